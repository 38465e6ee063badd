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


_MASK32 = 0xFFFFFFFF
# The constants of numpy's SeedSequence (numpy/random/bit_generator.pyx), whose hash :func:`sample_seeds` computes
# for a whole batch of spawn keys at once.
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _XSHIFT = 0xCA01F9DD, 0x4973F715, 16
_POOL_SIZE = 4


def _uint32_words(value: int) -> list[int]:
    """A non-negative int as little-endian 32-bit words (at least one), as SeedSequence splits its entropy."""
    words = [value & _MASK32]
    value >>= 32
    while value:
        words.append(value & _MASK32)
        value >>= 32
    return words


class _HashConstant:
    """SeedSequence's running hash constant: it advances by the same multiplier at every use, whatever the
    data, so one sequence of constants serves every spawn key."""

    def __init__(self, start: int, multiplier: int):
        self.value, self.multiplier = start, multiplier

    def next(self) -> int:
        used = self.value
        self.value = (self.value * self.multiplier) & _MASK32
        return used


def _hashmix(value, constant: _HashConstant):
    # value ^= h; h *= M; value *= h; value ^= value >> 16, in uint32 (on ints, or uint64 arrays of 32-bit values).
    h = constant.next()
    value = ((value ^ h) * constant.value) & _MASK32
    return value ^ (value >> _XSHIFT)


def _mix(x, y):
    result = (_MIX_L * x - _MIX_R * y) & _MASK32
    return result ^ (result >> _XSHIFT)


def sample_seeds(seed: int, indices: range | list[int]) -> list[int]:
    """:func:`sample_seed` for many indices at once: numpy's SeedSequence(seed, spawn_key=(i,)) hash, with the
    part that depends on ``seed`` alone computed once and the rest vectorised over the indices (one
    SeedSequence per sample costs tens of microseconds, which a stochastic sampler would pay on every call)."""
    indices = [int(i) for i in indices]
    if any(i < 0 for i in indices):
        raise ValueError("indices: expected non-negative sample indices")
    run_words = _uint32_words(int(seed) & ((1 << 128) - 1))
    run_words += [0] * (_POOL_SIZE - len(run_words))  # padded, as SeedSequence does when there is a spawn key
    constant = _HashConstant(_INIT_A, _MULT_A)
    pool = [_hashmix(word, constant) for word in run_words[:_POOL_SIZE]]
    for src in range(_POOL_SIZE):
        for dst in range(_POOL_SIZE):
            if src != dst:
                pool[dst] = _mix(pool[dst], _hashmix(pool[src], constant))
    out = [0] * len(indices)
    index_words = [_uint32_words(index) for index in indices]
    by_length: dict[int, list[int]] = {}
    for position, words in enumerate(index_words):
        by_length.setdefault(len(words), []).append(position)
    for length, positions in by_length.items():
        words = np.array([index_words[p] for p in positions], dtype=np.uint64).reshape(-1, length)
        mixed = [np.full(len(positions), word, dtype=np.uint64) for word in pool]
        index_constant = _HashConstant(constant.value, _MULT_A)
        for src in range(length):
            for dst in range(_POOL_SIZE):
                mixed[dst] = _mix(mixed[dst], _hashmix(words[:, src], index_constant))
        # generate_state(1, uint64): two 32-bit words from the first two pool entries, read little-endian.
        state_constant = _HashConstant(_INIT_B, _MULT_B)
        low, high = (_hashmix(mixed[i], state_constant) for i in range(2))
        values = (low | (high << np.uint64(32))) >> np.uint64(1)
        for p, v in zip(positions, values.tolist(), strict=True):
            out[p] = int(v)
    return out


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded with ``seed`` (numpy's SeedSequence hashing)."""
    return sample_seeds(seed, [index])[0]


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
        self._generators = [torch.Generator().manual_seed(s) for s in sample_seeds(seed, indices)]
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
