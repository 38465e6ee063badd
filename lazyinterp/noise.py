"""Per-sample noise streams: sample i draws from its own generator seeded by (seed, i).

Each sample's initial noise and Brownian increments depend only on (seed, i), never on the batch it is in,
so results are identical for any batch size, any sharding over processes, and on CPU or CUDA (noise is
drawn on the CPU and moved).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import torch

Tensor = torch.Tensor


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded with ``seed`` (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence(entropy=int(seed) & ((1 << 128) - 1), spawn_key=(int(index),))
    return int(state.generate_state(1, dtype=np.uint64)[0]) >> 1


def resolve_seed(generator: int | torch.Generator | None) -> int:
    """A base seed: an int as is, one draw from a torch.Generator, or one draw from torch's global RNG."""
    if generator is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    if isinstance(generator, bool) or not isinstance(generator, (int, np.integer)):
        raise TypeError(f"generator: expected an int seed, a torch.Generator or None, got {type(generator).__name__}")
    return int(generator)


@cache
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lazyinterp-noise")


class NoiseStreams:
    """Standard normal draws, one independent stream per sample.

    Args:
        seed: the run's base seed.
        indices: the global indices of the samples in this batch (defaults to 0..batch-1).
        sample_shape: the shape of one sample.
        workers: host threads that draw the streams; the values do not depend on it. Default 1 when the
            samples live on the CPU (whose cores run the network), else up to 8: with an accelerator the host
            is otherwise idle, and drawing is most of a stochastic sampler's cost beyond the network.
    """

    def __init__(self, seed: int, indices: range | list[int], sample_shape: tuple[int, ...], *,
                 device=None, dtype: torch.dtype = torch.float32, workers: int | None = None):
        self.sample_shape = tuple(sample_shape)
        self.device = device
        self.dtype = dtype
        self._generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]
        if workers is None:
            on_host = device is None or torch.device(device).type == "cpu"
            workers = 1 if on_host else min(8, os.cpu_count() or 1)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: expected a positive integer or None, got {workers!r}")
        self.workers = workers

    def __len__(self) -> int:
        return len(self._generators)

    def draw(self) -> Tensor:
        """The next standard normal tensor of shape (batch, *sample_shape)."""
        return self._draw(self.sample_shape, 0)

    def draw_block(self, count: int) -> Tensor:
        """The next ``count`` draws at once, shape (count, batch, *sample_shape).

        One call per sample instead of one per sample and draw: an SDE takes all its increments up front, so the
        per-step cost does not grow with the batch. The values are a function of (seed, i, count) alone.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count: expected an integer >= 0, got {count!r}")
        return self._draw((count, *self.sample_shape), 1)

    def _draw(self, shape: tuple[int, ...], dim: int) -> Tensor:
        """One draw of ``shape`` from every stream, stacked along ``dim``, on the device in ``dtype``."""
        batch = len(self._generators)
        # Drawn in float64 and cast, so float32 and float64 runs share the same underlying noise. Each stream
        # draws into a contiguous tensor of its own: the values of a draw depend on its memory layout.
        out_shape = (*shape[:dim], batch, *shape[dim:])
        to_cuda = self.device is not None and torch.device(self.device).type == "cuda"
        out = torch.empty(out_shape, dtype=torch.float64, pin_memory=to_cuda and torch.cuda.is_available())

        def fill(rows: range) -> None:
            for i in rows:
                out.select(dim, i).copy_(torch.randn(shape, generator=self._generators[i], dtype=torch.float64))

        per_worker = max(1, -(-batch // self.workers))
        chunks = [range(lo, min(lo + per_worker, batch)) for lo in range(0, batch, per_worker)]
        if len(chunks) > 1:
            list(_thread_pool(self.workers).map(fill, chunks))
        else:
            fill(range(batch))
        # From pinned memory the copy to the device is queued behind its work instead of waiting for it.
        return out.to(device=self.device, dtype=self.dtype, non_blocking=out.is_pinned())
