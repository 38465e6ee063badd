r"""Euler steps fitted to a model's own ODE paths.

The lazy schedules remove the discretisation error for Gaussian data by choosing, per direction, a time change and
a scale (theory §5). For data that are not Gaussian the best such choice depends on the model, and it can be
fitted: Euler in coordinates ȳ_j(r) = s_j(r) x_j(t(r)) + m_j(r) (a time change t(r) shared by all directions,
a scale s_j and a shift m_j per principal direction j) takes, from the node t_k to t_{k+1}, the step

    x_{k+1} = Q (u_k ⊙ Qᵀ η_X + v_k ⊙ Qᵀ η_Z) + w_k,    (η_Z, η_X) the model's posterior means at (x_k, t_k),

with u_k, v_k ∈ R^D and w_k ∈ R^D free: s_j, ṡ_j and ṫ at a node span every (u_kj, v_kj) wherever the model's
SNR is strictly increasing, and m_j spans every w_k. Q is an orthonormal basis (the eigenvectors of the model's
own sample covariance, or the identity with one u_k, v_k for all directions). At t_0 = 0 the state α_0 Z carries no
information about the data, so η_Z = Z and the first step needs no network evaluation: N evaluations make N + 1
steps.

:func:`fit_euler` chooses the nodes and (u, v, w) by gradient descent on the mean distance between the fitted
run and a converged solution of the model's own ODE from the same noise — on noise of its own, not the noise it
will sample from (as in Shaul et al., "Bespoke solvers for generative flow models", 2024, here per direction
and with the lazy schedules' centring). It needs the model alone, no data. It starts from DDIM's step
(u_k = β(t_{k+1}), v_k = α(t_{k+1}), w_0 = β(t_1) E[X]) on the nodes of :func:`~lazyinterp.grids.snr_matched_grid`.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .checks import check_float_dtype, check_int, check_number, check_shape
from .fetch import atomic_path
from .grids import snr_matched_grid
from .noise import NoiseStreams
from .predictors import Model, NonFiniteError, to_eta
from .samplers import sample
from .schedules import Schedule

Tensor = torch.Tensor

# Bases of larger samples would not fit in memory as a dense (D, D) matrix, nor be estimated from a few thousand
# samples; those fit one weight per step for all directions.
MAX_BASIS_DIM = 4096
# The time step of the central differences that give the schedule's coefficients' time derivatives.
_TIME_STEP = 1e-5
# The time step of the finite difference that gives the network's slope in t (float32 networks: about the square
# root of their precision).
_NETWORK_TIME_STEP = 1e-3
_FORMAT = "lazyinterp.fitted_euler/1"
# The nodes' log-SNR stays within ±this (SNR from 8e-7 to 1.2e6).
_MAX_LOG_SNR = 14.0


class _ScheduleCoefficients(torch.autograd.Function):
    """(α, β, α̇, β̇) at a time that carries a gradient: the schedule's own values forward, central differences
    backward (the schedule's functions run on detached float64 times)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, schedule: Schedule) -> Tensor:  # type: ignore[override]
        ctx.schedule = schedule
        ctx.save_for_backward(t)
        return _coefficients_at(schedule, t.detach())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (t,) = ctx.saved_tensors
        lo = (t.detach() - _TIME_STEP).clamp(0.0, 1.0)
        hi = (t.detach() + _TIME_STEP).clamp(0.0, 1.0)
        slope = (_coefficients_at(ctx.schedule, hi) - _coefficients_at(ctx.schedule, lo)) / (hi - lo)
        return (grad * slope).sum().reshape(t.shape), None


class _TimeOfLogSNR(torch.autograd.Function):
    """t with log(β_t/α_t) = λ (the schedule's SNR inverse) forward; dt/dλ = 1/(β̇/β − α̇/α) backward."""

    @staticmethod
    def forward(ctx: Any, log_snr: Tensor, schedule: Schedule) -> Tensor:  # type: ignore[override]
        t = schedule.snr_inverse(log_snr.detach().exp()).to(torch.float64)
        ctx.save_for_backward(t)
        ctx.schedule = schedule
        return t

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (t,) = ctx.saved_tensors
        tt = ctx.schedule.regular_time(t)
        a, b = ctx.schedule.alpha(tt), ctx.schedule.beta(tt)
        rate = ctx.schedule.dbeta(tt) / b - ctx.schedule.dalpha(tt) / a
        return grad / rate, None


def _coefficients_at(schedule: Schedule, t: Tensor) -> Tensor:
    tt = schedule.regular_time(t.reshape(1))
    return torch.cat([schedule.alpha(tt), schedule.beta(tt), schedule.dalpha(tt), schedule.dbeta(tt)])


def _eta(model: Model, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(η_Z, η_X) at (x, t) for one time t (a 0-dim float64 tensor), differentiable in x and in t (through the
    schedule's coefficients and the network's time input)."""
    t = t.clamp(model.t_min, model.t_max)
    # One coefficient per sample: to_eta reads a 0-dim tensor as a Python number, which would drop its gradient.
    a, b, da, db = (c.expand(x.shape[0]) for c in _ScheduleCoefficients.apply(t, model.schedule).to(x.dtype))
    # Model._output counts the evaluation and checks the network's output as every sampler's evaluation does.
    out = model._output(x, float(t.detach()))
    if t.requires_grad:
        # The network's slope in t by a finite difference, not by autograd: a network's time input need not be
        # differentiable (an exact model's, or integer timesteps), and one more evaluation is cheaper than a
        # second backward pass.
        with torch.no_grad():
            step = _NETWORK_TIME_STEP if float(t.detach()) + _NETWORK_TIME_STEP <= model.t_max else -_NETWORK_TIME_STEP
            slope = (model._output(x.detach(), float(t.detach()) + step) - out.detach()) / step
        out = out + (t - t.detach()).to(x.dtype) * slope
    return to_eta(model.predicts, out, x, a, b, da, db)


@dataclass
class FittedEuler:
    r"""Fitted Euler steps: N evaluation times and N + 1 steps x_{k+1} = Q (u_k ⊙ Qᵀ η_X + v_k ⊙ Qᵀ η_Z) + w_k.

    Attributes:
        times: (N,) the model times of the evaluations, increasing in (0, 1).
        data_weights: (N + 1, K) u_k, per direction (K = D) or one for all (K = 1).
        noise_weights: (N + 1, K) v_k.
        shifts: (N + 1, D) w_k.
        basis: (D, D) orthonormal columns Q, or None (the identity).
        sample_shape: the shape of one sample.
        report: how it was fitted: the held-out path errors of DDIM's steps and of the fitted ones, and
            ``fit_evaluations``, the network calls (each on a batch) of the reference and the fit together.
    """

    times: Tensor
    data_weights: Tensor
    noise_weights: Tensor
    shifts: Tensor
    basis: Tensor | None
    sample_shape: tuple[int, ...]
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        steps = self.times.numel() + 1
        dim = math.prod(self.sample_shape)
        width = dim if self.basis is not None else 1
        for name, value, shape in (("data_weights", self.data_weights, (steps, width)),
                                   ("noise_weights", self.noise_weights, (steps, width)),
                                   ("shifts", self.shifts, (steps, dim))):
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name}: expected shape {shape}, got {got}")
        if self.basis is not None and tuple(self.basis.shape) != (dim, dim):
            raise ValueError(f"basis: expected shape {(dim, dim)}, got {tuple(self.basis.shape)}")
        if self.times.ndim != 1 or not bool(((self.times > 0) & (self.times < 1)).all()) \
                or not bool((self.times[1:] > self.times[:-1]).all()):
            raise ValueError("times: expected increasing times inside (0, 1)")

    @property
    def nfe(self) -> int:
        """Network evaluations per sample."""
        return self.times.numel()

    def sample(self, model: Model, noise: Tensor) -> Tensor:
        """Samples from the starting noise Z (B, *sample_shape) in ``nfe`` evaluations of ``model``."""
        noise = _check_noise(noise, self.sample_shape)
        with torch.no_grad():
            return _run(model, noise, self.times, self.data_weights, self.noise_weights, self.shifts, self.basis)

    def save(self, path: Path | str) -> None:
        """Write a safetensors file (atomically)."""
        from safetensors.torch import save_file

        tensors = {"times": self.times, "data_weights": self.data_weights, "noise_weights": self.noise_weights,
                   "shifts": self.shifts}
        if self.basis is not None:
            tensors["basis"] = self.basis
        meta = {"format": _FORMAT, "sample_shape": json.dumps(list(self.sample_shape)),
                "report": json.dumps(self.report)}
        with atomic_path(path) as tmp:
            save_file({k: v.detach().to(torch.float64).contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata=meta)

    @classmethod
    def load(cls, path: Path | str) -> FittedEuler:
        """Read a file written by :meth:`save`."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"path: cannot read fitted steps from {path}: {exc}") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"path: {path} holds no fitted Euler steps (format {meta.get('format')!r})")
        return cls(tensors["times"], tensors["data_weights"], tensors["noise_weights"], tensors["shifts"],
                   tensors.get("basis"), tuple(json.loads(meta["sample_shape"])), json.loads(meta["report"]))


def _check_noise(noise: Any, sample_shape: tuple[int, ...]) -> Tensor:
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise: expected a floating-point tensor, got {type(noise).__name__}")
    if tuple(noise.shape[1:]) != tuple(sample_shape) or noise.shape[0] < 1:
        raise ValueError(f"noise: expected shape (B, {', '.join(map(str, sample_shape))}), got {tuple(noise.shape)}")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise: contains NaN or inf")
    return noise


def _mix(weights: Tensor, v: Tensor, basis: Tensor | None) -> Tensor:
    if basis is None:
        return weights * v
    return ((v @ basis) * weights) @ basis.T


def _run(model: Model, noise: Tensor, times: Tensor, data_weights: Tensor, noise_weights: Tensor, shifts: Tensor,
         basis: Tensor | None) -> Tensor:
    shape = noise.shape
    dtype = noise.dtype
    eta_z = noise.reshape(shape[0], -1)
    eta_x = torch.zeros_like(eta_z)  # E[X] is part of the first step's shift
    basis = None if basis is None else basis.to(device=noise.device, dtype=dtype)
    steps = times.numel() + 1
    for k in range(steps):
        x = _mix(data_weights[k].to(noise.device, dtype), eta_x, basis) \
            + _mix(noise_weights[k].to(noise.device, dtype), eta_z, basis) + shifts[k].to(noise.device, dtype)
        if k == steps - 1:
            return x.reshape(shape)
        eta_z, eta_x = _eta(model, x.reshape(shape), times[k])
        eta_z, eta_x = eta_z.reshape(shape[0], -1), eta_x.reshape(shape[0], -1)
    raise AssertionError("unreachable")


def _path_error(x: Tensor, reference: Tensor) -> Tensor:
    return (x - reference).flatten(1).norm(dim=1).mean()


def fit_euler(model: Model, nfe: int, sample_shape: tuple[int, ...] | None = None, *, noise: Tensor | None = None,
              samples: int = 4096, seed: int = 1, reference_nfe: int | None = None, iterations: int = 2000,
              batch_size: int = 512, per_direction: bool | None = None, learning_rate: float = 1e-2,
              dtype: torch.dtype = torch.float32, progress: bool = False) -> FittedEuler:
    r"""Fit N = ``nfe`` Euler steps in per-direction lazy coordinates to ``model``'s own ODE paths (module doc).

    Args:
        model: an :class:`~lazyinterp.Model` on a Gaussian-base schedule (α_0 > 0).
        nfe: network evaluations per sample of the fitted sampler.
        sample_shape: the shape of one sample; taken from ``noise`` when that is given.
        noise: the starting noise to fit on (S, *sample_shape); default ``samples`` draws of per-sample streams
            of ``seed`` (fit on other noise than the samples you will score).
        reference_nfe: evaluations of the reference (the model's own schedule, Heun on its uniform grid); default
            max(128, 32 · nfe), so that the fitted steps are not limited by the reference's own error.
        iterations: Adam steps on minibatches of ``batch_size`` paths; one eighth of the paths (from 16) is held
            out to report the path error before and after.
        per_direction: weights per principal direction of the model's samples (the reference's endpoints);
            default while D ≤ :data:`MAX_BASIS_DIM`, else one weight for all directions.
        learning_rate: Adam's, decayed to 0 on a cosine.
        dtype: of the drawn noise and so of the fit's state and weights (a given ``noise`` sets its own).
    """
    if not isinstance(model, Model):
        raise TypeError(f"model: expected an li.Model, got {type(model).__name__}")
    nfe = check_int(nfe, "nfe")
    iterations = check_int(iterations, "iterations", low=0)
    batch_size = check_int(batch_size, "batch_size")
    reference_nfe = max(128, 32 * nfe) if reference_nfe is None else check_int(reference_nfe, "reference_nfe", low=2)
    learning_rate = check_number(learning_rate, "learning_rate", positive=True)
    if per_direction is not None and not isinstance(per_direction, bool):
        raise TypeError(f"per_direction: expected True, False or None, got {per_direction!r}")
    if float(model.schedule.alpha(0.0)) <= 0:
        raise ValueError(f"model: its schedule {model.schedule.name} starts at a point (α_0 = 0); fitted steps start "
                         "from Gaussian noise")
    if noise is None:
        if sample_shape is None:
            raise ValueError("sample_shape: needed when no noise is given")
        sample_shape = check_shape(sample_shape, "sample_shape")
        samples = check_int(samples, "samples", low=2)
        noise = NoiseStreams(check_int(seed, "seed", low=0), range(samples), sample_shape,
                             dtype=check_float_dtype(dtype)).draw()
    else:
        if sample_shape is None:
            sample_shape = tuple(noise.shape[1:]) if isinstance(noise, Tensor) else ()
        sample_shape = check_shape(sample_shape, "sample_shape")
        noise = _check_noise(noise, sample_shape)
        if noise.shape[0] < 2:
            raise ValueError(f"noise: expected at least 2 samples to fit on, got {noise.shape[0]}")
    dim = math.prod(sample_shape)
    if per_direction is None:
        per_direction = dim <= MAX_BASIS_DIM
    elif per_direction and dim > MAX_BASIS_DIM:
        raise ValueError(f"per_direction: a sample of {dim} values is above {MAX_BASIS_DIM}, too many for a dense "
                         "basis; use per_direction=False")

    evaluations_before = model.nfe
    with torch.no_grad():
        reference = torch.cat([sample(model, noise[lo:lo + batch_size], steps=reference_nfe // 2, solver="heun")
                               for lo in range(0, noise.shape[0], batch_size)])
    flat = reference.flatten(1).to(torch.float64)
    mean = flat.mean(0)
    basis = None
    if per_direction:
        _, basis = torch.linalg.eigh(torch.cov(flat.T).reshape(dim, dim) if dim > 1 else flat.var().reshape(1, 1))

    grid = snr_matched_grid(nfe + 1, model.schedule)
    # Nodes by log-SNR, the first one free and each next one a softplus above it: increasing for any parameters.
    log_snr = torch.log(model.schedule.snr(grid[1:-1]))
    log_snr = _MAX_LOG_SNR * torch.atanh((log_snr / _MAX_LOG_SNR).clamp(-0.999, 0.999))  # undoes the bound in times()
    rises = torch.diff(log_snr)
    nodes = torch.cat([log_snr[:1], rises + torch.log(-torch.expm1(-rises))])  # softplus⁻¹ of the rises
    a_next, b_next = model.schedule.alpha(grid[1:]), model.schedule.beta(grid[1:])
    width = dim if per_direction else 1
    params = {
        "nodes": nodes.clone(),
        "data_weights": b_next[:, None].repeat(1, width).to(noise.dtype),
        "noise_weights": a_next[:, None].repeat(1, width).to(noise.dtype),
        "shifts": torch.zeros(nfe + 1, dim, dtype=noise.dtype),
    }
    params["shifts"][0] = b_next[0] * mean.to(device="cpu", dtype=noise.dtype)
    for value in params.values():
        value.requires_grad_(True)

    def times(node_params: Tensor) -> Tensor:
        log_snr = torch.cumsum(torch.cat([node_params[:1], torch.nn.functional.softplus(node_params[1:])]), 0)
        # A smooth, strictly increasing bound keeps every node strictly inside (0, 1), where SNR⁻¹ is one-to-one.
        return _TimeOfLogSNR.apply(_MAX_LOG_SNR * torch.tanh(log_snr / _MAX_LOG_SNR), model.schedule)

    def run(x0: Tensor) -> Tensor:
        return _run(model, x0, times(params["nodes"]), params["data_weights"], params["noise_weights"],
                    params["shifts"], basis)

    count = noise.shape[0]
    held = count // 8 if count >= 16 else 0
    train = count - held
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam(params.values(), lr=learning_rate)
    # A linear warm-up: Adam's first updates move every weight by about the learning rate whatever its gradient,
    # which over many steps would throw a converged start far off; then a cosine decay to 0.
    warmup = max(1, min(100, iterations // 10))
    decay = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(i, iterations) / max(iterations, 1))))
    check_every = max(1, iterations // 20)

    def held_error() -> float | None:
        if not held:
            return None
        with torch.no_grad():
            return float(_path_error(run(noise[train:]), reference[train:]))

    def snapshot() -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in params.items()}

    # The parameters kept are those with the lowest held-out path error seen, the start included, so the fit never
    # returns steps worse than DDIM's on noise it did not train on.
    initial = best_error = held_error()
    best = snapshot()
    with tqdm(range(iterations), disable=not progress, desc=f"fitting {nfe} NFE", unit="step", file=sys.stderr,
              dynamic_ncols=True, leave=False) as bar:
        for i in bar:
            pick = torch.randperm(train, generator=generator)[:batch_size]
            optimiser.zero_grad()
            loss = _path_error(run(noise[pick]), reference[pick])
            if not bool(torch.isfinite(loss)):
                raise NonFiniteError("fit_euler: the path error became NaN or inf; lower learning_rate")
            loss.backward()
            optimiser.step()
            decay.step()
            bar.set_postfix(path_error=f"{float(loss.detach()):.4g}", refresh=False)
            if (i + 1) % check_every == 0 or i + 1 == iterations:
                error = held_error()
                if error is None or (math.isfinite(error) and error <= best_error):
                    best_error, best = error, snapshot()
    params = best
    report = {"nfe": nfe, "samples": count, "held_out": held, "reference_nfe": 2 * (reference_nfe // 2),
              "iterations": iterations, "per_direction": per_direction,
              "held_out_path_error_initial": initial, "held_out_path_error": best_error,
              "fit_evaluations": model.nfe - evaluations_before}
    with torch.no_grad():
        return FittedEuler(times(params["nodes"]).detach().clone(), params["data_weights"].detach().clone(),
                           params["noise_weights"].detach().clone(), params["shifts"].detach().clone(),
                           None if basis is None else basis.detach().clone(), tuple(sample_shape), report)
