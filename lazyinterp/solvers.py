r"""Solvers for dX_t = b(t, X_t) dt + √(2 ε_t) dW_t over an explicit time grid.

Each is a small pure function of a drift b(t, x), a grid t_0 = 0 < … < t_N = 1, the starting state and, for an SDE,
ε(t) and a source of standard normal draws; none draws noise or reads a model itself.

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

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import graphs
from .checks import check_int
from .grids import MAX_STEPS, check_steps
from .predictors import NonFiniteError, linear_combination, merge_terms
from .schedules import Schedule, remembered

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


def check_solver(solver: Any) -> str:
    """The solver's name from a name or alias ("em" is "euler"); a ValueError naming the choices otherwise."""
    if not isinstance(solver, str) or solver.lower() not in SOLVER_ALIASES:
        raise ValueError(f"solver: expected one of {', '.join(SOLVER_ALIASES)}, got {solver!r}")
    return SOLVER_ALIASES[solver.lower()]


def count_nfe(solver: str, steps: int, last_step: str = "euler", known_start: bool = False) -> int:
    """Network evaluations of ``solver`` over ``steps`` intervals (see the module table); one fewer with
    ``known_start``, where the drift at t = 0 needs no network (see :func:`lazyinterp.sample`)."""
    solver = check_solver(solver)
    steps = check_steps(steps)
    if solver in ("euler", "euler-alpha") or solver in ODE_SOLVERS or solver in EXPONENTIAL_SOLVERS:
        nfe = steps
    else:
        nfe = 2 * steps - (1 if last_step == "denoise" else 0)
    return nfe - int(bool(known_start))


def steps_for_nfe(solver: str, nfe: int, last_step: str = "euler", known_start: bool = False) -> int | None:
    """The number of steps at which ``solver`` costs exactly ``nfe`` evaluations (:func:`count_nfe`), or None."""
    nfe = check_int(nfe, "nfe", 0)
    for steps in range(1, min(nfe + 3, MAX_STEPS + 1)):
        if count_nfe(solver, steps, last_step, known_start) == nfe:
            return steps
    return None


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


def _guard(step: int, t: float, fn: Callable[..., Tensor], *args: Any) -> Tensor:
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
         callback: Callback | None = None, epsilon: Callable[[float], float] | None = None,
         normal: Callable[[], Tensor] | None = None) -> Tensor:
    """Heun (explicit trapezoid), 2 evaluations a step: x̃ = x + h b(t, x); x' = x + h/2 (b(t, x) + b(t', x̃)).

    With ``epsilon`` and ``normal`` both stages add the same g ΔW = √(2 ε(t) h) ξ, ξ = ``normal()`` drawn at every
    step (:func:`stochastic_heun`).
    """
    times = [float(t) for t in grid]
    check = _StateCheck(x)
    last = len(times) - 2
    for k in range(len(times) - 1):
        t, t_next = times[k], times[k + 1]
        h = t_next - t
        xi = normal() if normal is not None else None
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
    return heun(drift, x, grid, denoise=denoise, callback=callback, epsilon=epsilon, normal=normal)


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
