r"""Sampling a model under any schedule and diffusion: :func:`sample`.

dX_t = b^ε(t, X_t) dt + √(2 ε_t) dW_t with b^ε = b + ε s keeps the interpolant's marginals for any ε ≥ 0. ε = 0 is
the probability-flow ODE and ε = κ ε* scales the statistically optimal diffusion ε* = α² d/dt log r.
:func:`sample` assembles the model converted to the schedule (:class:`Dynamics`), a grid (:mod:`lazyinterp.grids`),
a solver (:mod:`lazyinterp.solvers`), the noise (:mod:`lazyinterp.noise`, :mod:`lazyinterp.brownian`) and the
model-only estimates of E[X], σ and Σ (:mod:`lazyinterp.estimates`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import graphs
from .brownian import BrownianPaths
from .checks import check_float_dtype, check_shape
from .conversion import convert
from .covariance import Covariance, CovarianceLazyDynamics
from .devices import DeviceLike, check_device
from .estimates import data_covariance, data_mean, data_sigma, noted_as_estimate
from .grids import check_grid, check_grid_shift, make_grid
from .noise import KeyedStreams, NoiseStreams, check_indices, normal_draws, resolve_seed
from .predictors import (
    CenteredModel,
    Model,
    NonFiniteError,
    Predictor,
    check_predictor,
    eta_terms,
    linear_combination,
    merge_terms,
    model_cache,
)
from .schedules import END_OFFSET, LazySchedule, Schedule, as_time, get_schedule
from .solvers import (
    EXPONENTIAL_SOLVERS,
    ODE_STEPPERS,
    Callback,
    adams_bashforth2,
    alpha_matched_steps,
    check_solver,
    count_nfe,
    euler,
    euler_maruyama,
    exponential,
    stochastic_heun,
)

Tensor = torch.Tensor

LAST_STEPS = ("euler", "denoise")
SDE_NOISES = ("independent", "keyed", "brownian")


# Defaults ---------------------------------------------------------------------------------------------------------

# From this many steps on, li.sample's default lazy ODE solver is AB2-AM3 (lower FID and path error than AB2 on MNIST
# and on both Gaussian mixtures of the benchmark; below it AB2 wins).
PC_DEFAULT_FROM_STEPS = 12
# With covariance-matched coordinates the default is Euler below this many steps: there AB2's extrapolation from the
# zero drift at t = 0 overshoots badly on MNIST (FID 1286 vs Euler's 218 at 2 NFE), at a small cost on the mixtures.
COVARIANCE_AB2_FROM_STEPS = 7


def default_known_start(schedule: Schedule | str) -> bool:
    """:func:`sample`'s default ``known_start``: it centres (and so knows the drift at t = 0) on lazy schedules."""
    return isinstance(get_schedule(schedule), LazySchedule)


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
        """ε = 0: the probability-flow ODE."""
        return self.epsilon is None and self.kappa == 0

    def schedule_has_finite_optimum(self, t: float) -> bool:
        """ε* is finite at ``t``: everywhere but t = 0 of a Gaussian base."""
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
        """κ(t) = ε(t)/ε*(t); 0 where ε* is infinite or 0, or ε is 0."""
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
        """ε(t) = κ ε*(t), or the callable's value (also where ε* is infinite)."""
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
        """The schedule the dynamics run under (the converted predictor's)."""
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


def warn_one_exponential_step(solver: str, stacklevel: int = 3) -> None:
    """Warn that a run of one exponential step from pure noise returns η_X there, E[X] for every sample: the reason
    :func:`default_solver_for_steps` takes Euler instead (``stacklevel`` 3 names the caller of the function that
    calls this)."""
    warnings.warn(f"solver: one {solver} step from pure noise returns the model's posterior mean there, which is E[X] "
                  "for every sample; use two steps or more, or euler", stacklevel=stacklevel)


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


def check_known_mean(mean: Tensor, sample_shape: tuple[int, ...], device: DeviceLike, dtype: torch.dtype) -> Tensor:
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
    solver = check_solver(default_solver(schedule, diffusion_spec) if solver is None else solver)
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
    cache = model_cache(predictor)
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
           return_info: bool = False) -> Tensor | tuple[Tensor, SampleInfo]:
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
            :func:`~lazyinterp.solvers.adams_predictor_corrector`),
            "exponential" or "exponential-2m" (ODE or ε = κ ε*: the exact step with η_X held over a step, or
            extrapolated in log-SNR; see :func:`~lazyinterp.solvers.exponential`); default for an ODE on a lazy
            schedule "ab2" ("euler" below 7 steps with ``covariance``, :data:`COVARIANCE_AB2_FROM_STEPS`), or
            "ab2-pc" from 12 steps on (:data:`PC_DEFAULT_FROM_STEPS`); "ab2" for the point mass's SDE with ε = ε*;
            "exponential-2m" for any other SDE with ε = κ ε* ("euler" in a one-step run, where it would return
            E[X] for every sample); "euler" otherwise (:func:`default_solver`).
        generator: an int seed, a torch.Generator or None (torch's global RNG); each sample gets its own
            stream, so results do not depend on the batch size.
        grid: an explicit increasing time grid from 0 to 1, or "uniform", "model" (the SNRs of the model's own
            schedule on its uniform grid, see :func:`~lazyinterp.grids.snr_matched_grid`) or "linear" (those of
            the linear schedule's, whatever the model's: the same grid for a rectified-flow, VP or DDPM model of
            the same data); for a lazy schedule with σ far from 1 both move to its own uniform grid
            (:func:`~lazyinterp.grids.matched_grid`); default "linear" for the lazy schedules and "uniform" otherwise.
        last_step: "euler" or "denoise" (x_1 = η_X(t_{N−1}, x)); default "euler" for ODEs and "denoise" for
            SDEs, but "euler" for a one-step SDE, whose only step a denoising one would replace
            (:func:`default_last_step`).
        center: sample X − E[X] with the model's own estimate of E[X] and add it back; default on for the lazy
            schedules, which are lazy only for centred data. A tensor (one sample's shape, or one that broadcasts
            to it) is E[X] itself: centring about it, with no estimate.
        indices: global indices of the samples, for per-sample noise when a job is split (default 0..B−1).
        grid_shift: s > 0 divides the SNR of every node of the "model" or "linear" grid (diffusers' ``shift`` on
            the linear one); s > 1 spends more steps at high noise. Data-dependent (docs/levers.md); default 1.
        known_start: at t = 0 the state carries no information about the data, so for centred data the
            posterior means are known without the network: η_X = 0 and η_Z = x/α_0. The first evaluation is
            skipped and N steps cost one evaluation fewer (:func:`~lazyinterp.solvers.count_nfe`). Needs
            centring; default on whenever ``center`` is.
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
    shape = check_shape(shape, "shape", min_dims=2, what="(batch, ...)")
    batch, sample_shape = shape[0], shape[1:]
    device = check_device(device if device is not None else (noise.device if noise is not None else "cpu"))
    dtype = check_float_dtype(dtype if dtype is not None else (noise.dtype if noise is not None else torch.float32))
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
    with noted_as_estimate(batch):
        if center and mean is None:
            mean = data_mean(predictor, sample_shape, device, dtype)
        if isinstance(covariance, str):
            covariance = data_covariance(predictor, sample_shape, device, dtype, sample)
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
        # better there than on its own uniform grid (docs/levers.md).
        grid = "linear" if is_lazy else "uniform"
    grid = make_grid(grid, steps, target, predictor.schedule, grid_shift)
    if auto_multistep and len(grid) - 1 >= PC_DEFAULT_FROM_STEPS:
        solver = "ab2-pc"
    elif auto_multistep and covariance is not None and len(grid) - 1 < COVARIANCE_AB2_FROM_STEPS:
        solver = "euler"
    elif solver_is_default:
        solver = default_solver_for_steps(solver, len(grid) - 1)
    elif solver in EXPONENTIAL_SOLVERS and len(grid) == 2:
        warn_one_exponential_step(solver)
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
