r"""Samplers for dX_t = b^ε(t, X_t) dt + √(2 ε_t) dW_t over an explicit time grid.

b^ε = b + ε s keeps the interpolant's marginals for any ε ≥ 0. ε = 0 is the probability-flow ODE and
ε = κ ε* scales the statistically optimal diffusion ε* = α² d/dt log r. The solvers are small pure functions
of a drift, a grid and (for SDEs) a source of standard normal draws; :func:`sample` assembles them.

Network evaluations (NFE) for N grid intervals:

============================  ==========================  =================================
solver                        last_step="euler"           last_step="denoise"
============================  ==========================  =================================
euler (ODE), euler (SDE: EM)  N                           N
exponential (ODE and SDE)     N                           N
exponential-2m (ODE and SDE)  N                           N
ab2 (ODE and SDE: AB2 drift)  N                           N
ab2-pc (ODE, AB2 + AM3 PEC)   N                           N
heun (ODE and SDE)            2N                          2N − 1
============================  ==========================  =================================

``last_step="denoise"`` replaces the final interval by the posterior mean x_1 = η_X(t_{N−1}, x_{N−1})
(Tweedie's estimate): on the linear schedule this *is* the Euler step; on a point-mass SDE it drops the
final injected noise of variance 2 ε h, which cannot be removed by later steps.

The exponential step solves the SDE exactly over a step with η_X held at its value at the step's start
(``exponential-2m``: extrapolated linearly in log-SNR from the last two nodes); it ends at x_1 = η_X, so its
last step is the denoising step whichever ``last_step`` is asked for.

With ``known_start`` (centred data, the default of the lazy schedules) every count is one lower: at t = 0 the
state says nothing about the data, so η_X = E[X − μ] = 0 and η_Z = x/α_0 there without the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import graphs
from .brownian import BrownianPaths
from .conversion import convert
from .covariance import DEFAULT_RANK, FULL_RANK_MAX_DIM, Covariance, CovarianceLazyDynamics
from .devices import check_device
from .noise import KeyedStreams, NoiseStreams, check_indices, resolve_seed
from .predictors import (
    CenteredModel,
    Model,
    NonFiniteError,
    Predictor,
    check_predictor,
    estimate_mean,
    estimate_moments,
    estimate_sigma,
    eta_terms,
    linear_combination,
    merge_terms,
    reads_mean_directly,
)
from .schedules import END_OFFSET, LazySchedule, Schedule, as_time, check_positive, get_schedule, remembered

Tensor = torch.Tensor
Drift = Callable[[Tensor, float], Tensor]
Callback = Callable[[int, float, Tensor], None]

SOLVERS = ("euler", "euler-alpha", "heun", "ab2", "ab2-pc", "exponential", "exponential-2m")
SOLVER_ALIASES = {"euler": "euler", "euler-alpha": "euler-alpha", "heun": "heun", "ab2": "ab2", "ab2-pc": "ab2-pc",
                  "euler_maruyama": "euler", "euler-maruyama": "euler", "em": "euler", "exponential": "exponential",
                  "exponential-2m": "exponential-2m"}
# Exact steps of the SDE with η_X held (or extrapolated in log-SNR) over a step; ε = κ ε* only.
EXPONENTIAL_SOLVERS = ("exponential", "exponential-2m")
# Multistep solvers: one evaluation a step (they reuse drifts of earlier nodes); ab2-pc is for the ODE only.
ODE_SOLVERS = ("ab2", "ab2-pc")
LAST_STEPS = ("euler", "denoise")
SDE_NOISES = ("independent", "keyed", "brownian")
DEFAULT_STEPS = 8
# The most grid intervals a named grid is built with: far beyond any converged run (the benchmark's references use
# 500–512), and the finest grid that the Brownian paths resolve (leaves of width 2^-20, :mod:`lazyinterp.brownian`);
# larger counts are a mistake that would otherwise fail with an allocation error.
MAX_STEPS = 2**20


# Grids ----------------------------------------------------------------------------------------------------------

# From this many steps on, li.sample's default lazy ODE solver is AB2-AM3 (lower FID and path error than AB2 on MNIST
# and on both Gaussian mixtures of the benchmark; below it AB2 wins).
PC_DEFAULT_FROM_STEPS = 12
# With covariance-matched coordinates the default is Euler below this many steps: there AB2's extrapolation from the
# zero drift at t = 0 overshoots badly on MNIST (FID 1286 vs Euler's 218 at 2 NFE), at a small cost on the mixtures.
COVARIANCE_AB2_FROM_STEPS = 7


def uniform_grid(steps: int) -> Tensor:
    """t_k = k/N for k = 0..N (float64)."""
    steps = check_steps(steps)
    return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)


def snr_matched_grid(steps: int, schedule: Schedule, reference: Schedule | str = "linear",
                     shift: float = 1.0) -> Tensor:
    """Nodes t_k of ``schedule`` whose SNRs are those of ``reference`` on its uniform grid: r(t_k) = r_ref(k/N).

    With the model's training schedule as ``reference``, the converted sampler visits exactly the noise levels
    that uniform steps of the native sampler would, so only the coordinates of the Euler step differ.
    ``shift`` s divides every SNR, r(t_k) = r_ref(k/N)/s (a shift of −log s in log-SNR): on a linear reference
    this is the ``shift`` of diffusers' flow-matching schedulers, σ' = sσ/(1 + (s − 1)σ) with σ = 1 − t; s > 1
    spends more steps at high noise.
    """
    ref = get_schedule(reference, argument="reference")
    shift = check_grid_shift(shift)
    grid = schedule.snr_inverse(ref.snr(uniform_grid(steps)) / shift)
    grid[0], grid[-1] = 0.0, 1.0
    if shift != 1.0 and not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(f"grid_shift: {shift:g} moves nodes of the {steps}-step grid to SNRs the schedule cannot "
                         "tell apart, so they merge at t = 0 or t = 1; use a shift nearer 1")
    return grid


GRIDS = ("uniform", "model", "linear")
# Named grids that match the SNRs of a reference schedule's uniform grid, and take a shift.
SNR_MATCHED_GRIDS = ("model", "linear")
# The σ range beyond which a lazy schedule's "model" or "linear" grid is the lazy schedule's own uniform grid. A lazy
# schedule's samples scale with the data, but a reference's uniform grid does not: for data far from unit scale it
# crowds its nodes at one end of the data's SNR range, and the lazy schedule's own uniform grid is better (README,
# "steps").
GRID_SIGMA_RANGE = (0.25, 4.0)
# The σ range, per lazy family, inside which those grids are exactly the reference's SNRs. Between it and
# GRID_SIGMA_RANGE the node log-SNRs move linearly in |log σ| from the reference's to the own grid's, so the grid is
# a continuous function of σ. For the lazy VP ODE the blend starts at a factor 2 from unit scale: on random Gaussian
# mixtures with σ in [1/4, 1/2] or [2, 4] it beat the reference's grid on every one (docs/studies/grid_blend.py),
# while inside [1/2, 2] the reference's grid is the better one on MNIST and gmm-2d (README, "steps"). The point-mass
# SDE keeps the reference's grid up to a factor 4: on gmm-2d at σ = 3.7 the own grid and the blend were both worse.
MATCHED_GRID_SIGMA_RANGE = {"lazy_vp": (0.5, 2.0), "point_mass": GRID_SIGMA_RANGE}


def own_grid_weight(schedule: Schedule) -> float:
    """The weight w in [0, 1] of a schedule's own uniform grid in its "model" or "linear" grid: 0 unless the schedule
    is lazy with σ outside its :data:`MATCHED_GRID_SIGMA_RANGE` [a, b], 1 outside :data:`GRID_SIGMA_RANGE` [a', b'],
    and between, w = (log(σ/b))/log(b'/b) above and log(a/σ)/log(a/a') below."""
    sigma = getattr(schedule, "sigma", None)
    if not isinstance(schedule, LazySchedule) or sigma is None:
        return 0.0
    low, high = MATCHED_GRID_SIGMA_RANGE.get(schedule.family, GRID_SIGMA_RANGE)
    outer_low, outer_high = GRID_SIGMA_RANGE
    if sigma > high:
        return 1.0 if sigma >= outer_high else math.log(sigma / high) / math.log(outer_high / high)
    if sigma < low:
        return 1.0 if sigma <= outer_low else math.log(low / sigma) / math.log(low / outer_low)
    return 0.0


def matched_grid(steps: int, schedule: Schedule, reference: Schedule, shift: float = 1.0) -> Tensor:
    """The "model" or "linear" grid: the SNRs of ``reference``'s uniform grid (:func:`snr_matched_grid`) blended in
    log-SNR with those of ``schedule``'s own uniform grid by :func:`own_grid_weight` w,
    log r_k = (1 − w) log r_ref(k/N) + w log r(k/N), every SNR divided by ``shift``. Own grids depend on the data's
    SNR βσ/α alone, so beyond :data:`GRID_SIGMA_RANGE` the grid is the same for every σ."""
    weight = own_grid_weight(schedule)
    if weight == 0.0:
        return snr_matched_grid(steps, schedule, reference, shift)
    own = snr_matched_grid(steps, schedule, schedule, shift)
    if weight == 1.0:
        return own
    matched = snr_matched_grid(steps, schedule, reference, shift)
    inner = slice(1, -1)
    log_snr = torch.lerp(schedule.snr(matched[inner]).log(), schedule.snr(own[inner]).log(), weight)
    grid = own.clone()
    grid[inner] = schedule.snr_inverse(log_snr.exp())
    return grid


def check_grid_shift(shift: Any, grid: Any = "model") -> float:
    """A positive, finite SNR divisor, which only the "model" and "linear" grids take (any shift but 1 with another
    grid is refused)."""
    shift = check_positive(shift, "grid_shift")
    if isinstance(grid, str) and grid not in GRIDS:  # name the unknown grid, not the shift it cannot take
        raise ValueError(f"grid: expected an explicit grid or one of {', '.join(GRIDS)}, got {grid!r}")
    if shift != 1.0 and not (isinstance(grid, str) and grid in SNR_MATCHED_GRIDS):
        given = repr(grid) if isinstance(grid, str) else "an explicit grid"
        raise ValueError(f'grid_shift: applies to grid="model" or "linear" only, got {given}')
    return shift


_NAMED_GRIDS: dict = {}


def make_grid(grid: Any, steps: int | None, schedule: Schedule, model_schedule: Schedule,
              shift: float = 1.0) -> Tensor:
    """The time grid :func:`sample` uses: an explicit grid, or a named family over ``steps`` intervals.

    "uniform": t_k = k/N. "model": SNR-matched to the model's own schedule on its uniform grid; "linear": to the
    linear schedule's, r_k = (k/N)/(1 − k/N), whatever the model's (for a lazy schedule with σ far from 1,
    blended with or replaced by the lazy schedule's own: :func:`matched_grid`); every SNR divided by ``shift``.
    """
    if grid is None or isinstance(grid, str):
        steps = DEFAULT_STEPS if steps is None else check_steps(steps)
        name = grid or "uniform"
        if name not in GRIDS:
            raise ValueError(f"grid: expected an explicit grid or one of {', '.join(GRIDS)}, got {grid!r}")
        shift = check_grid_shift(shift, name)

        def compute() -> Tensor:
            if name in SNR_MATCHED_GRIDS:
                reference = model_schedule if name == "model" else get_schedule("linear")
                return check_grid(matched_grid(steps, schedule, reference, shift))
            return uniform_grid(steps)

        # A named grid is a function of its arguments: remembered (the schedules by identity, and kept alive by
        # the key), as sampling calls it with the same arguments every time; each caller gets its own copy.
        return remembered(_NAMED_GRIDS, (name, steps, schedule, model_schedule, shift), compute).clone()
    check_grid_shift(shift, grid)
    grid = check_grid(grid)
    if steps is not None and check_steps(steps) != len(grid) - 1:
        raise ValueError(f"steps: {steps} does not match the explicit grid's {len(grid) - 1} intervals; "
                         "give one of them")
    return grid


def check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps: expected an integer >= 1, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps}")
    if steps > MAX_STEPS:
        raise ValueError(f"steps: expected at most {MAX_STEPS} intervals, got {steps}")
    return steps


def check_grid(grid: Any) -> Tensor:
    """A strictly increasing float64 grid from exactly 0 to exactly 1."""
    try:
        g = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"grid: expected a 1-D sequence of times, got {type(grid).__name__}") from exc
    if g.ndim != 1 or g.numel() < 2:
        raise ValueError(f"grid: expected a 1-D grid with at least 2 times, got shape {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise ValueError("grid: times must be finite")
    if abs(float(g[0])) > 1e-12 or abs(float(g[-1]) - 1.0) > 1e-12:
        raise ValueError(f"grid: must run from 0 to 1, got {float(g[0]):.6g} to {float(g[-1]):.6g}")
    if not bool((torch.diff(g) > 0).all()):
        raise ValueError("grid: times must increase strictly")
    g[0], g[-1] = 0.0, 1.0
    return g


def count_nfe(solver: str, steps: int, last_step: str = "euler", known_start: bool = False) -> int:
    """Network evaluations of ``solver`` over ``steps`` intervals (see the module table); one fewer with
    ``known_start``, where the drift at t = 0 needs no network (see :func:`sample`)."""
    solver = _check_solver(solver)
    steps = check_steps(steps)
    if solver in ("euler", "euler-alpha") or solver in ODE_SOLVERS or solver in EXPONENTIAL_SOLVERS:
        nfe = steps
    else:
        nfe = 2 * steps - (1 if last_step == "denoise" else 0)
    return nfe - int(bool(known_start))


def steps_for_nfe(solver: str, nfe: int, last_step: str = "euler", known_start: bool = False) -> int | None:
    """The number of steps at which ``solver`` costs exactly ``nfe`` evaluations (:func:`count_nfe`), or None."""
    if isinstance(nfe, bool) or not isinstance(nfe, int):
        raise TypeError(f"nfe: expected an integer >= 0, got {type(nfe).__name__}")
    if nfe < 0:
        raise ValueError(f"nfe: expected an integer >= 0, got {nfe}")
    for steps in range(1, min(nfe + 3, MAX_STEPS + 1)):
        if count_nfe(solver, steps, last_step, known_start) == nfe:
            return steps
    return None


def default_known_start(schedule: Schedule | str) -> bool:
    """:func:`sample`'s default ``known_start``: it centres (and so knows the drift at t = 0) on lazy schedules."""
    return isinstance(get_schedule(schedule), LazySchedule)


def _check_solver(solver: Any) -> str:
    if not isinstance(solver, str) or solver.lower() not in SOLVER_ALIASES:
        raise ValueError(f"solver: expected one of {', '.join(SOLVER_ALIASES)}, got {solver!r}")
    return SOLVER_ALIASES[solver.lower()]


# Diffusion coefficients -----------------------------------------------------------------------------------------

@dataclass
class Diffusion:
    r"""ε_t, either a multiple of the optimal one (ε = κ ε*) or a user's callable ε(t).

    Where ε* is infinite (a Gaussian base at t = 0) κ ε* is taken as 0, while a callable's finite ε(0) is used
    as given; where ε* = 0 (t = 1) the diffusion is 0."""

    schedule: Schedule
    kappa: float | None = None
    epsilon: Callable[[float], float] | None = None

    @property
    def is_ode(self) -> bool:
        return self.epsilon is None and self.kappa == 0

    def schedule_has_finite_optimum(self, t: float) -> bool:
        return t > 0 or self.schedule.base == "point_mass"

    def user_epsilon(self, t: float) -> float:
        """The callable's ε(t), validated."""
        eps = float(self.epsilon(t))
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"diffusion: eps(t) must be finite and >= 0, got {eps} at t={t:.6g}")
        return eps

    def _optimum(self, t: float) -> float:
        if not self.schedule_has_finite_optimum(t):
            return math.inf
        # A point mass's ε* at t = 0 is a 0/0: its right limit.
        return self.schedule.scalar_optimal_diffusion(max(t, END_OFFSET))

    def kappa_at(self, t: float) -> float:
        if self.epsilon is None and self.kappa == 0:
            return 0.0  # the ODE: no need for ε*
        eps_star = self._optimum(t)
        if self.epsilon is None:
            return 0.0 if not math.isfinite(eps_star) else float(self.kappa)
        eps = self.user_epsilon(t)
        if not math.isfinite(eps_star) or eps_star == 0 or eps == 0:
            return 0.0
        return eps / eps_star

    def epsilon_at(self, t: float) -> float:
        if self.epsilon is not None and not self.schedule_has_finite_optimum(t):
            return self.user_epsilon(t)
        kappa = self.kappa_at(t)
        return 0.0 if kappa == 0 else kappa * self._optimum(t)


def default_diffusion(schedule: Schedule) -> str:
    """"optimal" on a point-mass schedule, which an ODE cannot leave; "ode" on every other."""
    return "optimal" if schedule.base == "point_mass" else "ode"


def resolve_diffusion(diffusion: Any, schedule: Schedule) -> Diffusion:
    """"ode" → ε = 0, "optimal" → ε*, a float κ → κ ε*, a callable → ε(t); None → :func:`default_diffusion`."""
    if diffusion is None:
        diffusion = default_diffusion(schedule)
    if isinstance(diffusion, str):
        key = diffusion.lower()
        if key == "ode":
            return Diffusion(schedule, kappa=0.0)
        if key in ("optimal", "sde"):
            return Diffusion(schedule, kappa=1.0)
        raise ValueError(f"diffusion: expected 'ode', 'optimal', a number kappa >= 0 or a callable eps(t), "
                         f"got {diffusion!r}")
    if isinstance(diffusion, bool):
        raise TypeError("diffusion: expected 'ode', 'optimal', a number or a callable, got a bool")
    if isinstance(diffusion, (int, float)):
        if not (math.isfinite(diffusion) and diffusion >= 0):
            raise ValueError(f"diffusion: kappa must be a finite number >= 0, got {diffusion}")
        return Diffusion(schedule, kappa=float(diffusion))
    if callable(diffusion):
        return Diffusion(schedule, epsilon=lambda t: float(as_time(diffusion(as_time(t)))))
    raise TypeError(f"diffusion: expected 'ode', 'optimal', a number or a callable, got {type(diffusion).__name__}")


# Dynamics: drift and denoiser under a schedule -------------------------------------------------------------------

@dataclass
class Dynamics:
    """The drift b^ε(t, x) of a predictor under its schedule, with diffusion ``diffusion``."""

    predictor: Predictor
    diffusion: Diffusion
    known_start: bool = False
    coefficient_cache: dict = field(default_factory=dict)

    @property
    def schedule(self) -> Schedule:
        return self.predictor.schedule

    def _coefficients(self, t: float, kappa: float) -> tuple[str, float, float]:
        key = (t, kappa)
        if key not in self.coefficient_cache:
            sched = self.schedule
            if self.diffusion.epsilon is not None and not self.diffusion.schedule_has_finite_optimum(t):
                # A Gaussian base at t = 0, where ε* is infinite but a user's ε(0) is not:
                # b^ε = α̇ η_Z + β̇ η_X − (ε/α) η_Z.
                eps = self.diffusion.user_epsilon(t)
                a, da, db = float(sched.alpha(t)), float(sched.dalpha(t)), float(sched.dbeta(t))
                self.coefficient_cache[key] = ("z", da - eps / a, db)
            elif t < 0.5 and (kappa > 0 or sched.base == "point_mass"):
                a_coef, b_coef = sched.drift_coefficients(t, kappa)
                self.coefficient_cache[key] = ("x", a_coef, b_coef)
            else:
                a, b, da, db = sched.scalar_coefficients(t)  # at regular_time(t)
                if sched.base == "point_mass" and float(sched.alpha(t)) == 0.0:
                    # The point mass's data end, where α̇ is infinite: η_Z's coefficient is of size 1/√END_OFFSET
                    # while η_Z → 0, and a model's η_Z does not cancel it (a vp model, read at its own regularised
                    # SNR 1e5, sent stochastic Heun's last corrector 400 data scales away). At α = 0 the posterior
                    # is exact for any data, η_Z = 0 and η_X = x/β, as a linear model's is: the drift is β̇ x/β,
                    # bounded. The model is still evaluated, so its count holds.
                    self.coefficient_cache[key] = ("x", db / float(sched.beta(t)), 0.0)
                else:
                    if kappa != 0:
                        da = (1 + kappa) * da - kappa * a * db / b
                    self.coefficient_cache[key] = ("z", da, db)
        return self.coefficient_cache[key]

    def drift(self, x: Tensor, t: float) -> Tensor:
        """b^ε(t, x) = A x + B η_X (for t < 1/2) or C η_Z + D η_X (otherwise): both exact, each bounded
        where it is used."""
        form, first, second = self._coefficients(float(t), self.diffusion.kappa_at(float(t)))
        if self._at_known_start(t):
            eta_z, eta_x = ([(1.0, eta)] for eta in self._start_eta(x))
        else:
            eta_z, eta_x = eta_terms(self.predictor, x, t)
        # One multiply-add per distinct tensor (the state, the network's output, E[X]), rather than forming
        # η_Z and η_X first: on an accelerator each is a kernel launch.
        lead = [(first, x)] if form == "x" else [(first * c, v) for c, v in eta_z]
        return linear_combination(merge_terms([*lead, *((second * c, v) for c, v in eta_x)]))

    def start(self, noise: Tensor) -> Tensor:
        """The state at t = 0 from the standard normal ``noise``: α_0 Z (0 on a point mass)."""
        return float(self.schedule.alpha(0.0)) * noise

    def denoise(self, x: Tensor, t: float) -> Tensor:
        """η_X(t, x), the posterior mean of the data."""
        return self._start_eta(x)[1] if self._at_known_start(t) else self.predictor.eta(x, t)[1]

    def _at_known_start(self, t: float) -> bool:
        return self.known_start and float(t) == 0.0

    def _start_eta(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(η_Z, η_X) at t = 0 for centred data: X is independent of the state there, so η_X = E[X − μ] = 0, and
        x = α_0 Z gives η_Z = x/α_0 (0 at a point-mass start, where x = 0)."""
        alpha0 = float(self.schedule.alpha(0.0))
        eta_z = x / alpha0 if alpha0 > 0 else torch.zeros_like(x)
        return eta_z, torch.zeros_like(x)


# Pure solvers ---------------------------------------------------------------------------------------------------

def _kick(epsilon: Callable[[float], float] | None, t: float, h: float, xi: Tensor | None) -> list:
    """The noise of a step from t of length h, √(2 ε(t) h) ξ, as (coefficient, tensor) pairs (none where ε = 0)."""
    eps = epsilon(t) if epsilon is not None else 0.0
    return [(math.sqrt(2 * eps * h), xi)] if eps > 0 else []


# A step more than this many times longer than the one before it takes the one-step rule (Euler, or the trapezoid
# in the corrector): after so short a step the two drifts differ by little more than rounding, and the multistep
# weights, which grow like ρ = h/h_prev, would multiply that rounding into the state.
MAX_STEP_RATIO = 1e6


def ab2_weights(h: float, h_prev: float) -> tuple[float, float]:
    """The variable-step Adams–Bashforth 2 weights (w_k, w_{k−1}) = h (1 + ρ/2, −ρ/2), ρ = h / h_prev: the step
    is h [(1 + ρ/2) d_k − (ρ/2) d_{k−1}] = w_k d_k + w_{k−1} d_{k−1}; Euler's (h, 0) when ρ > MAX_STEP_RATIO."""
    if h > MAX_STEP_RATIO * h_prev:
        return h, 0.0
    rho = h / h_prev
    return h * (1 + 0.5 * rho), -0.5 * h * rho


def am3_weights(h: float, h_prev: float | None) -> tuple[float, ...]:
    r"""The variable-step Adams–Moulton 3 weights over [t_k, t_k + h] for the drifts at t_{k+1}, t_k, t_{k−1}:

    h ((3 + 2ρ)/(6(1 + ρ)), (3 + ρ)/6, −ρ²/(6(1 + ρ))),  ρ = h / h_prev,

    the integrals of the quadratic through the three drifts; the trapezoid's h (1/2, 1/2) when ``h_prev`` is None
    (no d_{k−1}), and h (1/2, 1/2, 0) when ρ > MAX_STEP_RATIO."""
    if h_prev is None:
        return 0.5 * h, 0.5 * h
    if h > MAX_STEP_RATIO * h_prev:
        return 0.5 * h, 0.5 * h, 0.0
    r = h / h_prev
    return h * (3 + 2 * r) / (6 * (1 + r)), h * (3 + r) / 6, -h * r * r / (6 * (1 + r))


def ab2_increment(h: float, h_prev: float, d: Tensor, d_prev: Tensor) -> Tensor:
    """The variable-step Adams–Bashforth 2 increment h [(1 + ρ/2) d_k − (ρ/2) d_{k−1}] (:func:`ab2_weights`)."""
    return linear_combination(zip(ab2_weights(h, h_prev), (d, d_prev), strict=True))


def am3_increment(h: float, h_prev: float | None, d_next: Tensor, d: Tensor, d_prev: Tensor | None) -> Tensor:
    r"""The variable-step Adams–Moulton 3 increment over [t_k, t_k + h] (:func:`am3_weights`): the trapezoid
    h/2 (d_k + d_{k+1}) when there is no d_{k−1} (``h_prev`` and ``d_prev`` None)."""
    drifts = (d_next, d) if d_prev is None else (d_next, d, d_prev)
    return linear_combination(zip(am3_weights(h, h_prev), drifts, strict=True))


def _guard(step: int, t: float, fn, *args):
    try:
        return fn(*args)
    except NonFiniteError as exc:
        raise NonFiniteError(f"{exc} (step {step + 1}, t={t:.6g})", t=t, step=step) from None


class _StateCheck:
    """Raises :class:`NonFiniteError` naming the first step (and its time) whose state is NaN or inf.

    On the CPU each step is checked at once. On an accelerator each step keeps the state's minimum and maximum
    (one reduction; NaN and ±inf show in them) on the device, read once at the end: reading a flag every step
    would stall the device's queue behind the host.
    """

    def __init__(self, x: Tensor):
        self.deferred = x.device.type != "cpu"
        # A run being captured as a CUDA graph is checked once, after each replay (see ``sample``).
        self.skipped = graphs.capturing()
        self.extremes: list[Tensor] = []
        self.times: list[float] = []

    def __call__(self, x: Tensor, step: int, t: float) -> None:
        if self.skipped:
            return
        if self.deferred:
            self.extremes.extend(torch.aminmax(x))
            self.times.append(t)
        elif not bool(torch.isfinite(x).all()):
            self._raise(step, t)

    def finish(self) -> None:
        if self.extremes:
            finite = torch.isfinite(torch.stack(self.extremes).view(-1, 2)).all(dim=1).cpu()
            if not bool(finite.all()):
                step = int((~finite).nonzero()[0])
                self._raise(step, self.times[step])

    @staticmethod
    def _raise(step: int, t: float) -> None:
        raise NonFiniteError(f"the sample became NaN or inf at step {step + 1} (t={t:.6g})", t=t, step=step)


def euler(drift: Drift, x: Tensor, grid: Tensor, *, denoise: Drift | None = None,
          callback: Callback | None = None, step_lengths: Sequence[float] | None = None) -> Tensor:
    """Explicit Euler: x_{k+1} = x_k + h_k b(t_k, x_k). With ``denoise``, the last step is x_N = D(t_{N−1}, x).

    ``step_lengths`` replaces h_k (e.g. :func:`alpha_matched_steps`): Euler in another time variable s, with
    h_k = Δs_k dt/ds(t_k), whose nodes are the same times.
    """
    times = [float(t) for t in grid]
    if step_lengths is None:
        lengths = [t1 - t0 for t0, t1 in zip(times, times[1:], strict=False)]
    elif len(step_lengths) == len(times) - 1:
        lengths = [float(h) for h in step_lengths]
    else:
        raise ValueError(f"step_lengths: expected {len(times) - 1} values, got {len(step_lengths)}")
    check = _StateCheck(x)
    last = len(times) - 2
    for k in range(len(times) - 1):
        t, h = times[k], lengths[k]
        if k == last and denoise is not None:
            x = _guard(k, t, denoise, x, t)
        else:
            x = linear_combination([(h, _guard(k, t, drift, x, t))], base=x)
        check(x, k, t)
        if callback is not None:
            callback(k, times[k + 1], x)
    check.finish()
    return x


def alpha_matched_steps(schedule: Schedule, grid: Tensor) -> list[float]:
    r"""Step lengths h'_k = (α(t_{k+1}) − α(t_k)) / α̇(t_k) for :func:`euler`: Euler in the time variable α.

    On x = α η_Z + β η_X the step x + h' (α̇ η_Z + β̇ η_X) lands the noise coefficient exactly on α(t_{k+1}), as
    DDIM does, and takes the data coefficient along the schedule's tangent, β + h' β̇. On a lazy VP schedule
    (α = σ cos θ, β = sin θ) that is Euler under another θ_t, a member of the same lazy family (theory §5), so it
    stays exact on N(μ, σ²I), whose drift is 0; and it is exact on a point mass at the mean, whose η_X is 0 after
    centring. Where α̇(t_k) = 0 (t = 0 of lazy VP) the step keeps h_k.
    """
    times = [float(t) for t in grid]
    lengths = []
    for t0, t1 in zip(times, times[1:], strict=False):
        a0, _, da0, _ = schedule.scalar_coefficients(t0)
        a1 = schedule.scalar_coefficients(t1)[0]
        # α̇ = 0 up to rounding (it comes out as −1e-17 at t = 0 of lazy VP): no tangent to follow.
        lengths.append((a1 - a0) / da0 if da0 < -1e-12 * abs(a0) else t1 - t0)
    return lengths


def heun(drift: Drift, x: Tensor, grid: Tensor, *, denoise: Drift | None = None,
         callback: Callback | None = None) -> Tensor:
    """Heun (explicit trapezoid), 2 evaluations a step: x̃ = x + h b(t, x); x' = x + h/2 (b(t, x) + b(t', x̃))."""
    times = [float(t) for t in grid]
    check = _StateCheck(x)
    last = len(times) - 2
    for k in range(len(times) - 1):
        t, t_next = times[k], times[k + 1]
        h = t_next - t
        if k == last and denoise is not None:
            x = _guard(k, t, denoise, x, t)
        else:
            d0 = _guard(k, t, drift, x, t)
            x_pred = linear_combination([(h, d0)], base=x)
            d1 = _guard(k, t_next, drift, x_pred, t_next)
            x = linear_combination([(0.5 * h, d0), (0.5 * h, d1)], base=x)
        check(x, k, t)
        if callback is not None:
            callback(k, t_next, x)
    check.finish()
    return x


def adams_bashforth2(drift: Drift, x: Tensor, grid: Tensor, *, denoise: Drift | None = None,
                     callback: Callback | None = None, epsilon: Callable[[float], float] | None = None,
                     normal: Callable[[], Tensor] | None = None) -> Tensor:
    """Two-step Adams–Bashforth on a non-uniform grid, one evaluation a step (the first step is Euler):

    x_{k+1} = x_k + h_k [(1 + ρ/2) b_k − (ρ/2) b_{k−1}] (+ √(2 ε(t_k) h_k) ξ_k for an SDE),  ρ = h_k / h_{k−1}.

    With ``epsilon`` and ``normal`` it is Euler–Maruyama with the drift extrapolated as above (the noise is
    additive, so this stays strong order 1); a standard normal draw is taken at every step, as there.
    """
    times = [float(t) for t in grid]
    check = _StateCheck(x)
    last = len(times) - 2
    previous = None
    for k in range(len(times) - 1):
        t, h = times[k], times[k + 1] - times[k]
        xi = normal() if normal is not None else None
        if k == last and denoise is not None:
            x = _guard(k, t, denoise, x, t)
        else:
            d = _guard(k, t, drift, x, t)
            weights = (h,) if previous is None else ab2_weights(h, t - times[k - 1])
            terms = [*zip(weights, (d, previous), strict=False), *_kick(epsilon, t, h, xi)]
            x = linear_combination(terms, base=x)
            previous = d
        check(x, k, t)
        if callback is not None:
            callback(k, times[k + 1], x)
    check.finish()
    return x


def adams_predictor_corrector(drift: Drift, x: Tensor, grid: Tensor, *, denoise: Drift | None = None,
                              callback: Callback | None = None) -> Tensor:
    r"""AB2 predictor, AM3 corrector, one evaluation a step (PEC): third order on a non-uniform grid.

    With h = t_{k+1} − t_k, ρ = h / (t_k − t_{k−1}) and d_j the drift evaluated at node t_j:

    * predict (AB2):  x̃_{k+1} = x_k + h [(1 + ρ/2) d_k − (ρ/2) d_{k−1}]   (Euler for k = 0);
    * evaluate:       d_{k+1} = b(t_{k+1}, x̃_{k+1}), the step's only network evaluation;
    * correct (AM3):  x_{k+1} = x_k + h [(3 + 2ρ)/(6(1 + ρ)) d_{k+1} + (3 + ρ)/6 d_k − ρ²/(6(1 + ρ)) d_{k−1}]
      (the trapezoid x_1 = x_0 + h/2 (d_0 + d_1) for k = 0),

    the AM3 weights being the integrals over [t_k, t_{k+1}] of the quadratic through (t_j, d_j), j = k−1..k+1.
    As in UniPC, the corrected state moves on with d_{k+1}, the drift at the *predicted* point, instead of
    paying for a second evaluation: d_{k+1} − b(t_{k+1}, x_{k+1}) = O(h³) (O(h²) after the Euler start) enters
    the next step multiplied by h, so the local error stays O(h⁴) (O(h³) once) and the scheme is third order.

    The last interval has no evaluation at its end, so it is the predictor alone; with ``denoise`` it is
    x_N = D(t_{N−1}, x̃_{N−1}), taken at the predicted state because correcting that state would cost an
    evaluation. ``callback(k, t, x)`` receives each node's final (corrected) state, so it runs one node behind
    the evaluations.
    """
    times = [float(t) for t in grid]
    check = _StateCheck(x)
    last = len(times) - 2
    drifts: list[Tensor] = []  # d_{k−2}, d_{k−1}, d_k
    start = x  # x_{k−1}, where the corrector of the interval ending at t_k starts
    for k in range(len(times) - 1):
        t, t_next = times[k], times[k + 1]
        h = t_next - t
        final_denoise = k == last and denoise is not None
        if not final_denoise:
            drifts = [*drifts[-2:], _guard(k, t, drift, x, t)]
            if k > 0:
                weights = am3_weights(t - times[k - 1], times[k - 1] - times[k - 2] if k > 1 else None)
                x = linear_combination(zip(weights, reversed(drifts), strict=False), base=start)
        if k > 0 and callback is not None:
            callback(k - 1, t, x)
        if final_denoise:
            x = _guard(k, t, denoise, x, t)
        else:
            start = x
            weights = (h,) if k == 0 else ab2_weights(h, t - times[k - 1])
            x = linear_combination(zip(weights, reversed(drifts), strict=False), base=x)
        check(x, k, t)
    if callback is not None:
        callback(last, times[-1], x)
    check.finish()
    return x


def euler_maruyama(drift: Drift, epsilon: Callable[[float], float], x: Tensor, grid: Tensor,
                   normal: Callable[[], Tensor], *, denoise: Drift | None = None,
                   callback: Callback | None = None) -> Tensor:
    """Euler–Maruyama: x_{k+1} = x_k + h b(t_k, x_k) + √(2 ε(t_k) h) ξ_k, with ξ_k = ``normal()``.

    A standard normal draw is taken at every step (also where ε = 0) so the noise used at step k does not
    depend on earlier steps' diffusion.
    """
    times = [float(t) for t in grid]
    check = _StateCheck(x)
    last = len(times) - 2
    for k in range(len(times) - 1):
        t, h = times[k], times[k + 1] - times[k]
        xi = normal()
        if k == last and denoise is not None:
            x = _guard(k, t, denoise, x, t)
        else:
            kick = _kick(epsilon, t, h, xi)
            x = linear_combination([(h, _guard(k, t, drift, x, t)), *kick], base=x)
        check(x, k, t)
        if callback is not None:
            callback(k, times[k + 1], x)
    check.finish()
    return x


def stochastic_heun(drift: Drift, epsilon: Callable[[float], float], x: Tensor, grid: Tensor,
                    normal: Callable[[], Tensor], *, denoise: Drift | None = None,
                    callback: Callback | None = None) -> Tensor:
    """Heun for additive noise: x̃ = x + h b(t, x) + g ΔW, x' = x + h/2 (b(t, x) + b(t', x̃)) + g ΔW,
    with g ΔW = √(2 ε(t) h) ξ (the noise does not depend on x, so this is the strong order-1 scheme)."""
    times = [float(t) for t in grid]
    check = _StateCheck(x)
    last = len(times) - 2
    for k in range(len(times) - 1):
        t, t_next = times[k], times[k + 1]
        h = t_next - t
        xi = normal()
        if k == last and denoise is not None:
            x = _guard(k, t, denoise, x, t)
        else:
            kick = _kick(epsilon, t, h, xi)
            d0 = _guard(k, t, drift, x, t)
            x_pred = linear_combination([(h, d0), *kick], base=x)
            d1 = _guard(k, t_next, drift, x_pred, t_next)
            x = linear_combination([(0.5 * h, d0), (0.5 * h, d1), *kick], base=x)
        check(x, k, t)
        if callback is not None:
            callback(k, t_next, x)
    check.finish()
    return x


def exponential_coefficients(schedule: Schedule, t: float, s: float, kappa: float) -> tuple[float, float, float]:
    r"""(keep, lift, spread) of the exact step from t to s > t of dX = b^ε dt + √(2ε) dW, ε = κ ε*, with
    η_X held at x̂ = η_X(t, x_t): x_s = keep · x_t + lift · x̂ + spread · ξ, ξ ~ N(0, I).

    With η_X frozen the SDE is linear in x, and U = x − β x̂ obeys dU = (α̇/α − κ λ̇) U dt + √(2ε) dW
    (λ = log r), so with ρ = r_t / r_s

        keep = (α_s/α_t) ρ^κ,   lift = β_s − keep β_t,   spread = α_s √(1 − ρ^{2κ}).

    κ = 0 is DDIM's step and κ = 1 DDPM's ancestral step; both depend on the schedule only through the SNRs
    and the scale α, so every schedule with the same SNR grid gives the same samples up to the scale.
    At a start with r_t = 0 (t = 0) and κ > 0 nothing of x_t is kept.
    """
    a_t, b_t = float(schedule.alpha(t)), float(schedule.beta(t))
    a_s, b_s = float(schedule.alpha(s)), float(schedule.beta(s))
    if a_s == 0.0:  # the data end: x_s = x̂
        return 0.0, b_s, 0.0
    if b_t == 0.0:  # SNR 0: x_t says nothing about the data
        if kappa == 0.0:
            if a_t == 0.0:
                raise ValueError("diffusion: an ODE cannot leave a point mass; use kappa > 0")
            return a_s / a_t, b_s, 0.0
        return 0.0, b_s, a_s
    # ρ^κ through logarithms: r_t and r_s can be far apart near the ends. ρ ≤ 1 on an increasing grid, but for times
    # a few ulps apart the rounded logarithms can put it just above 1, where the spread would be √(negative).
    log_rho = min(log_snr(schedule, t) - log_snr(schedule, s), 0.0)
    decay = math.exp(kappa * log_rho)
    keep = a_s / a_t * decay
    spread = a_s * math.sqrt(-math.expm1(2 * kappa * log_rho)) if kappa > 0 else 0.0
    return keep, b_s - keep * b_t, spread


def log_snr(schedule: Schedule, t: float) -> float:
    """λ_t = log r_t, −inf where r_t = 0 and +inf where r_t = ∞."""
    a, b = float(schedule.alpha(t)), float(schedule.beta(t))
    if b == 0.0:
        return -math.inf
    return math.inf if a == 0.0 else math.log(b) - math.log(a)


def exponential_slope_weight(schedule: Schedule, t: float, s: float, kappa: float) -> float:
    r"""w with x_s gaining w · D when η_X(u) = x̂ + (λ_u − λ_t) D over the step (λ = log r) rather than x̂:

        w = β_s [h − (1 − e^{−(1+κ) h}) / (1 + κ)],   h = λ_s − λ_t,

    the exact integral of the linear SDE's η_X term, α_s (1 + κ) ∫ e^{λ − κ(λ_s − λ)} η_X(λ) dλ. 0 where λ_t is
    −inf or λ_s is +inf (a step from SNR 0 or onto the data, which takes the frozen η_X).
    """
    lam_t, lam_s = log_snr(schedule, t), log_snr(schedule, s)
    if not (math.isfinite(lam_t) and math.isfinite(lam_s)):
        return 0.0
    h, m = lam_s - lam_t, 1.0 + kappa
    return float(schedule.beta(s)) * (h + math.expm1(-m * h) / m)


_EXPONENTIAL_STEPS: dict = {}


def _exponential_step(schedule: Schedule, t: float, s: float, kappa: float) -> tuple[float, ...]:
    """(keep, lift, spread, w, λ_t, λ_s) of the step from t to s, remembered: a sampler takes the same steps on
    every call with the same grid, and these are host-side scalars computed from the schedule."""
    return remembered(_EXPONENTIAL_STEPS, (schedule, t, s, kappa), lambda: (
        *exponential_coefficients(schedule, t, s, kappa), exponential_slope_weight(schedule, t, s, kappa),
        log_snr(schedule, t), log_snr(schedule, s)))


def exponential_terms(schedule: Schedule, t: float, s: float, kappa: float, x: Tensor, x_hat: Tensor,
                      xi: Tensor | None, previous: tuple[float, Tensor] | None = None) -> list:
    """The step from t to s as (coefficient, tensor) pairs: keep x + lift x̂ + spread ξ, and + w D with
    D = (x̂ − x̂_prev) / (λ_t − λ_prev) when ``previous`` = (λ_prev, x̂_prev) is given and usable."""
    keep, lift, spread, weight, lam_t, lam_s = _exponential_step(schedule, t, s, kappa)
    terms = [(lift, x_hat)]
    if keep != 0.0:
        terms.append((keep, x))
    if spread > 0.0:
        terms.append((spread, xi))
    if previous is not None:
        lam_prev, x_hat_prev = previous
        gap = lam_t - lam_prev
        # As in AB2: after a step MAX_STEP_RATIO times shorter the two x̂ differ by rounding, which D would amplify.
        if weight != 0.0 and math.isfinite(gap) and gap > 0.0 and lam_s - lam_t <= MAX_STEP_RATIO * gap:
            terms += [(weight / gap, x_hat), (-weight / gap, x_hat_prev)]
    return merge_terms(terms)


def exponential(denoise: Drift, schedule: Schedule, kappa: float, x: Tensor, grid: Tensor,
                normal: Callable[[], Tensor] | None = None, *, multistep: bool = False,
                callback: Callback | None = None) -> Tensor:
    r"""The exponential step, one evaluation a step: x_{k+1} = keep x_k + lift η_X(t_k, x_k) + spread ξ_k
    (:func:`exponential_coefficients`), exact when η_X does not change over a step (e.g. data at one point).

    With ``multistep`` (second order, still one evaluation a step) η_X is extrapolated linearly in λ = log r
    through its values at the last two nodes, D = (x̂_k − x̂_{k−1}) / (λ_k − λ_{k−1}), and that line is
    integrated exactly: + w D (:func:`exponential_slope_weight`), as in DPM-Solver++(2M) with exact weights.
    The first step, a step from SNR 0 and the step onto the data take the frozen η_X.

    ``normal()`` gives ξ_k and is called at every step when κ > 0 (as in :func:`euler_maruyama`); the ODE
    (κ = 0) needs none. The last step lands on η_X(t_{N−1}, x_{N−1}), the denoising step.
    """
    times = [float(t) for t in grid]
    check = _StateCheck(x)
    previous: tuple[float, Tensor] | None = None
    for k in range(len(times) - 1):
        t, t_next = times[k], times[k + 1]
        xi = normal() if kappa > 0 else None
        x_hat = _guard(k, t, denoise, x, t)
        x = linear_combination(exponential_terms(schedule, t, t_next, kappa, x, x_hat, xi, previous))
        if multistep:
            previous = (_exponential_step(schedule, t, t_next, kappa)[4], x_hat)
        check(x, k, t)
        if callback is not None:
            callback(k, t_next, x)
    check.finish()
    return x


# The deterministic solvers by name: pure functions (drift, x, grid, *, denoise, callback) -> x at the grid's end.
ODE_STEPPERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler, "heun": heun, "ab2": adams_bashforth2, "ab2-pc": adams_predictor_corrector,
}


# The user-facing entry point -----------------------------------------------------------------------------------

@dataclass
class SampleInfo:
    """What :func:`sample` did: network evaluations per sample, the grid, σ and the mean it used."""

    nfe: int
    grid: Tensor
    schedule: Schedule
    sigma: float | None = None
    mean: Tensor | None = None
    estimation_nfe: int = 0


def normal_draws(streams: NoiseStreams | KeyedStreams, count: int, block: int = 32) -> Callable[[], Tensor]:
    """``count`` draws from ``streams``, taken a block at a time: one generator call per sample and block rather
    than per sample and step (the per-step cost would otherwise grow with the batch)."""

    def draws():
        left = count
        while left > 0:
            take = min(block, left)
            yield from streams.draw_block(take)
            left -= take

    iterator = draws()
    return lambda: next(iterator)


def _check_dtype(dtype: Any) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    return dtype


def _model_cache(model: Any) -> dict:
    cache = getattr(model, "_cache", None)
    return cache if isinstance(cache, dict) else {}


def data_mean(model: Predictor, sample_shape: tuple[int, ...], device, dtype) -> Tensor:
    """E[X] estimated from the model (cached on it per shape); where it is not read at t = 0, σ comes with it."""
    cache = _model_cache(model)
    key = ("mean", sample_shape)
    if key not in cache:
        gen = torch.Generator().manual_seed(12345)
        kw = dict(probes=8, generator=gen, device=device, dtype=torch.float64 if dtype == torch.float64 else
                  torch.float32)
        if reads_mean_directly(model):
            cache[key] = estimate_mean(model, sample_shape, **kw)
        else:
            # σ comes from the same probes; where the model admits none, only an explicit σ can be used.
            cache[key], cache[("sigma-with-mean", sample_shape)] = estimate_moments(model, sample_shape,
                                                                                    require_sigma=False, **kw)
    return cache[key].to(device=device, dtype=dtype)


def data_sigma(model: Predictor, sample_shape: tuple[int, ...], mean: Tensor | None, device, dtype,
               known_mean: Tensor | None = None) -> float:
    """σ for a lazy schedule, from the model (cached): √(tr Cov X / D) when centring, else the RMS √(E‖X‖²/D);
    about ``known_mean`` (the caller's E[X]) where one is given."""
    cache = _model_cache(model)
    key = ("sigma", sample_shape, mean is not None)
    if known_mean is not None:
        known_mean = known_mean.to(device).expand(sample_shape)
        key += (hashlib.sha256(known_mean.double().cpu().numpy().tobytes()).hexdigest(),)
    if key not in cache:
        gen = torch.Generator().manual_seed(54321)
        mu = data_mean(model, sample_shape, device, dtype) if known_mean is None else known_mean
        sig = cache.get(("sigma-with-mean", sample_shape)) if known_mean is None else None
        if sig is None:
            sig = estimate_sigma(model, sample_shape, mean=mu, probes=8, generator=gen, device=device,
                                 dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        if mean is None:
            sig = math.sqrt(sig * sig + float((mu.double() ** 2).mean()))
        cache[key] = sig
    return cache[key]


# The model's own samples that estimate its covariance: max(2D, COVARIANCE_MIN_SAMPLES) of them (2 × DEFAULT_RANK above
# FULL_RANK_MAX_DIM), each from this many steps of the scalar lazy VP default.
COVARIANCE_SAMPLE_STEPS = 8
COVARIANCE_MIN_SAMPLES = 2048


_ESTIMATE_NOTE_START = "lazyinterp: raised while estimating E[X], sigma or the covariance"
_ESTIMATE_NOTE = (
    _ESTIMATE_NOTE_START + " from the model, which evaluates it on "
    "batches of probes or samples of its own, not on this call's batch of {batch}. A network with conditioning "
    "bound to that batch (class labels, prompts) must get one conditioning that broadcasts; or skip the estimate: "
    "center=E[X] as a tensor (or center=False) and schedule=li.lazy_vp(sigma), and an li.Covariance rather than "
    "covariance='model'.")


@contextlib.contextmanager
def _noted_as_estimate(batch: int):
    """Adds :data:`_ESTIMATE_NOTE` to an error raised inside (once, on Python >= 3.11): the network fails on the
    estimate's own batch sizes, most often because per-sample conditioning was bound to the samples' batch."""
    try:
        yield
    except Exception as exc:
        if hasattr(exc, "add_note") and not any(n.startswith(_ESTIMATE_NOTE_START)
                                                for n in getattr(exc, "__notes__", ())):
            exc.add_note(_ESTIMATE_NOTE.format(batch=batch))
        raise


def data_covariance(model: Predictor, sample_shape: tuple[int, ...], device, dtype, batch_size: int = 256
                    ) -> Covariance:
    """Cov X of the model's own samples (cached on it per shape): full rank up to D = FULL_RANK_MAX_DIM, from
    max(2D, 2048) samples; above, from 2 × DEFAULT_RANK samples, isotropic noise plus at most DEFAULT_RANK spikes
    (:meth:`Covariance.spiked_from_samples`: with N ≪ D the plain top eigenpairs are mostly sampling noise).

    Measured on MNIST (README): a covariance from the model's posterior mean at a low SNR, like σ's estimate, was
    further from the data's and lost FID; the samples' covariance matches the data's trace to 0.1%.
    """
    cache = _model_cache(model)
    key = ("covariance", sample_shape, torch.device(device).type)
    if key not in cache:
        dim = math.prod(sample_shape)
        full = dim <= FULL_RANK_MAX_DIM
        count = max(2 * dim, COVARIANCE_MIN_SAMPLES) if full else 2 * DEFAULT_RANK
        parts = []
        for lo in range(0, count, batch_size):
            hi = min(count, lo + batch_size)
            parts.append(sample(model, shape=(hi - lo, *sample_shape), generator=13579, indices=range(lo, hi),
                                schedule="lazy-vp", steps=COVARIANCE_SAMPLE_STEPS, device=device, dtype=dtype))
        samples = torch.cat(parts)
        cache[key] = Covariance.from_samples(samples) if full else \
            Covariance.spiked_from_samples(samples, DEFAULT_RANK)
    return cache[key]


def check_covariance_applies(schedule: Schedule, is_ode: bool) -> None:
    """Covariance-matched coordinates exist for the lazy VP probability-flow ODE only; anything else is refused."""
    if not (getattr(schedule, "family", None) == "lazy_vp" and is_ode):
        raise ValueError("covariance: applies to the probability-flow ODE of schedule='lazy-vp' only")


def default_solver(schedule: Schedule, diffusion: Diffusion) -> str:
    """The solver when none is given (before :func:`sample`'s step-count rules): "ab2" where the schedule is lazy
    for the dynamics (an ODE on a lazy schedule, or the point mass's SDE with ε = ε*: on Gaussian data their drift
    is 0, so extrapolating it is exact), "exponential-2m" for any other SDE with ε = κ ε*, "euler" otherwise; on a
    one-step grid Euler(–Maruyama) where this would be exponential (:func:`default_solver_for_steps`).

    Measured (README, "Benchmarks"): in lazy coordinates AB2 beats Euler at equal NFE. On the point mass with ε*
    AB2 beats the 2M step on MNIST up to 6 NFE (FID 174.9 / 58.59 / 37.26 vs 448.8 / 97.17 / 51.15 at 2 / 4 / 6)
    and on gmm-64d at every NFE but 4, and loses on MNIST from 8 NFE (34.45 vs 32.67) and on gmm-2d near its
    noise floor; with κ ≠ 1 or on lazy VP, where the drift keeps a stiff linear part, AB2 overshoots at few steps
    (gmm-64d, 3 NFE: 1.22 on lazy VP with κ = 1, 2.51 on the point mass with κ = 2) and the 2M step, which
    integrates that part exactly, is the better default.
    """
    if isinstance(schedule, LazySchedule) and (diffusion.is_ode or _is_lazy_sde(schedule, diffusion)):
        return "ab2"
    return "exponential-2m" if not diffusion.is_ode and diffusion.epsilon is None else "euler"


def default_solver_for_steps(solver: str, steps: int) -> str:
    """The default ``solver`` on a grid of ``steps`` intervals: the exponential steps end at η_X, which after a
    single step from t = 0 is E[X] for every sample, so a one-step run takes Euler(–Maruyama) instead (exact on
    Gaussian data for the lazy VP SDE)."""
    return "euler" if steps == 1 and solver in EXPONENTIAL_SOLVERS else solver


def _is_lazy_sde(schedule: Schedule, diffusion: Diffusion) -> bool:
    """The lazy point mass with ε = ε*: the SDE whose drift vanishes on Gaussian data (theory §5)."""
    return schedule.base == "point_mass" and diffusion.epsilon is None and diffusion.kappa == 1.0


def check_solver_fits(solver: str, diffusion: Diffusion, with_covariance: bool) -> None:
    """Refuses a solver that cannot run with this diffusion (or with covariance-matched coordinates)."""
    if solver in ("ab2-pc", "euler-alpha") and not diffusion.is_ode:
        raise ValueError(f"solver: {solver} is an ODE solver; use euler, heun, ab2 or exponential(-2m) with an SDE")
    if solver == "euler-alpha" and with_covariance:
        raise ValueError("covariance: euler-alpha matches one scalar noise coefficient; covariance-matched "
                         "coordinates have one per direction: use euler, ab2 or ab2-pc")
    if solver in EXPONENTIAL_SOLVERS and diffusion.epsilon is not None:
        raise ValueError("solver: the exponential step needs diffusion 'ode', 'optimal' or a number kappa "
                         "(eps = kappa eps*), not a callable eps(t); use euler or heun")
    if solver in EXPONENTIAL_SOLVERS and with_covariance:
        raise ValueError("covariance: the exponential step is the same in any lazy coordinates (DDIM's step); "
                         "drop covariance or use another solver")


def check_known_mean(mean: Tensor, sample_shape: tuple[int, ...], device, dtype) -> Tensor:
    """``center`` given as E[X]: a finite floating tensor that broadcasts to one sample's shape, on the run's device
    and dtype; anything else raises."""
    if not mean.is_floating_point():
        raise TypeError(f"center: expected True, False, None or E[X] as a floating tensor, got dtype {mean.dtype}")
    try:
        fits = torch.broadcast_shapes(mean.shape, sample_shape) == torch.Size(sample_shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"center: E[X] must broadcast to one sample's shape {tuple(sample_shape)}, "
                         f"got {tuple(mean.shape)}")
    if not bool(torch.isfinite(mean).all()):
        raise ValueError("center: E[X] has non-finite entries")
    return mean.to(device=device, dtype=dtype)


def check_optional_bool(value: Any, argument: str) -> None:
    """A TypeError naming ``argument`` unless ``value`` is True, False or None (None: the default applies)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{argument}: expected True, False or None, got {type(value).__name__}")


def default_last_step(is_ode: bool, steps: int | None = None) -> str:
    """The last step :func:`sample` takes unless told: "euler" for an ODE, "denoise" (x_1 = η_X) for an SDE, where
    it removes the last step's noise (theory §4, measured in the README) — except on a one-step grid, where it
    would replace the only step, and every sample would be E[X]."""
    return "euler" if is_ode or steps == 1 else "denoise"


def check_settings(schedule: Schedule, diffusion: Any = None, solver: str | None = None,
                   last_step: str | None = None, with_covariance: bool = False) -> tuple[Diffusion, str, str]:
    """The checks of :func:`sample` that need no model or data: (diffusion, solver, last step) as it resolves
    them on ``schedule`` (before its step-count rules for the default solver), or the error it would raise."""
    diffusion_spec = resolve_diffusion(diffusion, schedule)
    solver = _check_solver(default_solver(schedule, diffusion_spec) if solver is None else solver)
    if last_step is None:
        last_step = default_last_step(diffusion_spec.is_ode)
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step: expected one of {', '.join(LAST_STEPS)}, got {last_step!r}")
    if with_covariance:
        check_covariance_applies(schedule, diffusion_spec.is_ode)
    check_solver_fits(solver, diffusion_spec, with_covariance)
    if schedule.base == "point_mass" and diffusion_spec.is_ode:
        raise ValueError("diffusion: a point-mass schedule starts every sample at 0, and an ODE moves them all "
                         "alike, so it cannot leave the point; use diffusion='optimal' (or kappa > 0)")
    return diffusion_spec, solver, last_step


def resolve_covariance(covariance: Any, sample_shape: tuple[int, ...]) -> Covariance | str:
    """``covariance`` checked against the sample shape: "model", a :class:`Covariance` or a (D, D) tensor."""
    dim = math.prod(sample_shape)
    if isinstance(covariance, str):
        if covariance != "model":
            raise ValueError(f'covariance: expected "model", a Covariance or a (D, D) tensor, got {covariance!r}')
        return covariance
    if isinstance(covariance, torch.Tensor):
        if covariance.shape != (dim, dim):
            raise ValueError(f"covariance: expected a ({dim}, {dim}) matrix for samples of shape {sample_shape}, "
                             f"got {tuple(covariance.shape)}")
        return Covariance.from_matrix(covariance, sample_shape)
    if isinstance(covariance, Covariance):
        if covariance.dim != dim:
            raise ValueError(f"covariance: built for {covariance.dim} entries a sample, the samples have {dim}")
        return covariance
    raise TypeError(f'covariance: expected "model", a Covariance or a (D, D) tensor, got {type(covariance).__name__}')


_CAPTURES_PER_MODEL = 8


def _nonfinite_noise() -> ValueError:
    return ValueError("noise: expected finite values")


def _replay_captured(predictor: Predictor, key: tuple, run: Callable[..., Tensor], inputs: tuple[Tensor, ...],
                     keep: object) -> Tensor:
    """``run(*inputs)`` replayed from the capture kept on the model under ``key`` (captured on first use, holding
    ``keep`` alive)."""
    cache = _model_cache(predictor)
    captured = cache.get(key)
    if captured is None:
        captured = graphs.capture(run, inputs, counter=predictor, keep=keep)
        held = [k for k in cache if isinstance(k, tuple) and k and k[0] == "cuda-graph"]
        for old in held[: max(0, len(held) - _CAPTURES_PER_MODEL + 1)]:
            del cache[old]
        cache[key] = captured
    out = graphs.replay(captured, inputs, counter=predictor)
    if not bool(captured.finite):
        run(*inputs)  # eagerly, checked at every step, so the error names the step where it happened
        raise NonFiniteError("the sample became NaN or inf")
    return out


def sample(model: Model | Predictor, noise: Tensor | None = None, *, shape: tuple[int, ...] | None = None,
           steps: int | None = None, schedule: Schedule | str | None = None, diffusion: Any = None,
           solver: str | None = None, generator: int | torch.Generator | None = None, grid: Any = None,
           last_step: str | None = None, center: bool | Tensor | None = None, indices: Any = None,
           device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           callback: Callback | None = None, known_start: bool | None = None, grid_shift: float = 1.0,
           cuda_graph: bool = False, covariance: Any = None, sde_noise: str = "independent",
           return_info: bool = False):
    r"""Samples at t = 1 of dX = b^ε dt + √(2ε) dW under ``schedule``, from ``model`` converted exactly.

    Args:
        model: an :class:`~lazyinterp.Model` (network + training schedule + prediction kind).
        noise: the starting Z, shape (B, ...), for Gaussian-base schedules (the state starts at α_0 Z). When
            omitted it is drawn per sample from ``generator`` with ``shape``.
        shape: the batch shape (B, ...); needed for point-mass schedules, which start at 0.
        steps: the number of grid intervals (uniform grid); with an explicit ``grid``, omit it or give its
            interval count. Default 8.
        schedule: the sampling schedule (object or name); default the model's own. Conversion is exact.
        diffusion: "ode" (ε = 0), "optimal" (ε*), a float κ (ε = κ ε*) or a callable ε(t); default "optimal"
            on a point-mass schedule (an ODE cannot leave the point) and "ode" on every other.
        solver: "euler" (Euler, or Euler–Maruyama for an SDE), "heun" (also for SDEs), "ab2" (two-step
            Adams–Bashforth, one evaluation a step; for an SDE with Euler–Maruyama's noise), "ab2-pc" (ODE
            only: AB2 predicted, AM3 corrected, still one evaluation a step, third order; see
            :func:`adams_predictor_corrector`),
            "exponential" or "exponential-2m" (ODE or ε = κ ε*: the exact step with η_X held over a step, or
            extrapolated in log-SNR; see :func:`exponential`); default for an ODE on a lazy schedule "ab2"
            ("euler" below 7 steps with ``covariance``, :data:`COVARIANCE_AB2_FROM_STEPS`), or "ab2-pc" from 12
            steps on (:data:`PC_DEFAULT_FROM_STEPS`); "ab2" for the point mass's SDE with ε = ε*;
            "exponential-2m" for any other SDE with ε = κ ε* ("euler" in a one-step run, where it would return
            E[X] for every sample); "euler" otherwise (:func:`default_solver`).
        generator: an int seed, a torch.Generator or None (torch's global RNG); each sample gets its own
            stream, so results do not depend on the batch size.
        grid: an explicit increasing time grid from 0 to 1, or "uniform", "model" (the SNRs of the model's own
            schedule on its uniform grid, see :func:`snr_matched_grid`) or "linear" (those of the linear
            schedule's, whatever the model's: the same grid for a rectified-flow, VP or DDPM model of the same
            data); for a lazy schedule with σ far from 1 both move to its own uniform grid (:func:`matched_grid`);
            default "linear" for the lazy schedules and "uniform" otherwise.
        last_step: "euler" or "denoise" (x_1 = η_X(t_{N−1}, x)); default "euler" for ODEs and "denoise" for
            SDEs, but "euler" for a one-step SDE, whose only step a denoising one would replace
            (:func:`default_last_step`).
        center: sample X − E[X] with the model's own estimate of E[X] and add it back; default on for the lazy
            schedules, which are lazy only for centred data. A tensor (one sample's shape, or one that broadcasts
            to it) is E[X] itself: centring about it, with no estimate.
        indices: global indices of the samples, for per-sample noise when a job is split (default 0..B−1).
        grid_shift: s > 0 divides the SNR of every node of the "model" or "linear" grid (diffusers' ``shift`` on
            the linear one); s > 1 spends more steps at high noise. Data-dependent (README, "Choosing σ…"); default 1.
        known_start: at t = 0 the state carries no information about the data, so for centred data the
            posterior means are known without the network: η_X = 0 and η_Z = x/α_0. The first evaluation is
            skipped and N steps cost one evaluation fewer (:func:`count_nfe`). Needs centring; default on
            whenever ``center`` is.
        covariance: lazy VP coordinates matched to a covariance instead of a scalar σ (ODE on ``"lazy-vp"``
            only, not with ``cuda_graph``; :mod:`lazyinterp.covariance`): "model" (estimated from the model's own
            samples, cached on it), a :class:`~lazyinterp.covariance.Covariance` or a (D, D) matrix. Exact in one
            Euler step for any Gaussian data, not only isotropic ones. The scalar lazy VP schedule's σ then only
            sets its time variable; left to the model it is √(tr Σ/D). Default None (scalar σ).
        cuda_graph: on a CUDA device, capture the whole run as a CUDA graph on the first call and replay it on
            later calls with the same settings and shapes (the capture is kept on the model): the host's work
            per step, which dominates a small network's step on a large GPU, drops out. Values agree with the
            eager run up to kernel rounding; ``model.nfe`` counts the replayed evaluations only. The state is
            checked for NaN and inf once, at the end (a bad run is repeated eagerly to name the step). No
            ``callback``.
        sde_noise: the SDE's noise. "independent" (default): a fresh standard normal per sample and step, from the
            sample's own generator on the host (:class:`~lazyinterp.noise.NoiseStreams`). "keyed": the same law,
            but each draw computed on the samples' device from a hash of (seed, sample, step)
            (:class:`~lazyinterp.noise.KeyedStreams`), so an accelerator never waits for the host's generators;
            on a CPU its cost is of the same order as "independent"'s. "brownian": the normalised increments of one
            Brownian path W_i(t) per sample over the grid (:class:`~lazyinterp.brownian.BrownianPaths`), the same
            path whatever the grid, so runs with more steps refine the same sample; it costs a few times more to
            draw (about log₂ of the leaf count per grid time). All three depend on neither the batch nor the
            device, and the starting noise is the same in all three.
        return_info: also return a :class:`SampleInfo`.
    """
    predictor = check_predictor(model)
    if sde_noise not in SDE_NOISES:
        raise ValueError(f"sde_noise: expected one of {', '.join(SDE_NOISES)}, got {sde_noise!r}")
    target = predictor.schedule if schedule is None else get_schedule(schedule)
    solver_is_default, last_step_is_default = solver is None, last_step is None
    diffusion_spec, solver, last_step = check_settings(target, diffusion, solver, last_step, covariance is not None)
    # Measured (README, "Benchmarks"): in lazy coordinates two-step Adams–Bashforth beats Euler at equal NFE, and
    # its third-order predictor-corrector form overtakes it once steps are short; chosen below, with the grid.
    auto_multistep = solver_is_default and isinstance(target, LazySchedule) and diffusion_spec.is_ode
    if grid is not None and not isinstance(grid, str):
        grid = check_grid(grid)
    # Refused before σ and E[X] cost network calls; a grid left to the default is checked once chosen.
    grid_shift = check_grid_shift(grid_shift, "linear" if grid is None else grid)
    is_sde = not diffusion_spec.is_ode
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph: expected True or False, got {type(cuda_graph).__name__}")
    if center is not None and not isinstance(center, (bool, Tensor)):
        raise TypeError(f"center: expected True, False, None or E[X] as a tensor, got {type(center).__name__}")
    check_optional_bool(known_start, "known_start")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable callback(k, t, x) or None, got {type(callback).__name__}")
    if cuda_graph and callback is not None:
        raise ValueError("cuda_graph: a replayed run cannot call back into Python at every step; drop callback")
    if covariance is not None and cuda_graph:
        raise ValueError("cuda_graph: not supported with covariance; run it eagerly (cuda_graph=False)")

    # Starting state and its shape.
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError("noise: expected a floating-point tensor")
        # On an accelerator reading a flag back would wait for the device's queue: a non-finite start shows as a
        # non-finite state instead, and is reported as this error then (below).
        if noise.device.type == "cpu" and not bool(torch.isfinite(noise).all()):
            raise _nonfinite_noise()
        if target.base == "point_mass":
            raise ValueError("noise: a point-mass schedule starts every sample at 0; pass shape= (and generator=) "
                             "instead of noise")
        if shape is not None and tuple(shape) != tuple(noise.shape):
            raise ValueError(f"shape: {tuple(shape)} does not match noise.shape {tuple(noise.shape)}")
        shape = tuple(noise.shape)
    elif shape is None:
        raise ValueError("noise, shape: give the starting noise or the batch shape")
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"shape: expected a tuple of ints, got {shape!r}") from exc
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape: expected (batch, ...) with positive sizes, got {shape}")
    batch, sample_shape = shape[0], shape[1:]
    device = check_device(device if device is not None else (noise.device if noise is not None else "cpu"))
    dtype = _check_dtype(dtype if dtype is not None else (noise.dtype if noise is not None else torch.float32))
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph: needs a CUDA device, got {device}")
    indices = check_indices(range(batch) if indices is None else indices, batch)

    if covariance is not None:
        covariance = resolve_covariance(covariance, sample_shape)

    draws_start = noise is None and target.base != "point_mass"
    base_seed = resolve_seed(generator) if draws_start or is_sde else None
    stream_args = (base_seed, indices, sample_shape)
    streams = NoiseStreams(*stream_args, device=device, dtype=dtype) if draws_start else None
    if is_sde and sde_noise == "brownian":
        paths = BrownianPaths(*stream_args, device=device, dtype=dtype)
    elif is_sde and sde_noise == "keyed":
        step_streams = KeyedStreams(*stream_args, device=device, dtype=dtype)
    elif is_sde:
        # Independent steps continue the stream whose first draw started the state.
        step_streams = streams if streams is not None else NoiseStreams(*stream_args, device=device, dtype=dtype)

    # Centring and σ (estimated from the model when the lazy schedule leaves it open).
    nfe_before = getattr(predictor, "nfe", 0)
    is_lazy = isinstance(target, LazySchedule)
    known_mean = None
    if isinstance(center, Tensor):
        known_mean, center = check_known_mean(center, sample_shape, device, dtype), True
    elif center is None:
        center = is_lazy
    if known_start is None:
        known_start = center
    elif known_start and not center:
        raise ValueError("known_start: the drift at t = 0 is known only for centred data; pass center=True")
    mean = known_mean
    with _noted_as_estimate(batch):
        if center and mean is None:
            mean = data_mean(predictor, sample_shape, device, dtype)
        if isinstance(covariance, str):
            covariance = data_covariance(predictor, sample_shape, device, dtype)
        sigma = getattr(target, "sigma", None)
        if is_lazy and not target.resolved:
            sigma = math.sqrt(covariance.mean_eigenvalue) if covariance is not None else \
                data_sigma(predictor, sample_shape, mean, device, dtype, known_mean)
    source = CenteredModel(predictor, mean) if center else predictor
    if is_lazy and not target.resolved:
        target = target.resolve(sigma)
        diffusion_spec = resolve_diffusion(diffusion, target)
    estimation_nfe = getattr(predictor, "nfe", 0) - nfe_before

    if grid is None:
        # Measured on MNIST and on Gaussians with MNIST's pixel variances: the lazy schedules gain most when they
        # visit the noise levels of a linear model's uniform grid; on the mixtures a VP or cosine model does
        # better there than on its own uniform grid (README, "Choosing σ…").
        grid = "linear" if is_lazy else "uniform"
    grid = make_grid(grid, steps, target, predictor.schedule, grid_shift)
    if auto_multistep and len(grid) - 1 >= PC_DEFAULT_FROM_STEPS:
        solver = "ab2-pc"
    elif auto_multistep and covariance is not None and len(grid) - 1 < COVARIANCE_AB2_FROM_STEPS:
        solver = "euler"
    elif solver_is_default:
        solver = default_solver_for_steps(solver, len(grid) - 1)
    if last_step_is_default:
        last_step = default_last_step(diffusion_spec.is_ode, len(grid) - 1)
    known_start = bool(known_start) and float(grid[0]) == 0.0
    if covariance is not None:
        dynamics = CovarianceLazyDynamics(convert(source, target), covariance, known_start)
    else:
        dynamics = Dynamics(convert(source, target), diffusion_spec, known_start)
    if target.base == "point_mass":
        x = torch.zeros(shape, device=device, dtype=dtype)
    else:
        z = noise.to(device=device, dtype=dtype) if noise is not None else streams.draw()
        x = dynamics.start(z)
    denoise = dynamics.denoise if last_step == "denoise" else None
    steps = len(grid) - 1

    def step_draws(keys: Tensor | None = None) -> Callable[[], Tensor]:
        """ξ_k, one a step (keyed draws from ``keys`` when given)."""
        if sde_noise == "brownian":
            return (xi for block in paths.increment_blocks(grid) for xi in block).__next__
        if keys is not None:
            return normal_draws(KeyedStreams.from_keys(keys, sample_shape, dtype), steps)
        return normal_draws(step_streams, steps)

    def integrate(x: Tensor, increments: Tensor | None = None, keys: Tensor | None = None) -> Tensor:
        draws = None
        if is_sde:
            draws = step_draws(keys) if increments is None else iter(increments.unbind(0)).__next__
        with torch.no_grad():
            if solver in EXPONENTIAL_SOLVERS:
                return exponential(dynamics.denoise, target, diffusion_spec.kappa, x, grid, draws,
                                   multistep=solver == "exponential-2m", callback=callback)
            if is_sde:
                if solver == "ab2":
                    return adams_bashforth2(dynamics.drift, x, grid, denoise=denoise, callback=callback,
                                            epsilon=diffusion_spec.epsilon_at, normal=draws)
                stepper = euler_maruyama if solver == "euler" else stochastic_heun
                return stepper(dynamics.drift, diffusion_spec.epsilon_at, x, grid, draws, denoise=denoise,
                               callback=callback)
            if solver == "euler-alpha":
                return euler(dynamics.drift, x, grid, denoise=denoise, callback=callback,
                             step_lengths=alpha_matched_steps(target, grid))
            return ODE_STEPPERS[solver](dynamics.drift, x, grid, denoise=denoise, callback=callback)

    def integrate_and_add_mean(x: Tensor, increments: Tensor | None = None, keys: Tensor | None = None) -> Tensor:
        x = integrate(x, increments, keys)
        return x if mean is None else x + mean

    try:
        if cuda_graph:
            run, inputs = integrate_and_add_mean, (x,)
            if is_sde and sde_noise == "keyed":
                # Computed inside the graph from the per-sample keys: no draw is launched outside the replay.
                def run(x: Tensor, keys: Tensor) -> Tensor:
                    return integrate_and_add_mean(x, keys=keys)

                inputs = (x, step_streams.keys)
            elif is_sde:
                draws = step_draws()
                inputs = (x, torch.stack([draws() for _ in range(steps)]))
            # The capture reads every tensor by address: the network's weights follow in-place updates, and a
            # network swapped for another is a new key (the old one is kept alive, so its id is not reused; the
            # key holds the schedule itself for the same reason).
            net = getattr(predictor, "net", None)
            key = ("cuda-graph", id(net), tuple(shape), dtype, device, target, diffusion_spec.kappa,
                   diffusion_spec.epsilon, solver, tuple(grid.tolist()), last_step, known_start, id(mean),
                   sde_noise if is_sde else None)
            x = _replay_captured(predictor, key, run, inputs, keep=net)
        else:
            x = integrate_and_add_mean(x)
    except NonFiniteError:
        if noise is not None and not bool(torch.isfinite(noise).all()):
            raise _nonfinite_noise() from None
        raise
    if return_info:
        info = SampleInfo(nfe=count_nfe(solver, len(grid) - 1, last_step, known_start), grid=grid, schedule=target,
                          sigma=sigma, mean=mean, estimation_nfe=estimation_nfe)
        return x, info
    return x
