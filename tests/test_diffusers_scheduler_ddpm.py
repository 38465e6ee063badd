"""LazyScheduler on DDPM-style models (ε-, v- and x₀-prediction on discrete alphas_cumprod): which configs select
them, exactness on Gaussian latents, and li.sample's samples inside real DDPM, DDIM and Stable Diffusion
pipelines on tiny models, offline."""

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LatentConsistencyModelImg2ImgPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    UNetSpatioTemporalConditionModel,
)
from diffusers.models.unets.unet_2d import UNet2DOutput  # noqa: E402
from diffusers_support import UNET_CONFIG  # noqa: E402

import lazyinterp as li  # noqa: E402
from lazyinterp.diffusers import LazyScheduler, ddpm_model, ddpm_schedule  # noqa: E402

F64 = torch.float64

# One config per prediction type: ε on Stable Diffusion's scaled-linear betas (noisiest SNR 0.068, so the first
# instants of a lazy target are clamped to it), v on zero-terminal-SNR betas (SNR 0 at the start) and x₀ on
# DDPM's linear betas.
CONFIGS = {
    "epsilon": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon"),
    "v_prediction": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    "sample": dict(prediction_type="sample"),
}
# Stable Diffusion 1.x's scheduler_config.json as published: no prediction_type (ε by default).
SD_CONFIG_JSON = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}


def gaussian_output(x: torch.Tensor, timestep: torch.Tensor, sched, prediction_type: str, mean: float,
                    std: float) -> torch.Tensor:
    """The exact output of a DDPM network for X ~ N(mean, std² I) at the float timestep (index) it is given:
    with x = βX + αZ, η_X = μ + βσ²(x − βμ)/(β²σ² + α²) and η_Z = α(x − βμ)/(β²σ² + α²)."""
    t = (sched.num_train_timesteps - 1 - timestep.double().flatten()) / sched.num_train_timesteps
    t = t.expand(x.shape[0]).clamp(0.0, 1.0)
    a, b = (c.reshape(-1, *([1] * (x.ndim - 1))) for c in (sched.alpha(t), sched.beta(t)))
    xd = x.double()
    den = b * b * std**2 + a * a
    eta_x = mean + b * std**2 * (xd - b * mean) / den
    eta_z = a * (xd - b * mean) / den
    out = {"epsilon": eta_z, "sample": eta_x, "v_prediction": b * eta_z - a * eta_x}[prediction_type]
    return out.to(x.dtype)


def drive(scheduler: LazyScheduler, net, z: torch.Tensor, steps: int) -> torch.Tensor:
    """``scheduler`` stepped as a DDPM pipeline steps it, from latents ``z``."""
    scheduler.set_timesteps(steps)
    x = z.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t), t, x).prev_sample
    return x


# Configs ------------------------------------------------------------------------------------------------------------

def test_configs_say_whether_the_model_is_a_flow_or_a_ddpm_one():
    """diffusers drops config values left at their defaults before __init__, so a DDPMScheduler() config or
    Stable Diffusion's json (no prediction_type) used to reach LazyScheduler as a flow model and sample garbage.
    The prediction type is now read from the config as given."""
    for config, kind in [
        (DDPMScheduler().config, "epsilon"),
        (DDIMScheduler(prediction_type="v_prediction").config, "v_prediction"),
        (EulerDiscreteScheduler(prediction_type="sample").config, "sample"),
        (SD_CONFIG_JSON, "epsilon"),
        (PNDMScheduler.from_config(SD_CONFIG_JSON).config, "epsilon"),
    ]:
        sched = LazyScheduler.from_config(config)
        assert sched.config.prediction_type == kind and not sched._source.is_flow
    for config in (FlowMatchEulerDiscreteScheduler(shift=3.0).config,
                   DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                               flow_shift=3.0).config):
        sched = LazyScheduler.from_config(config)
        assert sched._source.is_flow and sched.shift == 3.0  # DPMSolver's and UniPC's flow_shift is the shift
    assert LazyScheduler.from_config(DDPMScheduler().config, prediction_type="v_prediction").config.prediction_type \
        == "v_prediction"
    with pytest.raises(ValueError, match="sigma_data: this is an EDM-preconditioned model's config"):
        LazyScheduler.from_config(EDMEulerScheduler().config)
    with pytest.raises(ValueError, match="prediction_type: expected one of epsilon, v_prediction, sample"):
        LazyScheduler(prediction_type="velocity")
    with pytest.raises(ValueError, match="beta_schedule: 'cubic' is not a beta schedule"):
        LazyScheduler(prediction_type="epsilon", beta_schedule="cubic")


@pytest.mark.parametrize("name", ["RePaintScheduler", "IPNDMScheduler", "ScoreSdeVeScheduler", "KarrasVeScheduler",
                                  "DDPMWuerstchenScheduler"])
def test_configs_of_other_model_kinds_are_refused(name):
    """A diffusers scheduler for another kind of model (RePaint's resampling, variance-exploding, Würstchen's cosine)
    has a config with no prediction type, which read as a flow model's and sampled garbage without a word. Its
    config in memory (no _class_name) and its json (with one) are refused, naming the config; a LazyScheduler's own
    config, which names no prediction type either, still reads as a flow model."""
    import diffusers

    native = getattr(diffusers, name)()
    with pytest.raises(ValueError, match="config: it names no prediction_type and is not a flow-matching config"):
        LazyScheduler.from_config(native.config)
    with pytest.raises(ValueError, match=f"config: {name} is for "):
        LazyScheduler.from_config({"_class_name": name, **native.config})
    assert LazyScheduler.from_config(LazyScheduler(schedule="linear").config)._source.is_flow
    if name == "RePaintScheduler":  # an ε model on DDPM betas, given the prediction type explicitly
        assert not LazyScheduler.from_config(native.config, prediction_type="epsilon")._source.is_flow
    with pytest.raises(ValueError, match="prediction_type: expected one of epsilon, v_prediction, sample, got "
                                         "'trigflow'"):
        LazyScheduler.from_config(diffusers.SCMScheduler().config)


def test_ddpm_config_round_trips(tmp_path):
    sched = LazyScheduler.from_config(SD_CONFIG_JSON, schedule="point-mass")
    sched.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "epsilon" and saved["beta_schedule"] == "scaled_linear"
    loaded = LazyScheduler.from_pretrained(tmp_path)
    assert not loaded._source.is_flow and loaded.config.schedule == "point-mass"
    torch.testing.assert_close(loaded._source.schedule.beta(torch.tensor([0.3], dtype=F64)),
                               sched._source.schedule.beta(torch.tensor([0.3], dtype=F64)), rtol=0, atol=0)


# Closed forms -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", list(CONFIGS))
def test_one_lazy_step_is_exact_on_gaussian_latents(prediction_type):
    """Gaussian latents N(μ, σ²I): the two probes read μ and σ exactly, and with them one lazy VP step (Euler, or
    AB2's first step) returns σZ + μ to rounding, for each prediction type; several steps stay exact up to the
    float32 timestep the network reads (the zero drift of the lazy schedule)."""
    config = CONFIGS[prediction_type]
    sched = ddpm_schedule(DDIMScheduler(**config).alphas_cumprod)
    z = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    for mean, std in ((0.7, 1.6), (-2.0, 0.3)):
        def net(x, t, mean=mean, std=std):
            return gaussian_output(x, t, sched, prediction_type, mean, std)

        for solver in (None, "euler"):
            scheduler = LazyScheduler(solver=solver, **config)
            out = drive(scheduler, net, z, 1)
            assert len(scheduler.timesteps) == 2  # the probes; with the mean known, t = 0 needs no evaluation
            torch.testing.assert_close(scheduler.estimated_sigma, torch.full((5,), std, dtype=F64), rtol=1e-12,
                                       atol=0)
            torch.testing.assert_close(scheduler.estimated_mean, torch.full_like(z, mean), rtol=0, atol=1e-12)
            torch.testing.assert_close(out, std * z + mean, rtol=0, atol=1e-12 * std)
            out = drive(LazyScheduler(solver=solver, **config), net, z, 4)
            torch.testing.assert_close(out, std * z + mean, rtol=0, atol=1e-6 * std)


def test_a_learned_variance_output_gives_its_first_channels():
    """A UNet with a learned variance returns 2C channels for C, and DDPMPipeline passes them to step as they are:
    the first C are the prediction (as ddpm_model reads them), so the run is still exact on Gaussian latents. A
    flow transformer's output must match the latents."""
    config = CONFIGS["epsilon"]
    sched = ddpm_schedule(DDIMScheduler(**config).alphas_cumprod)
    z = torch.randn(3, 2, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))

    def net(x, t):
        eps = gaussian_output(x, t, sched, "epsilon", 0.7, 1.6)
        return torch.cat([eps, torch.randn_like(eps)], dim=1)

    torch.testing.assert_close(drive(LazyScheduler(**config), net, z, 1), 1.6 * z + 0.7, rtol=0, atol=1e-12)
    flow = LazyScheduler(sigma=1.0)
    flow.set_timesteps(2)
    with pytest.raises(ValueError, match="model_output: shape"):
        flow.step(torch.zeros(3, 4, 4, 4), flow.timesteps[0], torch.zeros(3, 2, 4, 4))


def test_add_noise_is_ddpm_forward_process_at_the_given_index():
    """Custom timesteps are indices n, at ᾱ_n's SNR; the network sees exactly them, and add_noise there is
    DDPMScheduler's √ᾱ_n x₀ + √(1 − ᾱ_n) ε."""
    config = CONFIGS["epsilon"]
    scheduler = LazyScheduler(sigma=1.0, center=False, **config)
    scheduler.set_timesteps(timesteps=[999, 700, 420, 100, 5])
    assert scheduler.timesteps.tolist() == [999.0, 700.0, 420.0, 100.0, 5.0]
    x0, eps = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3)).unbind(0)
    for i, n in enumerate([999, 700, 420, 100, 5]):
        scheduler.set_begin_index(i)
        expected = DDPMScheduler(**config).add_noise(x0[None], eps[None], torch.tensor([n]))
        torch.testing.assert_close(scheduler.add_noise(x0[None], eps[None], torch.tensor([float(n)])), expected,
                                   rtol=0, atol=1e-6)
    # Noise levels √((1 − ᾱ)/ᾱ), as EulerDiscreteScheduler takes them, select the same nodes.
    abar = DDPMScheduler(**config).alphas_cumprod.double()
    scheduler.set_timesteps(sigmas=((1 - abar) / abar).sqrt()[[999, 700, 420, 100, 5]].tolist())
    torch.testing.assert_close(scheduler.timesteps, torch.tensor([999.0, 700.0, 420.0, 100.0, 5.0]), rtol=0,
                               atol=1e-3)
    # The noisiest index is the start: σ and E[X] are read there by default, and the first node is not evaluated.
    estimating = LazyScheduler(**config)
    estimating.set_timesteps(timesteps=[999, 500, 100])
    assert estimating.timesteps[2:].tolist() == [500.0, 100.0] and len(estimating.timesteps) == 4
    estimating.set_timesteps(sigmas=((1 - abar) / abar).sqrt()[[999, 500, 100]].tolist())
    assert estimating.timesteps[2:].tolist() == [500.0, 100.0]
    for bad, match in (([700, 999], "timesteps: expected indices in"), ([1000, 3], "timesteps: expected indices in")):
        with pytest.raises(ValueError, match=match):
            scheduler.set_timesteps(timesteps=bad)
    with pytest.raises(ValueError, match="sigmas: expected positive, finite, strictly decreasing noise levels"):
        scheduler.set_timesteps(sigmas=[3.0, 0.0])


# Pipelines ----------------------------------------------------------------------------------------------------------

class PerturbedGaussianUNet(UNet2DConditionModel):
    """A tiny conditional UNet's class and config whose output is the exact Gaussian one plus a small multiple of
    the random UNet's: a denoiser that is not Gaussian, smooth in the timestep (fed to the random part as n/100,
    whose sinusoidal embedding would otherwise oscillate every few indices)."""

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
        timestep = torch.as_tensor(timestep, dtype=torch.float32).flatten().expand(sample.shape[0])
        exact = gaussian_output(sample, timestep, self.lazy_schedule, self.prediction_type, 0.3, 0.8)
        noise = super().forward(sample, timestep / 100, encoder_hidden_states, return_dict=False)[0]
        return (exact + 0.2 * noise,)


def stable_diffusion(prediction_type: str, scheduler) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = PerturbedGaussianUNet(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                 out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                 norm_num_groups=2).eval()
    unet.lazy_schedule = ddpm_schedule(DDIMScheduler(**CONFIGS[prediction_type]).alphas_cumprod)
    unet.prediction_type = prediction_type
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("setting", [dict(), dict(solver="euler"), dict(solver="heun"), dict(solver="ab2-pc"),
                                     dict(solver="exponential-2m"), dict(schedule="point-mass")])
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_stable_diffusion_latents_equal_li_sample(prediction_type, setting, steps):
    """In StableDiffusionPipeline (a conditional UNet, prompt embeddings, output_type="latent") LazyScheduler's
    latents are li.sample's on ddpm_model of the same UNet, from the same initial latents, with the σ and E[X]
    the scheduler estimated for each sample (and, for the point-mass SDE, the noise seed it recorded)."""
    if setting.get("solver") == "ab2-pc" and steps == 1:
        pytest.skip("one step of ab2-pc is AB2's (Euler's) step")
    if setting.get("solver") == "exponential-2m" and steps == 1:
        pytest.skip("one exponential step from pure noise returns E[X] for every sample (and warns so)")
    base = DDIMScheduler(**CONFIGS[prediction_type], timestep_spacing="leading", steps_offset=1)
    pipe = stable_diffusion(prediction_type, LazyScheduler.from_config(base.config, **setting))
    embeds = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = pipe(prompt_embeds=embeds, num_inference_steps=steps, guidance_scale=1.0, height=64, width=64,
                   latents=z.clone(), output_type="latent", generator=torch.Generator().manual_seed(5)).images
    scheduler = pipe.scheduler
    kind = setting.get("schedule", "lazy-vp")
    for i in range(2):
        model = ddpm_model(pipe.unet, base, encoder_hidden_states=embeds[i: i + 1])
        target = li.SCHEDULES[kind](float(scheduler.estimated_sigma[i]))
        kw = {k: v for k, v in setting.items() if k != "schedule"}
        if kind == "point-mass":
            kw.update(shape=(1, 4, 8, 8), generator=scheduler.noise_seeds[0], indices=[i])
        else:
            kw["noise"] = z[i: i + 1]
        with torch.no_grad():
            ref = li.sample(model, steps=steps, schedule=target, center=scheduler.estimated_mean[i], **kw)
        torch.testing.assert_close(out[i: i + 1], ref, rtol=0, atol=2e-4)
    assert not torch.allclose(out[0], out[1])


def test_ddpm_and_ddim_pipelines_run_the_scheduler():
    """DDPMPipeline (a generator passed to step) and DDIMPipeline (eta and use_clipped_model_output passed to
    step) run it; DDIM's eta > 0 is refused with a pointer to the SDEs that keep the marginals."""
    torch.manual_seed(0)
    unet = UNet2DModel(**UNET_CONFIG).eval()
    sched = ddpm_schedule(DDPMScheduler().alphas_cumprod)

    class GaussianUNet(torch.nn.Module):
        """The exact ε of N(0.1, 0.3² I) pixels, called as DDPM pipelines call a UNet."""

        config, dtype, device = unet.config, torch.float32, torch.device("cpu")

        def forward(self, sample, timestep):
            t = torch.as_tensor(timestep, dtype=torch.float32).flatten()
            return UNet2DOutput(sample=gaussian_output(sample, t, sched, "epsilon", 0.1, 0.3))

    # The point-mass SDE with an Euler last step is exact in law on Gaussian data (the default denoising one
    # shrinks the spread at few steps).
    for settings in (dict(), dict(schedule="point-mass", last_step="euler"),
                     dict(sigma=0.3, center=False, solver="heun")):
        pipe = DDPMPipeline(unet=GaussianUNet(), scheduler=LazyScheduler.from_config(DDPMScheduler().config,
                                                                                       **settings))
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=64, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
        pixels = 2 * torch.as_tensor(images) - 1  # the pipeline's (x/2 + 1/2) clipped to [0, 1]
        assert abs(float(pixels.mean()) - 0.1) < 0.02 and abs(float(pixels.std()) - 0.3) < 0.02
    ddim = DDIMPipeline(unet=GaussianUNet(), scheduler=DDIMScheduler())
    ddim.scheduler = LazyScheduler.from_config(ddim.scheduler.config)
    ddim.set_progress_bar_config(disable=True)
    images = ddim(batch_size=4, num_inference_steps=1, eta=0.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (4, 8, 8, 1)
    assert math.isclose(float(ddim.scheduler.estimated_sigma[0]), 0.3, rel_tol=1e-5)
    with pytest.raises(ValueError, match="eta: DDIM's stochastic step is not taken here"):
        ddim(batch_size=1, num_inference_steps=2, eta=1.0, output_type="np")


def test_stable_diffusion_xl_runs_the_scheduler_with_guidance():
    """StableDiffusionXLPipeline (text-time conditioning, classifier-free guidance) runs it from an
    EulerDiscreteScheduler config: finite latents for 1 to 4 steps, every timestep evaluated once."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=80, cross_attention_dim=32,
                                norm_num_groups=2).eval()
    base = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=LazyScheduler.from_config(base.config))
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(float(args[1])))
    embeds, pooled = torch.randn(2, 5, 32), torch.randn(2, 32)
    for steps in range(1, 5):
        calls.clear()
        out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(embeds),
                   negative_pooled_prompt_embeds=torch.zeros_like(pooled), num_inference_steps=steps,
                   guidance_scale=5.0, height=64, width=64, output_type="latent").images
        assert out.shape == (2, 4, 8, 8) and bool(torch.isfinite(out).all())
        assert calls == pipe.scheduler.timesteps.tolist()


class PerturbedGaussianXLUNet(UNet2DConditionModel):
    """A tiny SDXL UNet's class and config whose output is the exact ε of N(0.3, 0.8² I) plus ``perturbation``
    times the random UNet's (read at timestep n/100, as in :class:`PerturbedGaussianUNet`)."""

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
        timestep = torch.as_tensor(timestep, dtype=torch.float32).flatten().expand(sample.shape[0])
        exact = gaussian_output(sample, timestep, self.lazy_schedule, "epsilon", 0.3, 0.8)
        if not self.perturbation:
            return (exact,)
        noise = super().forward(sample, timestep / 100, encoder_hidden_states, return_dict=False,
                                added_cond_kwargs=kwargs.get("added_cond_kwargs"))[0]
        return (exact + self.perturbation * noise,)


@pytest.mark.parametrize("perturbation,solver", [(0.0, None), (0.0, "euler"), (0.2, "euler")])
def test_an_sdxl_refiner_continues_the_base_run_with_its_moments(perturbation, solver):
    """SDXL's ensemble of experts: the base pipeline stops at denoising_end and the refiner (an image-to-image
    pipeline) goes on from denoising_start with the base's latents. The base read σ and E[X] with its probes; the
    refiner cannot (it starts part-way) and says so, but given them with set_moments it continues in the same lazy
    coordinates: on exact Gaussian latents the result is σZ + μ, and with Euler on a non-Gaussian UNet it is the
    full base run's."""
    torch.manual_seed(0)
    unet = PerturbedGaussianXLUNet(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                   out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                   use_linear_projection=True, addition_embed_type="text_time",
                                   addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                                   cross_attention_dim=32, norm_num_groups=2).eval()
    native = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    timestep_spacing="leading", steps_offset=1)
    unet.lazy_schedule, unet.perturbation = ddpm_schedule(native.alphas_cumprod), perturbation
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2).eval()
    parts = dict(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet)
    settings = {} if solver is None else {"solver": solver}
    base = StableDiffusionXLPipeline(scheduler=LazyScheduler.from_config(native.config, **settings), **parts)
    refiner = StableDiffusionXLImg2ImgPipeline(scheduler=LazyScheduler.from_config(native.config, **settings),
                                               requires_aesthetics_score=False, **parts)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    embeds, pooled = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2)), torch.randn(2, 32)
    args = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(embeds),
                negative_pooled_prompt_embeds=torch.zeros_like(pooled), guidance_scale=1.0, num_inference_steps=8,
                output_type="latent", original_size=(64, 64), target_size=(64, 64))  # the same time ids
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = base(latents=z.clone(), height=64, width=64, **args).images
        half = base(latents=z.clone(), height=64, width=64, denoising_end=0.5, **args).images
        with pytest.raises(ValueError, match="begin_index: this run opens with probes"):
            refiner(image=half, denoising_start=0.5, **args)
        refiner.scheduler.set_moments(base.scheduler.estimated_sigma, base.scheduler.estimated_mean)
        out = refiner(image=half, denoising_start=0.5, **args).images
    assert len(refiner.scheduler.timesteps) == 8  # no probes: every node, as the refiner's indices expect
    torch.testing.assert_close(refiner.scheduler.estimated_sigma, base.scheduler.estimated_sigma, rtol=0, atol=0)
    expected = 0.8 * z + 0.3 if perturbation == 0 else full
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)
    if perturbation:
        assert float((full - (0.8 * z + 0.3)).abs().max()) > 1e-2


def test_image_to_image_starts_from_add_noise_at_the_pipelines_node():
    """StableDiffusionImg2ImgPipeline (with σ given: the probes need a run from the start) begins at the node its
    strength picks, from add_noise's √ᾱ x₀ + √(1 − ᾱ) ε there, and evaluates the remaining nodes once each; with
    σ left to the scheduler it stops with a one-line error."""
    base = DDIMScheduler(**CONFIGS["epsilon"])
    pipe = stable_diffusion("epsilon", LazyScheduler.from_config(base.config, sigma=1.0))
    pipe = StableDiffusionImg2ImgPipeline(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.unet.register_forward_hook(lambda module, args, output: seen.append((float(args[1]), args[0].clone())))
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    embeds = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(2))
    out = pipe(prompt_embeds=embeds, image=image, strength=0.6, num_inference_steps=5, guidance_scale=1.0,
               output_type="latent", generator=torch.Generator().manual_seed(6)).images
    assert bool(torch.isfinite(out).all())
    assert [t for t, _ in seen] == pipe.scheduler.timesteps[2:].tolist()  # 5 − int(0.6 · 5) = 2 nodes skipped
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    # The node's index is fractional: ᾱ there is the schedule's, log-SNR linear between the integer indices.
    abar = float(ddpm_schedule(base.alphas_cumprod).beta(torch.tensor((999 - seen[0][0]) / 1000)) ** 2)
    start = math.sqrt(abar) * image + math.sqrt(1 - abar) * noise
    torch.testing.assert_close(seen[0][1], start, rtol=0, atol=1e-5)
    pipe.scheduler = LazyScheduler.from_config(base.config)
    with pytest.raises(ValueError, match="begin_index: this run opens with probes that read sigma"):
        pipe(prompt_embeds=embeds, image=image, strength=0.6, num_inference_steps=5, guidance_scale=1.0,
             output_type="latent")


class GaussianPixArt(PixArtTransformer2DModel):
    """A tiny PixArt transformer's class and config (ε and a learned variance, 8 output channels) whose ε is the
    exact one of N(0.3, 0.8² I) latents on DDPM's linear betas."""

    def forward(self, hidden_states, timestep=None, **kwargs):
        timestep = torch.as_tensor(timestep, dtype=torch.float32).flatten().expand(hidden_states.shape[0])
        eps = gaussian_output(hidden_states, timestep, self.lazy_schedule, "epsilon", 0.3, 0.8)
        return (torch.cat([eps, torch.randn_like(eps)], dim=1),)


@pytest.mark.parametrize("steps", [1, 4])
def test_pixart_sigma_pipeline_is_exact_on_gaussian_latents(steps):
    """PixArtSigmaPipeline (a DiT with learned variance, DPMSolver's ε config, classifier-free guidance with a
    null negative prompt): on exact Gaussian latents the probes read σ and E[X] and the lazy VP run returns
    σZ + μ, as in li.sample."""
    base = DPMSolverMultistepScheduler(prediction_type="epsilon")
    torch.manual_seed(0)
    transformer = GaussianPixArt(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=1, cross_attention_dim=16, sample_size=8, caption_channels=16,
                                 norm_num_groups=2).eval()
    transformer.lazy_schedule = ddpm_schedule(base.alphas_cumprod)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                               scheduler=LazyScheduler.from_config(base.config))
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = pipe(prompt_embeds=embeds, prompt_attention_mask=torch.ones(2, 6), negative_prompt=None,
                   negative_prompt_embeds=torch.zeros_like(embeds), negative_prompt_attention_mask=torch.ones(2, 6),
                   latents=z.clone(), num_inference_steps=steps, guidance_scale=4.5, height=64, width=64,
                   use_resolution_binning=False, output_type="latent").images
    torch.testing.assert_close(pipe.scheduler.estimated_sigma, torch.full((2,), 0.8, dtype=F64), rtol=1e-5, atol=0)
    torch.testing.assert_close(out, 0.8 * z + 0.3, rtol=0, atol=1e-5)


class GaussianCogVideoX(CogVideoXTransformer3DModel):
    """A tiny CogVideoX transformer's class and config whose v is the exact one of N(0.3, 0.8² I) video latents."""

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, **kwargs):
        timestep = torch.as_tensor(timestep, dtype=torch.float32).flatten().expand(hidden_states.shape[0])
        return (gaussian_output(hidden_states, timestep, self.lazy_schedule, "v_prediction", 0.3, 0.8),)


@pytest.mark.parametrize("native", [CogVideoXDDIMScheduler, CogVideoXDPMScheduler])
def test_cogvideox_pipeline_reads_the_shifted_snr_and_is_exact_on_gaussian_latents(native):
    """CogVideoX's schedulers shift ᾱ to ᾱ/(s + (1 − s) ᾱ) (``snr_shift_scale``, 3 for CogVideoX-2b) before the
    zero-SNR rescaling; LazyScheduler made from their config reads the v-prediction transformer at that SNR, so on
    exact Gaussian video latents (B, frames, C, H, W) under guidance the run returns σZ + μ."""
    base = native(snr_shift_scale=3.0, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                  beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    torch.manual_seed(0)
    transformer = GaussianCogVideoX(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                    time_embed_dim=4, text_embed_dim=16, num_layers=1, sample_width=8,
                                    sample_height=8, sample_frames=9, max_text_seq_length=6).eval()
    transformer.lazy_schedule = ddpm_schedule(base.alphas_cumprod)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                             scheduler=LazyScheduler.from_config(base.config))
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), latents=z.clone(),
                   num_inference_steps=4, guidance_scale=6.0, height=64, width=64, num_frames=9,
                   output_type="latent").frames
    assert pipe.scheduler.config.snr_shift_scale == 3.0
    torch.testing.assert_close(pipe.scheduler.estimated_sigma, torch.full((2,), 0.8, dtype=F64), rtol=1e-5, atol=0)
    torch.testing.assert_close(out, 0.8 * z + 0.3, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="snr_shift_scale: CogVideoX's SNR shift"):
        LazyScheduler(snr_shift_scale=3.0, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="snr_shift_scale: expected a positive finite number"):
        LazyScheduler(snr_shift_scale=0.0, prediction_type="epsilon")


def test_latent_consistency_pipeline_returns_the_final_sample():
    """LatentConsistencyModelPipeline passes original_inference_steps to set_timesteps and returns the
    pred_original_sample of the last step as its image: that is the run's final sample, so on exact Gaussian
    latents the image is σZ + μ. Its image-to-image pipeline passes strength to set_timesteps, which is refused
    below 1 with a pointer to set_begin_index."""
    base = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.manual_seed(0)
    unet = GaussianInpaintUNet(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                               out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                               norm_num_groups=2, time_cond_proj_dim=32).eval()
    unet.lazy_schedule = ddpm_schedule(base.alphas_cumprod)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2).eval()
    parts = dict(text_encoder=None, tokenizer=None, unet=unet, safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)
    pipe = LatentConsistencyModelPipeline(vae=None, scheduler=LazyScheduler.from_config(base.config), **parts)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    embeds = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = pipe(prompt_embeds=embeds, num_inference_steps=4, height=64, width=64, latents=z.clone(),
                   output_type="latent").images
    torch.testing.assert_close(out, 0.8 * z + 0.3, rtol=0, atol=1e-5)
    img2img = LatentConsistencyModelImg2ImgPipeline(vae=vae, scheduler=LazyScheduler.from_config(base.config),
                                                    **parts)
    img2img.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="strength: a part-way start is taken through set_begin_index"):
        img2img(prompt_embeds=embeds, image=torch.rand(2, 3, 16, 16), strength=0.5, num_inference_steps=4,
                output_type="latent")


class GaussianVideoUNet(UNetSpatioTemporalConditionModel):
    """A tiny SVD UNet's class and config whose output is the exact v of N(0.3, 0.8² I) video latents (the first
    four of its eight input channels; the rest carry the image's latents), read at the timestep ¼ ln σ."""

    def forward(self, sample, timestep, encoder_hidden_states=None, added_time_ids=None, return_dict=True):
        noise = torch.exp(4 * torch.as_tensor(timestep, dtype=F64).flatten()).reshape(-1, 1, 1, 1, 1)
        beta = 1 / torch.sqrt(1 + noise**2)
        x, alpha = sample[:, :, :4].double(), noise * beta
        den = beta**2 * 0.64 + alpha**2
        eta_x = 0.3 + beta * 0.64 * (x - beta * 0.3) / den
        eta_z = alpha * (x - beta * 0.3) / den
        return ((beta * eta_z - alpha * eta_x).to(sample.dtype),)


def test_stable_video_diffusion_reads_quarter_log_sigma_timesteps_and_is_exact_on_gaussian_latents():
    """Stable Video Diffusion's scheduler config (EulerDiscreteScheduler, v-prediction, timestep_type
    "continuous", σ from 0.002 to 700) describes a UNet whose timestep is ¼ ln σ, not an index. LazyScheduler
    made from it (in memory, and from the json, which names only what differs from the defaults) feeds the UNet
    ¼ ln σ within that range, and on exact Gaussian video latents returns σZ + μ. Custom timesteps, which would be
    indices, are refused."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = GaussianVideoUNet(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=8,
                             out_channels=4, down_block_types=("CrossAttnDownBlockSpatioTemporal",
                                                               "DownBlockSpatioTemporal"),
                             up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
                             cross_attention_dim=32, num_attention_heads=8, projection_class_embeddings_input_dim=96,
                             addition_time_embed_dim=32).eval()
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=1,
                                                             num_attention_heads=4, image_size=32,
                                                             intermediate_size=37, patch_size=1)).eval()
    vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                                       latent_channels=4).eval()
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                  timestep_type="continuous", sigma_min=0.002, sigma_max=700.0, use_karras_sigmas=True)
    json_config = {"_class_name": "EulerDiscreteScheduler", **config}
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    z = torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    seen = []
    unet.register_forward_hook(lambda module, args, output: seen.append(float(args[1])))
    for scheduler in (LazyScheduler.from_config(EulerDiscreteScheduler(**config).config),
                      LazyScheduler.from_config(json_config)):
        pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
                                            feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
        pipe.set_progress_bar_config(disable=True)
        seen.clear()
        with torch.no_grad():
            out = pipe(image, height=32, width=32, num_frames=3, num_inference_steps=4, latents=z.clone(),
                       output_type="latent", min_guidance_scale=2.0, max_guidance_scale=3.0).frames
        assert seen == pytest.approx(scheduler.timesteps.tolist(), abs=1e-6)
        assert 0.25 * math.log(0.002) - 1e-6 <= min(seen) and max(seen) <= 0.25 * math.log(700.0) + 1e-6
        # The probes sit at li.estimate_sigma's SNR 0.1: σ = 10, timestep ¼ ln 10.
        assert seen[0] == pytest.approx(0.25 * math.log(10.0), abs=1e-5)
        torch.testing.assert_close(scheduler.estimated_sigma, torch.full((1,), 0.8, dtype=F64), rtol=1e-5, atol=0)
        torch.testing.assert_close(out, 0.8 * z + 0.3, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="timesteps: a network on continuous noise levels"):
        scheduler.set_timesteps(timesteps=[999, 500])


class GaussianInpaintUNet(UNet2DConditionModel):
    """A tiny conditional UNet's class and config whose output is the exact ε of N(0.3, 0.8² I) latents, read from
    the first four input channels (an inpainting UNet's other five carry the mask and the masked image)."""

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
        timestep = torch.as_tensor(timestep, dtype=torch.float32).flatten().expand(sample.shape[0])
        return (gaussian_output(sample[:, :4], timestep, self.lazy_schedule, "epsilon", 0.3, 0.8),)


@pytest.mark.parametrize("in_channels", [4, 9])
@pytest.mark.parametrize("setting", [dict(), dict(solver="euler"), dict(solver="heun"), dict(schedule="point-mass")])
def test_inpainting_repaints_the_masked_region_as_text_to_image_does(in_channels, setting):
    """StableDiffusionInpaintPipeline with a real (tiny, random) VAE. A 4-channel UNet's pipeline blends
    add_noise(image) into the kept region after every step, the probes' included; a 9-channel one feeds the mask
    and the masked image's latents to the UNet. The network here is exact and acts on each latent on its own, so
    the probes still read σ and E[X] exactly from the inputs the network saw, and the repainted region is the
    text-to-image run's from the same initial latents (the whole image with 9 channels)."""
    base = DDIMScheduler(**CONFIGS["epsilon"])
    torch.manual_seed(0)
    unet = GaussianInpaintUNet(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=in_channels,
                               out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                               norm_num_groups=2).eval()
    unet.lazy_schedule = ddpm_schedule(base.alphas_cumprod)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2).eval()
    parts = dict(unet=unet, vae=vae, text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)
    inpaint = StableDiffusionInpaintPipeline(scheduler=LazyScheduler.from_config(base.config, **setting), **parts)
    plain = StableDiffusionPipeline(scheduler=LazyScheduler.from_config(base.config, **setting), **parts)
    embeds = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1  # repaint the right half: latent columns 4 and on (the VAE halves the size)
    common = dict(prompt_embeds=embeds, num_inference_steps=3, guidance_scale=1.0, height=16, width=16,
                  latents=z.clone(), output_type="latent")
    with torch.no_grad():
        out = inpaint(image=image, mask_image=mask, **common).images
        ref = plain(**common).images
    repainted = slice(4, None) if in_channels == 4 else slice(None)
    torch.testing.assert_close(out[..., repainted], ref[..., repainted], rtol=0, atol=1e-5)
    torch.testing.assert_close(inpaint.scheduler.estimated_sigma.double(), torch.full((2,), 0.8, dtype=F64),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(inpaint.scheduler.estimated_mean, torch.full_like(z, 0.3), rtol=0, atol=1e-5)


def test_a_run_that_opens_with_probes_cannot_start_mid_way():
    """Image-to-image pipelines index the timesteps by node; a point-mass run's probes would shift that silently,
    so starting such a run mid-way is an error that says what to pass."""
    scheduler = LazyScheduler(schedule="point-mass", sigma=1.0, **CONFIGS["epsilon"])
    scheduler.set_timesteps(5)
    assert len(scheduler.timesteps) == 7  # two probes, then every node (not centred: no known start)
    scheduler.set_begin_index(2)
    x = torch.randn(1, 3)
    with pytest.raises(ValueError, match="begin_index: this run opens with probes that read sigma"):
        scheduler.step(torch.zeros_like(x), scheduler.timesteps[2], x)


@pytest.mark.parametrize("steps", [1, 4])
def test_guided_stable_diffusion_latents_equal_li_sample_with_the_same_guidance(steps):
    """Under classifier-free guidance the pipeline combines u + w (c − u) before ``step``, and ddpm_model with the
    same ``guidance_scale`` and negative embeddings does the same inside li.sample: the latents agree."""
    base = DDIMScheduler(**CONFIGS["epsilon"])
    pipe = stable_diffusion("epsilon", LazyScheduler.from_config(base.config))
    embeds, negative = torch.randn(2, 2, 5, 32, generator=torch.Generator().manual_seed(2)).unbind(0)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=steps,
                   guidance_scale=5.0, height=64, width=64, latents=z.clone(), output_type="latent").images
    scheduler = pipe.scheduler
    for i in range(2):
        model = ddpm_model(pipe.unet, base, encoder_hidden_states=embeds[i: i + 1], guidance_scale=5.0,
                           negative_kwargs={"encoder_hidden_states": negative[i: i + 1]})
        with torch.no_grad():
            ref = li.sample(model, z[i: i + 1], steps=steps, schedule=li.lazy_vp(float(scheduler.estimated_sigma[i])),
                            center=scheduler.estimated_mean[i])
        torch.testing.assert_close(out[i: i + 1], ref, rtol=0, atol=2e-4)
    with torch.no_grad():  # the guidance is seen, by the probes too (one step evaluates nothing else)
        plain = pipe(prompt_embeds=embeds, num_inference_steps=steps, guidance_scale=1.0, height=64, width=64,
                     latents=z.clone(), output_type="latent").images
    assert float((plain - out).abs().max()) > 1e-2


def test_a_network_whose_probes_admit_no_sigma_falls_back_to_one_with_a_warning():
    """An ε network that always answers 0 reads η_X = x/β at the probes: slope 1/β_p, for which no σ exists
    (kβ_p = 1). The scheduler warns, naming the sample, uses σ = 1 and finishes with finite latents."""
    scheduler = LazyScheduler(**CONFIGS["epsilon"])
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="sigma: the model's response at the probes") as caught:
        out = drive(scheduler, lambda x, t: torch.zeros_like(x), z, 3)
    assert [str(w.message).split("for sample ")[1][0] for w in caught] == ["0", "1"]
    assert scheduler.estimated_sigma.tolist() == [1.0, 1.0] and bool(torch.isfinite(out).all())


def test_probes_read_the_latents_the_pipeline_actually_passed():
    """A pipeline that edits the latents it gets back (inpainting blends in the known region) changes the second
    probe's input; the moments are read from the inputs the network saw, so they stay exact on Gaussian data."""
    config = CONFIGS["epsilon"]
    sched = ddpm_schedule(DDIMScheduler(**config).alphas_cumprod)
    z = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    scheduler = LazyScheduler(**config)
    scheduler.set_timesteps(2)
    x = z.clone()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(gaussian_output(x, t, sched, "epsilon", 0.7, 1.6), t, x).prev_sample
        if i == 0:
            torch.testing.assert_close(x, -z, rtol=0, atol=0)  # the second probe, as returned
            x = -0.5 * z + 0.3  # as edited by the pipeline
    torch.testing.assert_close(scheduler.estimated_sigma, torch.full((4,), 1.6, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(scheduler.estimated_mean, torch.full_like(z, 0.7), rtol=0, atol=1e-12)
    torch.testing.assert_close(x, 1.6 * z + 0.7, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_no_diffusers_scheduler_with_alphas_cumprod_reads_as_a_flow_model():
    """Every diffusers scheduler that can be built with its defaults: LazyScheduler made from its config is refused
    with a ValueError, or is a DDPM-style model on that scheduler's own ᾱ, or (for one without ᾱ) a flow model. A
    scheduler with ᾱ read as a flow model samples garbage without a word, which is what this guards."""
    import inspect

    import diffusers

    kinds = {"refused": 0, "ddpm": 0, "flow": 0}
    for name in sorted(n for n in dir(diffusers) if n.endswith("Scheduler")):
        cls = getattr(diffusers, name)
        if not inspect.isclass(cls):
            continue
        try:
            native = cls()
        except (TypeError, ImportError):  # required arguments, or an optional dependency that is missing
            continue
        abar = getattr(native, "alphas_cumprod", None)
        try:
            scheduler = LazyScheduler.from_config(native.config)
        except ValueError:
            kinds["refused"] += 1
            continue
        if scheduler._source.is_flow:
            assert abar is None, name
            kinds["flow"] += 1
            continue
        n = torch.arange(len(abar) - 1, dtype=F64)
        got = scheduler._source.schedule.beta((len(abar) - 1 - n) / len(abar)) ** 2
        torch.testing.assert_close(got, abar.double()[:-1], rtol=1e-6, atol=0, msg=name)
        kinds["ddpm"] += 1
    assert kinds["refused"] >= 5 and kinds["ddpm"] >= 20 and kinds["flow"] >= 3, kinds


# Building diffusers' own Karras-type schedulers warns about numpy 2 in diffusers' code, thousands of times.
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_every_ddpm_family_config_gives_its_own_alphas_cumprod():
    """Each DDPM-family scheduler's default config, and a config naming only its class, give LazyScheduler that
    scheduler's ᾱ: Heun, KDPM2, LCM and TCD default to other betas than DDPM's, which diffusers would otherwise
    drop as defaults and replace with LazyScheduler's, and CogVideoX's schedulers shift the SNR by 3 by default."""
    import diffusers

    checked = []
    for name in sorted(LazyScheduler._compatibles):
        try:
            native = getattr(diffusers, name)()
        except ImportError:  # a scheduler whose optional dependency is missing (DPMSolverSDE needs torchsde)
            continue
        abar = getattr(native, "alphas_cumprod", None)
        if abar is None or "sigma_data" in native.config:
            continue
        for config in (native.config, {"_class_name": name}):
            scheduler = LazyScheduler.from_config(config)
            assert not scheduler._source.is_flow, name
            n = torch.arange(len(abar) - 1, dtype=F64)  # the noisiest index of a zero-SNR schedule is 0
            got = scheduler._source.schedule.beta((len(abar) - 1 - n) / len(abar)) ** 2
            torch.testing.assert_close(got, abar.double()[:-1], rtol=1e-6, atol=0, msg=name)
        checked.append(name)
    assert {"DDIMScheduler", "HeunDiscreteScheduler", "LCMScheduler", "TCDScheduler", "CogVideoXDDIMScheduler",
            "CogVideoXDPMScheduler"} <= set(checked)
    with pytest.raises(ValueError, match="sigma_data: this is an EDM-preconditioned model's config"):
        LazyScheduler.from_config({"_class_name": "EDMEulerScheduler"})
