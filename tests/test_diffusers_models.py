"""The diffusers model adapters: flow transformers and DDPM UNets as lazyinterp models, on tiny random models,
offline."""

import math
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
)
from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift as cogview4_shift  # noqa: E402
from diffusers_support import (
    OTHER_BASE,
    UNET_CONFIG,
    li_model,
    noise,
    other_pipeline,
    pack,
)

import lazyinterp as li  # noqa: E402
from lazyinterp.diffusers import (  # noqa: E402
    LazyScheduler,
    continuous_noise_schedule,
    ddpm_model,
    ddpm_schedule,
    flow_transformer_model,
    sigmas_to_grid,
)


def test_import_lazyinterp_does_not_import_diffusers():
    code = "import sys, lazyinterp; sys.exit('diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# Flow transformers --------------------------------------------------------------------------------------------------

def test_flux_adapter_packs_unpacked_latents(flux, embeds):
    """Unpacked (B, C, H, W) latents are packed for the call exactly as the pipeline packs them."""
    z = noise("flux")
    t = torch.tensor([0.3, 0.6])
    unpacked = li_model("flux", flux, embeds, packed=False).raw(z, t)
    packed = li_model("flux", flux, embeds).raw(pack(z), t)
    torch.testing.assert_close(pack(unpacked), packed, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="img_ids"):
        li_model("flux", flux, embeds, packed=False).raw(pack(z), t)


def test_covariance_matched_li_sample_on_a_transformer(sd3, embeds):
    """li.sample's covariance-matched lazy VP on an adapted transformer: Σ = σ²I is the scalar lazy VP(σ), and a
    low-rank Σ of latent samples gives finite latents of the input's shape and dtype, independent of the batch."""
    model = li_model("sd3", sd3, embeds, slice(0, 1))
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    isotropic = li.Covariance.from_matrix(0.7**2 * torch.eye(256), (4, 8, 8))
    with torch.no_grad():
        matched = li.sample(model, z, schedule=li.lazy_vp(0.7), covariance=isotropic, solver="euler", steps=3)
        scalar = li.sample(model, z, schedule=li.lazy_vp(0.7), solver="euler", steps=3)
        torch.testing.assert_close(matched, scalar, rtol=1e-5, atol=1e-5)
        latents = li.sample(model, torch.randn(24, 4, 8, 8, generator=torch.Generator().manual_seed(6)), steps=4,
                            schedule=li.lazy_vp(1.0))
        covariance = li.Covariance.from_samples(latents, rank=8)
        x = li.sample(model, z, schedule="lazy-vp", covariance=covariance, steps=3)
        halves = torch.cat([li.sample(model, part, schedule="lazy-vp", covariance=covariance, steps=3)
                            for part in z.split(2)])
    assert x.shape == z.shape and x.dtype == z.dtype and bool(torch.isfinite(x).all())
    assert not torch.allclose(x, scalar, atol=1e-3)
    torch.testing.assert_close(x, halves, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver", ["euler", None])
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_cogview4_latents_equal_li_sample_with_its_timestep_map(solver, steps):
    """CogView4 feeds its transformer the unshifted timesteps 1000 s while the latents sit at the shifted
    σ = μ/(μ + 1/s − 1): li.sample on the adapter with that map as ``timestep_fn`` gives the pipeline's latents."""
    scheduler = LazyScheduler.from_config(OTHER_BASE["cogview4"]().config, schedule="lazy-vp", sigma=0.8,
                                          solver=solver)
    pipe, args = other_pipeline("cogview4", scheduler)
    with torch.no_grad():
        out = pipe(num_inference_steps=steps, **args).images
    mu = cogview4_shift(4, 256, 0.25, 0.75)  # 32×32 pixels: 4×4 latents, 2×2 patches
    size = torch.tensor([[32.0, 32.0]])
    model = flow_transformer_model(pipe.transformer, encoder_hidden_states=args["prompt_embeds"], original_size=size,
                                   target_size=size, crop_coords=torch.zeros(1, 2),
                                   timestep_fn=lambda sigma: 1000 * sigma / (sigma + mu * (1 - sigma)))
    z = args["latents"]
    mean = model.eta(z, 0.0)[1]
    with torch.no_grad():
        ref = li.sample(li.CenteredModel(model, mean), z, grid=scheduler.grid, schedule=scheduler._target,
                        solver=solver, center=False)
    torch.testing.assert_close(out, ref + mean, rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match="timestep_fn, timestep_scale: give one of them"):
        flow_transformer_model(pipe.transformer, timestep_fn=lambda s: s, timestep_scale=1.0)
    with pytest.raises(TypeError, match="timestep_fn: expected a function of sigma, got float"):
        flow_transformer_model(pipe.transformer, timestep_fn=1000.0)


# DDPM UNets ---------------------------------------------------------------------------------------------------------

class SpyUNet(torch.nn.Module):
    """Records the timesteps and labels it is called with; predicts (α_n x) for the ᾱ it is given."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.abar = alphas_cumprod.double()
        self.calls = []

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        self.calls.append((timestep.clone(), class_labels))
        return (0.5 * sample,)


@pytest.mark.parametrize("kind", ["noise", "data", "velocity"])
def test_one_lazy_euler_step_is_exact_for_a_ddpm_network(kind):
    """Under a DDPM schedule β_0 = √ᾱ_{T−1} > 0, so η_X(0, x) is not E[X]; σ and E[X] still come out exact
    (li.estimate_moments), and one lazy VP Euler step maps Z to σZ + μ on Gaussian data."""
    z = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for scheduler in (DDIMScheduler(), DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                     beta_end=0.012)):
        sched = ddpm_schedule(scheduler.alphas_cumprod)
        assert float(sched.beta(0.0)) > 0
        for sigma, mean in ((1.0, 0.0), (0.5, 2.0), (5.5, 1.0)):
            g = li.GaussianMixture.gaussian(torch.full((4,), mean, dtype=torch.float64),
                                            torch.tensor(sigma**2, dtype=torch.float64))
            out = li.sample(g.model(sched, kind), z, steps=1, schedule="lazy-vp", solver="euler")
            torch.testing.assert_close(out, sigma * z + mean, rtol=0, atol=1e-10 * sigma)


def test_ddpm_schedule_nodes_timesteps_and_clean_end():
    """Index n sits at t = (T − 1 − n)/T with ᾱ_n exactly; the UNet gets timestep n; α = 0 at t = 1; zero-terminal
    SNR gives β = 0 at t = 0; r⁻¹ is exact."""
    for scheduler in (DDIMScheduler(), DDIMScheduler(beta_schedule="squaredcos_cap_v2"),
                      DDIMScheduler(rescale_betas_zero_snr=True)):
        abar = scheduler.alphas_cumprod.double()
        sched = ddpm_schedule(abar)
        n = torch.arange(1000, dtype=torch.float64)
        t = (999 - n) / 1000
        torch.testing.assert_close(sched.beta(t) ** 2, abar, rtol=0, atol=1e-14)
        assert float(sched.alpha(1.0)) == 0.0 and float(sched.beta(1.0)) == 1.0
        assert (float(sched.beta(0.0)) == 0.0) == bool(abar[-1] == 0)
        tt = torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(sched.snr_inverse(sched.snr(tt)), tt, rtol=0, atol=1e-12)
        assert bool((torch.diff(sched.snr(torch.linspace(0, 1, 20001, dtype=torch.float64)[1:-1])) > 0).all())
        h = 1e-7
        inner = tt.clamp(0.01, 0.99) + 0.3 / 1000  # away from the nodes, where α̇ and β̇ jump
        torch.testing.assert_close(sched.dbeta(inner), (sched.beta(inner + h) - sched.beta(inner - h)) / (2 * h),
                                   rtol=1e-5, atol=1e-7)
    spy = SpyUNet(DDIMScheduler().alphas_cumprod)
    model = ddpm_model(spy, DDIMScheduler(), class_labels=torch.tensor([3]))
    x = torch.randn(2, 1, 4, 4)
    model.raw(x, torch.tensor([0.0, 0.5], dtype=torch.float64))
    model.eta(x, 1.0)  # the clean end: the network is not asked beyond index 0
    (first, labels), (last, _) = spy.calls
    torch.testing.assert_close(first, torch.tensor([999.0, 499.0]))
    torch.testing.assert_close(last, torch.tensor([0.0, 0.0]))
    assert labels.tolist() == [3, 3]


# Stable Video Diffusion's scheduler: a v-prediction UNet on continuous noise levels, timestep ¼ ln σ.
SVD_EULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                 timestep_type="continuous", sigma_min=0.002, sigma_max=700.0, use_karras_sigmas=True)


def test_continuous_noise_schedule_is_log_linear_in_sigma_with_quarter_log_timesteps():
    """σ(t) = α/β runs log-linearly from sigma_max at t = 0 to sigma_min at index 0, the timestep is ¼ ln σ(t)
    (held at the ends of the range), and time_of_timestep inverts it; r⁻¹ is exact."""
    sched = continuous_noise_schedule(0.002, 700.0)
    t = torch.linspace(0, 0.999, 1001, dtype=torch.float64)
    sigma = sched.alpha(t) / sched.beta(t)
    expected = torch.exp(math.log(700.0) + (math.log(0.002) - math.log(700.0)) * t / 0.999)
    torch.testing.assert_close(sigma, expected, rtol=1e-10, atol=0)  # α = √(1 − ᾱ) near ᾱ = 1
    torch.testing.assert_close(sched.timestep(t), 0.25 * torch.log(expected), rtol=0, atol=1e-12)
    torch.testing.assert_close(sched.time_of_timestep(sched.timestep(t)), t, rtol=0, atol=1e-12)
    torch.testing.assert_close(sched.timestep(torch.tensor([1.0], dtype=torch.float64)),
                               torch.tensor([0.25 * math.log(0.002)], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(sched.snr_inverse(sched.snr(t)), t, rtol=0, atol=1e-10)
    for low, high in ((0.0, 1.0), (2.0, 1.0), (math.nan, 1.0)):
        with pytest.raises(ValueError, match="sigma_m"):
            continuous_noise_schedule(low, high)


def test_ddpm_model_on_continuous_timesteps_feeds_quarter_log_sigma_and_one_lazy_step_is_exact():
    """ddpm_model of an EulerDiscreteScheduler with timestep_type="continuous" (v-prediction, SVD) calls the
    network with ¼ ln σ; for the exact v of N(μ, s² I) one lazy VP Euler step maps Z to sZ + μ."""
    mean, std = 0.3, 0.8
    seen = []

    def net(x, c_noise, return_dict=False):
        seen.append(c_noise.clone())
        sig = torch.exp(4 * c_noise.double()).reshape(-1, *([1] * (x.ndim - 1)))
        b = 1 / torch.sqrt(1 + sig**2)
        a = sig * b
        xd = x.double()
        den = b * b * std**2 + a * a
        eta_x = mean + b * std**2 * (xd - b * mean) / den
        eta_z = a * (xd - b * mean) / den
        return ((b * eta_z - a * eta_x).to(x.dtype),)

    model = ddpm_model(net, EulerDiscreteScheduler(**SVD_EULER))
    z = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = li.sample(model, z, steps=1, schedule="lazy-vp", solver="euler")
    torch.testing.assert_close(out, std * z + mean, rtol=0, atol=1e-6)
    c_noise = torch.cat(seen)
    assert float(c_noise.min()) >= 0.25 * math.log(0.002) - 1e-6 and float(c_noise.max()) <= 0.25 * math.log(700) + 1e-6
    model.raw(z, torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(seen[-1], torch.full((6,), 0.25 * math.log(700.0)), rtol=0, atol=1e-5)


def test_adapters_name_arguments_of_the_wrong_type():
    for bad in (None, "0.9", object()):
        with pytest.raises(TypeError, match="alphas_cumprod: expected a 1-D sequence of numbers"):
            ddpm_schedule(bad)
    with pytest.raises(ValueError, match="alphas_cumprod: values must lie in"):
        ddpm_schedule([0.9, 1.2, 0.1])
    for bad in (True, "1.0, 0.5"):
        with pytest.raises(TypeError, match="sigmas: expected a 1-D sequence of numbers"):
            sigmas_to_grid(bad, "linear")
    for bad in (True, math.nan, "2"):
        with pytest.raises(ValueError, match="guidance_scale: expected a finite number"):
            flow_transformer_model(torch.nn.Linear(2, 2), guidance_scale=bad)


class GaussianishUNet(torch.nn.Module):
    """ε = α_n x + s β_n u(x, n): the exact ε of N(0, I) data plus a perturbation by a random UNet u.

    A random UNet alone is not a denoiser: its ε is unrelated to x, so the ODE (x/√ᾱ from 157·Z at index 999)
    ends as a small difference of huge terms. The exact Gaussian part keeps samples O(1), and β_n keeps the
    perturbation from dominating at high noise. A random UNet's sinusoidal timestep embedding also oscillates
    with a period of about 6 timesteps, which no ODE solver resolves (DDIM aliases it at integer timesteps);
    trained UNets are smooth in the timestep, so the random one is fed n/100.
    """

    def __init__(self, unet, alphas_cumprod, prediction_type, scale=1.0):
        super().__init__()
        self.unet, self.prediction_type, self.scale = unet, prediction_type, scale
        self.sched = ddpm_schedule(alphas_cumprod)

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        t = (999 - timestep.double()) / 1000
        a, b = (c.float().reshape(-1, 1, 1, 1) for c in (self.sched.alpha(t), self.sched.beta(t)))
        u = self.unet(sample, timestep / 100).sample
        eps = a * sample + self.scale * b * u
        if self.prediction_type == "v_prediction":
            return (b * eps - a * (b * sample - self.scale * a * u),)
        return (eps,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_unet_on_a_lazy_schedule_agrees_with_ddim(prediction_type):
    """A DDPM UNet sampled through the exact conversion (Heun, 50 steps) agrees with DDIM (η = 0) on its native
    schedule in the many-step limit.

    DDIM is first order: DDIM(125) and DDIM(250) differ by about 1e-2, so the comparison is with the Richardson
    combination 2·DDIM(250) − DDIM(125), which cancels the leading error (it agrees with 2·DDIM(1000) − DDIM(500)
    to 3e-4). Heun at 50 steps is within 1e-3 of it; the tolerance 3e-3 is a quarter of DDIM(250)'s own error.

    ε-prediction uses linear betas, whose noisiest index is not pure noise (SNR √ᾱ/√(1 − ᾱ) ≈ 6e-3), so the target
    is lazy VP restricted to the model's SNR range, α = cos θ, β = sin θ with θ from atan(r_0) to π/2 (still
    lazy: α² + β² = 1); a zero-SNR start would clamp the matched time below r_0. v-prediction uses
    zero-terminal-SNR betas (full SNR range), so the target is li.lazy_vp(1) itself.
    """
    zero_snr = prediction_type == "v_prediction"
    ddim_config = dict(clip_sample=False, timestep_spacing="trailing", prediction_type=prediction_type,
                       rescale_betas_zero_snr=zero_snr)
    native = DDIMScheduler(**ddim_config)
    torch.manual_seed(0)
    unet = UNet2DModel(**UNET_CONFIG).eval()
    net = GaussianishUNet(unet, native.alphas_cumprod, prediction_type)
    z = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def ddim(steps):
        sched = DDIMScheduler(**ddim_config)
        sched.set_timesteps(steps)
        x = z.clone()
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(net(x, t.expand(1).float())[0], t, x).prev_sample
        return x

    coarse, fine = ddim(125), ddim(250)
    reference = 2 * fine - coarse
    assert float((fine - reference).abs().max()) > 4e-3  # DDIM(250) alone is not converged

    model = ddpm_model(net, native)
    if zero_snr:
        target = li.lazy_vp(1.0)
    else:
        theta0 = math.atan(float(model.schedule.snr(0.0)))
        h = math.pi / 2 - theta0
        target = li.Schedule(lambda t: torch.sin(h * (1 - t)), lambda t: torch.sin(theta0 + h * t),
                             name="lazy-vp on the model's SNR range", check=False)
    # li.sample starts at α'_0·noise; DDIM starts at z.
    out = li.sample(model, z / float(target.alpha(0.0)), steps=50, schedule=target, solver="heun", center=False)
    torch.testing.assert_close(out, reference, rtol=0, atol=3e-3)
