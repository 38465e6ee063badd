"""The samplers the benchmark compares (peers, baselines and ours) and its two references, each with the step
count that costs a given NFE exactly."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..brownian import DEFAULT_DEPTH as BROWNIAN_DEPTH
from ..grids import MAX_STEPS, snr_matched_grid
from ..samplers import default_known_start
from ..schedules import point_mass
from ..solvers import steps_for_nfe

Tensor = torch.Tensor

FAMILIES = ("peer", "baseline", "ours")
# What :attr:`SamplerDef.euler_schedule` names for Euler in fitted per-direction lazy coordinates.
FITTED_SCHEDULE = "lazy-fitted"


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
    def euler_schedule(self) -> str | None:
        """The schedule of a deterministic Euler-type sampler of li.sample (Euler in its own time variable or in α,
        one evaluation a step), else None: the rows that the report's "Euler at N against linear Euler at 2N"
        compares."""
        if self.kind == "fitted":
            return FITTED_SCHEDULE
        if self.kind != "li" or self.stochastic or self.options.get("solver", "euler") not in ("euler", "euler-alpha"):
            return None
        return self.options["schedule"]

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
        if self.kind == "fitted":  # the first of its N + 1 steps needs no evaluation
            return {"steps": nfe + 1}
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
    # Fitted once per model and NFE on noise of its own (li.fit_euler), before the run and outside its time.
    SamplerDef("lazy-fitted-euler", "lazy Euler, fitted per direction to the model's paths", "ours", "fitted"),
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


def li_kwargs(spec: SamplerDef, plan: dict) -> dict:
    """The keyword arguments of ``li.sample`` that run a sampler of kind "li" with this plan."""
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
