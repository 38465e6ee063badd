r"""Exact conversion between schedules: a time change and a rescaling (theory §3).

For a source schedule (α, β) and a target (α', β'):

* τ(t) = r⁻¹(r'_t) matches the SNRs and c_t = α'_t/α_{τ(t)} = β'_t/β_{τ(t)} = (α'_t + β'_t)/(α_τ + β_τ),
  so that I'_t = c_t I_{τ(t)} for the same (Z, X);
* predictors transfer as η'(t, x) = η(τ, x/c), s'(t, x) = s(τ, x/c)/c and
  b'(t, x) = (ċ/c) x + c τ̇ b(τ, x/c);
* SDE paths transfer as Y_t = c_t X_{τ(t)} with ε'_t = c_t² τ̇_t ε_{τ(t)}, driven by dW̃ = τ̇^{−1/2} dW_τ.

At a point-mass target's t = 0, c = 0 and x = 0, so x/c is read as 0 (η_X of a Gaussian-base model at τ = 0
is E[X] for every input).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .predictors import Predictor, Terms, _expand, check_predictor, eta_terms, linear_combination
from .schedules import Schedule, as_time, get_schedule, remembered

Tensor = torch.Tensor


_SCALAR_TIME_CHANGES: dict = {}


def _schedules(source: Schedule | str, target: Schedule | str) -> tuple[Schedule, Schedule]:
    return get_schedule(source, argument="source"), get_schedule(target, argument="target")


def _time_change(source: Schedule, target: Schedule, tt: Tensor) -> tuple[Tensor, Tensor]:
    tau = source.snr_inverse(target.snr(tt))
    return tau, (target.alpha(tt) + target.beta(tt)) / (source.alpha(tau) + source.beta(tau))


def time_change(source: Schedule | str, target: Schedule | str, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """(τ, c) at target time ``t``: the source time with the same SNR, and the scale I'_t = c I_τ."""
    source, target = _schedules(source, target)
    tt = as_time(t)
    if tt.ndim:
        return _time_change(source, target, tt)
    tau, scale = scalar_time_change(source, target, float(tt))
    return torch.tensor(tau, dtype=tt.dtype), torch.tensor(scale, dtype=tt.dtype)


def scalar_time_change(source: Schedule | str, target: Schedule | str, t: float) -> tuple[float, float]:
    """:func:`time_change` at one time, as floats.

    A sampler converts at the same grid times on every call with the same pair of schedules, so the results
    are remembered (the maps are deterministic, so this changes no value).
    """
    source, target = _schedules(source, target)
    return remembered(_SCALAR_TIME_CHANGES, (source, target, float(t)),
                      lambda: tuple(float(v) for v in _time_change(source, target, as_time(float(t)))))


def time_change_derivatives(source: Schedule | str, target: Schedule | str, t: Tensor | float) -> tuple[Tensor, Tensor]:
    r"""(τ̇, ċ) at interior target times, exact to float precision.

    τ̇ = λ̇'_t / λ̇_τ (log-SNR derivatives), and with S = α + β, c = S'_t/S_τ gives
    ċ = Ṡ'_t/S_τ − S'_t Ṡ_τ τ̇ / S_τ².
    """
    source, target = _schedules(source, target)
    tt = as_time(t)
    tau, _ = time_change(source, target, tt)
    dtau = target.dlog_snr(tt) / source.dlog_snr(tau)
    s_tgt = target.alpha(tt) + target.beta(tt)
    ds_tgt = target.dalpha(tt) + target.dbeta(tt)
    s_src = source.alpha(tau) + source.beta(tau)
    ds_src = source.dalpha(tau) + source.dbeta(tau)
    dscale = ds_tgt / s_src - s_tgt * ds_src * dtau / (s_src * s_src)
    return dtau, dscale


def converted_diffusion(source: Schedule | str, target: Schedule | str, epsilon_source: Callable[[Tensor], Tensor],
                        t: Tensor | float) -> Tensor:
    """ε'_t = c_t² τ̇_t ε(τ(t)): the target diffusion that keeps the same sample path (``epsilon_source`` a
    callable ε(t) of the source's time)."""
    if not callable(epsilon_source):
        raise TypeError(f"epsilon_source: expected a callable eps(t), got {type(epsilon_source).__name__}")
    source, target = _schedules(source, target)
    tt = as_time(t)
    tau, scale = time_change(source, target, tt)
    dtau, _ = time_change_derivatives(source, target, tt)
    return scale * scale * dtau * as_time(epsilon_source(tau))


class ConvertedModel:
    r"""A predictor under ``target`` built exactly from one under another schedule: η'(t, x) = η(τ, x/c)."""

    def __init__(self, predictor: Predictor, target: Schedule):
        self.inner = predictor
        self.source = predictor.schedule
        self.schedule = target

    def __repr__(self) -> str:
        return f"ConvertedModel({self.source.name} -> {self.schedule.name})"

    def eta(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(η_Z, η_X) under the target schedule: η'(t, x) = η(τ(t), x / c(t))."""
        eta_z, eta_x = self.eta_terms(x, t)
        return linear_combination(eta_z), linear_combination(eta_x)

    def eta_terms(self, x: Tensor, t: Tensor | float) -> tuple[Terms, Terms]:
        """:meth:`eta` as linear combinations (:func:`~lazyinterp.predictors.to_eta_terms`)."""
        if isinstance(t, (float, int)) or (isinstance(t, Tensor) and t.ndim == 0):
            # One time for the batch, as a sampler asks at every step: (τ, c) as floats, remembered per time.
            tau, c = scalar_time_change(self.source, self.schedule, float(t))
            y = x / c if c != 0 else torch.zeros_like(x)
        else:
            tau, scale = time_change(self.source, self.schedule, t)
            c = _expand(scale, x)
            y = torch.where(c == 0, torch.zeros_like(x), x / torch.where(c == 0, torch.ones_like(c), c))
        return eta_terms(self.inner, y, tau)


def convert(predictor: Predictor, schedule: Schedule | str) -> Predictor:
    """``predictor`` under ``schedule`` (itself when the schedules are the same object)."""
    predictor = check_predictor(predictor, "predictor")
    schedule = get_schedule(schedule)
    if predictor.schedule is schedule:
        return predictor
    return ConvertedModel(predictor, schedule)


@dataclass
class ConvertedPath:
    """A path under the target schedule: times, states Y_k = c(t_k) X_k and Brownian increments."""

    grid: Tensor
    path: Tensor
    increments: Tensor | None


def convert_path(path: Tensor, grid: Tensor, source: Schedule | str, target: Schedule | str,
                 increments: Tensor | None = None) -> ConvertedPath:
    r"""Map a stored source path (ODE or SDE) to the target schedule.

    Args:
        path: states X_k at the source times, shape (K + 1, *state).
        grid: the source times s_k, increasing, shape (K + 1,).
        increments: optional Brownian increments ΔW_k over [s_k, s_{k+1}], shape (K, *state).

    Returns:
        The target times t_k with τ(t_k) = s_k (t_k = r'⁻¹(r(s_k))), the states Y_k = c(t_k) X_k, and the
        increments ΔW̃_k = ΔW_k √((t_{k+1} − t_k)/(s_{k+1} − s_k)) of the time-changed Brownian motion
        dW̃ = τ̇^{−1/2} dW_τ. Driving the target SDE with ε' = c²τ̇ ε(τ) by these increments follows Y.
    """
    if not isinstance(path, Tensor) or not isinstance(grid, Tensor):
        raise TypeError("path, grid: expected tensors")
    source, target = _schedules(source, target)
    if grid.ndim != 1 or path.shape[0] != grid.shape[0]:
        raise ValueError(f"path: expected leading dimension {grid.shape[0]} (len(grid)), got {tuple(path.shape)}")
    s = as_time(grid)
    if not bool((torch.diff(s) > 0).all()):
        raise ValueError("grid: source times must increase strictly")
    t = target.snr_inverse(source.snr(s))
    _, scale = time_change(source, target, t)
    y = path * _expand(scale, path)
    new_increments = None
    if increments is not None:
        if increments.shape != (path.shape[0] - 1, *path.shape[1:]):
            raise ValueError(f"increments: expected shape {(path.shape[0] - 1, *path.shape[1:])}, "
                             f"got {tuple(increments.shape)}")
        ratio = torch.sqrt(torch.diff(t) / torch.diff(s))
        new_increments = increments * _expand(ratio, increments)
    return ConvertedPath(grid=t, path=y, increments=new_increments)
