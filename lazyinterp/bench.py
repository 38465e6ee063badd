r"""``lazyinterp bench``: samplers compared at equal, exactly counted network evaluations (NFE).

Every sampler of a run starts from the same per-sample noise Z_i (stream (seed, i), see
:mod:`lazyinterp.noise`), and stochastic samplers draw their Brownian increments from a second family of
streams, so the only difference between two results is the sampler.

**Workloads.**

* ``mnist``: a velocity UNet trained under the linear schedule (``--model``, default the bundled one). The
  value is FID-MNIST (:func:`lazyinterp.metrics.evaluate`) on ``n`` samples; the classifier's mean confidence
  and class entropy come with it. FID depends on ``n``: compare only runs with the same ``n``.
* ``gmm-2d``: the mixture X ~ Σ_k w_k N(m_k, C_k) in R² with 8 components whose means lie on a circle of
  radius 2.5 around (1, −0.5), m_k = (1, −0.5) + 2.5 (cos θ_k, sin θ_k), θ_k = 2πk/8, and whose covariances
  C_k = R_k diag(0.35², 0.08²) R_kᵀ are elongated along the circle (R_k the rotation by θ_k + π/2); weights
  w_k ∝ 1 + 0.6 sin(1.7 k + 0.3).
* ``gmm-64d``: 10 components in R⁶⁴ drawn once from a fixed seed (``torch.Generator().manual_seed(64)``):
  m_k = 0.5 + 0.5 ξ_k with ξ_k ~ N(0, I), C_k = Q_k diag(10^{−2 u}) Q_kᵀ with Q_k the Q factor of a standard
  Gaussian matrix and u ~ U(0, 1)⁶⁴ (eigenvalues spread over two decades), weights w_k = 0.5 + U(0, 1).
* ``--mode-scale S`` multiplies every component covariance of either mixture by S, means and weights kept: S > 1
  moves it towards one Gaussian, S < 1 towards point masses.

Both mixtures have closed-form predictors, so the model (:meth:`GaussianMixture.model`, the exact
linear-schedule velocity v(t, x) = E[X − Z | (1 − t) Z + t X = x]) has no training error and every
difference is discretisation error. Their metrics:

* ``value``, the sliced Wasserstein-2 distance to the target,
  SW₂(P, Q)² = E_θ W₂²(θ♯P, θ♯Q) for θ uniform on the unit sphere, estimated with L = 128 fixed directions
  (the same for every sampler) against M = k·n fresh target samples. On the line, the optimal coupling between
  n equal atoms x_(1) ≤ … ≤ x_(n) and M equal atoms y_(1) ≤ … ≤ y_(M) is monotone, so
  W₂² = (1/M) Σ_j (x_(⌈j/k⌉) − y_(j))² exactly. The "noise floor" reported with the reference is the mean
  (and spread) of SW₂ over 5 sets of n fresh target samples: below it a sampler cannot be told apart from the
  target. Because every sampler starts from the same noise, differences between samplers are less noisy than
  the floor's spread.
* ``path_error`` (every workload), the mean per-sample distance (1/n) Σ_i ‖x_i − x_i^ref‖₂ to the reference
  ODE solution from the same noise: linear-schedule Heun at ``--reference-nfe`` NFE, converged for the exact
  mixture model. All ODE samplers share the probability-flow map Z ↦ X (the conversion is exact), so this
  measures discretisation error pathwise. It is left out (null) for stochastic samplers, whose samples are not
  a function of Z.
* ``sde_path_error`` (the mixtures, by default), its analogue for the samplers of the point-mass SDE with ε*:
  each is run a second time with ``sde_noise="brownian"`` (one Brownian path per sample, the same whatever the
  grid, :mod:`lazyinterp.brownian`) and compared, sample by sample, with the same SDE solved by Euler–Maruyama
  on the same paths, over the SNR-matched grid of ``SDE_REFERENCE_STEPS`` steps with its times rounded to the
  paths' dyadic nodes (:func:`sde_reference_grid`). It measures the strong (pathwise) error of the SDE solvers;
  ``value`` stays the run with independent noise.

**Counting NFE.** Euler, AB2, AB2-PC and Euler–Maruyama use N evaluations for N steps. Heun uses 2N, or 2N − 1 when
its last interval is the denoising step x_1 = η_X(t_{N−1}, x). The lazy schedules centre the data, which makes the
drift at t = 0 known without the network (``li.sample``'s ``known_start``): their N steps cost one evaluation fewer,
so a target K is reached with N = K + 1 steps (Heun: 2N − 1 or 2N − 2 = K). A linear Heun at K = 1 would be a bare
denoising step and is skipped. diffusers' FlowMatchHeun uses 2N − 1 evaluations (Euler on its last interval), DPM-
Solver++ and UniPC N, and flow_matching's midpoint rule 2 per step. Every run is checked against the model's own
evaluation counter (minus the one-off evaluations that estimate E[X] and σ for the lazy schedules, reported as
``estimation_nfe``); a (sampler, K) pair that cannot reach K exactly is listed in ``skipped``.

**Peers** are driven through their own packages (the ``bench`` extra: ``diffusers``, ``flow_matching``).
diffusers writes x_σ = (1 − σ) x_data + σ ε with the model predicting ε − x_data = −v(1 − σ, x), and its
``timesteps`` are 1000 σ; the model is evaluated at σ = timestep/1000, as diffusers pipelines do (DPM-Solver++
and UniPC truncate their timesteps to integers). flow_matching's ``ScheduleTransformedModel`` moves the linear
model (``CondOTScheduler``) to its ``CosineScheduler``, solved by its ``ODESolver`` with the midpoint rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from tqdm import tqdm

from . import distributed, graphs
from .brownian import DEFAULT_DEPTH as BROWNIAN_DEPTH
from .cli_errors import UserError, as_option_message, one_line_message
from .conversion import convert
from .distributed import Context
from .fetch import atomic_path, cache_dir, ensure_writable, save_figure, sha256_file
from .grids import MAX_STEPS, snr_matched_grid
from .noise import NoiseStreams, sample_seed
from .predictors import Model, NonFiniteError
from .samplers import default_known_start, sample
from .schedules import linear, point_mass
from .solvers import count_nfe, steps_for_nfe
from .targets import GaussianMixture

Tensor = torch.Tensor

WORKLOADS = ("mnist", "gmm-2d", "gmm-64d")
DEFAULT_NFE = "1,2,3,4,6,8,12,16"
# On the mixtures the sliced W2 of n exact samples sits at a floor that falls like 1/√n; with 4000 samples the floor
# (0.022 ± 0.003 on gmm-64d) exceeded the gaps between samplers from 6 NFE, so those could not be ranked.
DEFAULT_N = {"mnist": 2000, "gmm-2d": 16000, "gmm-64d": 16000}
DEFAULT_BATCH = {"mnist": 250}
FAMILIES = ("peer", "baseline", "ours")
SLICED_DIRECTIONS = 128
# The target sample behind the sliced distance has at least this many points (a multiple of n).
TARGET_POINTS = 40_000
OVERHEAD_SAMPLERS = ("lazy-vp-euler", "point-mass-sde", "point-mass-sde-exp2m")
# The SDEs' overhead is measured with each of these noises: the host's per-sample generators (the default) and
# draws computed on the device (reported as "<sampler>-keyed").
OVERHEAD_SDE_NOISES = ("independent", "keyed")
OVERHEAD_BATCH, OVERHEAD_STEPS, OVERHEAD_REPEATS = 256, 8, 5


# Target mixtures ------------------------------------------------------------------------------------------------

def gmm_2d() -> GaussianMixture:
    """The ``gmm-2d`` target (see the module docstring)."""
    k = torch.arange(8, dtype=torch.float64)
    theta = 2 * math.pi * k / 8
    means = torch.tensor([1.0, -0.5], dtype=torch.float64) + 2.5 * torch.stack([theta.cos(), theta.sin()], 1)
    phi = theta + math.pi / 2
    rot = torch.stack([torch.stack([phi.cos(), -phi.sin()], -1), torch.stack([phi.sin(), phi.cos()], -1)], -2)
    diag = torch.diag(torch.tensor([0.35**2, 0.08**2], dtype=torch.float64))
    covs = rot @ diag @ rot.transpose(1, 2)
    weights = 1 + 0.6 * torch.sin(1.7 * k + 0.3)
    return GaussianMixture(weights, means, covs)


def gmm_64d() -> GaussianMixture:
    """The ``gmm-64d`` target (see the module docstring)."""
    gen = torch.Generator().manual_seed(64)
    comps, dim = 10, 64
    means = 0.5 + 0.5 * torch.randn(comps, dim, generator=gen, dtype=torch.float64)
    covs = []
    for _ in range(comps):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        eig = 10 ** (-2 * torch.rand(dim, generator=gen, dtype=torch.float64))
        covs.append(q @ torch.diag(eig) @ q.T)
    weights = 0.5 + torch.rand(comps, generator=gen, dtype=torch.float64)
    return GaussianMixture(weights, means, torch.stack(covs))


class SlicedW2:
    r"""SW₂ to a fixed target sample along fixed directions, for sample sets of exactly ``n`` points.

    With M = k n target points, the 1-D optimal coupling sends the i-th smallest sample to the k target points
    of rank (i − 1)k + 1 … ik, so W₂² along θ is (1/M) Σ_j (x_(⌈j/k⌉) − y_(j))², and
    SW₂ = (mean over θ of W₂²)^{1/2}.
    """

    def __init__(self, target: GaussianMixture, n: int, *, seed: int = 2024, directions: int = SLICED_DIRECTIONS,
                 points: int = TARGET_POINTS):
        gen = torch.Generator().manual_seed(seed)
        dirs = torch.randn(directions, target.dim, generator=gen, dtype=torch.float64)
        self.directions = dirs / dirs.norm(dim=1, keepdim=True)
        self.n = n
        self.k = max(1, math.ceil(points / n))
        ref = target.sample(self.k * n, gen)
        self.sorted_target = torch.sort(ref @ self.directions.T, dim=0).values  # (M, L)

    def __call__(self, x: Tensor) -> float:
        """SW₂ of the n points ``x`` (any trailing shape, flattened) to the target sample."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        if x.shape[0] != self.n:
            raise ValueError(f"samples: expected {self.n} points, got {x.shape[0]}")
        proj = torch.sort(x @ self.directions.T, dim=0).values
        diff = proj.repeat_interleave(self.k, dim=0) - self.sorted_target
        return float((diff * diff).mean().sqrt())


# Workloads ------------------------------------------------------------------------------------------------------

@dataclass
class Workload:
    """A model with the metric that scores its samples."""

    name: str
    model: Model
    sample_shape: tuple[int, ...]
    dtype: torch.dtype
    metric: str
    metric_label: str
    score: Callable[[Tensor, Context], dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    identity: str = ""  # what the model's results depend on, for matching cached runs


def _mnist_workload(model_name: str, device: torch.device | str = "cpu", chunk: int | None = None) -> Workload:
    from .metrics import FeatureStats, check_fid_applies, class_report, features_and_probs, fid_from_stats
    from .models import EVAL_CHUNK, load_model, resolve_model_path

    model, info = load_model(model_name, device, chunk=chunk or EVAL_CHUNK)
    check_fid_applies(info.data)

    def score(x: Tensor, ctx: Context) -> dict[str, Any]:
        """FID-MNIST with the classifier run on each rank's share and the feature moments all-reduced."""
        share = ctx.part(x.shape[0])
        feats, probs = features_and_probs(x[share.start:share.stop].float())
        stats = distributed.all_reduce_stats(FeatureStats.from_features(feats), ctx)
        report = class_report(ctx.all_gather_rows(torch.from_numpy(probs)))
        return {"value": fid_from_stats(stats), "mean_confidence": report["mean_confidence"],
                "class_entropy": report["class_entropy"]}

    return Workload("mnist", model, (1, 28, 28), torch.float32, "fid", "FID-MNIST", score,
                    {"model": str(model_name), "schedule": info.schedule, "predicts": info.predicts},
                    identity=sha256_file(resolve_model_path(model_name)))


def scale_modes(target: GaussianMixture, scale: float) -> GaussianMixture:
    """The mixture with every component's covariance multiplied by ``scale`` (means and weights kept)."""
    return target if scale == 1.0 else GaussianMixture(target.weights, target.means, target.covs * scale)


def check_mode_scale(mode_scale: Any, workload: str | None = None) -> float:
    """``mode_scale`` as a float, refused unless finite and positive, and unless 1 for ``workload`` "mnist", which
    has no modes to scale."""
    if isinstance(mode_scale, bool) or not isinstance(mode_scale, (int, float)) \
            or not math.isfinite(mode_scale) or mode_scale <= 0:
        raise ValueError(f"mode_scale: expected a finite number > 0, got {mode_scale!r}")
    if workload == "mnist" and mode_scale != 1.0:
        raise ValueError("mode_scale: only the mixture workloads (gmm-2d, gmm-64d) have modes to scale")
    return float(mode_scale)


def _gmm_workload(name: str, n: int, mode_scale: float = 1.0) -> Workload:
    target = scale_modes(gmm_2d() if name == "gmm-2d" else gmm_64d(), mode_scale)
    sliced = SlicedW2(target, n)
    # Mode weights of n samples fluctuate like a multinomial, which alone moves SW₂ by a visible amount on
    # well-separated modes: the floor is given as the mean and spread over several fresh samples.
    floors = torch.tensor([sliced(target.sample(n, torch.Generator().manual_seed(7 + i))) for i in range(5)])

    def score(x: Tensor, ctx: Context) -> dict[str, Any]:
        return {"value": sliced(x)}

    info = {"components": int(target.means.shape[0]), "dim": target.dim, "mode_scale": mode_scale,
            "directions": SLICED_DIRECTIONS,
            "target_points": sliced.k * n, "noise_floor": float(floors.mean()),
            "noise_floor_std": float(floors.std())}
    return Workload(name, target.model("linear"), (target.dim,), torch.float64, "sliced_w2",
                    "sliced W2 to the target", score, info)


def make_workload(name: str, n: int, model_name: str = "mnist", device: torch.device | str = "cpu",
                  chunk: int | None = None, mode_scale: float = 1.0) -> Workload:
    """The workload ``name``; ``device`` runs the mnist network (the mixtures' exact models stay on the CPU) in
    fixed chunks of ``chunk`` samples (default :data:`lazyinterp.models.EVAL_CHUNK`). ``mode_scale`` multiplies
    the mixtures' component covariances: how tight the modes are decides which schedule suits Euler (README)."""
    if name not in WORKLOADS:
        raise ValueError(f"workload: unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")
    mode_scale = check_mode_scale(mode_scale, name)
    return _mnist_workload(model_name, device, chunk) if name == "mnist" else _gmm_workload(name, n, mode_scale)


# Samplers -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerDef:
    """A named sampler: ``kind`` says what drives it ("li", "diffusers" or "flow_matching")."""

    name: str
    label: str
    family: str
    kind: str
    options: dict = field(default_factory=dict)
    stochastic: bool = False

    @property
    def known_start(self) -> bool:
        """li.sample's default for this sampler: the lazy schedules centre, so their drift at t = 0 is free."""
        return self.kind == "li" and default_known_start(self.options["schedule"])

    def plan(self, nfe: int) -> dict | None:
        """The step count (and last step) that costs exactly ``nfe`` evaluations, or None."""
        second_order = self.options.get("solver") == "heun" or self.options.get("scheduler") == "heun"
        if self.kind == "li":
            solver = self.options.get("solver", "euler")
            # A second-order method lands on odd counts with its own last step and on even ones with a denoising
            # last step (or the other way round when the first evaluation is free).
            last_steps = [self.options.get("last_step") or "euler"] + (["denoise"] if second_order else [])
            for last_step in last_steps:
                steps = steps_for_nfe(solver, nfe, last_step, self.known_start)
                # One Heun step that is all denoising is a bare denoising step, not Heun.
                if steps is not None and not (second_order and steps == 1 and last_step == "denoise"):
                    return {"steps": steps, "last_step": last_step}
            return None
        if self.kind == "diffusers":
            if second_order:  # 2N − 1 evaluations; N = 1 would be a single Euler step
                return {"steps": (nfe + 1) // 2} if nfe % 2 == 1 and nfe >= 3 else None
            return {"steps": nfe}
        if self.kind == "flow_matching":
            return {"steps": nfe // 2} if nfe % 2 == 0 else None
        raise ValueError(f"sampler {self.name}: unknown kind {self.kind!r}")


def _clipped_linear_eps(t: Tensor) -> Tensor:
    """min(ε*_linear(t), 1) with ε*_linear = (1 − t)/t, the linear schedule's optimal diffusion."""
    return torch.clamp((1 - t) / t, max=1.0)


SAMPLERS: tuple[SamplerDef, ...] = (
    SamplerDef("fm-euler", "diffusers FlowMatchEuler", "peer", "diffusers", {"scheduler": "euler", "shift": 1.0}),
    SamplerDef("fm-euler-shift3", "diffusers FlowMatchEuler shift=3", "peer", "diffusers",
               {"scheduler": "euler", "shift": 3.0}),
    SamplerDef("fm-heun", "diffusers FlowMatchHeun", "peer", "diffusers", {"scheduler": "heun"}),
    SamplerDef("dpm-2m", "diffusers DPM-Solver++(2M) flow", "peer", "diffusers", {"scheduler": "dpm"}),
    SamplerDef("unipc", "diffusers UniPC flow", "peer", "diffusers", {"scheduler": "unipc"}),
    SamplerDef("fmlib-cosine-midpoint", "flow_matching cosine midpoint", "peer", "flow_matching"),
    SamplerDef("linear-euler", "linear Euler", "baseline", "li", {"schedule": "linear"}),
    SamplerDef("linear-ab2", "linear AB2", "baseline", "li", {"schedule": "linear", "solver": "ab2"}),
    SamplerDef("linear-em-clipped", "linear EM, eps = min(eps*, 1)", "baseline", "li",
               {"schedule": "linear", "diffusion": _clipped_linear_eps, "last_step": "denoise"}, stochastic=True),
    # The uniform grid is named explicitly: li.sample's default grid for the lazy schedules is "model".
    SamplerDef("lazy-vp-euler", "lazy VP Euler, uniform grid", "ours", "li",
               {"schedule": "lazy-vp", "grid": "uniform"}),
    SamplerDef("lazy-vp-heun", "lazy VP Heun, uniform grid", "ours", "li",
               {"schedule": "lazy-vp", "solver": "heun", "grid": "uniform"}),
    SamplerDef("lazy-vp-euler-model-grid", "lazy VP Euler, SNR-matched grid", "ours", "li",
               {"schedule": "lazy-vp", "grid": "model"}),
    SamplerDef("lazy-vp-euler-alpha", "lazy VP Euler, alpha-matched steps, SNR-matched grid", "ours", "li",
               {"schedule": "lazy-vp", "solver": "euler-alpha", "grid": "model"}),
    SamplerDef("lazy-vp-ab2", "lazy VP AB2, SNR-matched grid", "ours", "li",
               {"schedule": "lazy-vp", "solver": "ab2", "grid": "model"}),
    SamplerDef("lazy-vp-ab2-pc", "lazy VP AB2-AM3 PC, SNR-matched grid", "ours", "li",
               {"schedule": "lazy-vp", "solver": "ab2-pc", "grid": "model"}),
    SamplerDef("lazy-vp-cov-euler", "lazy VP Euler, covariance-matched, SNR-matched grid", "ours", "li",
               {"schedule": "lazy-vp", "grid": "model", "covariance": "model"}),
    SamplerDef("lazy-vp-cov-ab2", "lazy VP AB2, covariance-matched, SNR-matched grid", "ours", "li",
               {"schedule": "lazy-vp", "solver": "ab2", "grid": "model", "covariance": "model"}),
    SamplerDef("lazy-vp-cov-ab2-pc", "lazy VP AB2-AM3 PC, covariance-matched, SNR-matched grid", "ours", "li",
               {"schedule": "lazy-vp", "solver": "ab2-pc", "grid": "model", "covariance": "model"}),
    SamplerDef("lazy-vp-cov-euler-denoise", "lazy VP Euler, covariance-matched, denoising last step", "ours", "li",
               {"schedule": "lazy-vp", "grid": "model", "covariance": "model", "last_step": "denoise"}),
    SamplerDef("lazy-vp-cov-ab2-denoise", "lazy VP AB2, covariance-matched, denoising last step", "ours", "li",
               {"schedule": "lazy-vp", "solver": "ab2", "grid": "model", "covariance": "model",
                "last_step": "denoise"}),
    SamplerDef("point-mass-sde", "point-mass SDE (EM), uniform grid", "ours", "li",
               {"schedule": "point-mass", "diffusion": "optimal", "solver": "euler", "last_step": "denoise",
                "grid": "uniform"}, stochastic=True),
    SamplerDef("point-mass-sde-model-grid", "point-mass SDE (EM), SNR-matched grid", "ours", "li",
               {"schedule": "point-mass", "diffusion": "optimal", "solver": "euler", "last_step": "denoise",
                "grid": "model"}, stochastic=True),
    # The exponential step depends on the SNR grid alone: on this grid it is DDPM's ancestral step on the linear
    # schedule's uniform grid (tests/test_solvers.py).
    SamplerDef("point-mass-sde-exp", "point-mass SDE (exponential step), SNR-matched grid", "ours", "li",
               {"schedule": "point-mass", "diffusion": "optimal", "solver": "exponential", "grid": "model"},
               stochastic=True),
    SamplerDef("point-mass-sde-exp2m", "point-mass SDE (exponential 2M step), SNR-matched grid", "ours", "li",
               {"schedule": "point-mass", "diffusion": "optimal", "solver": "exponential-2m", "grid": "model"},
               stochastic=True),
    SamplerDef("point-mass-sde-ab2", "point-mass SDE (AB2 drift, EM noise), SNR-matched grid", "ours", "li",
               {"schedule": "point-mass", "diffusion": "optimal", "solver": "ab2", "last_step": "denoise",
                "grid": "model"}, stochastic=True),
    SamplerDef("point-mass-sde-heun", "point-mass SDE (stochastic Heun), SNR-matched grid", "ours", "li",
               {"schedule": "point-mass", "diffusion": "optimal", "solver": "heun", "last_step": "denoise",
                "grid": "model"}, stochastic=True),
)
SAMPLER_NAMES = tuple(s.name for s in SAMPLERS)
# The reference is Heun, two evaluations a step, over at most MAX_STEPS steps.
MAX_REFERENCE_NFE = 2 * MAX_STEPS
REFERENCE = SamplerDef("reference", "linear Heun", "reference", "li", {"schedule": "linear", "solver": "heun"})
# The point-mass SDE with ε* solved by Euler–Maruyama on the SNR-matched grid of this many steps, its times rounded to
# the Brownian paths' dyadic nodes (:func:`sde_reference_grid`).
SDE_REFERENCE_STEPS = 512
SDE_REFERENCE = SamplerDef("sde-reference", "point-mass SDE, Euler–Maruyama, dyadic SNR-matched grid", "reference",
                           "li", {"schedule": "point-mass", "diffusion": "optimal", "solver": "euler",
                                  "last_step": "denoise", "sde_noise": "brownian"}, stochastic=True)


def sde_reference_grid(sigma: float, steps: int = SDE_REFERENCE_STEPS) -> Tensor:
    """The SNR-matched grid of the point mass with this σ, each time rounded to the coarsest dyadic level 2^−ℓ
    finer than a sixteenth of its distance to a neighbour (ℓ at most the Brownian paths' depth L): dyadic times read
    the path exactly, with no bridge, and a coarse level costs fewer of its nodes (a time at level ℓ needs about
    ℓ − log₂ N of them). Euler–Maruyama's strong error comes from the stiff drift near t = 1 and the solution's
    dependence on the path's fine scales near t = 0, which a uniform grid resolves badly (at 512 uniform steps it
    was still 0.09 from the 1024-step SNR-matched solution on gmm-2d)."""
    grid = snr_matched_grid(steps, point_mass(sigma), "linear").tolist()
    rounded = [0.0]
    for k in range(1, len(grid) - 1):
        gap = min(grid[k] - grid[k - 1], grid[k + 1] - grid[k])
        level = min(BROWNIAN_DEPTH, max(1, math.ceil(math.log2(16.0 / gap))))
        scale = float(1 << level)
        rounded.append(round(grid[k] * scale) / scale)
    rounded.append(1.0)
    return torch.tensor(sorted(set(rounded)), dtype=torch.float64)


PEER_PACKAGES = {"diffusers": "diffusers", "flow_matching": "flow_matching"}


def _available(kind: str) -> bool:
    package = PEER_PACKAGES.get(kind)
    return package is None or importlib.util.find_spec(package) is not None


def linear_velocity(model: Model) -> Callable[[Tensor, Any], Tensor]:
    """v(x, t) under the linear schedule, v = η_X − η_Z, from a model trained under any schedule."""
    if model.schedule.name == "linear":
        return lambda x, t: model.predict(x, t, "velocity")
    predictor = convert(model, linear())

    def velocity(x: Tensor, t: Tensor | float) -> Tensor:
        eta_z, eta_x = predictor.eta(x, t)
        return eta_x - eta_z

    return velocity


def _diffusers_scheduler(options: dict):
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    which = options["scheduler"]
    if which == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=options.get("shift", 1.0))
    if which == "heun":
        return FlowMatchHeunDiscreteScheduler()
    if which == "dpm":
        return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                           solver_order=2)
    if which == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    raise ValueError(f"unknown diffusers scheduler {which!r}")


def diffusers_sample(scheduler: Any, velocity: Callable[[Tensor, float], Tensor], noise: Tensor, steps: int) -> Tensor:
    """Run a diffusers flow scheduler from ``noise`` (σ = 1): output ε − x_data = −v(1 − σ, x), σ = timestep/1000."""
    scheduler.set_timesteps(steps)
    scale = float(scheduler.config.num_train_timesteps)
    x = noise
    for timestep in scheduler.timesteps:
        sigma = float(timestep) / scale
        x = scheduler.step(-velocity(x, 1.0 - sigma), timestep, x).prev_sample
    return x


def flow_matching_sample(velocity: Callable[[Tensor, Any], Tensor], noise: Tensor, steps: int) -> Tensor:
    """flow_matching: the linear model moved to its CosineScheduler, midpoint rule on a uniform grid.

    The midpoint rule evaluates at t_k and t_k + h/2 only, never at t = 1, where ScheduleTransformedModel
    divides by the cosine noise coefficient 0 and returns NaN; no clipping of the end time is needed.
    """
    from flow_matching.path.scheduler import CondOTScheduler, CosineScheduler, ScheduleTransformedModel
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    class Velocity(ModelWrapper):
        def __init__(self):
            super().__init__(None)

        def forward(self, x: Tensor, t: Tensor, **extras) -> Tensor:
            return velocity(x, t)

    model = ScheduleTransformedModel(Velocity(), CondOTScheduler(), CosineScheduler())
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=noise.dtype, device=noise.device)
    return ODESolver(model).sample(x_init=noise, step_size=None, method="midpoint", time_grid=grid)


def _li_kwargs(spec: SamplerDef, plan: dict) -> dict:
    opts = spec.options
    return {"schedule": opts["schedule"], "diffusion": opts.get("diffusion", "ode"),
            "solver": opts.get("solver", "euler"), "grid": opts.get("grid"), "steps": plan["steps"],
            "last_step": plan["last_step"], "covariance": opts.get("covariance"),
            "sde_noise": opts.get("sde_noise", "independent")}


def solves_reference_sde(spec: SamplerDef) -> bool:
    """Whether ``spec`` samples the SDE of :data:`SDE_REFERENCE` (the point mass with ε*), so that its strong error
    to it is defined."""
    return spec.stochastic and spec.kind == "li" and spec.options.get("schedule") == "point-mass" \
        and spec.options.get("diffusion") == "optimal"


def run_batch(spec: SamplerDef, plan: dict, model: Model, noise: Tensor, indices: range, seed: int,
              velocity: Callable) -> tuple[Tensor, int]:
    """Samples for one batch and the network evaluations they cost per sample (estimation excluded)."""
    model.nfe = 0
    if spec.kind == "li":
        kwargs = _li_kwargs(spec, plan)
        base_point = spec.options["schedule"] == "point-mass"
        x, info = sample(model, None if base_point else noise, shape=tuple(noise.shape), device=noise.device,
                         generator=sample_seed(seed, 1 << 62), indices=indices, return_info=True, **kwargs)
        return x, model.nfe - info.estimation_nfe
    if spec.kind == "diffusers":
        return diffusers_sample(_diffusers_scheduler(spec.options), velocity, noise, plan["steps"]), model.nfe
    return flow_matching_sample(velocity, noise, plan["steps"]), model.nfe


def _batches(n: int, batch_size: int) -> list[range]:
    return [range(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]


class RunFailed(RuntimeError):
    """A sampler could not run (a network NaN, or σ that cannot be estimated) on some rank."""


@torch.no_grad()
def run_sampler(spec: SamplerDef, plan: dict, workload: Workload, noise: Tensor, batch_size: int, seed: int,
                progress: bool = False, desc: str = "", ctx: Context | None = None) -> tuple[Tensor, set[int], float]:
    """All ``n`` samples of one (sampler, plan), the per-sample NFE seen in each batch, and wall seconds.

    Under torch.distributed each rank runs a contiguous share of the batches and every rank gets all samples
    back in order. Sample i depends only on its noise (seed, i), so the result is the same for any split.
    """
    ctx = ctx or Context()
    velocity = linear_velocity(workload.model)
    batches = _batches(noise.shape[0], batch_size)
    share = ctx.part(len(batches))
    mine = batches[share.start:share.stop]
    out, seen, error = [], set(), None
    start = time.perf_counter()
    with tqdm(total=sum(len(idx) for idx in mine), disable=not progress or len(mine) < 2 or not ctx.is_main,
              desc=desc, leave=False, unit="sample", dynamic_ncols=True, file=sys.stderr) as bar:
        try:
            for idx in mine:
                x, used = run_batch(spec, plan, workload.model, noise[idx.start:idx.stop], idx, seed, velocity)
                out.append(x.detach())
                seen.add(int(used))
                bar.update(len(idx))
        except (NonFiniteError, ValueError) as exc:
            error = str(exc).splitlines()[0] or type(exc).__name__
    # Every rank learns of a failure anywhere, so that none waits in a collective the others skip.
    reports = ctx.all_gather_object((error, sorted(seen)))
    errors = [e for e, _ in reports if e is not None]
    if errors:
        raise RunFailed(errors[0])
    local = torch.cat(out) if out else noise[:0]
    x = ctx.all_gather_rows(local)
    return x, set().union(*(set(s) for _, s in reports)), time.perf_counter() - start


# Measurement of the sampler's own cost --------------------------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_overhead(model: Model, sample_shape: tuple[int, ...], dtype: torch.dtype, *, seed: int = 0,
                     batch: int = OVERHEAD_BATCH, steps: int = OVERHEAD_STEPS, repeats: int = OVERHEAD_REPEATS,
                     device: torch.device | str = "cpu", cuda_graph: bool = False,
                     direct: bool = False) -> dict[str, float]:
    r"""T_sample / T_net − 1 for lazy VP Euler and the point-mass SDE (Euler–Maruyama and the 2M step, each with
    the host's and with keyed noise, :data:`OVERHEAD_SDE_NOISES`): the time ``li.sample`` spends beyond the network
    (schedule maths, conversion, noise draws, state updates, checks) as a fraction of network time.

    T_sample is the wall time of ``li.sample`` for one batch; T_net that of the same number of network calls on a
    batch of the same shape, back to back. Each synchronises the device once, at the end, so on an accelerator
    the sampler's own work counts only where the device has to wait for it. The median over ``repeats``
    interleaved pairs, after one warm-up run (which also estimates E[X] and σ).

    With ``cuda_graph`` both sides are replayed CUDA graphs (``li.sample(cuda_graph=True)``, and the network
    calls captured back to back), so what is left is the sampler's own device work.

    With ``direct`` the sampler's own time is measured, not inferred from a difference: ``li.sample`` runs with
    the network replaced by one that returns a stored output, and the fraction is T_sample / T_net. Where the
    network takes seconds (a CPU) the difference of two such times is mostly timing noise, while this stays
    precise. On an accelerator it counts the sampler's kernels in full, as if none overlapped the network's.
    """
    device = torch.device(device)
    noise = NoiseStreams(seed, range(batch), sample_shape, dtype=dtype).draw().to(device)
    net_dtype = model.net_dtype or dtype
    net_x, net_t = noise.to(net_dtype), torch.full((batch,), 0.5, device=device, dtype=net_dtype)

    @torch.no_grad()  # as li.sample runs the network
    def network_calls(x: Tensor, calls: int) -> Tensor:
        for _ in range(calls):
            out = model.net(x, net_t)
        return out

    net = model.net
    if direct:
        stored = network_calls(net_x, 1)

        def net(x: Tensor, t: Tensor) -> Tensor:
            # The warm-up's estimates of E[X] and σ probe with their own batch size: those calls are real.
            return stored if x.shape == stored.shape else model.net(x, t)
    bare = Model(net, model.schedule, model.predicts, t_min=model.t_min, net_dtype=net_dtype)

    captured_networks: dict[int, graphs.CapturedRun] = {}

    def network_seconds(calls: int) -> float:
        if cuda_graph and calls not in captured_networks:
            captured_networks[calls] = graphs.capture(lambda x: network_calls(x, calls), (net_x,))
        _synchronize(device)
        start = time.perf_counter()
        if cuda_graph:
            captured_networks[calls].graph.replay()
        else:
            network_calls(net_x, calls)
        _synchronize(device)
        return time.perf_counter() - start

    runs = []
    for name in OVERHEAD_SAMPLERS:
        spec = next(s for s in SAMPLERS if s.name == name)
        kwargs = _li_kwargs(spec, spec.plan(steps))
        for sde_noise in OVERHEAD_SDE_NOISES if spec.stochastic else ("independent",):
            label = name if sde_noise == "independent" else f"{name}-{sde_noise}"
            runs.append((label, spec, {**kwargs, "sde_noise": sde_noise}))
    result = {}
    for name, spec, kwargs in runs:
        start_noise = None if spec.options["schedule"] == "point-mass" else noise

        def run(start_noise: Tensor | None, kwargs: dict) -> float:
            _synchronize(device)
            start = time.perf_counter()
            sample(bare, start_noise, shape=tuple(noise.shape), device=device, generator=seed,
                   cuda_graph=cuda_graph, **kwargs)
            _synchronize(device)
            return time.perf_counter() - start

        bare.nfe = 0
        _, info = sample(bare, start_noise, shape=tuple(noise.shape), device=device, generator=seed,
                         cuda_graph=cuda_graph, return_info=True, **kwargs)
        calls = bare.nfe - info.estimation_nfe
        network_seconds(calls)
        fractions = []
        for _ in range(repeats):
            t_net = network_seconds(calls)
            # Directly measured, T_sample is the sampler's own time; otherwise it includes the network's.
            fractions.append(run(start_noise, kwargs) / t_net - (0 if direct else 1))
        result[name] = sorted(fractions)[len(fractions) // 2]
    return result


# The benchmark --------------------------------------------------------------------------------------------------

def parse_nfe(value: str | Iterable[int]) -> list[int]:
    """NFE values from "1,2,4" (or an iterable of ints): sorted, without duplicates, each >= 1."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = set()
    for item in items:
        text = str(item).strip()
        try:
            k = int(text)
        except ValueError:
            raise ValueError(f"nfe: expected comma-separated integers >= 1, got {text!r}") from None
        if not 1 <= k <= MAX_STEPS:
            raise ValueError(f"nfe: each NFE must be from 1 to {MAX_STEPS}, got {k}")
        out.add(k)
    if not out:
        raise ValueError("nfe: expected at least one NFE value")
    return sorted(out)


def select_samplers(names: str | Sequence[str] | None) -> list[SamplerDef]:
    """Sampler definitions by name (all when None); unknown names are an error."""
    if names is None:
        return list(SAMPLERS)
    items = [s.strip() for s in names.split(",")] if isinstance(names, str) else [str(s).strip() for s in names]
    items = [s for s in items if s]
    unknown = [s for s in items if s not in SAMPLER_NAMES]
    if unknown or not items:
        raise ValueError(f"samplers: unknown sampler {', '.join(unknown) or '(none given)'}; expected a comma list "
                         f"of {', '.join(SAMPLER_NAMES)}")
    return [s for s in SAMPLERS if s.name in items]


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _path_error(x: Tensor, reference: Tensor) -> float:
    diff = (x.detach().cpu().double() - reference.detach().cpu().double()).reshape(x.shape[0], -1)
    return float(diff.norm(dim=1).mean())


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("lazyinterp", "torch", "diffusers", "flow_matching"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


class RunCache:
    """Finished runs of an interrupted benchmark, so that the next run of the same command resumes.

    One folder per configuration (workload, n, seed, reference NFE, model file, device type, package versions,
    lazyinterp's source) under ``root``: ``reference.json`` and ``reference.safetensors`` (the reference samples,
    for path errors) and one ``run-<sampler>-<nfe>.json`` per finished (sampler, NFE). Every file is written
    atomically, and only by rank 0, which shares what it read with the other ranks.
    """

    def __init__(self, root: Path | str, manifest: dict[str, Any]):
        text = json.dumps(manifest, sort_keys=True)
        self.folder = Path(root) / hashlib.sha256(text.encode()).hexdigest()[:16]
        self.manifest = json.loads(text)

    def _run_path(self, sampler: str, nfe: int) -> Path:
        return self.folder / f"run-{sampler}-{nfe}.json"

    def load(self) -> tuple[dict | None, Tensor | None, dict[tuple[str, int], dict]]:
        """The cached reference entry and samples, and the cached runs by (sampler, NFE)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        reference, samples, runs = None, None, {}
        try:
            if (self.folder / "reference.json").is_file():
                samples = load_file(self.folder / "reference.safetensors")["samples"]
                reference = json.loads((self.folder / "reference.json").read_text())
            for path in self.folder.glob("run-*.json"):
                entry = json.loads(path.read_text())
                runs[(entry["sampler"], int(entry["nfe"]))] = entry
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise ValueError(f"work_dir: {self.folder} holds unreadable results ({exc}); remove it or pass "
                             "--fresh") from None
        return reference, samples, runs

    def start(self, fresh: bool) -> None:
        """Create the folder and its manifest (after removing what it holds, with ``fresh``)."""
        if fresh:
            self.remove()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text(json.dumps(self.manifest, indent=1, sort_keys=True) + "\n", self.folder / "manifest.json")

    def save_reference(self, entry: dict, samples: Tensor) -> None:
        """Keep the reference run and its samples (for the path errors of later runs)."""
        from safetensors.torch import save_file

        with atomic_path(self.folder / "reference.safetensors") as tmp:
            save_file({"samples": samples.detach().cpu().contiguous()}, str(tmp))
        write_text(json.dumps(entry) + "\n", self.folder / "reference.json")

    def save_run(self, entry: dict) -> None:
        """Keep one finished (sampler, NFE) run."""
        write_text(json.dumps(_clean(entry)) + "\n", self._run_path(entry["sampler"], entry["nfe"]))

    def remove(self) -> None:
        """Delete the folder and everything cached in it."""
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                path.unlink()
            self.folder.rmdir()


def code_identity() -> str:
    """sha256 of lazyinterp's own source files: runs cached by other code are never resumed."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def default_work_dir() -> Path:
    """Where an interrupted benchmark keeps its finished runs: ``<cache>/bench``."""
    return cache_dir() / "bench"


def check_run_arguments(workload: str, *, n: int | None = None, reference_nfe: int = 1000,
                        batch_size: int | None = None, max_runs: int | None = None, chunk: int | None = None) -> None:
    """The bounds :func:`run_bench` holds its arguments to (None: the default), as a ValueError naming the
    argument; checked before anything is loaded or sampled."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload: unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if n is not None and not (integer(n) and n >= 2):
        raise ValueError(f"n: expected an integer >= 2, got {n!r}")
    if not (integer(reference_nfe) and 2 <= reference_nfe <= MAX_REFERENCE_NFE):
        raise ValueError(f"reference_nfe: expected an integer from 2 to {MAX_REFERENCE_NFE}, got {reference_nfe!r}")
    for name, value in (("batch_size", batch_size), ("max_runs", max_runs), ("chunk", chunk)):
        if value is not None and not (integer(value) and value >= 1):
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")


def run_bench(workload: str = "gmm-2d", *, nfe: str | Iterable[int] = DEFAULT_NFE, n: int | None = None,
              seed: int = 0, samplers: str | Sequence[str] | None = None, reference_nfe: int = 1000,
              model: str = "mnist", batch_size: int | None = None, progress: bool = True,
              overhead: bool | None = None, log: Callable[[str], None] | None = None,
              device: torch.device | str = "cpu", ctx: Context | None = None, work_dir: Path | str | None = None,
              fresh: bool = False, max_runs: int | None = None, chunk: int | None = None,
              sde_path_error: bool | None = None, mode_scale: float = 1.0,
              finish: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the benchmark and return its results (the dict that ``--json`` writes).

    Args:
        workload: "mnist", "gmm-2d" or "gmm-64d".
        nfe: the NFE values to compare, as "1,2,4" or integers.
        n: samples per run; default 2000 for mnist and 16000 for the mixtures.
        samplers: names to run (default all; peers whose package is missing are skipped with a note).
        reference_nfe: NFE of the linear-Heun reference solution from the same noise.
        model: the mnist model, a bundled name or a checkpoint path.
        batch_size: samples per batch; default 250 for mnist and all n for the mixtures.
        overhead: measure the sampler overhead (default: for mnist only, where the network is a real one).
        log: called with one line per finished run.
        device: where the mnist network runs ("cpu", "cuda", "cuda:1"); under torchrun use ``ctx``'s device.
        ctx: the torch.distributed context (:func:`lazyinterp.distributed.setup`); every rank calls run_bench
            with the same arguments and samples its share of each run; rank 0 holds the complete results (path
            errors, overhead), reads and writes the cache, and calls ``finish``.
        work_dir: where finished runs are kept until the benchmark completes (default :func:`default_work_dir`);
            a run interrupted for any reason resumes from there when called again with the same configuration.
        fresh: discard runs cached by an interrupted benchmark of the same configuration.
        max_runs: stop after this many new (sampler, NFE) runs; the result then has ``"complete": False`` and
            the next call resumes.
        chunk: the mnist network sees fixed chunks of this many samples (default 50), which makes samples
            independent of ``batch_size`` and of the number of processes; larger chunks are faster on a GPU.
        sde_path_error: also score the point-mass SDE samplers pathwise against :data:`SDE_REFERENCE` on shared
            Brownian paths (``sde_path_error``; default: for the mixtures, whose exact model makes the
            reference's SDE_REFERENCE_STEPS − 1 evaluations cheap).
        mode_scale: the mixtures only: multiply every component's covariance by this (1 is the workload as
            described above; larger is closer to one Gaussian, smaller closer to point masses).
        finish: called with the complete results before the cached runs are removed (e.g. to write outputs).
    """
    ctx = ctx or Context(device=torch.device(device))
    nfes = parse_nfe(nfe)
    specs = select_samplers(samplers)
    check_run_arguments(workload, n=n, reference_nfe=reference_nfe, batch_size=batch_size, max_runs=max_runs,
                        chunk=chunk)
    n = DEFAULT_N[workload] if n is None else n
    batch_size = batch_size or DEFAULT_BATCH.get(workload, n)
    log = log if log is not None and ctx.is_main else (lambda line: None)
    progress = progress and ctx.is_main
    started = time.perf_counter()
    if sde_path_error is None:
        sde_path_error = workload != "mnist"

    skipped: list[dict[str, Any]] = []
    runnable = []
    for spec in specs:
        if _available(spec.kind):
            runnable.append(spec)
        elif samplers is not None:
            raise ValueError(f"samplers: {spec.name} needs the {PEER_PACKAGES[spec.kind]} package "
                             "(pip install 'lazyinterp[bench]')")
        else:
            skipped.append({"sampler": spec.name, "nfe": None, "reason": f"{PEER_PACKAGES[spec.kind]} not installed"})
    jobs = []
    for spec in runnable:
        for k in nfes:
            plan = spec.plan(k)
            if plan is None:
                skipped.append({"sampler": spec.name, "nfe": k, "reason": "no step count gives exactly this NFE"})
            else:
                jobs.append((spec, k, plan))

    wl = make_workload(workload, n, model, ctx.device, chunk, mode_scale)
    versions = _versions()
    cache = RunCache(default_work_dir() if work_dir is None else work_dir,
                     {"workload": workload, "mode_scale": float(mode_scale), "n": n, "seed": seed,
                      "reference_nfe": reference_nfe,
                      "model": wl.identity, "device": ctx.device.type, "versions": versions,
                      "code": code_identity(), "chunk": chunk, "sde_path_error": bool(sde_path_error)})
    if ctx.is_main:
        cache.start(fresh)
    # Rank 0 reads the cache and tells the others; only rank 0 computes path errors and needs the samples.
    cached_ref, cached_ref_x, cached_runs = cache.load() if ctx.is_main else (None, None, None)
    cached_ref, cached_runs = ctx.broadcast_object((cached_ref, cached_runs))
    if cached_ref is not None:
        log(f"resuming from {cache.folder}: the reference and {len(cached_runs)} runs are cached (--fresh discards "
            "them)")

    # Importing a peer package takes seconds; it must not count against the first run's time.
    for kind in {spec.kind for spec in runnable} & set(PEER_PACKAGES):
        importlib.import_module(PEER_PACKAGES[kind])
    if any(spec.kind == "diffusers" for spec in runnable):
        _diffusers_scheduler({"scheduler": "euler"})
    if any(spec.kind == "flow_matching" for spec in runnable):
        importlib.import_module("flow_matching.solver")
    mdl = wl.model
    noise = NoiseStreams(seed, range(n), wl.sample_shape, dtype=wl.dtype).draw()
    if workload == "mnist":
        noise = noise.to(ctx.device)
    # E[X] and σ of the lazy schedules are estimated once per model and cached on it; doing it here keeps that
    # one-off cost out of every run's time and NFE.
    mdl.nfe = 0
    try:
        _, info = sample(mdl, noise[:1], steps=1, schedule="lazy-vp", return_info=True)
        sigma = {"value": info.sigma, "note": "estimated by li.sample from the model"}
        estimation_nfe = info.estimation_nfe
    except ValueError as exc:
        sigma = {"value": None, "note": f"li.sample could not estimate sigma: {exc}"}
        log(f"warning: {sigma['note']}")
        estimation_nfe = mdl.nfe

    # The pathwise SDE reference, planned here so that the progress bar counts it and the Brownian reruns.
    sde_spec = sde_plan = None
    sde_nfe = 0
    if sde_path_error and sigma["value"] is not None and any(solves_reference_sde(spec) for spec, _, _ in jobs):
        grid = sde_reference_grid(sigma["value"])
        sde_spec = dataclasses.replace(SDE_REFERENCE, options={**SDE_REFERENCE.options, "grid": grid})
        sde_plan = {"steps": len(grid) - 1, "last_step": sde_spec.options["last_step"]}
        sde_nfe = count_nfe(sde_spec.options["solver"], len(grid) - 1, sde_plan["last_step"], sde_spec.known_start)

    def job_nfe(spec: SamplerDef, k: int) -> int:
        """The evaluations per sample a job costs: twice k where it is rerun on Brownian paths."""
        return 2 * k if sde_spec is not None and solves_reference_sde(spec) else k

    # Progress in network evaluations per sample, so that the long references weigh what they cost.
    bar = tqdm(total=reference_nfe + sde_nfe + sum(job_nfe(spec, k) for spec, k, _ in jobs), disable=not progress,
               desc="reference", unit="NFE", dynamic_ncols=True, file=sys.stderr)
    ref_plan = REFERENCE.plan(reference_nfe)
    if cached_ref is not None:
        reference, ref_x = cached_ref, cached_ref_x
        log(f"reference linear Heun, {reference_nfe} NFE: {wl.metric} {reference['value']:.4g} (cached in "
            f"{cache.folder})")
    else:
        try:
            ref_x, ref_seen, ref_seconds = run_sampler(REFERENCE, ref_plan, wl, noise, batch_size, seed, progress,
                                                       f"reference {reference_nfe} NFE", ctx)
        except RunFailed as exc:  # no benchmark without its reference
            raise RuntimeError(f"reference ({REFERENCE.label}, {reference_nfe} NFE): {exc}") from None
        if ref_seen != {reference_nfe}:
            raise RuntimeError(f"reference: expected {reference_nfe} NFE, the model counted {sorted(ref_seen)}")
        reference = {"sampler": "linear Heun", "nfe": reference_nfe, "steps": ref_plan["steps"],
                     "last_step": ref_plan["last_step"], "seconds": round(ref_seconds, 3), **wl.score(ref_x, ctx)}
        for key in ("noise_floor", "noise_floor_std"):
            if key in wl.info:
                reference[key] = wl.info[key]
        if ctx.is_main:
            cache.save_reference(reference, ref_x)
        log(f"reference linear Heun, {reference_nfe} NFE: {wl.metric} {reference['value']:.4g}")
    bar.update(reference_nfe)

    sde_reference, sde_ref_x = None, None
    if sde_spec is not None:
        bar.set_description(f"SDE reference {sde_nfe} NFE")
        try:
            sde_ref_x, seen, seconds = run_sampler(sde_spec, sde_plan, wl, noise, batch_size, seed, progress,
                                                   f"SDE reference {sde_nfe} NFE", ctx)
        except RunFailed as exc:
            raise RuntimeError(f"SDE reference ({SDE_REFERENCE.label}): {exc}") from None
        if seen != {sde_nfe}:
            raise RuntimeError(f"SDE reference: expected {sde_nfe} NFE, the model counted {sorted(seen)}")
        sde_reference = {"sampler": SDE_REFERENCE.label, "nfe": sde_nfe, "steps": sde_plan["steps"],
                         "sde_noise": "brownian", "seconds": round(seconds, 3), **wl.score(sde_ref_x, ctx)}
        log(f"SDE reference ({SDE_REFERENCE.label}, {sde_nfe} NFE, Brownian noise): {wl.metric} "
            f"{sde_reference['value']:.4g}")
        bar.update(sde_nfe)

    results = []
    new_runs = 0
    complete = True
    for spec, k, plan in jobs:
        if (spec.name, k) in cached_runs:
            entry = cached_runs[(spec.name, k)]
            if entry.get("skipped"):
                skipped.append(entry["skipped"])
            else:
                results.append(entry)
            bar.update(job_nfe(spec, k))
            continue
        if max_runs is not None and new_runs >= max_runs:
            complete = False
            break
        bar.set_description(f"{spec.name} NFE {k}")
        entry = _run_entry(spec, k, plan, wl, noise, batch_size, seed, progress, ctx, ref_x, log, sde_ref_x)
        if entry.get("skipped"):
            skipped.append(entry["skipped"])
        else:
            results.append(entry)
        if ctx.is_main:
            cache.save_run(entry)
        new_runs += 1
        bar.update(job_nfe(spec, k))
    bar.close()

    out: dict[str, Any] = {
        "workload": workload, "metric": wl.metric, "metric_label": wl.metric_label, "n": n, "seed": seed,
        "nfe": nfes, "reference": reference, "sde_reference": sde_reference, "results": results, "skipped": skipped,
        "estimation_nfe": estimation_nfe, "workload_info": wl.info,
        "sigma": sigma,
        "samplers": {s.name: {"label": s.label, "family": s.family, "stochastic": s.stochastic} for s in runnable},
        "versions": versions, "torch_threads": torch.get_num_threads(), "device": str(ctx.device),
        "processes": ctx.world, "network_chunk": getattr(mdl, "chunk", None), "complete": complete,
    }
    if not complete:
        out["work_dir"] = str(cache.folder)
        return _clean(out)
    if (overhead if overhead is not None else workload == "mnist") and ctx.is_main:
        out["overhead"] = measure_overhead(mdl, wl.sample_shape, wl.dtype, seed=seed, device=noise.device)
        out["overhead_direct"] = measure_overhead(mdl, wl.sample_shape, wl.dtype, seed=seed, device=noise.device,
                                                  direct=True)
        if noise.device.type == "cuda":
            out["overhead_cuda_graph"] = measure_overhead(mdl, wl.sample_shape, wl.dtype, seed=seed,
                                                          device=noise.device, cuda_graph=True)
        out["overhead_setup"] = {"batch": OVERHEAD_BATCH, "steps": OVERHEAD_STEPS, "repeats": OVERHEAD_REPEATS}
    out["seconds"] = round(time.perf_counter() - started, 2)
    out = _clean(out)
    if finish is not None and ctx.is_main:
        finish(out)
    ctx.barrier()
    if ctx.is_main:
        cache.remove()
    return out


def _run_entry(spec: SamplerDef, k: int, plan: dict, wl: Workload, noise: Tensor, batch_size: int, seed: int,
               progress: bool, ctx: Context, ref_x: Tensor | None, log: Callable[[str], None],
               sde_ref_x: Tensor | None = None) -> dict[str, Any]:
    """One (sampler, NFE) run and its scores, or ``{"skipped": ...}`` when the evaluations did not add up; with
    ``sde_ref_x``, a sampler of the reference SDE is run again on Brownian paths for its ``sde_path_error``."""
    entry: dict[str, Any] = {"sampler": spec.name, "label": spec.label, "family": spec.family, "nfe": k,
                             "steps": plan["steps"]}
    if "last_step" in plan:
        entry["last_step"] = plan["last_step"]
    try:
        x, seen, seconds = run_sampler(spec, plan, wl, noise, batch_size, seed, progress, f"{spec.name} {k}", ctx)
    except RunFailed as exc:
        # A sampler that cannot run (a network NaN, or σ that cannot be estimated) is a result, not a crash.
        log(f"{spec.name:>28} NFE {k:>3}: failed: {exc}")
        return {**entry, "value": None, "seconds": None, "path_error": None, "stochastic": spec.stochastic,
                "error": str(exc)}
    if seen != {k}:
        return {"sampler": spec.name, "nfe": k,
                "skipped": {"sampler": spec.name, "nfe": k,
                            "reason": f"the model counted {sorted(seen)} evaluations, not {k}"}}
    if bool(torch.isfinite(x).all()):
        entry.update(wl.score(x, ctx))
        entry["path_error"] = None if spec.stochastic or ref_x is None else _path_error(x, ref_x)
    else:
        entry.update({"value": None, "path_error": None, "error": "non-finite samples"})
    entry["seconds"] = round(seconds, 4)
    entry["stochastic"] = spec.stochastic
    if sde_ref_x is not None and solves_reference_sde(spec):
        entry["sde_path_error"] = _sde_path_error(spec, k, plan, wl, noise, batch_size, seed, ctx, sde_ref_x)
    pe, spe = entry.get("path_error"), entry.get("sde_path_error")
    log(f"{spec.name:>28} NFE {k:>3}: {wl.metric} {_fmt(entry.get('value'))}"
        + (f", path error {_fmt(pe)}" if pe is not None else "")
        + (f", SDE path error {_fmt(spe)}" if spe is not None else "") + f" ({seconds:.2f} s)")
    return entry


def _sde_path_error(spec: SamplerDef, k: int, plan: dict, wl: Workload, noise: Tensor, batch_size: int, seed: int,
                    ctx: Context, sde_ref_x: Tensor) -> float | None:
    """The mean distance of ``spec``'s samples on the Brownian paths to the SDE reference's (None where a run
    fails or leaves a non-finite sample)."""
    brownian = dataclasses.replace(spec, options={**spec.options, "sde_noise": "brownian"})
    try:
        x, seen, _ = run_sampler(brownian, plan, wl, noise, batch_size, seed, ctx=ctx)
    except RunFailed:
        return None
    if seen != {k}:
        raise RuntimeError(f"{spec.name}: expected {k} NFE on Brownian paths, the model counted {sorted(seen)}")
    return _path_error(x, sde_ref_x) if bool(torch.isfinite(x).all()) else None


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float):
        return _finite_or_none(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# Reports --------------------------------------------------------------------------------------------------------

def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _table(results: dict, key: str) -> list[str]:
    nfes = results["nfe"]
    rows: dict[str, dict[int, float | None]] = {}
    labels: dict[str, tuple[str, str]] = {}
    for r in results["results"]:
        if (key == "path_error" and r.get("stochastic")) or (key == "sde_path_error" and key not in r):
            continue
        rows.setdefault(r["sampler"], {})[r["nfe"]] = r.get(key)
        labels[r["sampler"]] = (r["label"], r["family"])
    best = {}
    for k in nfes:
        values = [row[k] for row in rows.values() if row.get(k) is not None]
        best[k] = min(values) if values else None
    lines = ["| sampler | family | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
             "|---|---|" + "---:|" * len(nfes)]
    for name, row in rows.items():
        cells = []
        for k in nfes:
            v = row.get(k)
            cells.append(f"**{_fmt(v)}**" if v is not None and v == best[k] else _fmt(v))
        label, family = labels[name]
        lines.append(f"| {label} | {family} | " + " | ".join(cells) + " |")
    return lines


def _percentages(fractions: dict[str, float]) -> str:
    """"name 1.23%, ..." for a {name: fraction} mapping."""
    return ", ".join(f"{k} {100 * v:.2f}%" for k, v in fractions.items())


def markdown_report(results: dict) -> str:
    """The value table (rows samplers, columns NFE, best per column in bold) and the path-error table."""
    ref = results["reference"]
    scale = results.get("workload_info", {}).get("mode_scale", 1.0)
    modes = f" with component covariances × {scale:g}" if scale != 1.0 else ""
    lines = [f"### {results['workload']}{modes}: {results['metric_label']} (lower is better), n = {results['n']}, "
             f"seed {results['seed']}", ""]
    ref_line = (f"Reference: linear Heun at {ref['nfe']} NFE ({ref['steps']} steps) from the same noise: "
                f"{_fmt(ref.get('value'))}")
    if "noise_floor" in ref:
        ref_line += (f"; noise floor (fresh target samples of the same size, mean ± std of 5): "
                     f"{_fmt(ref['noise_floor'])} ± {_fmt(ref.get('noise_floor_std'))}")
    lines += [ref_line + ".", ""]
    lines += _table(results, "value")
    if any(r.get("path_error") is not None for r in results["results"]):
        lines += ["", f"Path error: mean ‖x − x_ref‖₂ per sample to the reference ({ref['nfe']}-NFE linear Heun) "
                  "from the same noise; ODE samplers only.", ""]
        lines += _table(results, "path_error")
    sde_ref = results.get("sde_reference")
    if sde_ref and any(r.get("sde_path_error") is not None for r in results["results"]):
        lines += ["", f"SDE path error: mean ‖x − x_ref‖₂ per sample to the {sde_ref['sampler']} at "
                  f"{sde_ref['nfe']} NFE ({sde_ref['steps']} steps; {results['metric_label']} "
                  f"{_fmt(sde_ref.get('value'))}), every run on the same per-sample Brownian paths "
                  "(`sde_noise=\"brownian\"`); samplers of that SDE only.", ""]
        lines += _table(results, "sde_path_error")
    if results.get("overhead"):
        setup = results.get("overhead_setup", {})
        lines += ["", f"Sampler overhead (time outside the network / network time, batch {setup.get('batch')}, "
                  f"{setup.get('steps')} steps): {_percentages(results['overhead'])}."]
        if results.get("overhead_direct"):
            lines += ["", "The sampler's own time measured directly (the network replaced by a stored output), as a "
                      f"fraction of network time: {_percentages(results['overhead_direct'])}."]
        if results.get("overhead_cuda_graph"):
            lines += ["", "The same with both sides replayed as CUDA graphs (`cuda_graph=True`): "
                      f"{_percentages(results['overhead_cuda_graph'])}."]
    if results.get("skipped"):
        pairs = ", ".join(f"{s['sampler']}@{s['nfe']}" if s["nfe"] is not None else f"{s['sampler']} ({s['reason']})"
                          for s in results["skipped"])
        lines += ["", f"Not run (no step count gives the exact NFE, or unavailable): {pairs}."]
    return "\n".join(lines) + "\n"


STYLES = {"peer": "--", "baseline": ":", "ours": "-"}


def plot_results(results: dict, path: Path | str) -> None:
    """Metric and path error against NFE on log-log axes; dashed peers, dotted baselines, solid ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    names = list(dict.fromkeys(r["sampler"] for r in results["results"]))
    cmap = plt.get_cmap("tab20")
    # tab20 pairs a dark and a light shade of each hue: use all dark shades before any light one.
    colours = [cmap(j) for j in (*range(0, 20, 2), *range(1, 20, 2))]
    for i, name in enumerate(names):
        rows = [r for r in results["results"] if r["sampler"] == name]
        for ax, key in zip(axes, ("value", "path_error"), strict=True):
            pts = [(r["nfe"], r[key]) for r in rows if r.get(key) is not None and r[key] > 0]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, STYLES.get(rows[0]["family"], "-"), marker="o", ms=3, color=colours[i % 20],
                        label=rows[0]["label"])
        sde = [(r["nfe"], r["sde_path_error"]) for r in rows if (r.get("sde_path_error") or 0) > 0]
        if sde:
            xs, ys = zip(*sde, strict=True)
            axes[1].plot(xs, ys, "-.", marker="x", ms=4, color=colours[i % 20])
    ref = results["reference"]
    if ref.get("value"):
        axes[0].axhline(ref["value"], color="grey", lw=0.8, label=f"reference ({ref['nfe']} NFE)")
    if ref.get("noise_floor"):
        axes[0].axhline(ref["noise_floor"], color="grey", lw=0.8, ls="-.", label="noise floor")
    axes[0].set_ylabel(results["metric_label"])
    axes[1].set_ylabel("path error: ODE samplers (o) to the ODE reference,\n"
                       "SDE samplers (x) to the SDE reference on the same Brownian paths")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_xticks(results["nfe"], [str(k) for k in results["nfe"]])
        ax.minorticks_off()
        ax.grid(True, which="both", lw=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{results['workload']}, n = {results['n']}")
    save_figure(fig, path)


def write_json(results: dict, path: Path | str) -> None:
    """Write ``results`` as JSON (no NaN or inf) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")


def write_text(text: str, path: Path | str) -> None:
    """Write ``text`` to ``path`` atomically: a reader sees the old file or the whole new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# Command line ---------------------------------------------------------------------------------------------------

# Arguments that the library's errors name, and the options of `lazyinterp bench` that set them.
BENCH_OPTIONS = {"mode_scale": "--mode-scale", "nfe": "--nfe", "samplers": "--samplers", "device": "--device",
                 "workload": "--workload", "n": "--n", "reference_nfe": "--reference-nfe", "batch_size": "--batch-size",
                 "max_runs": "--max-runs", "chunk": "--chunk"}


class _OneLineErrors(click.Command):
    """Usage errors as one line (no usage banner), like every other failure of this command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise UserError(exc.format_message()) from None


@click.command("bench", cls=_OneLineErrors)
@click.option("--workload", default="gmm-2d", show_default=True, help="mnist, gmm-2d or gmm-64d.")
@click.option("--nfe", default=DEFAULT_NFE, show_default=True, help="Comma-separated NFE values.")
@click.option("--n", "-n", "n", default=None, type=int,
              help="Samples per run [default: 2000 mnist, 16000 gmm]; under torchrun write -n.")
@click.option("--seed", default=0, type=int, show_default=True)
@click.option("--samplers", default=None, help=f"Comma list of samplers [default: all]: {', '.join(SAMPLER_NAMES)}.")
@click.option("--reference-nfe", default=1000, type=int, show_default=True,
              help="NFE of the linear-Heun reference from the same noise.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write results as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None,
              help="Write the tables as Markdown.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="Write a PNG plot of the metric against NFE.")
@click.option("--model", "model_name", default="mnist", show_default=True,
              help="mnist workload: a bundled model name or a .safetensors checkpoint.")
@click.option("--batch-size", default=None, type=int, help="Samples per batch [default: 250 mnist, all n gmm].")
@click.option("--device", default="cpu", show_default=True,
              help="Device of the mnist network: cpu or cuda (one GPU per process under torchrun).")
@click.option("--chunk", default=None, type=int,
              help="mnist: the network sees fixed chunks of this many samples, so samples do not depend on "
                   "--batch-size or the process count [default: 50; larger is faster on a GPU].")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where finished runs are kept until the benchmark completes, so that an interrupted "
                   "benchmark resumes [default: $LAZYINTERP_CACHE/bench].")
@click.option("--fresh", is_flag=True, help="Discard the finished runs of an interrupted benchmark.")
@click.option("--max-runs", default=None, type=int,
              help="Stop after this many new (sampler, NFE) runs (rerun to continue).")
@click.option("--overhead/--no-overhead", default=None,
              help="Measure the sampler overhead outside the network [default: for mnist].")
@click.option("--sde-path-error/--no-sde-path-error", default=None,
              help=f"Score the point-mass SDE samplers pathwise against a {SDE_REFERENCE_STEPS}-step solution on "
              "the same Brownian paths [default: for the mixtures].")
@click.option("--mode-scale", default=1.0, type=float, show_default=True,
              help="Mixtures: multiply every component's covariance by this (wider or tighter modes).")
@click.option("--quiet", is_flag=True, help="No progress bars or per-run lines.")
def bench(workload: str, nfe: str, n: int | None, seed: int, samplers: str | None, reference_nfe: int,
          json_path: Path | None, markdown_path: Path | None, plot_path: Path | None, model_name: str,
          batch_size: int | None, device: str, work_dir: Path | None, fresh: bool, max_runs: int | None,
          chunk: int | None, overhead: bool | None, sde_path_error: bool | None, mode_scale: float,
          quiet: bool) -> None:
    """Compare samplers at exactly counted NFE: peers (diffusers, flow_matching), baselines and lazy schedules.

    Runs as one process or under torchrun (each rank samples a share of every run); the results are the same.
    """
    try:
        check_run_arguments(workload, n=n, reference_nfe=reference_nfe, batch_size=batch_size, max_runs=max_runs,
                            chunk=chunk)
        check_mode_scale(mode_scale, workload)
        parse_nfe(nfe)
        select_samplers(samplers)
    except ValueError as exc:
        raise UserError(as_option_message(exc, BENCH_OPTIONS)) from None
    outputs = [(p, o) for p, o in ((json_path, "--json"), (markdown_path, "--markdown"), (plot_path, "--plot"))
               if p is not None]
    try:
        for path, option in outputs:
            ensure_writable(path, option)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    resolved = [p.absolute() for p, _ in outputs]
    if len(set(resolved)) != len(resolved):
        raise UserError("--json, --markdown, --plot: each output needs its own file")

    def write_outputs(results: dict) -> None:
        report = markdown_report(results)
        if json_path is not None:
            write_json(results, json_path)
        if markdown_path is not None:
            write_text(report, markdown_path)
        if plot_path is not None:
            plot_results(results, plot_path)
        click.echo(report, nl=False)

    try:
        ctx = distributed.setup(device)
    except ValueError as exc:
        raise UserError(as_option_message(exc, BENCH_OPTIONS)) from None
    try:
        results = run_bench(workload, nfe=nfe, n=n, seed=seed, samplers=samplers, reference_nfe=reference_nfe,
                            model=model_name, batch_size=batch_size, progress=not quiet,
                            log=None if quiet else lambda line: tqdm.write(line, file=sys.stderr), ctx=ctx,
                            work_dir=work_dir, fresh=fresh, max_runs=max_runs, overhead=overhead, chunk=chunk,
                            sde_path_error=sde_path_error, mode_scale=mode_scale, finish=write_outputs)
    except (ValueError, TypeError, RuntimeError, OSError, MemoryError) as exc:
        raise UserError(one_line_message(exc)) from None
    finally:
        distributed.teardown(ctx)
    if not ctx.is_main:
        return
    if not results["complete"]:
        click.echo(f"stopped after {max_runs} new runs; finished runs are in {results['work_dir']}; "
                   "run the same command again to resume")
        return
    if results.get("overhead"):
        click.echo(f"overhead outside the network: {_percentages(results['overhead'])}", err=True)
    if results.get("overhead_direct"):
        click.echo(f"overhead outside the network, measured directly: {_percentages(results['overhead_direct'])}",
                   err=True)
    if results.get("overhead_cuda_graph"):
        click.echo(f"overhead outside the network, CUDA graphs: {_percentages(results['overhead_cuda_graph'])}",
                   err=True)
    if not quiet:
        click.echo(f"done in {results['seconds']:.1f} s", err=True)
