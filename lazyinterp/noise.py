"""Per-sample noise streams: sample i draws from its own generator seeded by (seed, i).

Each sample's initial noise and Brownian increments depend only on (seed, i), never on the batch it is in,
so results are identical for any batch size, any sharding over processes, and on CPU or CUDA (noise is
drawn on the CPU and moved).
"""

from __future__ import annotations

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


class NoiseStreams:
    """Standard normal draws, one independent stream per sample.

    Args:
        seed: the run's base seed.
        indices: the global indices of the samples in this batch (defaults to 0..batch-1).
        sample_shape: the shape of one sample.
    """

    def __init__(self, seed: int, indices: range | list[int], sample_shape: tuple[int, ...], *,
                 device=None, dtype: torch.dtype = torch.float32):
        self.sample_shape = tuple(sample_shape)
        self.device = device
        self.dtype = dtype
        self._generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]

    def __len__(self) -> int:
        return len(self._generators)

    def draw(self) -> Tensor:
        """The next standard normal tensor of shape (batch, *sample_shape)."""
        # Drawn in float64 and cast, so float32 and float64 runs share the same underlying noise.
        out = torch.stack([torch.randn(self.sample_shape, generator=g, dtype=torch.float64)
                           for g in self._generators])
        return out.to(device=self.device, dtype=self.dtype)

    def draw_block(self, count: int) -> Tensor:
        """The next ``count`` draws at once, shape (count, batch, *sample_shape).

        One call per sample instead of one per sample and draw: an SDE takes all its increments up front, so the
        per-step cost does not grow with the batch. The values are a function of (seed, i, count) alone.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count: expected an integer >= 0, got {count!r}")
        out = torch.stack([torch.randn((count, *self.sample_shape), generator=g, dtype=torch.float64)
                           for g in self._generators], dim=1)
        return out.to(device=self.device, dtype=self.dtype)
