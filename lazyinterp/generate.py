"""Sampling jobs: many samples in batches, with progress, per-sample noise and atomic outputs.

Sample i always draws its noise from the stream (seed, i), so the output does not depend on the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .fetch import atomic_path
from .fitting import FittedEuler
from .noise import NoiseStreams, sample_seed
from .predictors import Model
from .samplers import sample
from .schedules import Schedule, get_schedule


@dataclass
class SamplerSpec:
    """A sampler configuration: schedule, diffusion, solver, steps and options of :func:`lazyinterp.sample`."""

    schedule: str = "linear"
    steps: int = 8
    diffusion: Any = None
    solver: str | None = None
    sigma: float | None = None
    last_step: str | None = None
    center: bool | None = None
    grid: Any = None
    grid_shift: float = 1.0
    covariance: Any = None
    sde_noise: str = "independent"
    fitted: FittedEuler | None = None  # steps of :func:`lazyinterp.fit_euler`, which replace all of the above

    def schedule_object(self) -> Schedule:
        """The sampling schedule, resolved with ``sigma`` where that is given."""
        sched = get_schedule(self.schedule)
        if self.sigma is not None and hasattr(sched, "resolve"):
            sched = sched.resolve(self.sigma)
        return sched


def sample_batch(model: Model, spec: SamplerSpec, indices: range, sample_shape: tuple[int, ...], seed: int,
                 device: torch.device | str = "cpu", cuda_graph: bool = False) -> torch.Tensor:
    """Samples for the global ``indices``: the noise of sample i comes from the stream (seed, i). With
    ``cuda_graph`` every batch of a shape after the first replays one CUDA graph (``li.sample``)."""
    if spec.fitted is not None:
        return spec.fitted.sample(model, NoiseStreams(seed, indices, sample_shape, device=device).draw())
    schedule = spec.schedule_object()
    shape = (len(indices), *sample_shape)
    noise = None
    if schedule.base != "point_mass":
        # Every sampler of a run starts from the same noise; SDE increments come from a second family of
        # streams, derived from the seed, so they never alias another run's starting noise.
        noise = NoiseStreams(seed, indices, sample_shape, device=device).draw()
    return sample(model, noise, shape=shape, steps=spec.steps, grid=spec.grid, schedule=schedule,
                  diffusion=spec.diffusion, solver=spec.solver, generator=sample_seed(seed, 1 << 62),
                  indices=indices,
                  last_step=spec.last_step, center=spec.center, grid_shift=spec.grid_shift, device=device,
                  covariance=spec.covariance, sde_noise=spec.sde_noise, cuda_graph=cuda_graph)


def generate(model: Model, spec: SamplerSpec, n: int, sample_shape: tuple[int, ...], *, seed: int = 0,
             batch_size: int = 256, device: torch.device | str = "cpu", start: int = 0,
             progress: bool = True, desc: str = "sample", cuda_graph: bool = False) -> torch.Tensor:
    """``n`` samples with global indices start..start+n−1, in batches of ``batch_size``."""
    if n < 1:
        raise ValueError(f"n: expected at least 1 sample, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
    out = []
    with tqdm(total=n, disable=not progress, desc=desc, unit="img", dynamic_ncols=True, leave=False) as bar:
        for lo in range(start, start + n, batch_size):
            idx = range(lo, min(lo + batch_size, start + n))
            out.append(sample_batch(model, spec, idx, sample_shape, seed, device, cuda_graph).cpu())
            bar.update(len(idx))
    return torch.cat(out)


def image_grid(samples: torch.Tensor | np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """A (H', W') uint8 image tiling model-unit samples (N, 1, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(samples)).float()
    if x.ndim == 4:
        x = x[:, 0]
    n, h, w = x.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=np.uint8)
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = pixels[i]
    return canvas


def save_png(path: Path | str, image: np.ndarray) -> None:
    """Write a grey-scale uint8 image as PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        plt.imsave(tmp, image, cmap="gray", vmin=0, vmax=255, format="png")


def save_samples(path: Path | str, samples: torch.Tensor, **metadata: Any) -> None:
    """Write ``samples`` (float32) and scalar metadata to an npz, atomically."""
    arrays = {"samples": samples.detach().cpu().float().numpy()}
    for key, value in metadata.items():
        arrays[key] = np.asarray(value)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
