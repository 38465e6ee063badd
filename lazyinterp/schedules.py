r"""Interpolation schedules I_t = α_t Z + β_t X, with t = 0 the base (noise or a point) and t = 1 the data.

A :class:`Schedule` exposes α, β, their time derivatives α̇, β̇, the signal-to-noise ratio r = β/α, its
log-derivative λ̇ = d/dt log r = β̇/β − α̇/α, its inverse r⁻¹, and the statistically optimal diffusion
ε*_t = α² λ̇. All maths runs in float64.

Two kinds of schedule:

* **Gaussian base**: α_0 > 0 (usually 1), β_0 = 0, α_1 = 0, β_1 = 1. Sampling starts at α_0 Z.
* **Point mass**: α_0 = β_0 = 0, α_1 = 0, β_1 = 1. Every sample starts at 0; only an SDE can leave it.

Built-ins: :func:`linear`, :func:`cosine`, :func:`vp`, :func:`lazy_vp` and :func:`point_mass`. A custom
schedule comes from two callables, with derivatives by autograd unless given.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from .checks import check_positive

Tensor = torch.Tensor
ScheduleFn = Callable[[Tensor], Tensor]
Base = Literal["gaussian", "point_mass"]

_F64 = torch.float64
# Where an end-point quantity is a 0/0, it is replaced by its right/left limit, evaluated this close to the
# end. In float64 the evaluated limit is accurate to about this value times the quantity's derivative.
END_OFFSET = 1e-9
_SCALAR_CACHE_SIZE = 4096


def remembered(cache: dict, key: Any, compute: Callable[[], Any]) -> Any:
    """``cache[key]``, computed by ``compute()`` on first use; the cache starts over once it holds
    ``_SCALAR_CACHE_SIZE`` entries (scalar values asked for at the same grid times at every step)."""
    hit = cache.get(key)
    if hit is None:
        hit = compute()
        if len(cache) >= _SCALAR_CACHE_SIZE:
            cache.clear()
        cache[key] = hit
    return hit


def as_time(t: Tensor | float) -> Tensor:
    """``t`` as a float64 tensor on the CPU (schedule maths never runs on the accelerator)."""
    if isinstance(t, Tensor):
        return t.detach().to(device="cpu", dtype=_F64)
    try:
        return torch.as_tensor(t, dtype=_F64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"t: expected a time (a float or a tensor of floats), got {type(t).__name__}") from None


def check_times(t: Tensor) -> Tensor:
    """``t`` unchanged if every time is finite, else a ValueError naming t. Times past an end of [0, 1] are
    allowed: adaptive ODE solvers (torchdiffeq's dopri5) evaluate a drift slightly beyond the interval."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"t: expected finite times in [0, 1], got {float(t[~torch.isfinite(t)].reshape(-1)[0])!r}")
    return t


def _autograd_derivative(fn: ScheduleFn) -> ScheduleFn:
    """d/dt fn(t) for an elementwise fn, exact to float precision (reverse-mode autograd)."""

    def derivative(t: Tensor) -> Tensor:
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(fn(tt).sum(), tt)
        return grad

    return derivative


def _bisect_inverse(fn: ScheduleFn, target: Tensor, iterations: int = 64) -> Tensor:
    """Vectorised bisection for the increasing fn on [0, 1]: the t with fn(t) = target, clamped to [0, 1]."""
    lo = torch.zeros_like(target)
    hi = torch.ones_like(target)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        below = fn(mid) < target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


class Schedule:
    r"""A schedule (α_t, β_t) on t ∈ [0, 1].

    Args:
        alpha, beta: elementwise callables of a float64 tensor of times.
        dalpha, dbeta: their derivatives; computed by autograd when omitted.
        snr_inverse: r ↦ t with β_t/α_t = r; by bisection when omitted.
        name: a label used in reprs, results and error messages.
        check: validate the boundary conditions and that the SNR increases.

    Raises:
        TypeError: alpha or beta is not callable.
        ValueError: the schedule breaks the boundary conditions or its SNR does not increase.
    """

    def __init__(self, alpha: ScheduleFn, beta: ScheduleFn, *, dalpha: ScheduleFn | None = None,
                 dbeta: ScheduleFn | None = None, snr_inverse: Callable[[Tensor], Tensor] | None = None,
                 name: str = "custom", check: bool = True):
        for arg, fn in (("alpha", alpha), ("beta", beta), ("dalpha", dalpha), ("dbeta", dbeta),
                        ("snr_inverse", snr_inverse)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{arg}: expected a callable of a time tensor, got {type(fn).__name__}")
        self._alpha = alpha
        self._beta = beta
        self._dalpha = dalpha or _autograd_derivative(alpha)
        self._dbeta = dbeta or _autograd_derivative(beta)
        self._snr_inverse = snr_inverse
        self.name = name
        a0 = float(self._eval(alpha, 0.0))
        self.base: Base = "point_mass" if abs(a0) < 1e-12 else "gaussian"
        if check:
            self._validate()

    def __repr__(self) -> str:
        return f"Schedule({self.name}, base={self.base})"

    def _eval(self, fn: ScheduleFn, t: Tensor | float) -> Tensor:
        # A sampler asks for α, β and their derivatives at the same few grid times many times a step; scalar
        # values are remembered per schedule (the functions are deterministic, so this changes no result), and
        # each caller gets its own copy.
        if not isinstance(t, (Tensor, float, int)):
            t = as_time(t)  # anything else that is a time (a numpy scalar), or a TypeError naming t
        if not isinstance(t, Tensor) or t.ndim == 0:
            cache = self.__dict__.setdefault("_scalar_values", {})
            return remembered(cache, (fn, float(t)), lambda: self._compute(fn, t)).clone()
        return self._compute(fn, t)

    @staticmethod
    def _compute(fn: ScheduleFn, t: Tensor | float) -> Tensor:
        # Solvers may step past an end (see check_times), which is clamped; the schedule is only defined on
        # [0, 1].
        tt = check_times(as_time(t)).clamp(0.0, 1.0)
        return torch.as_tensor(fn(tt), dtype=_F64).expand_as(tt).clone()

    def _validate(self) -> None:
        grid = torch.linspace(0.0, 1.0, 2001, dtype=_F64)
        a, b = self.alpha(grid), self.beta(grid)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"schedule {self.name}: alpha and beta must be finite on [0, 1]")
        a0, b0, a1, b1 = float(a[0]), float(b[0]), float(a[-1]), float(b[-1])
        tol = 1e-6
        if abs(b0) > tol or abs(a1) > tol or abs(b1 - 1.0) > tol:
            raise ValueError(
                f"schedule {self.name}: boundary conditions need beta(0) = 0, alpha(1) = 0 and beta(1) = 1; "
                f"got beta(0)={b0:.3g}, alpha(1)={a1:.3g}, beta(1)={b1:.3g}"
            )
        if a0 < -tol:
            raise ValueError(f"schedule {self.name}: alpha(0) must be >= 0, got {a0:.3g}")
        inner = grid[1:-1]
        if (self.alpha(inner) <= 0).any() or (self.beta(inner) <= 0).any():
            raise ValueError(f"schedule {self.name}: alpha and beta must be positive inside (0, 1)")
        r = self.beta(inner) / self.alpha(inner)
        if not (torch.diff(r) > 0).all():
            raise ValueError(f"schedule {self.name}: the SNR beta/alpha must increase strictly in t")

    # Coefficients -------------------------------------------------------------------------------------------
    def alpha(self, t: Tensor | float) -> Tensor:
        """α_t, the coefficient of the base noise Z."""
        return self._eval(self._alpha, t)

    def beta(self, t: Tensor | float) -> Tensor:
        """β_t, the coefficient of the data X."""
        return self._eval(self._beta, t)

    def dalpha(self, t: Tensor | float) -> Tensor:
        """α̇_t."""
        return self._eval(self._dalpha, t)

    def dbeta(self, t: Tensor | float) -> Tensor:
        """β̇_t."""
        return self._eval(self._dbeta, t)

    def regular_time(self, t: Tensor | float) -> Tensor:
        """``t`` itself wherever α̇ and β̇ are finite; elsewhere (vp at t = 1, a point mass at t = 0, whose
        derivatives are infinite there) the time moved END_OFFSET inside, so quantities built from
        derivatives take their one-sided limits."""
        tt = as_time(t)
        if tt.ndim == 0:
            if math.isfinite(float(self.dalpha(tt))) and math.isfinite(float(self.dbeta(tt))):
                return tt
            return tt.clamp(END_OFFSET, 1 - END_OFFSET)
        finite = torch.isfinite(self.dalpha(tt)) & torch.isfinite(self.dbeta(tt))
        if bool(finite.all()):
            return tt
        return torch.where(finite, tt, tt.clamp(END_OFFSET, 1 - END_OFFSET))

    def scalar_coefficients(self, t: float) -> tuple[float, float, float, float]:
        """(α, β, α̇, β̇) at ``regular_time(t)`` for one time, as floats (remembered per time, as a sampler asks
        for them at the same grid times at every step)."""
        def compute() -> tuple[float, float, float, float]:
            tt = self.regular_time(float(t))
            return float(self.alpha(tt)), float(self.beta(tt)), float(self.dalpha(tt)), float(self.dbeta(tt))

        return remembered(self.__dict__.setdefault("_scalar_coefficients", {}), float(t), compute)

    def snr(self, t: Tensor | float) -> Tensor:
        """r_t = β_t / α_t: 0 at t = 0 (also for a point mass, as a limit) and +inf at t = 1."""
        tt = as_time(t)
        a, b = self.alpha(tt), self.beta(tt)
        r = b / a
        r = torch.where(b == 0, torch.zeros_like(r), r)
        return torch.where((a == 0) & (b > 0), torch.full_like(r, math.inf), r)

    def snr_inverse(self, r: Tensor | float) -> Tensor:
        """r⁻¹: the time t at which β_t/α_t = r, for r in [0, inf]; an r outside the schedule's range of SNRs maps
        to the nearer end of [0, 1]."""
        rr = as_time(r)
        if rr.numel() and not bool((rr >= 0).all()):  # also false for NaN
            bad = rr[~(rr >= 0)].reshape(-1)[0]
            raise ValueError(f"r: expected signal-to-noise ratios in [0, inf], got {float(bad)!r}")
        if self._snr_inverse is not None:
            t = torch.as_tensor(self._snr_inverse(rr), dtype=_F64)
        else:
            t = _bisect_inverse(self.snr, rr)
        return t.clamp(0.0, 1.0)

    def dlog_snr(self, t: Tensor | float) -> Tensor:
        """λ̇_t = d/dt log r_t = β̇/β − α̇/α (+inf where β = 0 or α = 0)."""
        tt = as_time(t)
        return self.dbeta(tt) / self.beta(tt) - self.dalpha(tt) / self.alpha(tt)

    def optimal_diffusion(self, t: Tensor | float) -> Tensor:
        """ε*_t = α² β̇/β − α α̇ = α² λ̇, the diffusion that minimises the path KL of a predictor error."""
        tt = as_time(t)
        a, b = self.alpha(tt), self.beta(tt)
        return a * a * self.dbeta(tt) / b - a * self.dalpha(tt)

    def scalar_optimal_diffusion(self, t: float) -> float:
        """ε*_t for one time, as a float (remembered per time, as a sampler asks for it at every step)."""
        return remembered(self.__dict__.setdefault("_scalar_optimal_diffusion", {}), float(t),
                          lambda: float(self.optimal_diffusion(float(t))))

    def drift_coefficients(self, t: float, kappa: float) -> tuple[float, float]:
        r"""(A, B) with b^ε(t, x) = A x + B η_X(t, x) for ε = κ ε*.

        A = α̇/α − κ λ̇ and B = (1 + κ) β λ̇ = (1 + κ)(β̇ − α̇ β/α). At a point mass's t = 0 these are
        0/0 and are taken as their right limits.
        """
        tt = float(t)
        if self.base == "point_mass" and tt <= 0.0:
            tt = END_OFFSET
        a, b = float(self.alpha(tt)), float(self.beta(tt))
        da, db = float(self.dalpha(tt)), float(self.dbeta(tt))
        d_coef = db - da * b / a
        lam = db / b - da / a if b > 0 else math.inf
        return da / a - kappa * lam, (1 + kappa) * d_coef

    def drift_coefficients_noise_form(self, t: float, kappa: float) -> tuple[float, float]:
        r"""(C, D) with b^ε(t, x) = C η_Z(t, x) + D η_X(t, x) for ε = κ ε*.

        C = (1 + κ) α̇ − κ α β̇/β and D = β̇. Bounded at t = 1, where the η_X form is not.
        """
        tt = float(t)
        a, b = float(self.alpha(tt)), float(self.beta(tt))
        da, db = float(self.dalpha(tt)), float(self.dbeta(tt))
        return (1 + kappa) * da - kappa * a * db / b, db


# Built-in schedules ---------------------------------------------------------------------------------------------

def linear() -> Schedule:
    """Linear / rectified flow: α = 1 − t, β = t, r = t/(1 − t), r⁻¹(r) = r/(1 + r)."""
    return Schedule(lambda t: 1 - t, lambda t: t, dalpha=lambda t: -torch.ones_like(t),
                    dbeta=lambda t: torch.ones_like(t), snr_inverse=lambda r: _ratio_inverse(r),
                    name="linear", check=False)


def _ratio_inverse(r: Tensor) -> Tensor:
    return torch.where(torch.isinf(r), torch.ones_like(r), r / (1 + r))


def cosine() -> Schedule:
    """Cosine: α = cos(πt/2), β = sin(πt/2), r = tan(πt/2), r⁻¹(r) = (2/π) atan r."""
    h = math.pi / 2
    # cos(πt/2) written as sin(π(1 − t)/2) so that α_1 is exactly 0 in floating point.
    return Schedule(lambda t: torch.sin(h * (1 - t)), lambda t: torch.sin(h * t),
                    dalpha=lambda t: -h * torch.cos(h * (1 - t)), dbeta=lambda t: h * torch.cos(h * t),
                    snr_inverse=lambda r: torch.atan(r) / h, name="cosine", check=False)


def vp(beta_min: float = 0.1, beta_max: float = 20.0) -> Schedule:
    r"""Variance-preserving (the VP-SDE of DDPM/score-SDE), in this package's time t = 1 − s.

    With B(s) = β_min s + (β_max − β_min) s²/2 and ᾱ = exp(−B): α = √(1 − ᾱ), β = √ᾱ. As in the VP-SDE,
    β_0 = exp(−B(1)/2) is small but not 0 (about 6.7e-3 for the defaults): samplers start from pure noise at
    t = 0, and a conversion clamps the matched time into [0, 1].
    """
    if not (isinstance(beta_min, (int, float)) and isinstance(beta_max, (int, float))):
        raise TypeError("beta_min, beta_max: expected numbers")
    if not (0 <= beta_min < beta_max):
        raise ValueError(f"beta_min, beta_max: need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
    bmin, bmax = float(beta_min), float(beta_max)

    def log_abar(t: Tensor) -> Tensor:
        s = 1 - t
        return -(bmin * s + 0.5 * (bmax - bmin) * s * s)

    def alpha(t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(log_abar(t)))

    def beta(t: Tensor) -> Tensor:
        return torch.exp(0.5 * log_abar(t))

    def dlog_abar(t: Tensor) -> Tensor:  # d/dt log ᾱ = β(s) = β_min + (β_max − β_min) s
        return bmin + (bmax - bmin) * (1 - t)

    def dalpha(t: Tensor) -> Tensor:
        abar = torch.exp(log_abar(t))
        return -abar * dlog_abar(t) / (2 * alpha(t))

    def dbeta(t: Tensor) -> Tensor:
        return 0.5 * dlog_abar(t) * beta(t)

    def snr_inverse(r: Tensor) -> Tensor:
        # ᾱ = r²/(1 + r²); solve (β_max − β_min)/2 s² + β_min s + log ᾱ = 0 for s ≥ 0.
        # log(r²/(1 + r²)) = −log(1 + r⁻²), which neither overflows for large r nor needs a case at r = inf.
        log_abar_target = -torch.log1p((r * r).reciprocal())
        k = bmax - bmin
        s = (-bmin + torch.sqrt(bmin * bmin - 2 * k * log_abar_target)) / k
        return 1 - s

    return Schedule(alpha, beta, dalpha=dalpha, dbeta=dbeta, snr_inverse=snr_inverse,
                    name=f"vp({bmin:g},{bmax:g})", check=False)


def _check_sigma(sigma: float) -> float:
    return check_positive(sigma, "sigma", "a positive number or None")


@functools.lru_cache(maxsize=64)
def _resolved_member(family: type, sigma: float) -> LazySchedule:
    return family(sigma)


class LazySchedule(Schedule):
    """A lazy schedule family member; ``sigma=None`` means "estimate σ from the model" at sampling time."""

    family: str = ""

    def __init__(self, sigma: float | None):
        self.sigma = None if sigma is None else _check_sigma(sigma)
        if self.sigma is None:
            # Unresolved: usable only through `resolve`; every α, β, derivative or SNR inverse asked of it says so.
            self.name = f"{self.family}(sigma=None)"
            self.base = "point_mass" if self.family == "point_mass" else "gaussian"

            def unresolved(_: Tensor) -> Tensor:
                raise self._unresolved_error()

            self._alpha = self._beta = self._dalpha = self._dbeta = self._snr_inverse = unresolved
            return
        super().__init__(*self._functions(self.sigma), name=f"{self.family}({self.sigma:g})", check=False)

    def _functions(self, sigma: float) -> tuple:
        raise NotImplementedError

    def resolve(self, sigma: float) -> LazySchedule:
        """This family's member with the given σ (the same object for the same σ, so that the values it
        remembers serve every call that samples with it)."""
        return _resolved_member(type(self), _check_sigma(sigma))

    @property
    def resolved(self) -> bool:
        """σ is set (not left to be estimated from a model)."""
        return self.sigma is not None

    def _unresolved_error(self) -> ValueError:
        return ValueError(f"{self.name}: sigma is None, so it is estimated from a model; pass this schedule to "
                          "li.sample, or call li.estimate_sigma / schedule.resolve(sigma) first")

    def _require(self) -> None:
        if self.sigma is None:
            raise self._unresolved_error()


class LazyVP(LazySchedule):
    r"""Lazy variance-preserving schedule: α = σ cos(πt/2), β = sin(πt/2), so α² + σ²β² = σ² is constant.

    On N(μ, σ² I) data (centred) the probability-flow drift is identically zero: Euler is exact in any number
    of steps. Sampling starts at σZ. r = tan(πt/2)/σ and r⁻¹(r) = (2/π) atan(σ r).
    """

    family = "lazy_vp"

    def _functions(self, sigma: float) -> tuple:
        h = math.pi / 2
        return (lambda t: sigma * torch.sin(h * (1 - t)), lambda t: torch.sin(h * t))

    def __init__(self, sigma: float | None = None):
        super().__init__(sigma)
        if self.sigma is not None:
            s, h = self.sigma, math.pi / 2
            self._dalpha = lambda t: -s * h * torch.cos(h * (1 - t))
            self._dbeta = lambda t: h * torch.cos(h * t)
            self._snr_inverse = lambda r: torch.atan(s * r) / h


class PointMass(LazySchedule):
    r"""Lazy point-mass schedule: β = t, α = σ √(t(1 − t)); every sample starts at 0.

    With the optimal diffusion ε* = σ²/2 the sampler is a time-changed Brownian motion on N(0, σ² I) data,
    so Euler–Maruyama is exact. σ = 1 is the Föllmer process. r = √(t/(1 − t))/σ and
    r⁻¹(r) = (σr)²/(1 + (σr)²).
    """

    family = "point_mass"

    def _functions(self, sigma: float) -> tuple:
        return (lambda t: sigma * torch.sqrt(t * (1 - t)), lambda t: t)

    def __init__(self, sigma: float | None = None):
        super().__init__(sigma)
        if self.sigma is not None:
            s = self.sigma
            self._dalpha = lambda t: s * (1 - 2 * t) / (2 * torch.sqrt(t * (1 - t)))
            self._dbeta = lambda t: torch.ones_like(t)
            self._snr_inverse = lambda r: _ratio_inverse((s * r) ** 2)

    def drift_coefficients(self, t: float, kappa: float) -> tuple[float, float]:
        """(A, B) with b^ε(t, x) = A x + B η_X for ε = κ ε*."""
        # On this family A = −κ/(1 − t) + (1 − κ)(1 − 2t)/(2t(1 − t)) and B = (1 + κ)/(2(1 − t)):
        # closed forms that stay exact at t = 0 when κ = 1.
        self._require()
        tt = float(t)
        if tt >= 1.0:
            raise ValueError("t: the point-mass drift is not defined at t = 1")
        b = (1 + kappa) / (2 * (1 - tt))
        if kappa == 1:
            return -1 / (1 - tt), b
        tt = max(tt, END_OFFSET)
        return -kappa / (1 - tt) + (1 - kappa) * (1 - 2 * tt) / (2 * tt * (1 - tt)), b

    def optimal_diffusion(self, t: Tensor | float) -> Tensor:  # noqa: D102
        self._require()
        tt = as_time(t)
        return torch.full_like(tt, self.sigma**2 / 2)


def lazy_vp(sigma: float | None = None) -> LazyVP:
    """The lazy VP schedule α = σ cos(πt/2), β = sin(πt/2); ``sigma=None`` estimates σ from the model."""
    return LazyVP(sigma)


def point_mass(sigma: float | None = None) -> PointMass:
    """The lazy point-mass schedule β = t, α = σ√(t(1 − t)); ``sigma=None`` estimates σ from the model."""
    return PointMass(sigma)


SCHEDULES: dict[str, Callable[[], Schedule]] = {
    "linear": linear,
    "cosine": cosine,
    "vp": vp,
    "lazy-vp": lazy_vp,
    "point-mass": point_mass,
}


@functools.cache
def _named_schedule(key: str) -> Schedule:
    """One object per name: a model trained under "linear" and a sampler asked for "linear" then share it, so
    the conversion between them is the identity and the values a schedule remembers serve every call."""
    return SCHEDULES[key]()


def get_schedule(schedule: Schedule | str, *, argument: str = "schedule") -> Schedule:
    """A schedule object from itself or from one of the names in :data:`SCHEDULES` (``_`` and ``-`` alike)."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        key = schedule.strip().lower().replace("_", "-")
        if key in SCHEDULES:
            return _named_schedule(key)
        raise ValueError(f"{argument}: unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    raise TypeError(f"{argument}: expected a Schedule or a schedule name, got {type(schedule).__name__}")
