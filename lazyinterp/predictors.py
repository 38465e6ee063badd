r"""Predictors: conversions between velocity, noise, data and score predictions, and the :class:`Model` wrapper.

Under I_t = α Z + β X, write η_Z(t, x) = E[Z | I_t = x] and η_X(t, x) = E[X | I_t = x]. Always
x = α η_Z + β η_X, and

* velocity  b = α̇ η_Z + β̇ η_X   (inverted with the determinant α β̇ − β α̇ > 0),
* noise     η_Z,
* data      η_X,
* score     s = −η_Z / α.

The 0/0 cases and how they are evaluated:

* data predictor where α = 0 (t = 1): η_Z = E[Z | X = x] = 0, the exact limit.
* score predictor where α = 0: η_Z = −α s = 0, exact.
* noise or score predictor where β = 0 (t = 0 of a Gaussian base): η_X(0, x) = E[X] cannot be read off a noise
  prediction, so :class:`Model` evaluates such networks no earlier than ``t_min`` (documented safe evaluation;
  by default the time where the SNR is 1e-3).
* the score where α = 0 when converting *to* a score: evaluated with α floored at 1e-12.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from numbers import Real
from typing import Any, Literal, Protocol

import torch

from .checks import check_int, check_positive
from .schedules import Schedule, as_time, get_schedule

Tensor = torch.Tensor
# α, β, α̇ or β̇: a number, or a tensor of one value or of one per sample.
Coefficient = Tensor | float
Kind = Literal["velocity", "noise", "data", "score"]
KINDS: tuple[str, ...] = ("velocity", "noise", "data", "score")
_ALPHA_FLOOR = 1e-12


class NonFiniteError(FloatingPointError, ValueError):
    """A network returned NaN or inf; ``t`` says when, ``step`` (set by samplers) at which step. It is a
    ValueError too, so that a bad model or checkpoint is reported like any other bad input."""

    def __init__(self, message: str, t: float | None = None, step: int | None = None):
        super().__init__(message)
        self.t = t
        self.step = step


def check_kind(kind: str, argument: str = "predicts") -> str:
    """``kind`` if it is one of :data:`KINDS`; a ValueError naming ``argument`` otherwise."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"{argument}: expected one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def linear_combination(terms: Iterable[tuple[Tensor | float, Tensor]], base: Tensor | None = None) -> Tensor:
    r"""``base`` + Σ_i c_i v_i over ``terms`` = ((c_1, v_1), ...), as a new tensor (``base`` itself if no terms).

    With Python-number coefficients each term is one fused multiply-add (one kernel on an accelerator, where a
    sampler's per-step arithmetic is otherwise a string of tiny multiply and add kernels); tensor coefficients
    (one per sample) broadcast as usual.
    """
    out = base
    for coef, value in terms:
        if isinstance(coef, Tensor):
            term = coef * value
            out = term if out is None else out + term
        elif out is None:
            out = value * coef
        elif out is base or value.shape != out.shape or value.dtype != out.dtype:
            out = torch.add(out, value, alpha=coef)
        else:
            out.add_(value, alpha=coef)  # ``out`` is a tensor made here, never the caller's
    if out is None:
        raise ValueError("terms: expected at least one (coefficient, tensor) pair or a base")
    return out


def _expand(coef: Tensor | float, like: Tensor) -> Tensor | float:
    """A per-sample coefficient of shape (B,) broadcast against ``like`` (B, ...); scalars pass through."""
    if isinstance(coef, Tensor) and coef.ndim == 1:
        return coef.to(like.dtype).to(like.device).view(-1, *([1] * (like.ndim - 1)))
    if isinstance(coef, Tensor):
        return float(coef)
    return coef


def _check_coefficients(like: Tensor, **coefs: Any) -> None:
    """Each schedule coefficient a number, or a tensor of one value or one per sample of ``like`` (B, ...)."""
    for name, coef in coefs.items():
        if isinstance(coef, Tensor):
            one_value = coef.numel() == 1 and coef.ndim <= 1
            if one_value or (coef.ndim == 1 and like.ndim and coef.shape[0] == like.shape[0]):
                continue
            raise ValueError(f"{name}: expected a number or a tensor of shape ({like.shape[0] if like.ndim else 1},), "
                             f"one value per sample, got shape {tuple(coef.shape)}")
        if isinstance(coef, bool) or not isinstance(coef, Real):
            raise TypeError(f"{name}: expected a number or a tensor, got {type(coef).__name__}")


Terms = list[tuple[Tensor | float, Tensor]]


def to_eta_terms(kind: str, output: Tensor, x: Tensor, alpha: Coefficient, beta: Coefficient, dalpha: Coefficient,
                 dbeta: Coefficient) -> tuple[Terms, Terms]:
    r"""(η_Z, η_X) from a ``kind`` prediction at interpolant value ``x``, each as a linear combination of ``x``
    and ``output`` (the (coefficient, tensor) pairs of :func:`linear_combination`), so that a sampler can fold
    them into its own update instead of materialising both.

    Coefficients are floats (shared time) or tensors of shape (B,) (one time per sample).
    """
    check_kind(kind, "kind")
    a, b, da, db = (_expand(c, x) for c in (alpha, beta, dalpha, dbeta))
    if kind == "velocity":
        det = a * db - b * da
        return [(db / det, x), (-b / det, output)], [(a / det, output), (-da / det, x)]
    if kind == "data":
        return [(1.0, _safe_div(x - b * output, a))], [(1.0, output)]
    eta_z = output if kind == "noise" else -a * output
    return [(1.0, eta_z)], [(1.0, _safe_div(x - a * eta_z, b))]


def to_eta(kind: str, output: Tensor, x: Tensor, alpha: Coefficient, beta: Coefficient, dalpha: Coefficient,
           dbeta: Coefficient) -> tuple[Tensor, Tensor]:
    r"""(η_Z, η_X) from a ``kind`` prediction at interpolant value ``x`` (:func:`to_eta_terms`, evaluated)."""
    # Checked here, at the public entry, not in to_eta_terms, which every network evaluation goes through.
    _check_coefficients(x, alpha=alpha, beta=beta, dalpha=dalpha, dbeta=dbeta)
    eta_z, eta_x = to_eta_terms(kind, output, x, alpha, beta, dalpha, dbeta)
    return linear_combination(eta_z), linear_combination(eta_x)


def eta_terms(predictor: Predictor, x: Tensor, t: Tensor | float) -> tuple[Terms, Terms]:
    """A predictor's (η_Z, η_X) as linear combinations: its own ``eta_terms`` where it has one, else its
    ``eta`` as single terms."""
    own = getattr(predictor, "eta_terms", None)
    if own is not None:
        return own(x, t)
    eta_z, eta_x = predictor.eta(x, t)
    return [(1.0, eta_z)], [(1.0, eta_x)]


def merge_terms(terms: Iterable[tuple[Tensor | float, Tensor]]) -> Terms:
    """The same linear combination with the coefficients of each tensor (by identity) added up, so that every
    distinct tensor costs one multiply-add."""
    merged: dict[int, list] = {}
    for coef, value in terms:
        entry = merged.get(id(value))
        if entry is None:
            merged[id(value)] = [coef, value]
        else:
            entry[0] = entry[0] + coef
    return [(coef, value) for coef, value in merged.values()]


def _safe_div(num: Tensor, den: Coefficient) -> Tensor:
    """num/den with the convention 0 where den == 0 (the exact limits listed in the module docstring)."""
    if isinstance(den, Tensor):
        zero = den == 0
        return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))
    return num / den if den != 0 else torch.zeros_like(num)


def from_eta(kind: str, eta_z: Tensor, eta_x: Tensor, alpha: Coefficient, beta: Coefficient,
             dalpha: Coefficient, dbeta: Coefficient) -> Tensor:
    """The ``kind`` prediction from (η_Z, η_X)."""
    check_kind(kind, "kind")
    _check_coefficients(eta_z, alpha=alpha, beta=beta, dalpha=dalpha, dbeta=dbeta)
    a, _, da, db = (_expand(c, eta_z) for c in (alpha, beta, dalpha, dbeta))
    if kind == "velocity":
        return da * eta_z + db * eta_x
    if kind == "noise":
        return eta_z
    if kind == "data":
        return eta_x
    if isinstance(a, Tensor):
        a = a.clamp_min(_ALPHA_FLOOR)
    else:
        a = max(a, _ALPHA_FLOOR)
    return -eta_z / a


class Predictor(Protocol):
    """Anything with a schedule and the posterior means η(t, x) = (η_Z, η_X) under it.

    A predictor may also have ``eta_terms(x, t)``, the same pair as linear combinations (:func:`to_eta_terms`),
    which lets a sampler fold them into its update (:func:`eta_terms` falls back on ``eta``).
    """

    schedule: Schedule

    def eta(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(E[Z | I_t = x], E[X | I_t = x]) for a batch ``x`` at time ``t``."""


def check_predictor(model: Any, argument: str = "model") -> Predictor:
    """``model`` itself if it has ``.eta`` and ``.schedule`` (an :class:`Model` or any predictor); else TypeError."""
    if not (hasattr(model, "eta") and hasattr(model, "schedule")):
        raise TypeError(f"{argument}: expected an li.Model (or a predictor with .eta and .schedule), "
                        f"got {type(model).__name__}")
    return model


def coefficients(schedule: Schedule, t: Tensor | float) -> tuple[Coefficient, Coefficient, Coefficient, Coefficient]:
    """(α, β, α̇, β̇) at ``t``: Python floats for a scalar time, float64 tensors for a batch of times.

    Where a derivative is infinite (an end of vp or of a point mass) they are the one-sided limits.
    """
    if not isinstance(t, Tensor) or t.ndim == 0:
        return schedule.scalar_coefficients(float(t))
    tt = schedule.regular_time(t)
    return schedule.alpha(tt), schedule.beta(tt), schedule.dalpha(tt), schedule.dbeta(tt)


def _check_state(x: Any, t: Any) -> None:
    """A TypeError naming x or t unless x is a floating-point batch (B, ...) and t a number or a tensor of times."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise TypeError(f"x: expected a floating-point tensor of shape (batch, ...), got "
                        f"{type(x).__name__ if not isinstance(x, Tensor) else f'{x.dtype} of shape {tuple(x.shape)}'}")
    if isinstance(t, bool) or not isinstance(t, (Real, Tensor)):
        raise TypeError(f"t: expected a time (a float or a tensor of times), got {type(t).__name__}")


def _parameter_dtype(net: Any) -> torch.dtype | None:
    """The dtype of a module's first parameter when it is floating-point, else None (the input's dtype is used)."""
    if not isinstance(net, torch.nn.Module):
        return None
    param = next(iter(net.parameters()), None)
    return param.dtype if param is not None and param.is_floating_point() else None


class Model:
    r"""A trained network together with the schedule it was trained under and what it predicts.

    ``net(x, t)`` is called with ``t`` a tensor of shape (batch,) in this package's time (0 = noise,
    1 = data). Schedule maths runs in float64 and the state in the input's dtype; only the network sees its
    own dtype (``net_dtype``, by default that of its first parameter), so fp16/bf16 networks are safe.

    ``chunk`` evaluates the network on fixed-size, zero-padded chunks, so that each sample's output does not
    depend on the batch it is sampled in (bit-identical results for any batch size or number of processes).

    Attributes:
        nfe: the number of network evaluations made so far (reset it freely).
    """

    def __init__(self, net: Callable[[Tensor, Tensor], Tensor], schedule: Schedule | str = "linear",
                 predicts: str = "velocity", *,
                 t_min: float | None = None, net_dtype: torch.dtype | None = None, check_finite: bool = True,
                 chunk: int | None = None):
        if not callable(net):
            raise TypeError(f"net: expected a callable net(x, t), got {type(net).__name__}")
        self.net = net
        self.schedule = get_schedule(schedule)
        if getattr(self.schedule, "resolved", True) is False:
            raise ValueError("schedule: a model's training schedule needs an explicit sigma")
        self.predicts = check_kind(predicts)
        low_snr, high_snr = (float(self.schedule.snr_inverse(r)) for r in (1e-3, 1e3))
        if t_min is None:
            t_min = low_snr if predicts in ("noise", "score") or self._singular_velocity(0.0) else 0.0
        if not (isinstance(t_min, (int, float)) and 0.0 <= t_min < 1.0):
            raise ValueError(f"t_min: expected a number in [0, 1), got {t_min!r}")
        self.t_min = float(t_min)
        # A velocity carries no information where α β̇ − β α̇ = 0 (e.g. β̇_0 = 0); evaluate just inside.
        self.t_max = high_snr if self._singular_velocity(1.0) else 1.0
        self.net_dtype = _parameter_dtype(net) if net_dtype is None else net_dtype
        self.check_finite = check_finite
        self.chunk = None if chunk is None else check_int(chunk, "chunk")
        self.nfe = 0
        self._cache: dict = {}

    def __repr__(self) -> str:
        return f"Model(predicts={self.predicts!r}, schedule={self.schedule.name})"

    def _singular_velocity(self, t: float) -> bool:
        if self.predicts != "velocity":
            return False
        a, b, da, db = coefficients(self.schedule, t)
        return not (a * db - b * da > 1e-12)

    def raw(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The network's own output at (x, t), in x's dtype; t is clamped to [t_min, t_max]."""
        _check_state(x, t)
        return self._output(x, t)

    def _output(self, x: Tensor, t: Tensor | float) -> Tensor:
        """:meth:`raw` for arguments already checked."""
        batch = x.shape[0]
        dtype = self.net_dtype or x.dtype
        if not isinstance(t, Tensor) or t.ndim == 0:
            # Filled on the device: copying a host tensor there would wait for the device's queue to empty.
            first = min(max(float(t), self.t_min), self.t_max)
            net_t = torch.full((batch,), first, device=x.device, dtype=dtype)
        else:
            tt = as_time(t)
            if tt.shape != (batch,):
                raise ValueError(f"t: expected a scalar or shape ({batch},), got {tuple(tt.shape)}")
            tt = tt.clamp(self.t_min, self.t_max)
            first = float(tt[0]) if batch else math.nan
            net_t = tt.to(device=x.device, dtype=dtype)
        out = self._call_net(x.to(dtype), net_t)
        self.nfe += 1
        if not isinstance(out, Tensor):
            # diffusers models return a tuple or an output object holding the tensor: say how to unwrap it.
            hint = "; return the tensor itself, e.g. lambda x, t: net(x, t)[0] or .sample" \
                if isinstance(out, tuple) or hasattr(out, "sample") else ""
            raise TypeError(f"net: expected a tensor output, got {type(out).__name__}{hint}")
        if out.shape != x.shape:
            raise ValueError(f"net: output shape {tuple(out.shape)} does not match input shape {tuple(x.shape)}")
        out = out.to(x.dtype)
        # On an accelerator a per-call check would stall the device queue; the samplers' state check reports a
        # non-finite output at the step and time where it entered the state, without a per-step synchronisation.
        if self.check_finite and out.device.type == "cpu" and not bool(torch.isfinite(out).all()):
            raise NonFiniteError(f"net returned NaN or inf at t={first:.6g}", t=first)
        return out

    def _call_net(self, x: Tensor, t: Tensor) -> Tensor:
        """The network on fixed-size chunks when ``chunk`` is set.

        Kernels pick their algorithm by batch size, so a sample's output can change in the last bit with the
        batch it is in; padding every call to ``chunk`` rows makes results independent of the batch size.
        """
        if self.chunk is None:
            return self.net(x, t)
        outs = []
        for lo in range(0, x.shape[0], self.chunk):
            xs, ts = x[lo: lo + self.chunk], t[lo: lo + self.chunk]
            short = self.chunk - xs.shape[0]
            if short:
                xs = torch.cat([xs, xs.new_zeros((short, *xs.shape[1:]))])
                ts = torch.cat([ts, ts[-1:].expand(short)])
            out = self.net(xs, ts)
            if not isinstance(out, Tensor):
                return out
            outs.append(out[: self.chunk - short])
        return torch.cat(outs)

    def eta(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(η_Z, η_X) at (x, t) under the model's own schedule."""
        eta_z, eta_x = self.eta_terms(x, t)
        return linear_combination(eta_z), linear_combination(eta_x)

    def eta_terms(self, x: Tensor, t: Tensor | float) -> tuple[Terms, Terms]:
        """(η_Z, η_X) at (x, t) as linear combinations of x and the network's output (:func:`to_eta_terms`)."""
        _check_state(x, t)
        if isinstance(t, Tensor) and t.ndim:
            t_eval = as_time(t).clamp(self.t_min, self.t_max)
        else:
            t_eval = min(max(float(t), self.t_min), self.t_max)
        out = self._output(x, t_eval)
        return to_eta_terms(self.predicts, out, x, *coefficients(self.schedule, t_eval))

    def predict(self, x: Tensor, t: Tensor | float, kind: str = "velocity") -> Tensor:
        """The ``kind`` prediction ("velocity", "noise", "data" or "score") at (x, t)."""
        eta_z, eta_x = self.eta(x, t)
        return from_eta(check_kind(kind, "kind"), eta_z, eta_x, *coefficients(self.schedule, t))


def ve_denoiser_model(denoise: Any, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                      net_dtype: torch.dtype | None = None, chunk: int | None = None) -> Model:
    r"""A :class:`Model` of a variance-exploding denoiser ``denoise(y, sigma)`` ≈ E[X | X + σZ = y], σ of shape
    (batch,): k-diffusion's and EDM's models with their preconditioning (bind any conditioning first).

    On the linear schedule I_t = (1 − t)Z + tX, I_t / t = X + σZ with σ = (1 − t)/t, so the data prediction is
    η_X(t, x) = D(x/t; (1 − t)/t). The network sees σ ∈ [σ_min, σ_max], its training range: times below
    t = 1/(1 + σ_max) are evaluated there (the model's ``t_min``), and σ is held at σ_min after t = 1/(1 + σ_min),
    where D is the identity to O(σ_min²).
    """
    if not callable(denoise):
        raise TypeError(f"denoise: expected a callable denoise(x, sigma), got {type(denoise).__name__}")
    low = check_positive(sigma_min, "sigma_min")
    high = check_positive(sigma_max, "sigma_max")
    if not low < high:
        raise ValueError(f"sigma_min, sigma_max: need sigma_min < sigma_max, got {sigma_min}, {sigma_max}")

    def data_prediction(x: Tensor, t: Tensor) -> Tensor:
        sigma = ((1 - t) / t).clamp(min=low)
        return denoise(x / t.reshape(-1, *(1,) * (x.ndim - 1)), sigma)

    return Model(data_prediction, "linear", predicts="data", t_min=1 / (1 + high),
                 net_dtype=_parameter_dtype(denoise) if net_dtype is None else net_dtype, chunk=chunk)


class CenteredModel:
    r"""The predictor of the centred data X − μ: η^c_Z(t, x) = η_Z(t, x + β μ), η^c_X = η_X(t, x + β μ) − μ."""

    def __init__(self, predictor: Predictor, mean: Tensor):
        self.inner = predictor
        self.schedule = predictor.schedule
        self.mean = mean

    def eta(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(η_Z, η_X) of the centred data X − μ: the inner model's at x + βμ, with μ taken off η_X."""
        eta_z, eta_x = self.eta_terms(x, t)
        return linear_combination(eta_z), linear_combination(eta_x)

    def eta_terms(self, x: Tensor, t: Tensor | float) -> tuple[Terms, Terms]:
        """:meth:`eta` as (coefficient, tensor) terms, summed by the caller."""
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        beta = _expand(self.schedule.beta(t), x)  # a float for one time (the schedule remembers it)
        eta_z, eta_x = eta_terms(self.inner, linear_combination([(beta, mean)], base=x), t)
        return eta_z, [*eta_x, (-1.0, mean)]


def model_cache(model: Any) -> dict:
    """The dict a :class:`Model` keeps for what is computed once per model (estimates, CUDA graphs); a fresh,
    unkept one for a predictor without it."""
    cache = getattr(model, "_cache", None)
    return cache if isinstance(cache, dict) else {}
