"""Time grids over [0, 1]: uniform, or matched to the noise levels of a reference schedule's uniform grid.

The conversion between schedules is exact in continuous time, so a converted sampler's discretisation error is
decided by its coordinates and by the grid. "model" visits the SNRs that uniform steps of the model's own schedule
would, "linear" those of the linear schedule's uniform grid whatever the model was trained under; for a lazy
schedule far from unit scale both move to its own uniform grid (:func:`matched_grid`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .checks import check_int, check_positive
from .schedules import LazySchedule, Schedule, get_schedule, remembered

Tensor = torch.Tensor

DEFAULT_STEPS = 8
# The most grid intervals a named grid is built with: far beyond any converged run (the benchmark's references use
# 500–512), and the finest grid that the Brownian paths resolve (leaves of width 2^-20, :mod:`lazyinterp.brownian`);
# larger counts are a mistake that would otherwise fail with an allocation error.
MAX_STEPS = 2**20


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
    """The time grid :func:`lazyinterp.sample` uses: an explicit grid, or a named family over ``steps`` intervals.

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
    """``steps`` as an int from 1 to :data:`MAX_STEPS`; TypeError or ValueError naming it otherwise."""
    steps = check_int(steps, "steps")
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
