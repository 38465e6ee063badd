"""LazyScheduler: against li.sample and the diffusers schedulers it replaces, inside SD3, FLUX, CogView4, Wan and
Qwen-Image pipelines on tiny random models, offline."""

import inspect
import math
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import make_mixture

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FluxImg2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)
from diffusers_support import (
    BATCH,
    FLUX_CONFIG,
    OTHER_BASE,
    SD3_CONFIG,
    SIZE,
    ExactFlux,
    ExactSD3,
    base_scheduler,
    exact,
    exact_output,
    layout,
    lazy,
    li_model,
    noise,
    other_pipeline,
    pipeline,
    random_covariance,
    run,
)

import lazyinterp as li  # noqa: E402
from lazyinterp.diffusers import (  # noqa: E402
    LazyScheduler,
    ddpm_schedule,
    grid_to_sigmas,
    sigmas_to_grid,
)
from lazyinterp.samplers import PC_DEFAULT_FROM_STEPS  # noqa: E402

# The scheduler against li.sample -----------------------------------------------------------------------------------

CONFIGS = {
    "lazy-vp euler": dict(schedule="lazy-vp", sigma=0.8, solver="euler"),
    "lazy-vp default (ab2)": dict(schedule="lazy-vp", sigma=0.6),
    "lazy-vp ab2-pc": dict(schedule="lazy-vp", sigma=0.7, solver="ab2-pc"),
    "lazy-vp heun": dict(schedule="lazy-vp", sigma=1.0, solver="heun"),
    "cosine sde heun": dict(schedule="cosine", diffusion=0.5, solver="heun"),
    "point-mass sde default (ab2)": dict(schedule="point-mass", sigma=0.7, diffusion="optimal"),
    "point-mass sde exponential": dict(schedule="point-mass", sigma=0.7, diffusion="optimal", solver="exponential"),
    "point-mass sde euler": dict(schedule="point-mass", sigma=0.7, diffusion="optimal", solver="euler"),
    "cosine sde exponential": dict(schedule="cosine", diffusion=0.5, solver="exponential"),
    "point-mass sde exponential-2m": dict(schedule="point-mass", sigma=0.7, diffusion="optimal",
                                          solver="exponential-2m"),
    "point-mass kappa 2 default (exponential-2m)": dict(schedule="point-mass", sigma=0.7, diffusion=2.0),
    "lazy-vp exponential": dict(schedule="lazy-vp", sigma=0.9, solver="exponential"),
    "point-mass sde default (ab2), brownian": dict(schedule="point-mass", sigma=0.7, diffusion="optimal",
                                                    sde_noise="brownian"),
    "cosine sde exponential-2m, brownian": dict(schedule="cosine", diffusion=0.5, solver="exponential-2m",
                                                sde_noise="brownian"),
    "point-mass sde default (ab2), keyed": dict(schedule="point-mass", sigma=0.7, diffusion="optimal",
                                                sde_noise="keyed"),
    "cosine sde exponential-2m, keyed": dict(schedule="cosine", diffusion=0.5, solver="exponential-2m",
                                             sde_noise="keyed"),
}


@pytest.mark.filterwarnings("ignore:solver. one exponential")  # asked for on purpose: the run returns E[X]
@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 5, 8])
def test_pipeline_latents_equal_li_sample(kind, name, steps, sd3, flux, embeds):
    """In SD3 and FLUX pipelines, for 1 to 8 steps, the latents are li.sample's on the same transformer and noise
    (the pipeline's SNR-matched grid; each sample's mean E[X] from its first evaluation; SDE noise from the seeds
    the scheduler derived from the initial latents). Where no solver is given, both use their default."""
    config = CONFIGS[name]
    transformer = sd3 if kind == "sd3" else flux
    scheduler = lazy(kind, **config)
    point_mass = config["schedule"] == "point-mass"
    # At a point-mass start li.sample calls the network on 0; give the pipeline 0 so the first call agrees.
    z = torch.zeros_like(noise(kind)) if point_mass else noise(kind)
    out = run(kind, pipeline(kind, transformer, scheduler), embeds, z, steps)
    z = layout(kind, z)
    assert scheduler.step_index == len(scheduler.timesteps)
    expected_evals = steps * (2 if config.get("solver") == "heun" else 1)
    # An SDE's default last step denoises (one evaluation, not Heun's two), except in a one-step run.
    expected_evals -= 1 if config.get("solver") == "heun" and config.get("diffusion", "ode") != "ode" \
        and steps > 1 else 0
    assert len(scheduler.timesteps) == expected_evals

    target = scheduler._target
    diffusion = config.get("diffusion", "ode")
    for i in range(BATCH):
        model = li_model(kind, transformer, embeds, slice(i, i + 1))
        zi = z[i : i + 1]
        predictor, mean = model, 0.0
        if isinstance(target, li.LazySchedule):
            mean = model.eta(zi, 0.0)[1]
            predictor = li.CenteredModel(model, mean)
        kwargs = dict(grid=scheduler.grid, schedule=target, diffusion=diffusion, solver=config.get("solver"),
                      center=False)
        if diffusion != "ode":
            kwargs.update(generator=scheduler.noise_seeds[i], indices=[i],
                          sde_noise=config.get("sde_noise", "independent"))
        ref = li.sample(predictor, shape=tuple(zi.shape), **kwargs) if point_mass else \
            li.sample(predictor, zi, **kwargs)
        torch.testing.assert_close(out[i : i + 1], ref + mean, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_linear_euler_reproduces_flow_match_euler(kind, steps, sd3, flux, embeds):
    """schedule="linear" with ODE Euler on the same sigmas is FlowMatchEulerDiscreteScheduler (SD3's static shift,
    FLUX's dynamic shift with mu)."""
    transformer = sd3 if kind == "sd3" else flux
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist()
    base = base_scheduler(kind)
    ref = run(kind, pipeline(kind, transformer, base), embeds, noise(kind), steps, sigmas=sigmas)
    ours = lazy(kind, schedule="linear", diffusion="ode")
    out = run(kind, pipeline(kind, transformer, ours), embeds, noise(kind), steps, sigmas=sigmas)
    torch.testing.assert_close(ours.timesteps, base.timesteps)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_heun_with_denoise_last_step_reproduces_flow_match_heun():
    """linear + Heun + last_step="denoise" interleaves and steps as FlowMatchHeunDiscreteScheduler."""
    def velocity_output(x, t):  # a smooth nonlinear ε − x_data
        s = (t / 1000).reshape(-1, 1)
        return torch.tanh(x) * (1 + s) - 0.3 * x * s

    heun = FlowMatchHeunDiscreteScheduler(shift=3.0)
    heun.set_timesteps(4)
    ours = LazyScheduler(schedule="linear", solver="heun", last_step="denoise")
    ours.set_timesteps(sigmas=heun.sigmas[:-1:2].tolist())
    torch.testing.assert_close(ours.timesteps, heun.timesteps)
    z = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    outs = []
    for sched in (heun, ours):
        x = z.clone()
        for t in sched.timesteps:
            x = sched.step(velocity_output(x, t.expand(3)), t, x).prev_sample
        outs.append(x)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


# Two-step Adams–Bashforth ------------------------------------------------------------------------------------------

# Dyadic, so exact through FlowMatchEulerDiscreteScheduler's float32 shifting (shift 1): the scheduler's model
# times are then exactly 1 − σ_k, and the driver below can evaluate the exact model there.
DYADIC_SIGMAS = [1.0, 0.875, 0.625, 0.375, 0.25, 0.125]


def drive(scheduler: LazyScheduler, mixture: li.GaussianMixture, z: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """``scheduler`` stepped as a pipeline steps it, on the exact flow model of ``mixture``, from latents ``z``.

    The output ε − x_data = −v is evaluated at the float64 model time τ_k = 1 − σ_k of each node rather than at
    the float32 timestep, which would cost 1e-7. An entry that is no node is the σ probe; there τ is read from
    the float32 timestep, as the scheduler reads it.
    """
    scheduler.set_timesteps(sigmas=sigmas)
    x, node = z.clone(), 0
    for t in scheduler.timesteps:
        s = float(t) / scheduler.config.num_train_timesteps
        if node < len(sigmas) and abs(s - sigmas[node]) < 1e-6:
            tau, node = 1 - sigmas[node], node + 1
        else:
            tau = 1 - s
        x = scheduler.step(-mixture.predict(x, tau, "linear"), t, x).prev_sample
    return x


@pytest.mark.parametrize("solver", ["ab2", "ab2-pc"])
@pytest.mark.parametrize("sigma", [0.8, None])
@pytest.mark.parametrize("last_step", [None, "denoise"])
def test_multistep_steps_equal_li_sample_on_a_mixture(mixture, solver, sigma, last_step):
    """Stepped with the exact mixture velocity in float64, ab2 and ab2-pc are li.sample with the same solver on
    the same grid to 1e-10, with either last step, and differ from the one-step method below them (Euler, AB2).
    With sigma=None every sample has its own σ, grid and step ratios ρ."""
    z = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scheduler = LazyScheduler(schedule="lazy-vp", sigma=sigma, solver=solver, last_step=last_step)
    out = drive(scheduler, mixture, z, DYADIC_SIGMAS)
    assert scheduler.step_index == len(scheduler.timesteps) == len(DYADIC_SIGMAS) + (sigma is None)
    sigmas = [sigma] * len(z) if sigma is not None else scheduler.estimated_sigma.tolist()
    if sigma is None:
        assert max(sigmas) - min(sigmas) > 0.1
    # The scheduler's E[X] is η_X at σ = 1, which is the mixture's mean exactly.
    model = li.CenteredModel(mixture.model("linear"), mixture.mean)
    for i, s in enumerate(sigmas):
        target = li.lazy_vp(s)
        ref = li.sample(model, z[i : i + 1], schedule=target, grid=sigmas_to_grid(DYADIC_SIGMAS, target),
                        solver=solver, last_step=last_step, center=False)
        torch.testing.assert_close(out[i : i + 1], ref + mixture.mean, rtol=0, atol=1e-10)
        lower = li.sample(model, z[i : i + 1], schedule=target, grid=sigmas_to_grid(DYADIC_SIGMAS, target),
                          solver="euler" if solver == "ab2" else "ab2", last_step=last_step, center=False)
        assert float((out[i : i + 1] - lower - mixture.mean).abs().max()) > 1e-4


@pytest.fixture(scope="module")
def flow_map():
    """Latents and their image under the mixture's probability-flow map, which every exactly converted ODE
    shares: linear-schedule Heun with 512 steps, within 2e-5 of 256 steps."""
    mixture = make_mixture()
    z = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = li.sample(mixture.model("linear"), z, schedule="linear", solver="heun", steps=512)
    coarser = li.sample(mixture.model("linear"), z, schedule="linear", solver="heun", steps=256)
    assert float((reference - coarser).norm(dim=1).pow(2).mean().sqrt()) < 1e-4
    return mixture, z, reference


@pytest.mark.parametrize("steps", [8, 16])
def test_multistep_beats_euler_at_equal_nfe_on_a_mixture(flow_map, steps):
    """Lazy VP (σ² = tr Cov/D) on the pipelines' default sigmas linspace(1, 1/N, N), N evaluations each: ab2's
    RMS error against the flow map is under half of Euler's (measured: 0.033 vs 0.087 at 8, 0.010 vs 0.069 at
    16; at 2 or 3 steps the two are alike), and ab2-pc's under 0.7 of ab2's (measured: 0.015 vs 0.033 at 8,
    0.0047 vs 0.010 at 16)."""
    mixture, z, reference = flow_map
    sigma = math.sqrt(float(torch.trace(mixture.cov)) / mixture.dim)
    sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).tolist()
    errors = {}
    for solver in ("euler", "ab2", "ab2-pc"):
        scheduler = LazyScheduler(schedule="lazy-vp", sigma=sigma, solver=solver)
        out = drive(scheduler, mixture, z, sigmas)
        assert len(scheduler.timesteps) == steps
        errors[solver] = float((out - reference).norm(dim=1).pow(2).mean().sqrt())
    assert errors["ab2"] < 0.5 * errors["euler"], errors
    assert errors["ab2-pc"] < 0.7 * errors["ab2"], errors


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_ab2_in_a_pipeline_evaluates_the_transformer_once_per_step(kind, sd3, flux, embeds):
    """A tiny random SD3 or FLUX pipeline runs with ab2, one transformer call per step, and does not end where
    Euler does (its equality with li.sample in pipelines is in test_pipeline_latents_equal_li_sample)."""
    transformer = sd3 if kind == "sd3" else flux
    steps = 5
    calls = []
    handle = transformer.register_forward_pre_hook(lambda module, args: calls.append(None))
    try:
        scheduler = lazy(kind, schedule="lazy-vp", sigma=1.0, solver="ab2")
        out = run(kind, pipeline(kind, transformer, scheduler), embeds, noise(kind), steps)
        nfe = len(calls)
        euler = run(kind, pipeline(kind, transformer, lazy(kind, schedule="lazy-vp", sigma=1.0, solver="euler")),
                    embeds, noise(kind), steps)
    finally:
        handle.remove()
    assert nfe == steps == len(scheduler.timesteps) == scheduler.step_index
    assert scheduler.order == 1
    assert bool(torch.isfinite(out).all())
    assert float((out - euler).abs().max()) > 1e-3


def test_ab2_pc_with_an_sde_raises():
    """ab2-pc is an ODE solver, in the scheduler as in li.sample (ab2 takes an SDE, with Euler–Maruyama's noise)."""
    for schedule, diffusion in (("lazy-vp", "optimal"), ("cosine", 0.5), ("point-mass", "optimal")):
        with pytest.raises(ValueError, match="solver: ab2-pc is an ODE solver"):
            LazyScheduler(schedule=schedule, sigma=1.0 if schedule != "cosine" else None, diffusion=diffusion,
                          solver="ab2-pc")
    with pytest.raises(ValueError, match="solver: ab2-pc is an ODE solver"):
        li.sample(li.Model(lambda x, t: -x, "linear", "velocity"), torch.zeros(1, 2), schedule="cosine",
                  diffusion=0.5, solver="ab2-pc")


def test_default_solver_is_li_samples_and_stays_a_default_in_the_config(tmp_path):
    """ab2 for an ODE on a lazy schedule and for the point mass with ε*, exponential-2m for any other SDE with
    ε = κ ε*, else Euler, as li.sample.
    The config keeps solver=None for the default, so a reloaded or re-targeted config takes its own schedule's
    default; an explicit solver is kept."""
    defaults = {("lazy-vp", "ode"): "ab2", ("lazy-vp", "optimal"): "exponential-2m",
                ("point-mass", "optimal"): "ab2", ("point-mass", 1.0): "ab2", ("point-mass", 2.0): "exponential-2m",
                ("cosine", "ode"): "euler", ("linear", "ode"): "euler",
                ("vp", 1.0): "exponential-2m", ("vp", lambda t: 0.1): "euler"}
    for (schedule, diffusion), solver in defaults.items():
        assert LazyScheduler(schedule=schedule, diffusion=diffusion).solver == solver, (schedule, diffusion)
    sched = lazy("sd3", schedule="lazy-vp", sigma=1.0)
    assert sched.solver == "ab2" and sched.config.solver is None
    assert LazyScheduler.from_config(sched.config).solver == "ab2"
    assert LazyScheduler.from_config(sched.config, diffusion="optimal").solver == "exponential-2m"
    sched.save_config(tmp_path / "default")
    config = LazyScheduler.load_config(tmp_path / "default")
    assert config["solver"] is None
    assert LazyScheduler.from_config(config).solver == "ab2"
    assert LazyScheduler.from_config(config, schedule="point-mass", diffusion="optimal").solver == "ab2"
    # From li.sample's PC_DEFAULT_FROM_STEPS steps the default is its third-order form, as in li.sample; an explicit
    # ab2 stays ab2.
    for steps, solver in ((PC_DEFAULT_FROM_STEPS - 1, "ab2"), (PC_DEFAULT_FROM_STEPS, "ab2-pc"),
                          (2, "ab2")):
        sched.set_timesteps(steps)
        assert sched.solver == solver and sched.config.solver is None, steps
    pinned = LazyScheduler(schedule="lazy-vp", solver="ab2")
    pinned.set_timesteps(PC_DEFAULT_FROM_STEPS + 4)
    assert pinned.solver == "ab2"
    explicit = lazy("sd3", schedule="cosine", solver="AB2")
    assert explicit.solver == "ab2" and explicit.config.solver == "ab2"
    explicit.save_pretrained(tmp_path / "explicit")
    loaded = LazyScheduler.from_pretrained(tmp_path / "explicit")
    assert loaded.solver == "ab2" and loaded.config.solver == "ab2"


# Custom timesteps --------------------------------------------------------------------------------------------------

CUSTOM_TIMESTEPS = {
    # CogView4 passes both: the sigmas (dynamically shifted, linear time shift) drive the solver, and the network
    # sees the unshifted timesteps.
    "timesteps and sigmas": (dict(use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75,
                                  base_image_seq_len=256, time_shift_type="linear"), True, 0.7),
    # Timesteps alone give the sigmas, shifted, and are seen by the network as given.
    "timesteps alone, shift 3": (dict(shift=3.0), False, None),
}


def labelled_steps(scheduler, base, mixture, z):
    """``scheduler`` stepped on the exact flow model of ``mixture`` by a network that reads its noise level from
    the timestep label as ``base`` (FlowMatchEulerDiscreteScheduler) pairs them: σ = base.sigmas[k] at
    base.timesteps[k], and 0 at label 0."""
    noise_level = {float(t): float(s) for t, s in zip(base.timesteps, base.sigmas[:-1], strict=True)} | {0.0: 0.0}
    x = z.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(-mixture.predict(x, 1 - noise_level[float(t)], "linear"), t, x).prev_sample
    return x


@pytest.mark.filterwarnings("ignore:.timesteps. were passed without")
@pytest.mark.parametrize("case", list(CUSTOM_TIMESTEPS))
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_custom_timesteps_label_the_nodes_as_flow_match_euler_does(case, steps, mixture):
    """Custom timesteps reach the network as given, as FlowMatchEulerDiscreteScheduler passes them, while the
    solver steps between the (shifted) sigmas: linear Euler is that scheduler, and lazy VP on N(0, I) latents with
    a network that reads σ from the label returns its initial latents."""
    config, with_sigmas, mu = CUSTOM_TIMESTEPS[case]
    labels = np.linspace(1000, 1, steps).astype(np.int64).astype(np.float32)
    args = dict(timesteps=labels, mu=mu) | (dict(sigmas=labels / 1000) if with_sigmas else {})
    base = FlowMatchEulerDiscreteScheduler(**config)
    base.set_timesteps(**args)
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = z.clone()
    for t in base.timesteps:
        ref = base.step(-mixture.predict(ref, 1 - float(base.sigmas[base.step_index or 0]), "linear"), t,
                        ref).prev_sample
    ours = LazyScheduler.from_config(base.config, schedule="linear", diffusion="ode", solver="euler")
    ours.set_timesteps(**args)
    torch.testing.assert_close(ours.timesteps, base.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(ours.sigmas, base.sigmas, rtol=0, atol=1e-7)
    torch.testing.assert_close(labelled_steps(ours, base, mixture, z), ref, rtol=1e-6, atol=1e-6)
    standard = li.GaussianMixture.gaussian(torch.zeros(2, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    for solver in ("euler", "ab2", "heun"):
        lazy_vp = LazyScheduler.from_config(base.config, schedule="lazy-vp", sigma=1.0, solver=solver)
        lazy_vp.set_timesteps(**args)
        torch.testing.assert_close(labelled_steps(lazy_vp, base, standard, z), z, rtol=1e-6, atol=1e-6)


def test_custom_timesteps_errors():
    sched = LazyScheduler()
    with pytest.raises(ValueError, match="sigmas, timesteps: expected the same length, got 2 and 3"):
        sched.set_timesteps(sigmas=[1.0, 0.5], timesteps=[1000.0, 500.0, 1.0])
    with pytest.raises(ValueError, match="timesteps: expected finite values"):
        sched.set_timesteps(sigmas=[1.0, 0.5], timesteps=[1000.0, math.nan])
    with pytest.raises(TypeError, match="timesteps: expected a 1-D sequence of numbers, got str"):
        sched.set_timesteps(timesteps="1000")
    for bad in ([1500.0, 500.0], [500.0, 900.0], [1000.0, 0.0]):
        with pytest.raises(ValueError, match=r"timesteps: expected values in \(0, 1000\], strictly decreasing"):
            sched.set_timesteps(timesteps=bad)


# Other flow pipelines -----------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:sigma. the model's response at the probe")  # a random network has no σ
@pytest.mark.parametrize("kind", ["cogview4", "wan", "qwenimage"])
@pytest.mark.parametrize("steps", [1, 4])
def test_other_flow_pipelines_run_the_scheduler(kind, steps):
    """In CogView4, Wan and Qwen-Image pipelines, linear Euler is FlowMatchEulerDiscreteScheduler on the same
    sigmas, and the lazy defaults (ODE and point-mass SDE) return finite latents of the pipeline's shape and
    dtype."""
    def final(scheduler):
        pipe, args = other_pipeline(kind, scheduler)
        with torch.no_grad():
            out = pipe(num_inference_steps=steps, **args)
        return (out.frames if kind == "wan" else out.images), args["latents"]

    base = OTHER_BASE[kind]()
    ref, _ = final(base)
    ours, _ = final(LazyScheduler.from_config(base.config, schedule="linear", diffusion="ode", solver="euler"))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for config in (dict(), dict(schedule="point-mass"), dict(solver="heun")):
        out, start = final(LazyScheduler.from_config(base.config, **config))
        assert out.shape == start.shape and out.dtype == start.dtype and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("config", [dict(), dict(solver="heun"), dict(sigma=1.0, solver="heun"),
                                    dict(schedule="point-mass")])
def test_sigmas_hold_the_noise_level_of_every_timesteps_entry(config):
    """As in diffusers' schedulers, sigmas[i] is the noise level of timesteps[i] (the σ probe's and Heun's
    correctors' entries included) and the last is 0: pipelines index sigmas by their loop index (Wan's cache
    context read sigmas[5] of a 5-node Heun run and raised IndexError). For a DDPM-style model they are k-diffusion's
    σ = α/β, the probes' at SNR 0.1 being 10."""
    flow = LazyScheduler(**config)
    flow.set_timesteps(4)
    assert len(flow.sigmas) == len(flow.timesteps) + 1 and float(flow.sigmas[-1]) == 0.0
    torch.testing.assert_close(flow.sigmas[:-1] * 1000, flow.timesteps, rtol=0, atol=1e-3)
    if "sigma" not in config and config.get("schedule") != "point-mass":
        assert float(flow.sigmas[1]) == pytest.approx(1 / 1.1)  # the σ probe, at li.estimate_sigma's SNR
    ddpm = LazyScheduler(prediction_type="epsilon", **config)
    ddpm.set_timesteps(4)
    assert len(ddpm.sigmas) == len(ddpm.timesteps) + 1 and float(ddpm.sigmas[-1]) == 0.0
    abar = ddpm_schedule(DDPMScheduler().alphas_cumprod)
    tau = (999 - ddpm.timesteps.double()) / 1000
    torch.testing.assert_close(ddpm.sigmas[:-1].double(), abar.alpha(tau) / abar.beta(tau), rtol=1e-5, atol=0)
    if ddpm._plan[0][0] == "probe+":
        assert ddpm.sigmas[:2].tolist() == pytest.approx([10.0, 10.0], rel=1e-5)


# Exactness on Gaussian latents --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("steps", [1, 2, 3, 8])
@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("sigma", [1.0, None])
def test_lazy_vp_returns_initial_latents_for_exact_standard_gaussian(kind, steps, solver, sigma, embeds):
    """A transformer with the exact velocity of N(0, I) latents: lazy VP (σ = 1, given or estimated) maps the
    pipeline's initial latents to themselves, for any number of steps."""
    transformer = exact(ExactSD3, SD3_CONFIG) if kind == "sd3" else exact(ExactFlux, FLUX_CONFIG)
    scheduler = lazy(kind, schedule="lazy-vp", sigma=sigma, diffusion="ode", solver=solver)
    z = noise(kind)
    out = run(kind, pipeline(kind, transformer, scheduler), embeds, z, steps)
    torch.testing.assert_close(out, layout(kind, z), rtol=1e-5, atol=2e-6)
    if sigma is None:
        torch.testing.assert_close(scheduler.estimated_sigma, torch.ones(BATCH, dtype=torch.float64), rtol=0,
                                   atol=1e-5)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("steps", [1, 4])
def test_sigma_none_estimates_sigma_and_mean_exactly(kind, steps, embeds):
    """On N(m, s² I) latents σ = s is estimated per sample (one extra evaluation, at li.estimate_sigma's SNR) and
    the centred lazy VP returns s Z + m exactly; without centring it is not lazy."""
    mean, std = 0.4, 0.6
    transformer = exact(ExactSD3, SD3_CONFIG, mean, std) if kind == "sd3" else exact(ExactFlux, FLUX_CONFIG,
                                                                                     mean, std)
    z = noise(kind)
    scheduler = lazy(kind, schedule="lazy-vp", sigma=None)
    out = run(kind, pipeline(kind, transformer, scheduler), embeds, z, steps)
    z = layout(kind, z)
    assert len(scheduler.timesteps) == steps + 1
    snr = inspect.signature(li.estimate_sigma).parameters["snr"].default
    assert float(scheduler.timesteps[1]) == pytest.approx(1000 / (1 + snr))
    torch.testing.assert_close(scheduler.estimated_sigma, torch.full((BATCH,), std, dtype=torch.float64), rtol=0,
                               atol=1e-5)
    torch.testing.assert_close(out, std * z + mean, rtol=1e-5, atol=2e-6)
    uncentred = lazy(kind, schedule="lazy-vp", sigma=None, center=False)
    out = run(kind, pipeline(kind, transformer, uncentred), embeds, noise(kind), steps)
    rms = math.sqrt(std**2 + mean**2)
    torch.testing.assert_close(uncentred.estimated_sigma, torch.full((BATCH,), rms, dtype=torch.float64), rtol=0,
                               atol=1e-5)
    assert float((out - (std * z + mean)).abs().max()) > 1e-2


def test_given_moments_replace_the_probe_for_one_run(embeds):
    """set_moments gives the next run σ per sample and E[X]: it evaluates no probe (N evaluations for N steps)
    and, given the exact ones, returns what the estimating run returns; the run after it estimates again. A part-way
    start (image-to-image) with them needs no probe either. Bad moments name their argument."""
    mean, std = 0.4, 0.6
    transformer = exact(ExactSD3, SD3_CONFIG, mean, std)
    z = noise("sd3")
    scheduler = lazy("sd3")
    pipe = pipeline("sd3", transformer, scheduler)
    estimated = run("sd3", pipe, embeds, z, 4)
    moments = scheduler.estimated_sigma.clone(), scheduler.estimated_mean.clone()
    scheduler.set_moments(*moments)
    given = run("sd3", pipe, embeds, z, 4)
    assert len(scheduler.timesteps) == 4
    torch.testing.assert_close(given, estimated, rtol=0, atol=1e-5)
    torch.testing.assert_close(scheduler.estimated_sigma, moments[0], rtol=0, atol=0)
    run("sd3", pipe, embeds, z, 4)
    assert len(scheduler.timesteps) == 5  # the probe is back
    scheduler.set_moments(std, torch.tensor(mean))  # one σ for all, a mean that broadcasts
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(2)
    start = scheduler.scale_noise(torch.full_like(z, mean), scheduler.timesteps[2:3], z)
    x = start
    for t in scheduler.timesteps[2:]:
        x = scheduler.step(exact_output(x, 1 - t.reshape(1) / 1000, mean, std), t, x).prev_sample
    assert scheduler.estimated_sigma.tolist() == [std] * BATCH
    # The lazy drift is 0 on these latents, so the run keeps y = c (x − τ μ) from its start at model time τ, where
    # c = σ cos θ/(1 − τ) with tan θ = σ τ/(1 − τ); at the end c = 1 and μ is added back.
    tau = 1 - float(scheduler.sigmas[2])
    theta = math.atan(std * tau / (1 - tau))
    expected = std * math.cos(theta) / (1 - tau) * (start.double() - tau * mean) + mean
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="sigma: only the lazy schedules"):
        lazy("sd3", schedule="linear").set_moments(sigma=1.0)
    with pytest.raises(ValueError, match="sigma: expected positive finite numbers"):
        scheduler.set_moments(sigma=[1.0, -1.0])
    with pytest.raises(TypeError, match="mean: expected a tensor"):
        scheduler.set_moments(mean=0.5)
    for sigma, mean_given, match in ((torch.ones(3), None, "sigma: set_moments gave 3 values for a batch of 2"),
                                     (None, torch.zeros(3, 4), "mean: set_moments gave a mean of shape")):
        scheduler.set_moments(sigma, mean_given)
        scheduler.set_timesteps(2)
        with pytest.raises(ValueError, match=match):
            scheduler.step(torch.zeros_like(z), scheduler.timesteps[0], z)


def test_sigma_estimate_falls_back_to_one_with_a_warning():
    """A model whose response admits no σ gets σ = 1, with a warning. Here E[X] = 0 and η_X(τ, x) = −x for τ > 0,
    a slope of −1; output = (x − η_X)/(1 − τ)."""
    sched = LazyScheduler(schedule="lazy-vp", sigma=None)
    sched.set_timesteps(2)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="sigma"):
        for t in sched.timesteps:
            output = x if float(t) == 1000 else 2 * x * 1000 / t
            x = sched.step(output, t, x).prev_sample
    torch.testing.assert_close(sched.estimated_sigma, torch.ones(2, dtype=torch.float64))


# Guidance, noise, state --------------------------------------------------------------------------------------------

def test_classifier_free_guidance_sd3_equals_li_sample(sd3, embeds):
    """SD3's CFG is combined before step; li.sample on the adapter with the same CFG combination agrees."""
    scale = 3.0
    scheduler = lazy("sd3", schedule="lazy-vp", sigma=1.0)
    z = noise("sd3")
    neg_pe, neg_pp = embeds["sd3_neg"]
    out = run("sd3", pipeline("sd3", sd3, scheduler), embeds, z, 4, guidance_scale=scale,
              negative_prompt_embeds=neg_pe, negative_pooled_prompt_embeds=neg_pp)
    model = li_model("sd3", sd3, embeds, guidance_scale=scale,
                     negative_kwargs=dict(encoder_hidden_states=neg_pe, pooled_projections=neg_pp))
    mean = model.eta(z, 0.0)[1]
    # Both sides on their default solver (ab2 for this lazy ODE).
    ref = li.sample(li.CenteredModel(model, mean), z, grid=scheduler.grid, schedule=li.lazy_vp(1.0), center=False)
    torch.testing.assert_close(out, ref + mean, rtol=1e-5, atol=2e-5)
    plain = run("sd3", pipeline("sd3", sd3, lazy("sd3", schedule="lazy-vp", sigma=1.0)), embeds, z, 4)
    assert float((out - plain).abs().max()) > 1e-3


@pytest.mark.parametrize("sde_noise", ["independent", "keyed", "brownian"])
def test_sde_uses_the_step_generator_like_li_sample(sde_noise):
    """step(generator=g) seeds the per-sample streams (or paths) as li.sample(generator=g) does."""
    def output(x, t):
        return torch.sin(x) - 0.5 * x * (t / 1000).reshape(-1, 1)

    model = li.Model(lambda x, t: -output(x, 1000 * (1 - t)), "linear", "velocity")
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    for solver in ("euler", "heun"):
        sched = LazyScheduler(schedule="cosine", diffusion="optimal", solver=solver, sde_noise=sde_noise)
        sched.set_timesteps(5)
        gen = torch.Generator().manual_seed(11)
        x = z.clone()
        for t in sched.timesteps:
            x = sched.step(output(x, t.expand(3)), t, x, generator=gen).prev_sample
        ref = li.sample(model, z, grid=sched.grid, schedule="cosine", diffusion="optimal", solver=solver,
                        generator=torch.Generator().manual_seed(11), sde_noise=sde_noise)
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-6)


def test_sde_in_a_pipeline_is_reproducible_from_the_pipeline_generator(sd3, embeds):
    """The pipelines do not pass their generator to step; the SDE noise is seeded from the initial latents."""
    def sample(seed):
        pipe = pipeline("sd3", sd3, lazy("sd3", schedule="point-mass", sigma=1.0, diffusion="optimal"))
        pe, pp = embeds["sd3"]
        return pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, num_inference_steps=3, height=SIZE, width=SIZE,
                    guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(seed)).images

    first, again, other = sample(0), sample(0), sample(1)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert float((first - other).abs().max()) > 1e-2
    assert float((first[0] - first[1]).abs().max()) > 1e-2


def test_edited_latents_between_steps_are_followed():
    """Inpainting pipelines edit the latents between steps; the scheduler steps from what it is given."""
    def output(x, t):
        return torch.tanh(x) + (t / 1000).reshape(-1, 1)

    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    sigmas = [1.0, 0.7, 0.4, 0.2]
    outs = []
    for sched in (FlowMatchEulerDiscreteScheduler(), LazyScheduler(schedule="linear")):
        sched.set_timesteps(sigmas=sigmas)
        x = z.clone()
        for t in sched.timesteps:
            x = sched.step(output(x, t.expand(2)), t, x).prev_sample
            x = x.clone()
            x[:, 0] = 0.25  # an inpainting-style overwrite
        outs.append(x)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_shift_terminal_matches_flow_match_euler_and_leaves_a_single_step_alone():
    """shift_terminal stretches the sigmas as FlowMatchEulerDiscreteScheduler does; with one step, where its stretch
    is 0/0, the run goes from sigma 1 to 0 in one Euler step (the linear schedule's own, so it is exact)."""
    for steps in (2, 5):
        ours, theirs = LazyScheduler(schedule="linear", shift_terminal=0.2), FlowMatchEulerDiscreteScheduler(
            shift_terminal=0.2)
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        torch.testing.assert_close(ours.sigmas.float(), theirs.sigmas, rtol=1e-6, atol=1e-6)
    sched = LazyScheduler(schedule="linear", shift_terminal=0.2)
    sched.set_timesteps(1)
    assert sched.sigmas.tolist() == [1.0, 0.0]
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    output = torch.randn(2, 3, generator=torch.Generator().manual_seed(6))  # ε − x_data at sigma 1
    torch.testing.assert_close(sched.step(output, sched.timesteps[0], z).prev_sample, z - output)


def test_image_to_image_begin_index_and_scale_noise():
    """scale_noise and set_begin_index behave as FlowMatchEulerDiscreteScheduler's (image-to-image)."""
    def output(x, t):
        return torch.tanh(x) - (t / 1000).reshape(-1, 1) * x

    g = torch.Generator().manual_seed(4)
    image, eps = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    outs = []
    for sched in (FlowMatchEulerDiscreteScheduler(shift=3.0), LazyScheduler(schedule="linear", shift=3.0)):
        sched.set_timesteps(sigmas=torch.linspace(1, 0.2, 5).tolist())
        sched.set_begin_index(2)
        timesteps = sched.timesteps[2:]
        x = sched.scale_noise(image, timesteps[:1].expand(2), eps)
        for t in timesteps:
            x = sched.step(output(x, t.expand(2)), t, x).prev_sample
        outs.append(x)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    sched = LazyScheduler(schedule="lazy-vp", sigma=None)
    sched.set_timesteps(4)
    sched.set_begin_index(2)
    with pytest.raises(ValueError, match="begin_index: this run opens with probes that read sigma"):
        sched.step(image, sched.timesteps[2], image)


@pytest.fixture(scope="module")
def sd3_inpainting():
    """An exact SD3 transformer on 16-channel latents of N(0.3, 0.8² I) and a tiny random VAE: the parts of
    StableDiffusion3InpaintPipeline and StableDiffusion3Pipeline, and an image with its right half masked."""
    transformer = exact(ExactSD3, dict(SD3_CONFIG, in_channels=16, out_channels=16), mean=0.3, std=0.8).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=2,
                        shift_factor=0.0).eval()
    parts = dict(transformer=transformer, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1  # the right half: latent columns 4 and on (the VAE halves the size)
    g = torch.Generator().manual_seed(3)
    common = dict(prompt_embeds=torch.randn(2, 7, 32, generator=g),
                  pooled_prompt_embeds=torch.randn(2, 64, generator=g), guidance_scale=1.0, height=16, width=16,
                  output_type="latent", num_inference_steps=3)
    return parts, dict(image=image, mask_image=mask), common


def _inpaint(parts, scheduler, **kwargs):
    pipe = StableDiffusion3InpaintPipeline(scheduler=scheduler, **parts)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(**kwargs).images, pipe


@pytest.mark.parametrize("setting", [dict(), dict(solver="heun"), dict(schedule="point-mass")])
def test_inpainting_at_full_strength_repaints_as_text_to_image_does(setting, sd3_inpainting):
    """StableDiffusion3InpaintPipeline at strength 1 blends scale_noise(image) into the kept region after every
    step, the σ probe's included. The transformer here is exact and acts on each latent on its own, so σ and E[X]
    are still read exactly, and the repainted half is the text-to-image run's from the same initial latents."""
    parts, inputs, common = sd3_inpainting
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    out, pipe = _inpaint(parts, lazy("sd3", **setting), strength=1.0, latents=z.clone(), **inputs, **common)
    plain = StableDiffusion3Pipeline(scheduler=lazy("sd3", **setting), **parts)
    plain.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = plain(latents=z.clone(), **common).images
    torch.testing.assert_close(out[..., 4:], ref[..., 4:], rtol=0, atol=1e-5)
    torch.testing.assert_close(pipe.scheduler.estimated_sigma, torch.full((2,), 0.8, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(pipe.scheduler.estimated_mean, torch.full_like(z, 0.3), rtol=0, atol=1e-5)


def test_inpainting_part_way_starts_at_the_pipelines_node(sd3_inpainting):
    """At the pipeline's default strength (0.6) the run starts part-way: linear Heun with a denoising last step
    (two timesteps per node, ``order`` 2) gives FlowMatchHeunDiscreteScheduler's latents in the same pipeline, and
    lazy VP with sigma given runs; with sigma left to the scheduler the probe needs the run's start, which the
    error says along with what to pass."""
    parts, inputs, common = sd3_inpainting
    kwargs = dict(generator=torch.Generator().manual_seed(6), **inputs, **common)
    native = FlowMatchHeunDiscreteScheduler()
    native.sigma_min = 1 / 3  # its nodes linspace(1, σ_min, N) are then LazyScheduler's linspace(1, 1/N, N)
    heun, _ = _inpaint(parts, native, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(6)
    ours, pipe = _inpaint(parts, LazyScheduler(schedule="linear", solver="heun", last_step="denoise"), **kwargs)
    assert pipe.scheduler.order == 2
    torch.testing.assert_close(ours, heun, rtol=0, atol=1e-5)
    kwargs["generator"] = torch.Generator().manual_seed(6)
    lazy_vp, _ = _inpaint(parts, lazy("sd3", sigma=1.0), **kwargs)
    assert bool(torch.isfinite(lazy_vp).all()) and float((lazy_vp - heun).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="begin_index: this run opens with probes that read sigma"):
        _inpaint(parts, lazy("sd3"), **kwargs)


def test_flux_image_to_image_equals_flow_match_euler_and_refuses_heun():
    """FluxImg2ImgPipeline passes sigmas linspace(1, 1/N, N) and mu: linear Euler gives FlowMatchEuler's latents
    from the node the strength picks. diffusers then counts len(timesteps) as the steps, which for Heun's two
    timesteps per node would start at the wrong node (or past the end): refused, naming begin_index."""
    transformer = exact(ExactFlux, FLUX_CONFIG, mean=0.3, std=0.8).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=1, norm_num_groups=2,
                        shift_factor=0.0).eval()
    g = torch.Generator().manual_seed(3)
    kwargs = dict(image=torch.rand(1, 3, 16, 16, generator=g), prompt_embeds=torch.randn(1, 7, 32, generator=g),
                  pooled_prompt_embeds=torch.randn(1, 32, generator=g), strength=0.6, num_inference_steps=5,
                  height=16, width=16, output_type="latent")
    def run(scheduler):
        pipe = FluxImg2ImgPipeline(transformer=transformer, vae=vae, text_encoder=None, tokenizer=None,
                                   text_encoder_2=None, tokenizer_2=None, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(generator=torch.Generator().manual_seed(6), **kwargs).images

    seen = []
    handle = transformer.register_forward_hook(
        lambda module, args, kw, output: seen.append(1000 * float(kw["timestep"][0])), with_kwargs=True)
    ours = lazy("flux", schedule="linear")
    outs = [run(base_scheduler("flux")), run(ours)]
    handle.remove()
    # The run starts at node 5 − int(0.6 · 5) = 2 and evaluates the three nodes left (FLUX feeds timestep / 1000).
    assert seen[3:] == pytest.approx(ours.timesteps[2:].tolist(), abs=1e-3)
    with pytest.raises(ValueError, match="begin_index: a pipeline that passes sigmas or timesteps"):
        run(lazy("flux", solver="heun", sigma=1.0))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


def test_step_returns_the_model_dtype():
    sched = LazyScheduler(schedule="lazy-vp", sigma=1.0)
    sched.set_timesteps(2)
    x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    out = sched.step(torch.randn_like(x), sched.timesteps[0], x)
    assert out.prev_sample.dtype == torch.bfloat16
    assert out.pred_original_sample.dtype == torch.bfloat16


# Grids, config and errors ------------------------------------------------------------------------------------------

def test_sigmas_and_grids_are_inverse_and_snr_matched():
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.1], dtype=torch.float64)
    for schedule in (li.linear(), li.cosine(), li.lazy_vp(0.6), li.point_mass(1.3)):
        grid = sigmas_to_grid(sigmas, schedule)
        assert float(grid[0]) == 0.0 and float(grid[-1]) == 1.0
        torch.testing.assert_close(grid_to_sigmas(grid, schedule), sigmas, rtol=0, atol=1e-12)
        tau = 1 - sigmas[1:]
        torch.testing.assert_close(schedule.snr(grid[1:-1]), tau / (1 - tau), rtol=1e-12, atol=0)


def test_save_pretrained_round_trip(tmp_path):
    sched = LazyScheduler.from_config(base_scheduler("flux").config, schedule=li.lazy_vp(0.7), diffusion=0.5,
                                      solver="heun", last_step="denoise")
    sched.save_pretrained(tmp_path)
    loaded = LazyScheduler.from_pretrained(tmp_path)
    for key in ("schedule", "sigma", "diffusion", "solver", "last_step", "shift", "use_dynamic_shifting",
                "max_shift", "base_shift"):
        assert loaded.config[key] == sched.config[key], key
    assert loaded.config.sigma == 0.7 and loaded.order == 2
    for s in (sched, loaded):
        s.set_timesteps(sigmas=[1.0, 0.6, 0.3], mu=0.8)
    torch.testing.assert_close(loaded.timesteps, sched.timesteps)
    torch.testing.assert_close(loaded.grid, sched.grid)


def test_scheduler_default_diffusion_follows_the_schedule():
    point_mass = LazyScheduler(schedule="point-mass", sigma=1.0)
    assert point_mass.solver == LazyScheduler(schedule="point-mass", sigma=1.0, diffusion="optimal").solver
    assert point_mass._is_sde and not LazyScheduler(schedule="lazy-vp", sigma=1.0)._is_sde
    assert LazyScheduler.from_config(point_mass.config)._is_sde
    assert LazyScheduler.from_config(point_mass.config, schedule="lazy-vp")._is_sde is False


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="schedule"):
        LazyScheduler(schedule="nonsense")
    with pytest.raises(ValueError, match="diffusion"):
        LazyScheduler(diffusion="bogus")
    with pytest.raises(ValueError, match="diffusion"):
        LazyScheduler(schedule="point-mass", diffusion="ode")
    with pytest.raises(ValueError, match="solver"):
        LazyScheduler(solver="rk4")
    with pytest.raises(ValueError, match="solver"):
        LazyScheduler(solver="ab3")  # a name li.sample may know, which step does not implement
    with pytest.raises(ValueError, match="last_step"):
        LazyScheduler(last_step="tweedie")
    with pytest.raises(ValueError, match="sigma"):
        LazyScheduler(schedule="cosine", sigma=0.5)
    with pytest.raises(ValueError, match="sigma"):
        LazyScheduler(schedule="lazy-vp", sigma=-1.0)
    with pytest.raises(ValueError, match="invert_sigmas"):
        LazyScheduler(invert_sigmas=True)
    with pytest.raises(ValueError, match="stochastic_sampling: FlowMatchEuler's re-noising"):
        LazyScheduler.from_config(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).config)
    assert LazyScheduler.from_config(FlowMatchEulerDiscreteScheduler().config).config.stochastic_sampling is False
    with pytest.raises(ValueError, match="sde_noise: expected one of independent, keyed, brownian"):
        LazyScheduler(schedule="point-mass", diffusion="optimal", sde_noise="pink")
    for sde_noise in ("keyed", "brownian"):
        assert LazyScheduler.from_config(LazyScheduler(sde_noise=sde_noise).config).config.sde_noise == sde_noise
    sched = LazyScheduler(schedule="lazy-vp", sigma=1.0)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros(1, 2), 1000.0, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps()
    with pytest.raises(ValueError, match="sigmas"):
        sched.set_timesteps(sigmas=[0.5, 0.8])
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(3, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: set at most one"):
        LazyScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(TypeError, match="sigma: expected a positive number or None, got str"):
        LazyScheduler(schedule="lazy-vp", sigma="0.5")
    for steps in (0, 2**20 + 1, 10**12):
        with pytest.raises(ValueError, match="num_inference_steps: expected an integer from 1 to 1048576"):
            sched.set_timesteps(steps)
    with pytest.raises(ValueError, match="mu"):
        LazyScheduler(use_dynamic_shifting=True).set_timesteps(4)
    with pytest.raises(ValueError, match="mu: expected a finite number"):
        LazyScheduler(use_dynamic_shifting=True).set_timesteps(4, mu=float("nan"))
    for device in ("meta", "cuda:99"):
        with pytest.raises(ValueError, match="device: "):
            sched.set_timesteps(4, device=device)
    for shift in (0.0, -3.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="shift: expected a positive finite number"):
            LazyScheduler(shift=shift)
        with pytest.raises(ValueError, match="shift: expected a positive finite number"):
            LazyScheduler().set_shift(shift)
    with pytest.raises(TypeError, match="shift: expected a number"):
        LazyScheduler(shift="3")
    assert LazyScheduler(shift=np.float32(3.0)).shift == 3.0
    sched.set_timesteps(2)
    with pytest.raises(ValueError, match="timestep"):
        sched.step(torch.zeros(1, 2), 123.0, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="per_token_timesteps: a noise level per token is not supported"):
        sched.step(torch.zeros(1, 2), sched.timesteps[0], torch.zeros(1, 2), per_token_timesteps=torch.ones(1, 2))


# Covariance-matched lazy VP -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("solver,steps", [(None, 1), (None, 4), (None, 8), ("ab2-pc", 5), ("heun", 3)])
@pytest.mark.parametrize("low_rank", [False, True], ids=["full", "low-rank"])
def test_pipeline_latents_with_covariance_equal_li_sample(kind, solver, steps, low_rank, sd3, flux, embeds):
    """With ``covariance``, pipeline latents are li.sample's covariance-matched lazy VP on the same transformer,
    noise, grid and mean, for a full matrix and for a low-rank li.Covariance, with the default solver rule (Euler
    below 7 steps, AB2 from 7) and explicit ones."""
    transformer = sd3 if kind == "sd3" else flux
    z = noise(kind)
    dim = layout(kind, z)[0].numel()
    matrix = random_covariance(dim, 11)
    covariance = li.Covariance.from_matrix(matrix).truncated(dim // 4) if low_rank else matrix
    scheduler = lazy(kind, schedule="lazy-vp", solver=solver, covariance=covariance)
    out = run(kind, pipeline(kind, transformer, scheduler), embeds, z, steps)
    expected_solver = solver or ("euler" if steps < 7 else "ab2")
    assert scheduler.solver == expected_solver
    z = layout(kind, z)
    for i in range(BATCH):
        model = li_model(kind, transformer, embeds, slice(i, i + 1))
        zi = z[i : i + 1]
        mean = model.eta(zi, 0.0)[1]
        ref = li.sample(li.CenteredModel(model, mean), zi, grid=scheduler.grid, schedule=scheduler._target,
                        solver=expected_solver, center=False, covariance=covariance)
        torch.testing.assert_close(out[i : i + 1], ref + mean, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("bad", [0, 2, 4])
def test_nan_from_the_transformer_is_an_error_naming_its_timestep(bad):
    """A NaN or inf model output anywhere in a run ends it with NonFiniteError at the last step (the flags stay on
    the device until then), naming the first bad evaluation, instead of returning NaN latents."""
    scheduler = LazyScheduler(schedule="lazy-vp", sigma=1.0, solver="heun")
    scheduler.set_timesteps(3)
    x = torch.randn(2, 4)
    with pytest.raises(li.NonFiniteError, match=rf"timesteps\[{bad}\]") as caught:
        for k, t in enumerate(scheduler.timesteps):
            output = torch.full_like(x, math.inf if k == bad else 0.1)
            x = scheduler.step(output, t, x).prev_sample
    assert caught.value.step == bad
    scheduler.set_timesteps(3)  # a new run starts clean
    for t in scheduler.timesteps:
        x = scheduler.step(torch.zeros(2, 4), t, torch.zeros(2, 4)).prev_sample
    assert bool(torch.isfinite(x).all())


def test_scheduler_covariance_errors_and_config():
    cov = li.Covariance.from_matrix(random_covariance(8, 1))
    scheduler = LazyScheduler(schedule="lazy-vp", covariance=cov)
    assert scheduler._target.sigma == pytest.approx(math.sqrt(cov.mean_eigenvalue))
    assert scheduler.config.covariance is None and "Covariance" not in scheduler.to_json_string()
    for kwargs, error, message in [
        (dict(schedule="cosine", covariance=cov), ValueError, "covariance: applies"),
        (dict(schedule="lazy-vp", diffusion="optimal", covariance=cov), ValueError, "covariance: applies"),
        (dict(schedule="lazy-vp", covariance="model"), ValueError, "cannot draw the model's own samples"),
        (dict(schedule="lazy-vp", covariance=[[1.0]]), TypeError, "covariance: expected"),
        (dict(schedule="lazy-vp", covariance=torch.tensor([[1.0, 2.0], [0.0, 1.0]])), ValueError, "symmetric"),
    ]:
        with pytest.raises(error, match=message):
            LazyScheduler(**kwargs)


# Shift, image-to-image, edited latents, one-step runs ---------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_li_sample_grid_shift_is_the_schedulers_shift(shift):
    """li.sample's grid="model" with grid_shift s is the grid LazyScheduler builds from diffusers' shifted sigmas
    (shift=s, default sigmas) for the same number of steps."""
    from lazyinterp.grids import snr_matched_grid

    target = li.lazy_vp(0.7)
    scheduler = LazyScheduler(schedule=target, shift=shift)
    scheduler.set_timesteps(6)
    torch.testing.assert_close(scheduler.grid, snr_matched_grid(6, target, "linear", shift), rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", ["euler", "ab2", "ab2-pc"])
def test_image_to_image_multistep_is_the_pure_solver_on_the_remaining_grid(mixture, solver):
    """From a begin index the run has no history: it is the pure solver of li.sample (Euler start, then AB2 or
    AB2-AM3) on the remaining nodes, from the state the noised image maps to, with the exact mixture model."""
    from lazyinterp.conversion import convert, time_change
    from lazyinterp.samplers import Dynamics, resolve_diffusion
    from lazyinterp.solvers import ODE_STEPPERS

    target = li.lazy_vp(0.8)
    scheduler = LazyScheduler(schedule=target, solver=solver, center=False)
    scheduler.set_timesteps(sigmas=DYADIC_SIGMAS)
    begin = 2
    scheduler.set_begin_index(begin)
    gen = torch.Generator().manual_seed(5)
    image = mixture.sample(4, gen)
    noise = torch.randn(4, 2, dtype=torch.float64, generator=gen)
    sigma = DYADIC_SIGMAS[begin]
    x = (1 - sigma) * image + sigma * noise  # the noised image at the begin node, as scale_noise makes it
    for node, t in enumerate(scheduler.timesteps[begin:], start=begin):
        x = scheduler.step(-mixture.predict(x, 1 - DYADIC_SIGMAS[node], "linear"), t, x).prev_sample
    grid = scheduler.grid[begin:].to(torch.float64)
    _, scale = time_change(li.linear(), target, float(grid[0]))
    dynamics = Dynamics(convert(mixture.model("linear"), target), resolve_diffusion("ode", target))
    start = float(scale) * ((1 - sigma) * image + sigma * noise)
    expected = ODE_STEPPERS[solver](dynamics.drift, start, grid)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("solver", ["euler", "ab2", "ab2-pc"])
def test_an_edit_of_the_latents_between_steps_stands(solver):
    """On N(0, σ²I) data with the exact σ, lazy VP's drift is 0, so a run returns its starting state. A pipeline
    that moves the latents by δ between steps (as inpainting does) moves the sample by c_k δ, with c_k the
    scale at that node: the edit is followed by every solver, and ab2-pc's correction does not undo it."""
    from lazyinterp.conversion import time_change

    sigma = 0.7
    gaussian = li.GaussianMixture.gaussian(torch.zeros(3), torch.tensor(sigma**2, dtype=torch.float64))
    z = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    delta = torch.tensor([0.25, 0.0, -0.1], dtype=torch.float64)
    edit_node = 3
    finals = []
    for edited in (False, True):
        scheduler = LazyScheduler(schedule=li.lazy_vp(sigma), solver=solver, center=False)
        scheduler.set_timesteps(sigmas=DYADIC_SIGMAS)
        x = z.clone()
        for node, t in enumerate(scheduler.timesteps):
            if edited and node == edit_node:
                x = x + delta
            x = scheduler.step(-gaussian.predict(x, 1 - DYADIC_SIGMAS[node], "linear"), t, x).prev_sample
        finals.append(x)
    _, scale = time_change(li.linear(), li.lazy_vp(sigma), float(scheduler.grid[edit_node]))
    torch.testing.assert_close(finals[1] - finals[0], float(scale) * delta.expand(2, 3), rtol=0, atol=1e-12)


def test_a_one_step_sde_run_keeps_its_noise():
    """As in li.sample, a one-step SDE run takes an Euler–Maruyama last step by default, not the denoising one that
    would return E[X] for every sample; two steps and more denoise last."""
    latents = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    def run(steps, last_step=None):
        sched = LazyScheduler(schedule="point-mass", sigma=1.0, diffusion="optimal", solver="euler",
                              last_step=last_step)
        sched.set_timesteps(steps)
        x, gen = latents.clone(), torch.Generator().manual_seed(1)
        for t in sched.timesteps:
            x = sched.step(torch.tanh(x) - x, t, x, generator=gen).prev_sample
        return x

    torch.testing.assert_close(run(1), run(1, "euler"), rtol=0, atol=0)
    assert not torch.allclose(run(1), run(1, "denoise"), atol=1e-2)
    torch.testing.assert_close(run(3), run(3, "denoise"), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:solver. one exponential")  # asked for on purpose: the run returns E[X]
def test_a_one_step_sde_run_takes_euler_maruyama_over_the_exponential_default(mixture):
    """As in li.sample: the default exponential steps end at η_X, which one step from the start makes E[X] for every
    sample, so a one-step run with the default solver steps by Euler–Maruyama; from two steps the default is the
    exponential 2M step."""
    latents = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def run(sigmas, solver=None):
        sched = LazyScheduler(schedule="lazy-vp", sigma=1.0, diffusion="optimal", solver=solver)
        return drive(sched, mixture, latents, sigmas)

    one, three = [1.0], [1.0, 0.625, 0.25]
    torch.testing.assert_close(run(one), run(one, "euler"), rtol=0, atol=0)
    assert float(run(one).std(dim=0).min()) > 0.5
    torch.testing.assert_close(run(one, "exponential-2m"), mixture.mean.expand(64, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(run(three), run(three, "exponential-2m"), rtol=0, atol=0)
    assert not torch.allclose(run(three), run(three, "euler"), atol=1e-3)


def test_one_exponential_step_from_pure_noise_warns_that_it_returns_the_mean():
    scheduler = LazyScheduler(schedule="lazy-vp", sigma=0.9, solver="exponential")
    with pytest.warns(UserWarning, match="solver: one exponential step from pure noise returns the model's posterior"):
        scheduler.set_timesteps(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.set_timesteps(2)
        scheduler.set_timesteps(sigmas=[0.5])  # one step that starts with signal in the latents
        LazyScheduler(schedule="point-mass", diffusion="optimal").set_timesteps(1)  # the default takes Euler
