"""A diffusers pipeline scheduler that samples under any lazyinterp schedule, diffusion and solver, and the
conversions between diffusers' ``sigmas`` and lazyinterp time grids."""

from __future__ import annotations

import hashlib
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim_cogvideox import CogVideoXDDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from ..brownian import BrownianPaths
from ..checks import check_int, check_number
from ..conversion import convert, time_change
from ..covariance import Covariance, CovarianceLazyDynamics
from ..devices import check_device
from ..estimates import PROBE_SNR, sigma_from_slope
from ..grids import MAX_STEPS, check_grid
from ..noise import KeyedStreams, NoiseStreams, normal_draws, resolve_seed
from ..predictors import (
    CenteredModel,
    Model,
    NonFiniteError,
    coefficients,
    linear_combination,
    to_eta,
)
from ..samplers import (
    COVARIANCE_AB2_FROM_STEPS,
    PC_DEFAULT_FROM_STEPS,
    SDE_NOISES,
    Dynamics,
    check_optional_bool,
    check_settings,
    default_last_step,
    default_solver_for_steps,
    resolve_covariance,
    resolve_diffusion,
    warn_one_exponential_step,
)
from ..schedules import SCHEDULES, LazySchedule, Schedule, get_schedule, linear
from ..solvers import EXPONENTIAL_SOLVERS, ODE_SOLVERS, ab2_increment, am3_increment, exponential_terms, log_snr
from .models import (
    ddpm_output_to_prediction,
    ddpm_prediction_kind,
    ddpm_time_range,
    network_schedule,
)

Tensor = torch.Tensor
_F64 = torch.float64


# The solvers ``step`` implements (li.sample's names; its aliases such as "em" resolve to them).
_SOLVERS = ("euler", "heun", "ab2", "ab2-pc", "exponential", "exponential-2m")


# Grids ------------------------------------------------------------------------------------------------------------

def _numbers(value: Any, name: str) -> Tensor:
    """``value`` (a sequence, array or tensor of numbers) as a float64 CPU tensor of its shape, or a TypeError."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name}: expected a 1-D sequence of numbers, got {type(value).__name__}")
    try:
        return torch.as_tensor(np.asarray(value, dtype=np.float64) if not isinstance(value, Tensor) else value,
                               dtype=_F64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: expected a 1-D sequence of numbers, got {type(value).__name__}") from exc


def _as_sigmas(sigmas: Any) -> Tensor:
    s = _numbers(sigmas, "sigmas").flatten()
    if s.numel() < 1:
        raise ValueError("sigmas: expected at least one sigma")
    if not bool(torch.isfinite(s).all()) or float(s.min()) <= 0 or float(s.max()) > 1 + 1e-6:
        raise ValueError(f"sigmas: expected values in (0, 1], got {s.tolist()}")
    if not bool((torch.diff(s) < 0).all()):
        raise ValueError("sigmas: expected a strictly decreasing sequence (noise first)")
    return s.clamp(max=1.0)


def _as_timesteps(timesteps: Any) -> np.ndarray:
    # float32, as diffusers holds timesteps.
    values = _numbers(timesteps, "timesteps").numpy().astype(np.float32)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"timesteps: expected a non-empty 1-D sequence, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("timesteps: expected finite values")
    return values


def _label(sigmas: Tensor, node_sigmas: Tensor, labels: np.ndarray, train_steps: int) -> Tensor:
    """The network's timesteps at ``sigmas``: ``labels`` at the nodes' (shifted) sigmas, linear in σ between them,
    through (0, 0) below the last node and (1, ``train_steps``) above the first."""
    xs = node_sigmas.tolist()[::-1]
    ys = labels.astype(np.float64).tolist()[::-1]
    xs, ys = [0.0] + xs, [0.0] + ys
    if xs[-1] < 1.0:
        xs, ys = xs + [1.0], ys + [float(train_steps)]
    out = np.interp(sigmas.numpy(), np.asarray(xs), np.asarray(ys))
    # Exactly the given values at the nodes, whatever the float rounding of the interpolation.
    for i, s in enumerate(sigmas.tolist()):
        hit = [j for j, x in enumerate(xs) if x == s]
        if hit:
            out[i] = ys[hit[-1]]
    return torch.as_tensor(out, dtype=torch.float32)


def sigmas_to_grid(sigmas: Any, schedule: Schedule | str) -> Tensor:
    r"""The time grid of ``schedule`` at the same SNR points as diffusers' flow ``sigmas``, ending at t = 1.

    A diffusers sigma σ_k is the linear-schedule time τ_k = 1 − σ_k; the grid node is the target time with the
    same SNR, t_k = r'⁻¹(r_lin(τ_k)) with r_lin(τ) = τ/(1 − τ). The appended last node is t = 1 (σ = 0), as
    diffusers appends σ = 0.

    Args:
        sigmas: N strictly decreasing values in (0, 1] (without the final 0).
        schedule: the target schedule (object or name); a lazy one needs its sigma.

    Returns:
        A float64 tensor of N + 1 increasing times.
    """
    s = _as_sigmas(sigmas)
    sched = get_schedule(schedule)
    tau = 1 - s
    t = tau if sched.name == "linear" else sched.snr_inverse(tau / s)
    t = torch.where(s == 1, torch.zeros_like(t), t)  # a bisected r⁻¹(0) lands within 1e-19 of 0, not on it
    grid = torch.cat([t, torch.ones(1, dtype=_F64)])
    if not bool((torch.diff(grid) > 0).all()):
        raise ValueError(f"sigmas: several of them map to the same time under {sched.name} (its SNR range does "
                         "not cover them); drop the noisiest ones")
    return grid


def grid_to_sigmas(grid: Any, schedule: Schedule | str) -> Tensor:
    r"""diffusers flow ``sigmas`` for a time grid of ``schedule``: σ_k = 1 − τ(t_k) with τ = r/(1 + r), r = r'_t.

    The inverse of :func:`sigmas_to_grid`: pass the result as ``sigmas=`` to a pipeline whose scheduler is a
    :class:`LazyScheduler` with no shift (``shift=1``, ``use_dynamic_shifting=False``) to run exactly this grid.
    """
    g = check_grid(grid)
    sched = get_schedule(schedule)
    if sched.name == "linear":
        return 1 - g[:-1]
    r = sched.snr(g[:-1])
    return 1 / (1 + r)


# The scheduler ----------------------------------------------------------------------------------------------------

@dataclass
class LazySchedulerOutput(BaseOutput):
    """Output of :meth:`LazyScheduler.step`.

    Args:
        prev_sample: the latents for the next model evaluation, in the model's (linear-schedule) coordinates.
        pred_original_sample: the model's data prediction E[X | latents] at this evaluation; at the run's last
            evaluation, the final sample (which latent consistency pipelines return as the image).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


# The prediction types of flow-matching configs; DDPM-style ones are those of ddpm_prediction_kind.
_FLOW_PREDICTIONS = (None, "flow_prediction")
# Schedulers of DDPM-style models (discrete alphas_cumprod).
_DDPM_FAMILY = frozenset(entry.name for entry in KarrasDiffusionSchedulers) | {"LCMScheduler", "TCDScheduler"}
# The config keys that describe the model rather than the sampler: read by from_config as the config gives them.
_MODEL_KEYS = ("num_train_timesteps", "prediction_type", "beta_start", "beta_end", "beta_schedule", "trained_betas",
               "rescale_betas_zero_snr", "snr_shift_scale", "sigma_data", "timestep_type", "sigma_min", "sigma_max")


_FLOW_KEYS = ("shift", "flow_shift", "use_dynamic_shifting")
# diffusers schedulers whose model is neither a flow on the linear schedule nor a DDPM-style one: a config of theirs
# names no prediction type, which would otherwise read as a flow model.
_OTHER_MODELS = {
    "ScoreSdeVeScheduler": "a variance-exploding score model; wrap it as a li.Model and use li.sample",
    "KarrasVeScheduler": "a variance-exploding model; wrap its denoiser with li.ve_denoiser_model",
    "IPNDMScheduler": "a model on IPNDM's own time parametrisation",
    "DDPMWuerstchenScheduler": "a model on Würstchen's own continuous cosine schedule",
    "RePaintScheduler": "RePaint's resampling, whose pipeline passes the image and mask to step",
    "SCMScheduler": "a TrigFlow consistency model, whose pipeline takes consistency steps",
    **{name: "a discrete (token) diffusion" for name in ("AmusedScheduler", "VQDiffusionScheduler",
                                                          "DiscreteDDIMScheduler", "EntropyBoundScheduler",
                                                          "BlockRefinementScheduler")},
}


def _init_defaults(class_name: Any) -> dict[str, Any]:
    """The ``__init__`` defaults of the diffusers scheduler class ``class_name`` (empty for any other name)."""
    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        return {}
    return {name: param.default for name, param in inspect.signature(cls.__init__).parameters.items()
            if param.default is not inspect.Parameter.empty}


class _FlowSource:
    """A flow-matching transformer: the linear schedule in diffusers' convention, ``output = ε − x_data = −v`` at
    the timestep T σ, σ = 1 − τ."""

    is_flow = True
    predicts = "velocity"
    t_min, t_max = 0.0, 1.0

    def __init__(self, train_steps: int):
        self.schedule = linear()
        self.train_steps = train_steps

    def prediction(self, output: Tensor, x: Tensor, t: Any) -> Tensor:
        return -output

    def clamp(self, tau: Tensor | float) -> Tensor | float:
        """τ as it is: the network is evaluated on all of [0, 1]."""
        return tau

    def timesteps(self, sigmas: Tensor) -> Tensor:
        """The network's timesteps at model sigmas σ = 1 − τ."""
        return (sigmas * self.train_steps).to(torch.float32)

    def time_of(self, timestep: float) -> float:
        """The model time τ of a timestep."""
        return 1 - timestep / self.train_steps


class _DDPMSource:
    """A DDPM-style UNet (ε-, v- or x₀-prediction) on :func:`~lazyinterp.diffusers.ddpm_schedule` of its
    ``alphas_cumprod`` (or on continuous noise levels), read as :func:`~lazyinterp.diffusers.ddpm_model` reads it:
    the timestep is the schedule's (the continuous index u(τ) = T − 1 − T τ, or ¼ ln σ), and the network is
    evaluated within its [t_min, t_max] (never beyond index 0)."""

    is_flow = False

    def __init__(self, schedule: Schedule, prediction_type: str):
        self.schedule = schedule
        self.continuous = schedule.continuous_noise  # timesteps ¼ ln σ rather than indices
        self.prediction_type = prediction_type
        self.predicts = ddpm_prediction_kind(prediction_type)
        self.train_steps = self.schedule.num_train_timesteps
        self.t_min, self.t_max = ddpm_time_range(Model(lambda x, t: x, self.schedule, self.predicts))

    def prediction(self, output: Tensor, x: Tensor, t: Any) -> Tensor:
        return ddpm_output_to_prediction(output, x, t, self.schedule, self.prediction_type)

    def clamp(self, tau: Tensor | float) -> Tensor | float:
        """τ kept in [t_min, t_max], where the network is evaluated."""
        if isinstance(tau, Tensor):
            return tau.clamp(self.t_min, self.t_max)
        return min(max(float(tau), self.t_min), self.t_max)

    def timesteps(self, sigmas: Tensor) -> Tensor:
        """The network's timesteps at model sigmas σ = 1 − τ: u(τ) with τ kept in [t_min, t_max]."""
        return self.schedule.timestep(self.clamp(1 - sigmas)).to(torch.float32)

    def time_of(self, timestep: Tensor | float) -> Tensor:
        """The model time τ of a timestep."""
        return self.schedule.time_of_timestep(timestep)


def _ddpm_alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                         trained_betas: Any, rescale_betas_zero_snr: bool, snr_shift_scale: float = 1.0) -> Tensor:
    """ᾱ of a DDPM-style config, computed by diffusers itself (every beta schedule and the zero-SNR rescaling);
    with CogVideoX's ``snr_shift_scale`` s, ᾱ/(s + (1 − s) ᾱ) before the rescaling, as its schedulers take it."""
    kwargs = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                  beta_schedule=beta_schedule, trained_betas=trained_betas,
                  rescale_betas_zero_snr=rescale_betas_zero_snr)
    try:
        helper = DDPMScheduler(**kwargs) if snr_shift_scale == 1.0 else \
            CogVideoXDDIMScheduler(snr_shift_scale=snr_shift_scale, **kwargs)
    except NotImplementedError as exc:
        raise ValueError(f"beta_schedule: {beta_schedule!r} is not a beta schedule diffusers implements") from exc
    return helper.alphas_cumprod


class _Recorded:
    """The network's output at the point where the pipeline evaluated it, as a predictor under the source's
    schedule.

    The conversion passes the model time τ and the input x = y/c; the network saw the pipeline's latents,
    which agree with x except at a point-mass start (c = 0, where the conversion passes 0). The latents the
    network actually saw are used, so that (x, output) stay a consistent pair.
    """

    def __init__(self, source: _FlowSource | _DDPMSource):
        self.source = source
        self.schedule = source.schedule
        self.x: Tensor | None = None
        self.output: Tensor | None = None

    def eta(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        source = self.source
        if not source.is_flow:  # the network saw a time inside its range; its prediction holds beyond it
            t = source.clamp(float(t))
        prediction = source.prediction(self.output, self.x, t)
        return to_eta(source.predicts, prediction, self.x, *coefficients(self.schedule, t))


@dataclass
class _Lane:
    """Samples sharing one target schedule: their grid t_k, model times τ_k, scales c_k and dynamics."""

    index: slice
    schedule: Schedule
    grid: list[float]
    tau: list[float]
    scale: list[float]
    data_scale: list[float]
    alpha0: float
    recorded: _Recorded
    dynamics: Dynamics | CovarianceLazyDynamics


def _generator_seed(generator: Any) -> int:
    """One draw from ``generator`` as li.sample takes it, also from an accelerator's generator."""
    if isinstance(generator, torch.Generator) and generator.device.type != "cpu":
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return resolve_seed(generator)


def _latents_seed(x: Tensor) -> int:
    digest = hashlib.blake2b(x.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class LazyScheduler(SchedulerMixin, ConfigMixin):
    r"""A diffusers scheduler that samples a pipeline's network under a lazyinterp schedule: a flow-matching
    transformer (SD3, FLUX, …) or a DDPM-style UNet (Stable Diffusion 1.x/2.x, SDXL, DDPM and DDIM pipelines).

    Usage: ``pipe.scheduler = LazyScheduler.from_config(pipe.scheduler.config, schedule="lazy-vp")``.

    **Which model.** The config's ``prediction_type`` says it: none or ``"flow_prediction"`` (FlowMatch configs,
    and DPMSolver's and UniPC's flow configs, whose ``flow_shift`` is read as ``shift``) is a flow model, as below;
    ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` (DDPM-family configs; Stable Diffusion's, which name none,
    are ε) is a DDPM-style model, read as :func:`~lazyinterp.diffusers.ddpm_model` reads it (see "DDPM-style
    models" below). An EDM config (``sigma_data``) is refused.

    **The model.** The pipeline's transformer is a flow model on the linear schedule in diffusers' convention,
    x_σ = (1 − σ) x_data + σ ε with ``output = ε − x_data``: lazyinterp's velocity is v = −output at time
    τ = 1 − σ. The sampler integrates dY = b^ε(t, Y) dt + √(2ε_t) dW under the target schedule (α', β') from the
    exactly converted model (theory §3): τ(t) = r⁻¹(r'_t), c_t = α'_t/α_τ, and Y_t = c_t X_τ.

    **The grid.** ``set_timesteps`` builds diffusers sigmas exactly as ``FlowMatchEulerDiscreteScheduler`` does
    (``shift``, ``use_dynamic_shifting`` with ``mu``, ``shift_terminal``, Karras/exponential/beta sigmas); with only
    ``num_inference_steps = N`` the unshifted sigmas are linspace(1, 1/N, N), as FLUX passes (no step is spent on
    0.001 → 0). Each sigma σ_k is an SNR point: the node is the target time t_k = r'⁻¹(r_lin(1 − σ_k)), and the last
    node is t = 1 (see :func:`sigmas_to_grid`). :attr:`sigmas` holds, as diffusers' schedulers do, the noise level
    of each :attr:`timesteps` entry (the model sigma 1 − τ, at the nodes 1 − τ(t_k); the σ probe's and Heun's
    correctors' included), then 0; :attr:`grid` holds the target times t_k. Custom ``timesteps`` are treated as
    diffusers treats them: without ``sigmas`` they give σ = timesteps / 1000 before the shift, and with ``sigmas``
    (as CogView4 passes them) only label the nodes; either way the network sees them as given at the nodes, and
    between nodes (the σ probe, Heun's last corrector) a piecewise-linear interpolation of them in σ, through (0,
    0).

    **Coordinates.** The pipeline calls the transformer on its latents at the exposed ``timesteps``, so the
    latents are kept in the model's coordinates x = y/c_k (+ β_k μ when centring, below, with β_k = τ_k the data's
    coefficient at the model time) and ``timesteps`` are the model times 1000 (1 − τ(t_k)) at which the converted
    predictor evaluates the network (or the custom timesteps that label those sigmas). ``step`` maps the
    latents to the target state y = c_k (x − β_k μ), takes the step under the target schedule and returns the next
    latents x_{k+1} = y_{k+1}/c_{k+1} + β_{k+1} μ. At t = 1, c = 1 and β = 1, so the final latents are the sample.
    A higher-precision copy of the state is kept between steps and used while the pipeline leaves the latents it
    got back untouched (inpainting pipelines that edit them are followed).

    **The start.** A Gaussian-base target starts at y_0 = α'_0 Z with Z the pipeline's initial latents, as
    ``li.sample(model, noise=Z)`` does (lazy VP: y_0 = σZ). A point-mass target starts at y_0 = 0 (c_0 = 0):
    the initial latents do not enter the state. The network is still called on them at σ = 1, where the exact
    η_X = x + v is E[X] whatever the input, and they seed the SDE noise (below).

    **Centring** (``center``, default on for the lazy schedules as in ``li.sample``). The lazy schedules are lazy
    for centred data, so the sampler runs on X − μ and adds μ back. μ is each sample's own E[X] estimate, free
    at the first evaluation: at σ = 1 (τ = 0), η_X(0, x) = x + v = x − output is E[X] for every input
    (per prompt under conditioning and guidance); for a DDPM-style model it comes from probes ("DDPM-style
    models"). It needs a run that starts at σ = 1; otherwise the default does not centre and ``center=True``
    raises.

    **sigma=None** (lazy schedules). σ is estimated per sample from the model; for a flow model at the cost of one
    extra evaluation inserted after the first (a DDPM-style model's probes are below): the latents are moved to
    the linear-schedule point at :func:`lazyinterp.estimate_sigma`'s SNR r_p, τ_p = r_p/(1 + r_p),
    x_p = (1 − τ_p) Z + τ_p μ (probe noise u = (1 − τ_p) Z from the initial latents), and with
    k = ⟨u, η_X(τ_p, x_p) − μ⟩/‖u‖², σ² = k α²/(β(1 − kβ)) at α = 1 − τ_p, β = τ_p (exact for Gaussian data; the mean
    eigenvalue of the covariance in the linear regime otherwise, as :func:`lazyinterp.estimate_sigma`). Without
    centring σ is the RMS √(σ² + mean μ²). Where the probe's response admits no σ (k ≤ 0 or kβ ≥ 1, as from an
    untrained model) σ = 1 is used, with a warning. The first step then runs from the stored first evaluation.
    Each sample gets its own target schedule: the exposed model times do not depend on σ (SNR-matched nodes),
    only t_k and c_k do. The estimates are in :attr:`estimated_sigma`. Pass a number (e.g. 1 for latents
    normalised to unit variance) to skip the probe. The probe needs a run that starts at σ = 1; a run that continues
    another (a refiner, image-to-image) can take that run's σ and E[X] from :meth:`set_moments` instead.

    **Solvers.** ``solver="euler"`` (Euler, or Euler–Maruyama for an SDE) evaluates once per node. ``"ab2"``
    (two-step Adams–Bashforth; for an SDE with Euler–Maruyama's noise) also evaluates once per node and keeps
    the previous drift between ``step`` calls (``set_timesteps`` clears it): with the drift b_k = b(t_k, y_k) in
    the target coordinates and
    h_k = t_{k+1} − t_k, the first step is Euler and then y_{k+1} = y_k + h_k [(1 + ρ/2) b_k − (ρ/2) b_{k−1}],
    ρ = h_k/h_{k−1}; the last interval takes that step too (``last_step="euler"``, the ODE default) or is
    replaced by x_1 = η_X(t_{N−1}, x) (``"denoise"``). ``"ab2-pc"`` (ODE only, third order, once per node) is
    :func:`lazyinterp.solvers.adams_predictor_corrector`: the latents returned are the AB2-predicted state, and
    the evaluation there first corrects the state the last interval reached with the AM3 weights, then predicts
    the next one from the corrected state with that same drift; a step whose latents the pipeline edited
    (inpainting) is not corrected, so the edit stands. ``"heun"`` (order 2) interleaves like
    ``FlowMatchHeunDiscreteScheduler``: timesteps m_0, m_1, m_1, …, m_{N−1}, m_{N−1}, then m_N = 0 (the
    corrector at t = 1) when ``last_step="euler"``; with ``last_step="denoise"`` (the default for SDEs of two
    steps or more) the last interval is x_1 = η_X(t_{N−1}, x) and m_N is dropped. ``"exponential"`` (once per
    node; ODE or an SDE with ε = κ ε*) is :func:`lazyinterp.solvers.exponential`: the exact step with η_X held
    over the interval, DDIM's step for the ODE and DDPM's ancestral step for ε*; ``"exponential-2m"``
    extrapolates η_X linearly in log-SNR from the node before (second order, once per node). The default is
    :func:`lazyinterp.sample`'s: ``"ab2"`` for an ODE on a lazy schedule, ``"ab2-pc"`` there from 12 steps
    (:data:`lazyinterp.samplers.PC_DEFAULT_FROM_STEPS`, decided in ``set_timesteps``), ``"ab2"`` for the
    point-mass SDE with ε*, ``"exponential-2m"`` for any other SDE with ε = κ ε*, ``"euler"`` otherwise;
    the config keeps ``solver=None`` for it, so a reloaded or re-targeted config takes the default of its own
    schedule and diffusion (:attr:`solver` is the one in use).
    The arithmetic is that of :func:`lazyinterp.sample` with the same grid, so the two agree to float precision.

    **DDPM-style models.** The network is :func:`~lazyinterp.diffusers.ddpm_model`'s: the continuous VP schedule of
    the config's ``alphas_cumprod`` (``beta_schedule``, ``beta_start``, ``beta_end``, ``trained_betas``,
    ``rescale_betas_zero_snr`` and CogVideoX's ``snr_shift_scale``, computed by diffusers), its output read by
    ``prediction_type``, and the timestep the continuous index u = T − 1 − T τ (a float; never beyond index 0). The
    nodes are li.sample's default grid, the SNRs of the linear schedule's uniform grid (each divided by ``shift``);
    the native scheduler's own spacing settings (``timestep_spacing``, Karras sigmas, …) do not apply. Custom
    ``timesteps`` are indices n (nodes at ᾱ_n's SNR, which the network then sees exactly) and custom ``sigmas`` the
    noise levels √((1 − ᾱ)/ᾱ) of k-diffusion and ``EulerDiscreteScheduler``; the noisiest index T − 1 (or its noise
    level, or more) is the start t = 0, as in the default grid. The initial latents are the noise Z (y_0 = α'_0 Z),
    as DDIM takes them for the noisiest index. The first evaluation of such a model is not at SNR 0, so it does not
    give E[X]: E[X] and σ come from two antithetic probes at :func:`lazyinterp.estimate_sigma`'s SNR r_p instead, at
    the initial latents w and at −w (k = ⟨(η_X(w) − η_X(−w))/2, w⟩/‖w‖², μ = ((η_X(w) + η_X(−w))/2)/(1 − kβ_p), σ² =
    kα_p²/(β_p(1 − kβ_p)); read at the latents the pipeline actually passes, should it edit them; exact for Gaussian
    latents, per sample and per prompt, in :attr:`estimated_sigma` and :attr:`estimated_mean`). They are the first
    two :attr:`timesteps` when σ is estimated or the run centres (by default it centres only when σ is estimated;
    with σ given, ``center=True`` adds them), and for a point-mass target, whose first evaluation must see the state
    0. A run that opens with them cannot start mid-way (image-to-image). With the mean known the drift at t = 0 is
    known too, so the first node is not evaluated (li.sample's ``known_start``): N steps cost N + 1 evaluations.
    ``add_noise`` (UNet image-to-image pipelines) is :meth:`scale_noise`, √(1 − ᾱ) noise + √ᾱ sample; ``step`` takes
    DDIM pipelines' ``eta`` (0 only: the SDEs are ``diffusion``) and ``use_clipped_model_output``. The latents equal
    li.sample's on ``ddpm_model`` of the same UNet with the estimated σ and E[X] (``center=estimated_mean[i]``); a
    run that evaluates the first node (no probes) passes the network Z there, where li.sample passes α_0 Z.

    **Covariance** (``covariance``, ODE on ``"lazy-vp"`` only). Lazy VP coordinates matched to a covariance Σ of
    the latents instead of a scalar σ, as ``li.sample(covariance=...)`` (:mod:`lazyinterp.covariance`): exact in
    one Euler step for any Gaussian latents. Pass a :class:`~lazyinterp.Covariance` (for large latents a low-rank
    one, e.g. ``li.Covariance.spiked_from_samples(latents)`` of encoded images) or a (D, D) matrix over the
    latents as the pipeline holds them (packed for FLUX). The state is y = (A/α) c (x − β μ) and starts at
    Σ^{1/2} Z; σ, left to the scheduler, is √(tr Σ/D) and only sets the time variable. The default solver follows
    li.sample: Euler below 7 steps, then AB2, then AB2-AM3 from 12. The covariance is not saved to the config.

    **Noise.** SDEs draw one standard normal per step and sample from per-sample streams
    (:class:`lazyinterp.noise.NoiseStreams`). With ``step(..., generator=g)`` the base seed is one draw from ``g``,
    as ``li.sample(generator=g)``. SD3 and FLUX pipelines do not pass their generator to ``step``; then sample i's
    stream is seeded by a hash of its initial latents (with i), so a pipeline call with a seeded generator is
    reproducible. :attr:`noise_seeds` records the seeds: ``li.sample(..., generator=noise_seeds[i], indices=[i])``
    reproduces sample i. With ``sde_noise="brownian"`` the steps read the increments of each sample's Brownian
    path over its grid (:class:`lazyinterp.brownian.BrownianPaths`, keyed by the same seed and index), as
    ``li.sample(sde_noise="brownian")`` does, so runs with more steps refine the same samples. With
    ``sde_noise="keyed"`` the draws are computed on the latents' device from the same seeds
    (:class:`lazyinterp.noise.KeyedStreams`), as ``li.sample(sde_noise="keyed")`` does.

    Args:
        num_train_timesteps: the timestep scale of a flow model (timestep = 1000 σ), or a DDPM model's T.
        schedule: the target schedule: a name in ``lazyinterp.SCHEDULES`` or a :class:`~lazyinterp.Schedule`
            (custom schedule objects work but are saved to the config by name only).
        sigma: σ of a lazy schedule; ``None`` estimates it per sample (above).
        diffusion: ``"ode"``, ``"optimal"`` (ε*), a number κ (ε = κε*) or a callable ε(t) (not saved); ``None``
            for ``"optimal"`` on the point-mass schedule and ``"ode"`` on any other.
        solver: ``"euler"``, ``"heun"``, ``"ab2"``, ``"ab2-pc"`` (ODE only), ``"exponential"`` or
            ``"exponential-2m"``;
            ``None`` for ``"ab2"`` on a lazy-schedule ODE (``"ab2-pc"`` from 12 steps) and on the point-mass SDE
            with ε*, ``"exponential-2m"`` for any other SDE with ε = κ ε* and ``"euler"`` otherwise.
        last_step: ``"euler"`` or ``"denoise"``; default ``"euler"`` for ODEs and ``"denoise"`` for SDEs.
        center: centre on the model's own E[X] estimate; default on for lazy schedules.
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len, time_shift_type,
        shift_terminal, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: as in
            ``FlowMatchEulerDiscreteScheduler``; they shape the sigmas before the SNR matching.
        invert_sigmas: must be False (Mochi's inverted convention is not supported).
        use_flow_sigmas: read by FLUX pipelines; when True they pass only ``num_inference_steps``.
        stochastic_sampling: must be False (kept in the config, which some pipelines read); ``diffusion`` gives
            SDEs that keep the marginals.
        covariance: a :class:`~lazyinterp.Covariance` or (D, D) tensor for covariance-matched lazy VP (above).
        sde_noise: ``"independent"``, ``"keyed"`` or ``"brownian"``, as in ``li.sample`` (Noise, above).
        prediction_type: ``None`` or ``"flow_prediction"`` for a flow model; ``"epsilon"``, ``"v_prediction"`` or
            ``"sample"`` for a DDPM-style one (above).
        beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr: a DDPM-style model's betas, as
            in ``DDPMScheduler``.
        flow_shift: DPMSolver's and UniPC's name for the shift of a flow model; used when ``shift`` is 1.
        sigma_data: must be None (EDM-preconditioned models are ``li.ve_denoiser_model``'s).
        snr_shift_scale: CogVideoX's shift s of a DDPM-style model's ᾱ, ᾱ/(s + (1 − s) ᾱ); 1 for none.
        timestep_type, sigma_min, sigma_max: as in ``EulerDiscreteScheduler``: with ``"continuous"`` a v-prediction
            network sees the timestep ¼ ln σ for noise levels σ from ``sigma_min`` to ``sigma_max`` (Stable Video
            Diffusion; :func:`~lazyinterp.diffusers.continuous_noise_schedule`), not an index.

    Raises:
        ValueError: an unknown schedule, diffusion, solver or last step, a sigma for a non-lazy schedule, a
            point-mass schedule with an ODE, ``"ab2-pc"`` with an SDE, or a covariance other than
            on the lazy VP ODE.
    """

    # The configs this scheduler is made from: their keys that it does not take (a native sampler's own grid and
    # step settings, e.g. timestep_spacing, solver_order) are dropped by from_config without a warning.
    _compatibles: list[str] = sorted(_DDPM_FAMILY) + ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler",
                                                       "FlowMatchEulerDiscreteScheduler",
                                                       "FlowMatchHeunDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, schedule: str = "lazy-vp", sigma: float | None = None,
                 diffusion: str | float | None = None, solver: str | None = None, last_step: str | None = None,
                 center: bool | None = None, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: float | None = 0.5, max_shift: float | None = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, time_shift_type: str = "exponential",
                 shift_terminal: float | None = None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, invert_sigmas: bool = False,
                 use_flow_sigmas: bool = False, covariance: Any = None, sde_noise: str = "independent",
                 stochastic_sampling: bool = False, prediction_type: str | None = None,
                 beta_start: float = 0.0001, beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas: Any = None, rescale_betas_zero_snr: bool = False, flow_shift: float | None = None,
                 sigma_data: float | None = None, snr_shift_scale: float = 1.0, timestep_type: str = "discrete",
                 sigma_min: float | None = None, sigma_max: float | None = None):
        if prediction_type not in _FLOW_PREDICTIONS:
            ddpm_prediction_kind(prediction_type)  # names prediction_type if it is none of diffusers' kinds
        if sigma_data is not None:
            raise ValueError("sigma_data: this is an EDM-preconditioned model's config; wrap its denoiser with "
                             "li.ve_denoiser_model and sample it with li.sample")
        snr_shift_scale = check_number(snr_shift_scale, "snr_shift_scale", positive=True)
        if prediction_type in _FLOW_PREDICTIONS:
            if snr_shift_scale != 1.0:
                raise ValueError("snr_shift_scale: CogVideoX's SNR shift of a DDPM-style model's alphas_cumprod; a "
                                 "flow model takes shift")
            self._source: _FlowSource | _DDPMSource = _FlowSource(check_int(num_train_timesteps,
                                                                           "num_train_timesteps"))
        else:
            abar = _ddpm_alphas_cumprod(check_int(num_train_timesteps, "num_train_timesteps", 3), beta_start,
                                        beta_end, beta_schedule, trained_betas, bool(rescale_betas_zero_snr),
                                        snr_shift_scale)
            if timestep_type not in ("discrete", "continuous"):
                raise ValueError(f"timestep_type: expected 'discrete' or 'continuous', got {timestep_type!r}")
            self._source = _DDPMSource(network_schedule(abar, prediction_type, timestep_type, sigma_min, sigma_max),
                                       prediction_type)
        if flow_shift is not None and shift == 1.0:
            # DPMSolver's and UniPC's name for the shift of flow models (Wan, SANA).
            shift = flow_shift
        if sde_noise not in SDE_NOISES:
            raise ValueError(f"sde_noise: expected one of {', '.join(SDE_NOISES)}, got {sde_noise!r}")
        self._sde_noise = sde_noise
        if stochastic_sampling:
            raise ValueError("stochastic_sampling: FlowMatchEuler's re-noising from the data prediction does not keep "
                             "the marginals; pass stochastic_sampling=False, and diffusion='optimal' or a number "
                             "for an SDE that does")
        if invert_sigmas:
            raise ValueError("invert_sigmas: inverted sigmas are not supported; flow models here go from noise "
                             "(sigma 1) to data (sigma 0)")
        if sum(bool(flag) for flag in (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)) > 1:
            raise ValueError("use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: set at most one of them")
        target, config_name, config_sigma = self._target_schedule(schedule, sigma)
        # The default last step is settled per run, in set_timesteps (a one-step SDE run takes Euler's).
        probe_diffusion, self._solver, self._last_step = check_settings(target, diffusion, solver, last_step,
                                                                        covariance is not None)
        self._covariance = self._check_covariance(covariance)
        if self._covariance is not None and not target.resolved:
            # As in li.sample: with a covariance, σ only sets the time variable, √(tr Σ/D) unless given.
            target = target.resolve(math.sqrt(self._covariance.mean_eigenvalue))
        self._target = target
        self._diffusion_arg = diffusion
        self._is_sde = not probe_diffusion.is_ode
        # The default is li.sample's: in lazy coordinates AB2 beats Euler at equal NFE (README, "Benchmarks").
        # From PC_DEFAULT_FROM_STEPS steps on, set_timesteps moves that default to its third-order form, ab2-pc.
        self._multistep_default = solver is None and isinstance(target, LazySchedule) and not self._is_sde
        # An SDE's default is settled per run too (li.sample's one-step rule): kept here to start from each time.
        self._default_sde_solver = self._solver if solver is None and self._is_sde else None
        # li.sample may know more solvers than the stepping below implements; those must not run as Euler.
        if self._solver not in _SOLVERS:
            raise ValueError(f"solver: LazyScheduler implements {', '.join(_SOLVERS)} (or None for the default), "
                             f"got {solver!r}")
        check_optional_bool(center, "center")
        self._center_arg = center
        if self._solver == "heun":
            self.order = 2
        config_diffusion = diffusion if diffusion is None or isinstance(diffusion, (str, int, float)) else "custom"
        # Values normalised here are explicit settings now, not defaults to be dropped on reload. A default solver
        # stays None, so that a reloaded or re-targeted config (from_config(config, diffusion="optimal")) picks
        # the default of its own schedule and diffusion rather than inheriting ab2.
        defaults = [k for k in self.config.get("_use_default_values", [])
                    if k not in ("schedule", "sigma", "shift")]
        # A covariance is data, not configuration: it is not saved (pass it again to from_config).
        self.register_to_config(schedule=config_name, sigma=config_sigma, diffusion=config_diffusion,
                                solver=None if solver is None else self._solver, covariance=None,
                                shift=shift, flow_shift=None, _use_default_values=defaults)
        self._shift = check_number(shift, "shift", positive=True)
        self.init_noise_sigma = 1.0
        train = torch.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps, dtype=torch.float32)
        self.sigmas = torch.cat([train, torch.zeros(1)])
        self.timesteps = train * num_train_timesteps
        self.num_inference_steps: int | None = None
        self._model_sigmas: Tensor | None = None
        # Sharing the object with a linear target makes the conversion the identity (τ = t, c = 1 exactly).
        if self._source.is_flow and target.name == "linear":
            self._source.schedule = target
        self._begin_index: int | None = None
        self._custom_grid = False  # the last set_timesteps took sigmas or timesteps (not only a step count)
        # set_moments: σ (per sample) and E[X] for the next run, taken over by it at its first step.
        self._pending_sigma: Tensor | None = None
        self._pending_mean: Tensor | None = None
        self._plan: list[tuple[str, int]] | None = None
        self._known_start = False
        self._reset_run()

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' ``from_config``, reading first what kind of model the config describes.

        diffusers drops the values a config holds at their defaults before they reach ``__init__``, and
        ``DDPMScheduler()`` or a Stable Diffusion ``scheduler_config.json`` leave ``prediction_type`` at its
        default, "epsilon"; ``HeunDiscreteScheduler()`` or an LCM config leave betas at defaults other than
        these. So what describes the model (:data:`_MODEL_KEYS`: prediction type, betas, an EDM config's
        ``sigma_data``) is read from the config as given, and where it is missing, from the defaults of the
        diffusers class its ``_class_name`` names; keyword arguments still win. A config of a diffusers scheduler
        for another kind of model (variance-exploding, discrete, RePaint, …) is refused.
        """
        if isinstance(config, dict):
            name = config.get("_class_name")
            if isinstance(name, str) and name in _OTHER_MODELS:
                raise ValueError(f"config: {name} is for {_OTHER_MODELS[name]}, not a flow-matching or DDPM-style "
                                 "model that LazyScheduler reads")
            native = _init_defaults(name)
            for key in _MODEL_KEYS:
                value = config[key] if key in config else native.get(key)
                if key not in kwargs and value is not None:
                    kwargs[key] = value
            # A scheduler's own config in memory carries no _class_name; one with a model's betas or noise levels
            # but neither a prediction type nor a flow shift is for another kind of model.
            if kwargs.get("prediction_type") is None and not any(k in config for k in _FLOW_KEYS) and \
                    any(k in config for k in ("beta_schedule", "trained_betas", "sigma_max", "scaler")):
                raise ValueError("config: it names no prediction_type and is not a flow-matching config (no shift), "
                                 "so it is for another kind of model (variance-exploding, RePaint, Würstchen, …); "
                                 "pass prediction_type if it is a DDPM-style model")
        return super().from_config(config, return_unused_kwargs, **kwargs)

    @staticmethod
    def _check_covariance(covariance: Any) -> Covariance | None:
        """``covariance`` as a :class:`~lazyinterp.Covariance` (a (D, D) matrix is decomposed once), or None."""
        if covariance is None:
            return None
        if isinstance(covariance, str):
            raise ValueError("covariance: a scheduler cannot draw the model's own samples; pass a li.Covariance "
                             "(e.g. li.Covariance.spiked_from_samples(latents)) or a (D, D) matrix")
        if isinstance(covariance, Tensor):
            return Covariance.from_matrix(covariance)
        if not isinstance(covariance, Covariance):
            raise TypeError(f"covariance: expected a li.Covariance or a (D, D) tensor, got {type(covariance).__name__}")
        return covariance

    @staticmethod
    def _target_schedule(schedule: Any, sigma: float | None) -> tuple[Schedule, str, float | None]:
        """The target schedule object, and the (schedule, sigma) pair the config stores for it."""
        if isinstance(schedule, LazySchedule):
            if sigma is not None and schedule.sigma is not None and float(sigma) != schedule.sigma:
                raise ValueError(f"sigma: {sigma} contradicts the schedule's own sigma {schedule.sigma}")
            sig = schedule.sigma if schedule.sigma is not None else sigma
            name = "point-mass" if schedule.family == "point_mass" else "lazy-vp"
            return SCHEDULES[name](sig) if sig is not None else schedule, name, sig
        target = get_schedule(schedule)
        if isinstance(target, LazySchedule):
            if sigma is not None:
                target = target.resolve(sigma)
            return target, str(schedule).strip().lower().replace("_", "-"), target.sigma
        if sigma is not None:
            raise ValueError(f"sigma: only the lazy schedules (lazy-vp, point-mass) take a sigma, not {target.name}")
        key = target.name if isinstance(schedule, Schedule) else str(schedule).strip().lower().replace("_", "-")
        return (linear() if key == "linear" else target), key, None

    # Properties of the diffusers contract -----------------------------------------------------------------------
    @property
    def solver(self) -> str:
        """The solver in use: the configured one, or the default for the schedule and diffusion."""
        return self._solver

    @property
    def shift(self) -> float:
        """The static shift applied to the sigmas (when ``use_dynamic_shifting`` is off)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Set the SNR divisor of the grid (diffusers' ``shift``), a finite number > 0."""
        self._shift = check_number(shift, "shift", positive=True)

    @property
    def step_index(self) -> int | None:
        """The index of the next ``step`` in :attr:`timesteps`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first index into :attr:`timesteps`, set by pipelines through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``timesteps[begin_index]`` (image-to-image pipelines skip the noisiest nodes)."""
        if begin_index and self._solver == "heun" and self._custom_grid:
            # diffusers' retrieve_timesteps reports len(timesteps) as the step count when it passes sigmas or
            # timesteps, so the pipeline's start, order · int(steps · (1 − strength)), counts Heun's two
            # entries per node twice: past the run's end, or at a node the strength does not pick.
            raise ValueError("begin_index: a pipeline that passes sigmas or timesteps (FLUX, and any call with "
                             "custom sigmas) counts Heun's two timesteps per node as two steps, so its part-way "
                             "start would skip the wrong nodes; use a solver with one timestep per node (the "
                             "default, 'euler', 'ab2') for image-to-image there")
        self._begin_index = begin_index

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The latents as they are: flow models take them unscaled."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def grid(self) -> Tensor | None:
        """The target-time grid when all samples share one schedule (None before it is known)."""
        if self._lanes is not None and len(self._lanes) == 1:
            return torch.tensor(self._lanes[0].grid, dtype=_F64)
        if self._target_resolved and self._model_sigmas is not None:
            return sigmas_to_grid(self._model_sigmas, self._target)
        return None

    @property
    def _target_resolved(self) -> bool:
        return getattr(self._target, "resolved", True)

    @property
    def _sigma_known(self) -> bool:
        """σ needs no reading from the model: the schedule has one, or set_moments gave it."""
        return self._target_resolved or self._given_sigma is not None or self._pending_sigma is not None

    @property
    def _mean_given(self) -> bool:
        return self._given_mean is not None or self._pending_mean is not None

    def set_moments(self, sigma: Any = None, mean: Any = None) -> None:
        """σ and E[X] for the next run, instead of reading them from the model: a refiner or an image-to-image pass
        that continues another run takes that run's, ``refiner.scheduler.set_moments(base.scheduler.estimated_sigma,
        base.scheduler.estimated_mean)``, and is then in the same lazy coordinates. The next run needs no probes,
        so it may start part-way; it takes them over at its first step, and the runs after it read their own again.

        Args:
            sigma: σ of the lazy schedule, one number or one per sample (None: the scheduler's own).
            mean: E[X] per sample, shaped as the latents (or broadcastable to them); the run centres on it unless
                ``center=False``.

        Raises:
            ValueError: a σ that is not positive and finite, a σ for a schedule that takes none or with a
                covariance, or a mean that is not finite.
            TypeError: a mean that is not a tensor.
        """
        given_sigma = None
        if sigma is not None:
            if not isinstance(self._target, LazySchedule):
                raise ValueError(f"sigma: only the lazy schedules (lazy-vp, point-mass) take a sigma, not "
                                 f"{self._target.name}")
            if self._covariance is not None:
                raise ValueError("sigma: a covariance-matched run takes its sigma from the covariance")
            given_sigma = _numbers(sigma, "sigma").to(_F64).flatten()
            if given_sigma.numel() == 0 or not bool(torch.isfinite(given_sigma).all()) or \
                    not bool((given_sigma > 0).all()):
                raise ValueError(f"sigma: expected positive finite numbers, got {given_sigma.tolist()}")
        given_mean = None
        if mean is not None:
            if not isinstance(mean, Tensor):
                raise TypeError(f"mean: expected a tensor shaped as the latents, got {type(mean).__name__}")
            if not bool(torch.isfinite(mean).all()):
                raise ValueError("mean: expected finite values")
            given_mean = mean.detach()
        self._pending_sigma, self._pending_mean = given_sigma, given_mean

    # Timesteps -------------------------------------------------------------------------------------------------
    def _reset_run(self) -> None:
        self._step_index: int | None = None
        self._lanes: list[_Lane] | None = None
        self._mean: Tensor | None = None
        self._sample_keys: list[tuple[int, int]] | None = None
        self._draws: list | None = None
        self._brownian: list | None = None
        self._y: Tensor | None = None
        self._returned: Tensor | None = None
        self._heun: tuple | None = None
        self._previous_drift: Tensor | None = None
        self._previous_x_hat: tuple[int, Tensor] | None = None  # exponential-2m: (node, η_X there)
        self._drifts: list[Tensor] = []  # ab2-pc: d_{k−2}, d_{k−1}, d_k
        self._corrector_start: Tensor | None = None  # ab2-pc: the corrected state the last interval left from
        self._edited = False  # the pipeline changed the latents this step returned
        self._deferred: tuple | None = None
        self._probe_mean: Tensor | None = None
        self._probe_direction: Tensor | None = None
        self._probe_plus: Tensor | None = None
        self._center = False
        self._given_sigma: Tensor | None = None
        self._given_mean: Tensor | None = None
        self.estimated_mean: Tensor | None = None
        # Per evaluation, (its index in timesteps, whether the transformer returned NaN or inf, on its device).
        self._nonfinite: list[tuple[int, Tensor]] = []
        self.estimated_sigma: Tensor | None = None
        self.noise_seeds: list[int] | None = None

    def _shifted_sigmas(self, sigmas: Tensor, mu: float | None) -> Tensor:
        """``sigmas`` through exactly FlowMatchEulerDiscreteScheduler's shifting (float32, as it computes).

        Its ``shift_terminal`` stretch maps the last sigma to ``shift_terminal`` by rescaling 1 − σ by its last
        value, which is 0/0 for a run whose only sigma is 1 (one step): that run is left unstretched.
        """
        cfg = self.config
        shift_terminal = cfg.shift_terminal if float(sigmas[-1]) < 1 else None
        helper = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=cfg.num_train_timesteps, shift=self._shift,
            use_dynamic_shifting=cfg.use_dynamic_shifting, base_shift=cfg.base_shift, max_shift=cfg.max_shift,
            base_image_seq_len=cfg.base_image_seq_len, max_image_seq_len=cfg.max_image_seq_len,
            shift_terminal=shift_terminal,
            use_karras_sigmas=cfg.use_karras_sigmas, use_exponential_sigmas=cfg.use_exponential_sigmas,
            use_beta_sigmas=cfg.use_beta_sigmas, time_shift_type=cfg.time_shift_type)
        helper.set_timesteps(sigmas=sigmas.tolist(), mu=mu)
        return helper.sigmas[:-1].to(_F64)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: Any = None, mu: float | None = None, timesteps: Any = None,
                      original_inference_steps: int | None = None, strength: float = 1.0) -> None:
        """Build the grid and the model timesteps the pipeline evaluates (see the class docstring).

        Args:
            num_inference_steps: N, the number of grid intervals (default sigmas linspace(1, 1/N, N)).
            device: where :attr:`timesteps` live.
            sigmas: custom diffusers sigmas (N values, decreasing, noise first, without the final 0).
            mu: the dynamic shift (required when ``use_dynamic_shifting``).
            timesteps: custom timesteps the network sees at the nodes; without ``sigmas`` also the sigmas,
                as 1000 σ before the shift.
            original_inference_steps: taken from latent consistency pipelines and not used (it spaces
                ``LCMScheduler``'s own grid).
            strength: 1 only: latent consistency image-to-image pipelines pass it here, and a part-way start is
                taken through :meth:`set_begin_index` instead.

        Raises:
            ValueError: neither steps nor sigmas/timesteps, lengths that disagree, a missing ``mu``, sigmas outside
                (0, 1] or not decreasing, timesteps that are not finite, a strength other than 1, or a device this
                machine lacks.
        """
        if strength != 1:
            raise ValueError(f"strength: a part-way start is taken through set_begin_index, as image-to-image "
                             f"pipelines other than the latent consistency ones call it; got {strength!r}")
        cfg = self.config
        if device is not None:
            device = check_device(device)
        self._custom_grid = sigmas is not None or timesteps is not None
        if not self._source.is_flow:
            self._set_ddpm_timesteps(num_inference_steps, device, sigmas, timesteps)
            return
        labels = None if timesteps is None else _as_timesteps(timesteps)
        raw = None if sigmas is None else _as_sigmas(sigmas)
        if raw is not None and labels is not None and len(labels) != raw.numel():
            raise ValueError(f"sigmas, timesteps: expected the same length, got {raw.numel()} and {len(labels)}")
        if raw is None and labels is not None:
            try:
                raw = _as_sigmas(labels.astype(np.float64) / cfg.num_train_timesteps)
            except ValueError as exc:
                raise ValueError(f"timesteps: expected values in (0, {cfg.num_train_timesteps}], strictly "
                                 f"decreasing, got {labels.tolist()}") from exc
        if raw is None:
            if num_inference_steps is None:
                raise ValueError("num_inference_steps, sigmas: give the number of steps or the sigmas")
            n = check_int(num_inference_steps, "num_inference_steps", 1, MAX_STEPS)
            raw = torch.linspace(1.0, 1.0 / n, n, dtype=_F64)
        else:
            if num_inference_steps is not None and num_inference_steps != raw.numel():
                raise ValueError(f"num_inference_steps: {num_inference_steps} does not match len(sigmas) = "
                                 f"{raw.numel()}")
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("mu: required when use_dynamic_shifting is True (pipelines compute it from the image "
                             "size)")
        if mu is not None:
            mu = check_number(mu, "mu")
        model_sigmas = _as_sigmas(self._shifted_sigmas(raw, mu))
        plan, entry_sigmas = self._set_grid(model_sigmas)
        probe = plan[1][0] == "probe" if len(plan) > 1 else False
        if labels is None:
            self.timesteps = self._source.timesteps(entry_sigmas).to(device=device)
            # The probe's τ as the network sees it, through the float32 timestep.
            self._probe_tau = float(self._source.time_of(float(self.timesteps[1]))) if probe else None
        else:
            self.timesteps = _label(entry_sigmas, model_sigmas, labels, cfg.num_train_timesteps).to(device=device)
            self._probe_tau = 1 - float(entry_sigmas[1]) if probe else None
        # One noise level per timesteps entry, then the end's: pipelines index sigmas by their loop index.
        self.sigmas = torch.cat([entry_sigmas, torch.zeros(1, dtype=_F64)]).to(torch.float32)

    def _set_ddpm_timesteps(self, num_inference_steps: int | None, device: torch.device | None, sigmas: Any,
                            timesteps: Any) -> None:
        """:meth:`set_timesteps` for a DDPM-style model: the nodes' SNRs from N (the linear schedule's uniform
        grid, each SNR divided by ``shift``, as ``li.sample``'s ``grid="linear"``), from custom ``timesteps``
        (indices n, at ᾱ_n's SNR) or from custom ``sigmas`` (noise levels √((1 − ᾱ)/ᾱ), SNR 1/σ)."""
        source = self._source
        if sigmas is not None and timesteps is not None:
            raise ValueError("sigmas, timesteps: give one of them for a DDPM-style model")
        if timesteps is not None and source.continuous:
            raise ValueError("timesteps: a network on continuous noise levels (timestep_type='continuous') takes "
                             "sigmas, k-diffusion's noise levels, not timesteps")
        if timesteps is not None:
            index = _numbers(timesteps, "timesteps")
            top = source.train_steps - 1
            if index.ndim != 1 or index.numel() == 0 or not bool(torch.isfinite(index).all()) \
                    or float(index.min()) < 0 or float(index.max()) > top or not bool((torch.diff(index) < 0).all()):
                raise ValueError(f"timesteps: expected indices in [0, {top}], strictly decreasing, got "
                                 f"{index.tolist()}")
            raw = 1 / (1 + source.schedule.snr(source.time_of(index)))
            # The noisiest index is the model's start, t = 0 of every target, as in the default grid.
            raw[index == top] = 1.0
        elif sigmas is not None:
            noise = _numbers(sigmas, "sigmas").flatten()
            if noise.numel() == 0 or not bool(torch.isfinite(noise).all()) or float(noise.min()) <= 0 \
                    or not bool((torch.diff(noise) < 0).all()):
                raise ValueError(f"sigmas: expected positive, finite, strictly decreasing noise levels "
                                 f"√((1 − ᾱ)/ᾱ) without the final 0, got {noise.tolist()}")
            raw = noise / (1 + noise)
            top_noise = source.schedule.alpha(0.0) / source.schedule.beta(0.0)
            raw[noise >= top_noise * (1 - 1e-6)] = 1.0
        else:
            if num_inference_steps is None:
                raise ValueError("num_inference_steps, sigmas: give the number of steps, the timesteps or the "
                                 "sigmas")
            n = check_int(num_inference_steps, "num_inference_steps", 1, MAX_STEPS)
            raw = torch.linspace(1.0, 1.0 / n, n, dtype=_F64)
        if num_inference_steps is not None and num_inference_steps != raw.numel():
            raise ValueError(f"num_inference_steps: {num_inference_steps} does not match the {raw.numel()} "
                             "given timesteps or sigmas")
        shift = self._shift
        # σ' = sσ/(1 + (s − 1)σ) divides the SNR (1 − σ)/σ by s.
        plan, entry_sigmas = self._set_grid(_as_sigmas(shift * raw / (1 + (shift - 1) * raw)))
        self.timesteps = source.timesteps(entry_sigmas).to(device=device)
        self._probe_tau = float(source.time_of(float(self.timesteps[0]))) if plan[0][0] == "probe+" else None
        # Noise levels as k-diffusion and EulerDiscreteScheduler write them, σ = α/β (the data's at SNR 1/σ), one
        # per timesteps entry, then the end's 0: pipelines index sigmas by their loop index.
        entry_tau = source.clamp(1 - entry_sigmas)
        levels = source.schedule.alpha(entry_tau) / source.schedule.beta(entry_tau)
        self.sigmas = torch.cat([levels, torch.zeros(1, dtype=_F64)]).to(torch.float32)

    def _set_grid(self, model_sigmas: Tensor) -> tuple[list[tuple[str, int]], Tensor]:
        """The nodes, solver and evaluation plan for these model sigmas, for a new run: sets
        :attr:`num_inference_steps`, the node sigmas 1 − τ(t_k) and the plan, a list of (role, node) per network
        evaluation, and returns it with the model sigma of each entry."""
        self._reset_run()  # before planning, which reads what set_moments left for this run and not the last's
        model_sigmas[model_sigmas >= 1 - 1e-7] = 1.0
        n = model_sigmas.numel()
        self._model_sigmas = model_sigmas
        self.num_inference_steps = n
        if self._multistep_default:
            # li.sample's rule, including Euler below COVARIANCE_AB2_FROM_STEPS steps with a covariance.
            few = self._covariance is not None and n < COVARIANCE_AB2_FROM_STEPS
            self._solver = "ab2-pc" if n >= PC_DEFAULT_FROM_STEPS else ("euler" if few else "ab2")
        elif self._default_sde_solver is not None:
            self._solver = default_solver_for_steps(self._default_sde_solver, n)
        elif self._solver in EXPONENTIAL_SOLVERS and n == 1 and float(model_sigmas[0]) == 1.0:
            warn_one_exponential_step(self._solver)

        # Model sigmas at the nodes: 1 − τ(t_k). SNR-matched nodes give 1 − σ_k back for a flow model, except where a
        # target's SNR range is narrower than the linear one (vp at t = 0), which time_change clamps. Per-sample σ
        # (estimated) does not move them: the nodes are SNR points.
        flow = self._source.is_flow
        if self._target_resolved or not flow:
            target = self._target if self._target_resolved else self._target.resolve(1.0)
            tau, _ = time_change(self._source.schedule, target, sigmas_to_grid(model_sigmas, target))
            node_sigmas = 1 - tau
        else:
            node_sigmas = torch.cat([model_sigmas, torch.zeros(1, dtype=_F64)])
        self._node_sigmas = node_sigmas

        starts_at_top = float(model_sigmas[0]) == 1.0
        if flow:
            # The σ probe follows the first evaluation, which gives E[X] exactly (τ = 0).
            probe, moments, known_start = not self._sigma_known, False, False
        else:
            # A DDPM model's first evaluation is not at SNR 0, so E[X] and σ come from two antithetic probes at
            # the start instead; a point-mass target's first evaluation must see the state 0 (c = 0), which the
            # pipeline's initial latents are not, so it starts with them too. With the mean known the drift at
            # t = 0 is too, and the first node is not evaluated (li.sample's known_start).
            probe = False
            centre = self._default_center(starts_at_top)
            # With σ and E[X] given (set_moments) they are not read again, except that a point mass at the start
            # still opens with the probes.
            read = not self._sigma_known or (centre and not self._mean_given)
            moments = starts_at_top and (read or self._target.base == "point_mass")
            known_start = moments and centre
        self._known_start = known_start
        self._last_step = self.config.last_step or default_last_step(not self._is_sde, n)
        denoise = self._last_step == "denoise"
        plan: list[tuple[str, int]] = [("probe+", 0), ("probe-", 0)] if moments else []
        for k in range(n):
            if not (k == 0 and known_start):
                plan.append(("pred", k))
            if k == 0 and probe:
                plan.append(("probe", 0))
            if self._solver == "heun" and not (k == n - 1 and denoise):
                plan.append(("corr", k))
        self._plan = plan
        self._begin_index = None
        return plan, torch.tensor([self._entry_sigma(role, node) for role, node in plan], dtype=_F64)

    def _default_center(self, starts_at_top: bool) -> bool:
        """Whether the run centres: ``center`` if given, else on for a lazy target in a run from the top, where
        E[X] is available (free for a flow model, from the σ probes for a DDPM one, which it then needs anyway)."""
        if self._center_arg is not None:
            return self._center_arg
        if self._mean_given:
            return True
        lazy = isinstance(self._target, LazySchedule) and starts_at_top
        return lazy and (self._source.is_flow or not self._sigma_known)

    def _entry_sigma(self, role: str, node: int) -> float:
        if role == "probe":
            # li.estimate_sigma's SNR r_p (β/α of the linear schedule), so both estimate alike (li.estimate_sigma
            # probes again only where σ̂ is more than 4× from 1).
            return 1 / (1 + PROBE_SNR)
        if role in ("probe+", "probe-"):
            source = self._source
            tau = float(source.schedule.snr_inverse(torch.tensor(PROBE_SNR, dtype=_F64)))
            return 1 - source.clamp(tau)
        return float(self._node_sigmas[node + 1 if role == "corr" else node])

    def index_for_timestep(self, timestep: Any, schedule_timesteps: Tensor | None = None) -> int:
        """The first node evaluation (not a Heun corrector or the σ probe) at ``timestep``."""
        times = self.timesteps if schedule_timesteps is None else schedule_timesteps
        value = float(torch.as_tensor(timestep).flatten()[0])
        for i, (role, _) in enumerate(self._plan or []):
            if role == "pred" and abs(float(times[i]) - value) <= 1e-3:
                return i
        raise ValueError(f"timestep: {value} is not one of this scheduler's node timesteps")

    def scale_noise(self, sample: Tensor, timestep: Any, noise: Tensor | None = None) -> Tensor:
        """The forward process at ``timestep`` (image-to-image, inpainting): x_σ = σ noise + (1 − σ) sample for a
        flow model, √(1 − ᾱ) noise + √ᾱ sample for a DDPM one."""
        if self._plan is None:
            raise ValueError("set_timesteps: call it before scale_noise")
        if noise is None:
            raise ValueError("noise: scale_noise needs the noise to mix in")
        times = torch.as_tensor(timestep).flatten()
        if self._begin_index is None:
            indices = [self.index_for_timestep(t) for t in times]
        else:
            indices = [self._step_index if self._step_index is not None else self._begin_index] * times.numel()
        sigmas = [self._entry_sigma(*self._plan[i]) for i in indices]
        if self._source.is_flow:
            sig = torch.tensor(sigmas, dtype=sample.dtype, device=sample.device)
            noise_coef, data_coef = sig, 1.0 - sig
        else:
            tau = self._source.clamp(1 - torch.tensor(sigmas, dtype=_F64))
            noise_coef, data_coef = (c.to(dtype=sample.dtype, device=sample.device) for c in
                                     (self._source.schedule.alpha(tau), self._source.schedule.beta(tau)))
        shape = (-1, *([1] * (sample.ndim - 1)))
        return noise_coef.view(shape) * noise + data_coef.view(shape) * sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Any) -> Tensor:
        """DDPM schedulers' name for :meth:`scale_noise` (image-to-image pipelines of UNet models call it)."""
        return self.scale_noise(original_samples, timesteps, noise)

    # Stepping --------------------------------------------------------------------------------------------------
    def _build_lanes(self, shape: tuple[int, ...], sigmas: list[float] | None) -> None:
        batch = shape[0]
        targets = [(slice(0, batch), self._target)] if sigmas is None else \
            [(slice(i, i + 1), self._target.resolve(s)) for i, s in enumerate(sigmas)]
        covariance = None if self._covariance is None else resolve_covariance(self._covariance, tuple(shape[1:]))
        lanes = []
        for index, target in targets:
            grid = sigmas_to_grid(self._model_sigmas, target)
            tau, scale = time_change(self._source.schedule, target, grid)
            recorded = _Recorded(self._source)
            mean = None if self._mean is None else self._mean[index]
            source = recorded if mean is None else CenteredModel(recorded, mean)
            if covariance is not None:
                dynamics = CovarianceLazyDynamics(convert(source, target), covariance, self._known_start)
            else:
                dynamics = Dynamics(convert(source, target), resolve_diffusion(self._diffusion_arg, target),
                                    self._known_start)
            lanes.append(_Lane(index=index, schedule=target, grid=grid.tolist(), tau=tau.tolist(),
                               scale=scale.tolist(), data_scale=self._data_scale(tau),
                               alpha0=float(target.alpha(0.0)), recorded=recorded, dynamics=dynamics))
        self._lanes = lanes

    def _given_sigmas(self) -> list[float] | None:
        """The per-sample σ set_moments gave this run (None: the schedule's own, or estimated)."""
        return None if self._given_sigma is None else self.estimated_sigma.tolist()

    def _data_scale(self, tau: Tensor) -> list[float]:
        """β of the model at the nodes' times τ_k, the weight of E[X] in its state (τ_k itself for a flow)."""
        return tau.tolist() if self._source.is_flow else self._source.schedule.beta(tau).tolist()

    def _to_state(self, x: Tensor, node: int) -> Tensor:
        """Pipeline latents at ``node`` → target state y = c (x − β μ); y_0 = α'_0 Z at a t = 0 start. With a
        covariance the target state is (A/α) c (x − β μ), and Σ^{1/2} Z at the start. The initial latents are
        the noise Z, for a DDPM model too (whose noisiest state α_0 Z + β_0 X they stand for as in DDIM)."""
        y = torch.empty_like(x)
        for lane in self._lanes:
            xs = x[lane.index]
            matched = isinstance(lane.dynamics, CovarianceLazyDynamics)
            if node == 0 and lane.grid[0] == 0.0:
                y[lane.index] = lane.dynamics.start(xs) if matched else lane.alpha0 * xs
                continue
            if self._mean is not None:
                xs = xs - lane.data_scale[node] * self._mean[lane.index]
            xs = lane.scale[node] * xs
            y[lane.index] = lane.dynamics.from_scalar_state(xs, lane.grid[node]) if matched else xs
        return y

    def _to_latents(self, y: Tensor, node: int) -> Tensor:
        """Target state at ``node`` → pipeline latents x = y/c + β μ (y first mapped by α/A with a covariance)."""
        x = torch.empty_like(y)
        for lane in self._lanes:
            ys = y[lane.index]
            if isinstance(lane.dynamics, CovarianceLazyDynamics):
                ys = lane.dynamics.to_scalar_state(ys, lane.grid[node])
            # At a point-mass start (c = 0) the model's state is 0, as the conversion passes it.
            xs = ys / lane.scale[node] if lane.scale[node] != 0 else torch.zeros_like(ys)
            if self._mean is not None:
                xs = xs + lane.data_scale[node] * self._mean[lane.index]
            x[lane.index] = xs
        return x

    def _record(self, x_in: Tensor, output: Tensor) -> None:
        for lane in self._lanes:
            lane.recorded.x = x_in[lane.index]
            lane.recorded.output = output[lane.index]

    def _start(self, x_in: Tensor, v: Tensor | None, node: int, generator: Any) -> None:
        """First evaluation: the centring decision, a flow model's mean estimate and the SDE noise streams."""
        starts_clean = node == 0 and float(self._node_sigmas[0]) == 1.0
        if self._pending_sigma is not None or self._pending_mean is not None:  # set_moments' are this run's now
            self._given_sigma, self._given_mean = self._pending_sigma, self._pending_mean
            self._pending_sigma = self._pending_mean = None
        center = self._default_center(starts_clean)
        flow = self._source.is_flow
        given_mean = None
        if self._given_mean is not None:
            try:
                given_mean = torch.broadcast_to(self._given_mean.to(device=x_in.device, dtype=x_in.dtype),
                                                x_in.shape)
            except RuntimeError:
                raise ValueError(f"mean: set_moments gave a mean of shape {tuple(self._given_mean.shape)}, which "
                                 f"does not broadcast to the latents' {tuple(x_in.shape)}") from None
        if center and not starts_clean and given_mean is None:
            where = "the evaluation at sigma = 1" if flow else "probes at the start of the run"
            raise ValueError(f"center: centring takes E[X] from {where}, so the run must start at sigma = 1 (not "
                             "image-to-image or custom sigmas below 1); pass center=False, or give E[X] with "
                             "set_moments")
        if not self._sigma_known and not starts_clean:
            raise ValueError("sigma: estimating sigma needs a run that starts at sigma = 1; pass sigma, or give it "
                             "with set_moments")
        self._center = center
        if self._given_sigma is not None:
            batch, count = x_in.shape[0], self._given_sigma.numel()
            if count not in (1, batch):
                raise ValueError(f"sigma: set_moments gave {count} values for a batch of {batch}")
            self.estimated_sigma = self._given_sigma.expand(batch).clone()
        if given_mean is not None:
            self._mean = given_mean if center else None
            self._probe_mean = given_mean
            self.estimated_mean = given_mean
        elif flow:
            # At τ = 0 the linear schedule gives η_X(0, x) = x + v = E[X] for any x.
            mean = x_in + v if (center or not self._sigma_known) else None
            self._mean = mean if center else None
            self._probe_mean = mean
            self.estimated_mean = mean
        if self._is_sde:
            batch, shape = x_in.shape[0], tuple(x_in.shape[1:])
            kw = {"device": x_in.device, "dtype": x_in.dtype}
            if generator is None:
                seeds = [_latents_seed(x_in[i]) for i in range(batch)]
            elif isinstance(generator, (list, tuple)):
                if len(generator) != batch:
                    raise ValueError(f"generator: expected {batch} generators, got {len(generator)}")
                seeds = [_generator_seed(g) for g in generator]
            else:
                seeds = [_generator_seed(generator)]
            self.noise_seeds = seeds
            # Sample i is keyed by (its own seed, i), or by (the batch's seed, i) when one seed serves the batch.
            self._sample_keys = [(seeds[i] if len(seeds) > 1 else seeds[0], i) for i in range(batch)]
            self._path_kw = {"sample_shape": shape, **kw}
            if self._sde_noise != "brownian":  # Brownian paths are read over the lanes' grids, at the first step
                streams = KeyedStreams if self._sde_noise == "keyed" else NoiseStreams
                by_seed = [(s, [i]) for i, s in enumerate(seeds)] if len(seeds) > 1 else [(seeds[0], range(batch))]
                # The same blocks of draws as li.sample takes over the same number of steps.
                self._draws = [normal_draws(streams(s, indices, shape, **kw), self.num_inference_steps)
                               for s, indices in by_seed]

    def _estimate_moments(self, plus: Tensor, minus: Tensor, x_minus: Tensor) -> list[float] | None:
        r"""A DDPM model's E[X] and σ per sample, from η_X at the probes x₊ = w (the initial latents) and x₋ at
        τ_p (α_p, β_p the model's coefficients there); x₋ = −w unless the pipeline edited the latents it got back.
        For Gaussian data η_X(x) = μ + k(x − β_p μ), so k = ⟨η₊ − η₋, x₊ − x₋⟩/‖x₊ − x₋‖²,
        μ = ((η₊ + η₋)/2 − k (x₊ + x₋)/2)/(1 − kβ_p) and σ² = kα_p²/(β_p(1 − kβ_p)), exact for isotropic Gaussian
        data (σ² the mean eigenvalue of the covariance in the linear regime otherwise); with x₋ = −w the level is
        the plain average, which cancels the odd part of a non-linear response.
        Sets the mean when centring; returns the σ when it is to be estimated (else None)."""
        a, b = (float(c) for c in coefficients(self._source.schedule, self._probe_tau)[:2])
        x_plus = self._probe_direction
        step = (x_plus - x_minus).flatten(1)
        slope = ((plus - minus).flatten(1) * step).sum(1) / (step * step).sum(1)
        per_sample = (-1, *([1] * (plus.ndim - 1)))
        level = (plus + minus) / 2 - slope.view(per_sample) * (x_plus + x_minus) / 2
        valid = torch.isfinite(slope) & (slope > 0) & (slope * b < 1)
        # Where the model's response admits no σ (an untrained network) the level is E[X]'s reading.
        gain = torch.where(valid, 1 - slope * b, torch.ones_like(slope))
        level = torch.where(valid.view(per_sample), level, (plus + minus) / 2)
        mean = level / gain.view(per_sample)
        if self._given_mean is None:
            self.estimated_mean = mean
            self._mean = mean if self._center else None
        if self._sigma_known:
            return None
        return self._sigmas_from_slopes(slope, a, b, mean, "probes", stacklevel=4)

    def _estimate_sigma(self, x_in: Tensor, v: Tensor) -> list[float]:
        r"""Per-sample σ from the probe at τ_p: k = ⟨u, η_X − μ⟩/‖u‖², σ² = k α²/(β(1 − kβ))."""
        mean = self._probe_mean
        b = self._probe_tau
        a = 1 - b
        eta_x = x_in + a * v
        u = (x_in - b * mean).flatten(1)
        slope = (u * (eta_x - mean).flatten(1)).sum(1) / (u * u).sum(1)
        return self._sigmas_from_slopes(slope, a, b, mean, "probe", stacklevel=3)

    def _sigmas_from_slopes(self, slopes: Tensor, a: float, b: float, mean: Tensor, where: str,
                            stacklevel: int) -> list[float]:
        """Per-sample σ from the posterior slopes k at (α, β) = (a, b), :func:`~lazyinterp.estimates.sigma_from_slope`
        (the RMS √(σ² + mean μ²) when the run does not centre). A slope no Gaussian has (not 0 < kβ < 1) gives 1,
        with a warning naming the sample; ``stacklevel`` is the caller's."""
        sigmas = []
        for i, k in enumerate(slopes.tolist()):
            if not (math.isfinite(k) and k > 0 and k * b < 1):
                warnings.warn(f"sigma: the model's response at the {where} (slope {k:.3g}) gives no sigma for sample "
                              f"{i}; using 1, the scale of latents normalised to unit variance (pass sigma to choose)",
                              RuntimeWarning, stacklevel=stacklevel + 1)
                sigmas.append(1.0)
                continue
            sigma = sigma_from_slope(k, a, b)
            if self._mean is None:
                sigma = math.hypot(sigma, math.sqrt(float((mean[i] ** 2).mean())))
            sigmas.append(sigma)
        return sigmas

    def _draw(self, node: int) -> Tensor:
        """ξ for the step from ``node``: the next independent draw, or each sample's Brownian increment over it."""
        if self._sde_noise == "brownian":
            if self._brownian is None:
                # Sample i reads the path of its key over its lane's grid from the node the run starts at.
                rows = range(len(self._sample_keys))
                lane_of = {i: lane for lane in self._lanes for i in rows[lane.index]}
                self._brownian = [
                    (xi for block in BrownianPaths(seed, [i], **self._path_kw).increment_blocks(lane_of[i].grid[node:])
                     for xi in block)
                    for seed, i in self._sample_keys]
            return torch.cat([next(path) for path in self._brownian])
        return torch.cat([d() for d in self._draws]) if len(self._draws) > 1 else self._draws[0]()

    def _drift(self, y: Tensor, node: int) -> Tensor:
        out = torch.empty_like(y)
        for lane in self._lanes:
            out[lane.index] = lane.dynamics.drift(y[lane.index], lane.grid[node])
        return out

    def _pred(self, y: Tensor, node: int) -> tuple[Tensor, int]:
        """The step from ``node`` (or Heun's predictor half of it): the new state and the node it is at."""
        n = self.num_inference_steps
        xi = self._draw(node) if self._is_sde else None
        if self._solver == "ab2-pc":
            y = self._correct(y, node)
        if self._solver in EXPONENTIAL_SOLVERS:
            out, x_hat = torch.empty_like(y), torch.empty_like(y)
            # exponential-2m extrapolates from the η_X of the node before, kept from the previous step.
            multistep = self._solver == "exponential-2m" and self._previous_x_hat is not None \
                and self._previous_x_hat[0] == node - 1
            for lane in self._lanes:
                t, idx = lane.grid[node], lane.index
                x_hat[idx] = lane.dynamics.denoise(y[idx], t)
                previous = (log_snr(lane.schedule, lane.grid[node - 1]), self._previous_x_hat[1][idx]) \
                    if multistep else None
                out[idx] = linear_combination(exponential_terms(
                    lane.schedule, t, lane.grid[node + 1], lane.dynamics.diffusion.kappa, y[idx], x_hat[idx],
                    None if xi is None else xi[idx], previous))
            self._previous_x_hat = (node, x_hat)
            return out, node + 1
        if node == n - 1 and self._last_step == "denoise":
            out = torch.empty_like(y)
            for lane in self._lanes:
                out[lane.index] = lane.dynamics.denoise(y[lane.index], lane.grid[node])
            return out, node + 1
        drift = self._drift(y, node) if self._solver != "ab2-pc" else self._drifts[-1]
        previous = self._previous_drift if self._solver in ODE_SOLVERS else None
        step = torch.empty_like(y)
        kick = torch.zeros_like(y)
        for lane in self._lanes:
            t, h = lane.grid[node], lane.grid[node + 1] - lane.grid[node]
            if previous is None:
                step[lane.index] = h * drift[lane.index]
            else:
                # Each lane has its own grid (per-sample σ), so the step ratio is per lane.
                step[lane.index] = ab2_increment(h, t - lane.grid[node - 1], drift[lane.index],
                                                 previous[lane.index])
            if xi is not None:
                eps = lane.dynamics.diffusion.epsilon_at(t)
                if eps > 0:
                    kick[lane.index] = math.sqrt(2 * eps * h) * xi[lane.index]
        if self._solver == "heun":
            self._heun = (y, drift, kick)
        elif self._solver in ODE_SOLVERS:
            self._previous_drift = drift
        if self._solver == "ab2-pc":
            self._corrector_start = y
        return y + step + kick, node + 1

    def _correct(self, y_pred: Tensor, node: int) -> Tensor:
        """ab2-pc at ``node``: records the drift d_k at the predicted state and, from the second node on, returns
        the AM3-corrected state y_k (:func:`lazyinterp.solvers.adams_predictor_corrector`). The corrected state
        moves on with d_k from the predicted one, as there. At a final denoising node the network output belongs
        to the predicted state, so that state is kept, as in li.sample."""
        if node == self.num_inference_steps - 1 and self._last_step == "denoise":
            return y_pred
        self._drifts = [*self._drifts[-2:], self._drift(y_pred, node)]
        # The first step of a run (node 0, or the begin index of image-to-image) has nothing to correct; the
        # second corrects with the trapezoid, as li.sample's does.
        if self._corrector_start is None or self._edited:
            return y_pred
        start, d = self._corrector_start, self._drifts
        three = len(d) == 3
        out = torch.empty_like(y_pred)
        for lane in self._lanes:
            g, idx = lane.grid, lane.index
            h = g[node] - g[node - 1]
            h_prev = g[node - 1] - g[node - 2] if three else None
            out[idx] = start[idx] + am3_increment(h, h_prev, d[-1][idx], d[-2][idx], d[-3][idx] if three else None)
        return out

    def _corr(self, y_pred: Tensor, node: int) -> Tensor:
        y, d0, kick = self._heun
        d1 = self._drift(y_pred, node + 1)
        out = torch.empty_like(y)
        for lane in self._lanes:
            h = lane.grid[node + 1] - lane.grid[node]
            idx = lane.index
            out[idx] = y[idx] + 0.5 * h * (d0[idx] + d1[idx]) + kick[idx]
        self._heun = None
        return out

    def _unchanged(self, sample: Tensor) -> bool:
        ret = self._returned
        return ret is not None and (sample is ret or (sample.shape == ret.shape and sample.dtype == ret.dtype
                                                      and torch.equal(sample, ret)))

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, generator: Any = None,
             return_dict: bool = True, per_token_timesteps: Tensor | None = None, eta: float | None = None,
             use_clipped_model_output: bool | None = None,
             variance_noise: Tensor | None = None) -> LazySchedulerOutput | tuple:
        """One model evaluation's worth of sampling: returns the latents for the next evaluation.

        Args:
            model_output: the network's output at (``sample``, ``timestep``), guidance applied: ε − x_data for a
                flow model, else its ``prediction_type``.
            timestep: the entry of :attr:`timesteps` the pipeline evaluated.
            sample: the latents the network was called on.
            generator: a torch.Generator (or one per sample) for SDE noise; see the class docstring.
            return_dict: return a :class:`LazySchedulerOutput` instead of a tuple.
            per_token_timesteps: must be None; one noise level per token (LTX conditioning) has no single
                conversion to another schedule.
            eta: DDIM's, which pipelines pass: 0 or None (the SDE is ``diffusion``).
            use_clipped_model_output: accepted from DDIM pipelines; nothing is clipped here.
            variance_noise: must be None (SDE noise comes from the per-sample streams).

        Returns:
            The next latents in ``model_output``'s dtype (and the data prediction), the final sample after the
            last entry.
        """
        if self._plan is None:
            raise ValueError("set_timesteps: call it before step")
        if per_token_timesteps is not None:
            raise ValueError("per_token_timesteps: a noise level per token is not supported; the schedule "
                             "conversion needs one noise level per sample")
        if eta is not None and check_number(eta, "eta") != 0:
            raise ValueError(f"eta: DDIM's stochastic step is not taken here, got {eta!r}; pass eta=0 and give the "
                             "scheduler diffusion='optimal' (or a number) for an SDE that keeps the marginals")
        if variance_noise is not None:
            raise ValueError("variance_noise: not taken; SDE noise comes from per-sample streams (pass generator)")
        if not isinstance(model_output, Tensor) or not isinstance(sample, Tensor):
            raise TypeError("model_output, sample: expected tensors")
        learned_variance = not self._source.is_flow and sample.ndim >= 2 and model_output.ndim == sample.ndim and \
            model_output.shape[1] == 2 * sample.shape[1] and model_output.shape[2:] == sample.shape[2:]
        if learned_variance:  # a UNet with a learned variance (DDPMPipeline passes it on): its first C channels
            model_output = model_output[:, : sample.shape[1]]
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output: shape {tuple(model_output.shape)} does not match the sample's "
                             f"{tuple(sample.shape)}")
        if self._step_index is None:
            first = float(torch.as_tensor(timestep).flatten()[0])
            if self._begin_index is not None:
                self._step_index = self._begin_index
            elif abs(float(self.timesteps[0]) - first) <= 1e-3:
                self._step_index = 0  # a DDPM model's run may open with the σ probes
            else:
                self._step_index = self.index_for_timestep(timestep)
            if self._step_index > 0 and any(role.startswith("probe") for role, _ in self._plan):
                # Pipelines that start mid-way index the timesteps by node, which the probes would offset, and
                # the probes need the run's start.
                raise ValueError("begin_index: this run opens with probes that read sigma and E[X] (estimated "
                                 "sigma, or for a DDPM-style model centring or a point-mass target), so it cannot "
                                 "start mid-way (image-to-image, inpainting); pass sigma (and center=False) with a "
                                 "Gaussian-base schedule")
            if not (0 <= self._step_index < len(self._plan)) or \
                    self._plan[self._step_index][0] not in ("pred", "probe+"):
                raise ValueError(f"begin_index: {self._step_index} is not the start of a step of this schedule")
        i = self._step_index
        if i >= len(self._plan):
            raise ValueError("step: the schedule is finished; call set_timesteps again")
        expected = float(self.timesteps[i])
        got = float(torch.as_tensor(timestep).flatten()[0])
        if abs(got - expected) > 1e-3 * max(1.0, abs(expected)):
            raise ValueError(f"timestep: expected {expected:.6g} (timesteps[{i}]), got {got:.6g}")
        role, node = self._plan[i]
        # Checked without waiting for the device: the flags are read once, at the last entry, as li.sample does.
        self._nonfinite.append((i, ~torch.isfinite(model_output.detach()).all()))
        if i == len(self._plan) - 1:
            self._raise_if_nonfinite()
        cdtype = torch.promote_types(sample.dtype, torch.float32)
        x_in = sample.detach().to(cdtype)
        output = model_output.detach().to(cdtype)
        v = -output
        unchanged = self._unchanged(sample)

        with torch.no_grad():
            if role in ("probe+", "probe-"):
                return self._moment_probe(role, x_in, output, model_output.dtype, return_dict, generator)
            if self._lanes is None and role == "pred":
                self._start(x_in, v, node, generator)
                if not self._sigma_known:
                    # The first evaluation waits for σ: the network is sent to the probe point first.
                    self._deferred = (x_in, output)
                    tau = self._probe_tau
                    probe = (1 - tau) * x_in + tau * self._probe_mean
                    return self._finish(probe, None, model_output.dtype, return_dict, y=None)
                self._build_lanes(tuple(x_in.shape), self._given_sigmas())
            if role == "probe":
                sigmas = self._estimate_sigma(x_in, v)
                self.estimated_sigma = torch.tensor(sigmas, dtype=_F64)
                self._build_lanes(tuple(x_in.shape), sigmas)
                x_in, output = self._deferred
                v = -output
                self._deferred = None
                role, unchanged = "pred", False
            state_node = node + 1 if role == "corr" else node
            y = self._y if unchanged and self._y is not None else self._to_state(x_in, state_node)
            self._record(x_in, output)
            data = torch.empty_like(x_in)
            for lane in self._lanes:
                if self._source.is_flow:
                    data[lane.index] = x_in[lane.index] + (1 - lane.tau[state_node]) * v[lane.index]
                else:
                    data[lane.index] = lane.recorded.eta(x_in[lane.index], lane.tau[state_node])[1]
            # A pipeline that edits the latents (inpainting) has the last word on the state: ab2-pc does not
            # correct such a step, as the correction would undo the edit.
            self._edited = not unchanged
            if role == "pred":
                y, next_node = self._pred(y, node)
            else:
                y, next_node = self._corr(y, node), node + 1
            x_next = self._to_latents(y, next_node)
        return self._finish(x_next, data, model_output.dtype, return_dict, y=y)

    def _moment_probe(self, role: str, x_in: Tensor, output: Tensor, dtype: torch.dtype, return_dict: bool,
                      generator: Any) -> LazySchedulerOutput | tuple:
        """A DDPM model's probes at τ_p: the first at the initial latents w, the second at −w; then the state at
        t = 0, and with the mean known the first step from it (:meth:`_estimate_moments`)."""
        probe = _Recorded(self._source)
        probe.x, probe.output = x_in, output
        eta_x = probe.eta(x_in, self._probe_tau)[1]
        if role == "probe+":
            self._start(x_in, None, 0, generator)
            self._probe_direction, self._probe_plus = x_in, eta_x
            return self._finish(-x_in, None, dtype, return_dict, y=None)
        sigmas = self._estimate_moments(self._probe_plus, eta_x, x_in)
        if sigmas is not None:
            self.estimated_sigma = torch.tensor(sigmas, dtype=_F64)
        self._build_lanes(tuple(x_in.shape), self._given_sigmas() if sigmas is None else sigmas)
        y = self._to_state(self._probe_direction, 0)
        self._edited = False
        if self._known_start:
            y, node = self._pred(y, 0)
        else:
            node = 0
        return self._finish(self._to_latents(y, node), None, dtype, return_dict, y=y)

    def _raise_if_nonfinite(self) -> None:
        flags = torch.stack([flag for _, flag in self._nonfinite]).cpu()
        if bool(flags.any()):
            first = self._nonfinite[int(flags.nonzero()[0, 0])][0]
            raise NonFiniteError(f"model_output: the transformer returned NaN or inf at timesteps[{first}] = "
                                 f"{float(self.timesteps[first]):.6g} (step index {first})", step=first)

    def _finish(self, x_next: Tensor, data: Tensor | None, dtype: torch.dtype, return_dict: bool,
                y: Tensor | None) -> LazySchedulerOutput | tuple:
        prev = x_next.to(dtype)
        self._y = y
        self._returned = prev
        self._step_index += 1
        if self._step_index == len(self._plan):
            # The run's own estimate of X is its final sample: latent consistency pipelines return this as the image.
            data = x_next
        data = None if data is None else data.to(dtype)
        if not return_dict:
            return (prev, data)
        return LazySchedulerOutput(prev_sample=prev, pred_original_sample=data)
