"""Per-sample noise: sample i's draws depend only on (seed, i), never on the batch it is in.

So results are identical for any batch size, any sharding over processes, and on CPU or CUDA. Two sources:

* :class:`NoiseStreams`: sample i draws from its own torch generator seeded by (seed, i), on the host, and the
  draws are moved to the device.
* :class:`KeyedStreams`: the k-th draw of sample i is computed, not drawn: SplitMix64 hashes (Steele, Lea & Flood
  2014) of (seed, i, k) and a counter, through Box–Muller, in int64 tensor arithmetic on the samples' own device.
  No host work, so on an accelerator it costs a few elementwise kernels instead of the host's generators.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from numbers import Integral
from typing import Any

import numpy as np
import torch

from .checks import check_float_dtype, check_int, check_shape
from .devices import DeviceLike, check_device

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


def _hashmix(value: Tensor | np.ndarray, constant: _HashConstant) -> Tensor | np.ndarray:
    # value ^= h; h *= M; value *= h; value ^= value >> 16, in uint32 (on ints, or uint64 arrays of 32-bit values).
    h = constant.next()
    value = ((value ^ h) * constant.value) & _MASK32
    return value ^ (value >> _XSHIFT)


def _mix(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> Tensor | np.ndarray:
    result = (_MIX_L * x - _MIX_R * y) & _MASK32
    return result ^ (result >> _XSHIFT)


def check_indices(indices: Any, count: int | None = None) -> range | list[int]:
    """Global sample indices: a range, or a sequence (list, tuple, integer array or tensor) of non-negative
    integers, ``count`` of them when given; else a TypeError or ValueError naming ``indices``."""
    if isinstance(indices, range):
        values: range | list[int] = indices
        smallest = min(indices[0], indices[-1]) if len(indices) else 0
    else:
        if isinstance(indices, (Tensor, np.ndarray)):
            integral = not indices.dtype.is_floating_point and indices.dtype != torch.bool \
                if isinstance(indices, Tensor) else np.issubdtype(indices.dtype, np.integer)
            items = indices.tolist() if integral and indices.ndim == 1 else None
        else:
            items = list(indices) if isinstance(indices, Iterable) and not isinstance(indices, (str, bytes)) else None
        if items is None or any(isinstance(i, (bool, np.bool_)) or not isinstance(i, Integral) for i in items):
            raise TypeError("indices: expected a range or a sequence of non-negative integers, got "
                            f"{type(indices).__name__}")
        values = [int(i) for i in items]
        smallest = min(values, default=0)
    if smallest < 0:
        raise ValueError(f"indices: expected non-negative sample indices, got {smallest}")
    if count is not None and len(values) != count:
        raise ValueError(f"indices: expected {count} indices, got {len(values)}")
    return values


def _index_words(indices: range | list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sample indices as SeedSequence hashes them, as 32-bit words, grouped by their number of words: pairs
    (positions, words of shape (len(positions), length)). An error names indices that are not non-negative
    integers (:func:`check_indices`)."""
    indices = check_indices(indices)
    if isinstance(indices, range) and indices.stop <= 2**63:
        values = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64).astype(np.uint64)
    else:
        ints = list(indices)
        if max(ints, default=0) >= 1 << 64:  # three words or more: split one by one
            by_length: dict[int, list[int]] = {}
            for position, i in enumerate(ints):
                by_length.setdefault(len(_uint32_words(i)), []).append(position)
            return [(np.array(positions), np.array([_uint32_words(ints[p]) for p in positions], dtype=np.uint64))
                    for positions in by_length.values()]
        values = np.array(ints, dtype=np.uint64)
    words = np.stack((values & np.uint64(_MASK32), values >> np.uint64(32)), 1)
    two_words = words[:, 1] != 0
    return [(np.flatnonzero(rows), words[rows, :length]) for length, rows in ((1, ~two_words), (2, two_words))
            if rows.any()]


def _sample_seed_array(seed: int, indices: range | list[int]) -> np.ndarray:
    """:func:`sample_seeds` as a uint64 array."""
    groups = _index_words(indices)
    run_words = _uint32_words(int(seed) & ((1 << 128) - 1))
    run_words += [0] * (_POOL_SIZE - len(run_words))  # padded, as SeedSequence does when there is a spawn key
    constant = _HashConstant(_INIT_A, _MULT_A)
    pool = [_hashmix(word, constant) for word in run_words[:_POOL_SIZE]]
    for src in range(_POOL_SIZE):
        for dst in range(_POOL_SIZE):
            if src != dst:
                pool[dst] = _mix(pool[dst], _hashmix(pool[src], constant))
    out = np.empty(sum(len(positions) for positions, _ in groups), dtype=np.uint64)
    for positions, words in groups:
        mixed = [np.full(len(positions), word, dtype=np.uint64) for word in pool]
        index_constant = _HashConstant(constant.value, _MULT_A)
        for src in range(words.shape[1]):
            for dst in range(_POOL_SIZE):
                mixed[dst] = _mix(mixed[dst], _hashmix(words[:, src], index_constant))
        # generate_state(1, uint64): two 32-bit words from the first two pool entries, read little-endian.
        state_constant = _HashConstant(_INIT_B, _MULT_B)
        low, high = (_hashmix(mixed[i], state_constant) for i in range(2))
        out[positions] = (low | (high << np.uint64(32))) >> np.uint64(1)
    return out


def sample_seeds(seed: int, indices: range | list[int]) -> list[int]:
    """:func:`sample_seed` for many indices at once: numpy's SeedSequence(seed, spawn_key=(i,)) hash, with the
    part that depends on ``seed`` alone computed once and the rest vectorised over the indices (one
    SeedSequence per sample costs tens of microseconds, which a stochastic sampler would pay on every call)."""
    return _sample_seed_array(seed, indices).tolist()


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


# SplitMix64's constants (Vigna's reference splitmix64.c), as the int64 values of their 64-bit patterns.
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def signed64(value: int) -> int:
    """The int64 whose bits are the 64-bit pattern ``value``."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of 64-bit patterns held in int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: Tensor) -> Tensor:
    """SplitMix64's output function on 64-bit patterns held in int64 (products wrap modulo 2^64):

    z ← (z ⊕ (z ≫ 30)) · 0xBF58476D1CE4E5B9;  z ← (z ⊕ (z ≫ 27)) · 0x94D049BB133111EB;  z ⊕ (z ≫ 31).

    ``x`` is left as it is; the rounds after the first work in place, as these tensors are the size of a batch.
    """
    if x.dtype != torch.int64:
        raise TypeError(f"x: expected an int64 tensor, got {x.dtype}")
    x = x ^ _shift_right(x, 30)
    x *= signed64(_MIX1)
    x ^= _shift_right(x, 27)
    x *= signed64(_MIX2)
    x ^= _shift_right(x, 31)
    return x


def splitmix64(seed: Tensor, count: int) -> Tensor:
    """The first ``count`` outputs of SplitMix64 from each seed: mix64(seed + k γ), k = 1..count, γ the golden
    ratio constant; shape (*seed.shape, count)."""
    steps = torch.arange(1, count + 1, device=seed.device, dtype=torch.int64) * signed64(_GOLDEN)
    return mix64(seed.unsqueeze(-1) + steps)


def keyed_normals(keys: Tensor, count: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``count`` standard normals for each int64 key, shape (*keys.shape, count): pairs of 53-bit uniforms from
    :func:`splitmix64` through Box–Muller, √(−2 log u₁) (cos 2πu₂, sin 2πu₂) with u₁ ∈ (0, 1]."""
    pairs = (count + 1) // 2
    bits = splitmix64(keys, 2 * pairs)
    uniform = _shift_right(bits, 11).to(torch.float64).mul_(2.0 ** -53)
    radius = (1.0 - uniform[..., 0::2]).log_().mul_(-2.0).sqrt_()
    angle = uniform[..., 1::2].mul(2 * math.pi)
    normals = torch.empty((*radius.shape, 2), dtype=torch.float64, device=keys.device)
    torch.mul(radius, torch.cos(angle), out=normals[..., 0])
    torch.mul(radius, angle.sin_(), out=normals[..., 1])
    return normals.flatten(-2)[..., :count].to(dtype)


def sample_keys(seed: int, indices: range | list[int], device: torch.device) -> Tensor:
    """One int64 key per sample, mix64 of its :func:`sample_seeds` seed, on ``device``: the root of every keyed
    draw of sample i (its :class:`KeyedStreams` steps and its Brownian path's nodes)."""
    # The seeds are below 2^63 (SeedSequence's 64-bit state shifted right by one), so int64 holds them as they are.
    seeds = torch.from_numpy(_sample_seed_array(int(seed), indices).astype(np.int64))
    return queued_copy(mix64(seeds), device)


def queued_copy(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``; to a GPU from pinned memory, so that the copy is queued behind the device's
    work instead of waiting for it to finish."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def check_keyed_args(seed: Any, sample_shape: Any, device: Any, dtype: Any
                     ) -> tuple[tuple[int, ...], torch.device, torch.dtype]:
    """The checked (sample_shape, device, dtype) of a source of keyed draws, or an error naming the argument."""
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    sample_shape = check_shape(sample_shape, "sample_shape", min_dims=0)
    device = check_device(device if device is not None else "cpu")
    return sample_shape, device, check_float_dtype(dtype)


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
                 device: DeviceLike | None = None, dtype: torch.dtype = torch.float32, workers: int | None = None):
        self.sample_shape = tuple(sample_shape)
        self.device = device
        self.dtype = dtype
        self._generators = [torch.Generator().manual_seed(s) for s in sample_seeds(seed, indices)]
        if workers is None:
            on_host = device is None or torch.device(device).type == "cpu"
            workers = 1 if on_host else min(8, os.cpu_count() or 1)
        self.workers = check_int(workers, "workers")

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
        count = check_int(count, "count", 0)
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


# The key space of KeyedStreams' draws, apart from the Brownian paths' nodes and leaves (lazyinterp.brownian).
_STEP_TAG = 0x3C5A7E9B1D2F4068
# Elements hashed at once: a block of draws is computed in parts of at most this many, whatever its size, so a
# large latent's int64 intermediates stay a few tens of megabytes.
_KEYED_CHUNK = 1 << 22


class KeyedStreams:
    """Standard normal draws, one independent stream per sample, computed on the samples' device.

    The k-th draw of sample i is :func:`keyed_normals` of mix64(mix64(k ⊕ tag) ⊕ key_i), key_i from
    :func:`sample_keys`: a function of (seed, i, k) alone, like :class:`NoiseStreams` (same law, other values),
    with the same :meth:`draw` and :meth:`draw_block`. Computed in float64 and cast, so float32 and float64 runs
    share their noise, and CPU and CUDA agree up to the rounding of log, cos and sin.
    """

    def __init__(self, seed: int, indices: range | list[int], sample_shape: tuple[int, ...], *,
                 device: DeviceLike | None = None, dtype: torch.dtype = torch.float32):
        sample_shape, device, dtype = check_keyed_args(seed, sample_shape, device, dtype)
        self._start(sample_keys(seed, indices, device), sample_shape, device, dtype)

    @classmethod
    def from_keys(cls, keys: Tensor, sample_shape: tuple[int, ...], dtype: torch.dtype = torch.float32
                  ) -> KeyedStreams:
        """Streams over given per-sample ``keys`` (:attr:`keys` of another source), from their first draw, on the
        keys' device: the same draws as that source's, computed from device tensors alone (so that a CUDA graph
        can compute them, with the keys as its input)."""
        if not isinstance(keys, Tensor) or keys.dtype != torch.int64 or keys.ndim != 1:
            raise TypeError(f"keys: expected a 1-d int64 tensor, got {keys!r:.80}")
        # The keys stand in for (seed, indices), so the seed checked here is a placeholder.
        sample_shape, device, dtype = check_keyed_args(0, sample_shape, keys.device, dtype)
        streams = cls.__new__(cls)
        streams._start(keys, sample_shape, device, dtype)
        return streams

    def _start(self, keys: Tensor, sample_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> None:
        """Checked settings and the per-sample keys, before the first draw."""
        self.sample_shape, self.device, self.dtype = sample_shape, device, dtype
        self.size = math.prod(sample_shape)
        self._keys = keys
        self._drawn = 0

    @property
    def keys(self) -> Tensor:
        """The per-sample keys, (batch,) int64 on the device: the root of every draw (see :meth:`from_keys`)."""
        return self._keys

    def __len__(self) -> int:
        return int(self._keys.shape[0])

    def draw(self) -> Tensor:
        """The next standard normal tensor of shape (batch, *sample_shape)."""
        return self.draw_block(1)[0]

    def draw_block(self, count: int) -> Tensor:
        """The next ``count`` draws at once, shape (count, batch, *sample_shape), equal to ``count`` calls of
        :meth:`draw`."""
        count = check_int(count, "count", 0)
        steps = torch.arange(self._drawn, self._drawn + count, dtype=torch.int64, device=self.device)
        step_keys = mix64(steps ^ signed64(_STEP_TAG))
        stream_keys = mix64(step_keys.unsqueeze(1) ^ self._keys.unsqueeze(0)).flatten()
        out = torch.empty((stream_keys.numel(), self.size), dtype=self.dtype, device=self.device)
        per_part = max(1, _KEYED_CHUNK // self.size)
        for lo in range(0, stream_keys.numel(), per_part):
            out[lo:lo + per_part] = keyed_normals(stream_keys[lo:lo + per_part], self.size, self.dtype)
        self._drawn += count
        return out.view(count, len(self), *self.sample_shape)


def normal_draws(streams: NoiseStreams | KeyedStreams, count: int, block: int = 32) -> Callable[[], Tensor]:
    """``count`` draws from ``streams``, taken a block at a time: one generator call per sample and block rather
    than per sample and step (the per-step cost would otherwise grow with the batch)."""

    def draws():
        left = count
        while left > 0:
            take = min(block, left)
            yield from streams.draw_block(take)
            left -= take

    iterator = draws()
    return lambda: next(iterator)
