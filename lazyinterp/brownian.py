r"""Per-sample Brownian paths that are the same whatever grid they are read on.

Each sample i of a run seeded with s owns one standard Brownian motion W_i on [0, 1], a fixed function of
(s, i, t): W_i(1) is drawn from a key of (s, i), and W_i at the midpoint m of a dyadic interval [a, b] is the
Brownian bridge's value there (Lévy's construction),

    W(m) = (W(a) + W(b))/2 + √((b − a)/4) ξ_node,

with ξ_node a standard normal keyed by (s, i, node). A time t that is not dyadic at depth L lies in a leaf
[a, b] of width 2^−L and is read from the bridge over it, W(t) = W(a) + (t − a)/(b − a) (W(b) − W(a)) +
√((t − a)(b − t)/(b − a)) ξ_t, keyed by t itself; several times in one leaf are bridged in turn, left to right,
so that their joint law stays exact (a time then depends on the earlier times of its leaf that were read too).

So a grid and any refinement of it read the same path: the increments over a fine grid sum to those over a coarse
one, and a stochastic sampler converges to one sample per noise seed as its steps grow, as it does for an ODE.
Every normal is computed, not drawn from a stateful generator: the keys are SplitMix64 hashes (Steele, Lea &
Flood 2014) of the seed, the sample, the node and a counter, turned into normals by Box–Muller, in int64 tensor
arithmetic on the samples' device, so no host generator is involved and the values do not depend on the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .checks import check_int
from .devices import DeviceLike
from .noise import check_keyed_args, keyed_normals, mix64, queued_copy, sample_keys, signed64

Tensor = torch.Tensor

# Separate key spaces for the kinds of draw: dyadic nodes (numbered 2^ℓ + j) and leaf bridges (keyed by a time's
# float64 bits).
_NODE_TAG = 0x5A1C3E0F2B4D6987
_LEAF_TAG = 0x2F6B8D4C1A3E5079
# Leaves of width 2^-20 (about 1e-6). Grids that differ inside a leaf read different bridges there, and the point-mass
# SDE's solution depends on its path at fine scales near t = 0: at depth 12 (leaves of 2.4e-4) the SNR-matched grids
# of 256 to 4096 steps converged to a sample 0.034 away from that of grids on the dyadic nodes (gmm-2d, per-sample
# mean distance), at depth 20 to within 0.003 of it.
DEFAULT_DEPTH = 20


def _as_times(value: Any, argument: str) -> Tensor:
    """A 1-D float64 CPU tensor of times, or a clear error."""
    try:
        times = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{argument}: expected a 1-D sequence of times, got {type(value).__name__}") from None
    if times.ndim != 1:
        raise ValueError(f"{argument}: expected a 1-D sequence of times, got shape {tuple(times.shape)}")
    return times


def _tagged(ids: Tensor, tag: int) -> Tensor:
    return mix64(ids ^ signed64(tag))


class BrownianPaths:
    """One standard Brownian motion per sample, W_i(t) for t in [0, 1], a function of (seed, i, t) alone.

    Args:
        seed: the run's base seed.
        indices: the global indices of the samples in this batch.
        sample_shape: the shape of one sample (W_i has independent coordinates of that shape).
        device: where the values are computed and returned.
        dtype: the dtype of :meth:`increments`' result (the path itself is computed in float64).
        depth: leaves have width 2^−depth (see the module docstring).
    """

    def __init__(self, seed: int, indices: range | Sequence[int], sample_shape: tuple[int, ...], *,
                 device: DeviceLike | None = None, dtype: torch.dtype = torch.float32, depth: int = DEFAULT_DEPTH):
        depth = check_int(depth, "depth", 1, 52)
        self.sample_shape, self.device, self.dtype = check_keyed_args(seed, sample_shape, device, dtype)
        self.size = math.prod(self.sample_shape)
        self.depth = depth
        self._keys = sample_keys(seed, indices, self.device)

    def __len__(self) -> int:
        return int(self._keys.shape[0])

    def _normals(self, ids: Tensor, tag: int) -> Tensor:
        """Normals of shape (len(ids), batch, size) keyed by (sample, id) in the key space ``tag``."""
        streams = mix64(queued_copy(_tagged(ids, tag), self.device).unsqueeze(1) ^ self._keys.unsqueeze(0))
        return keyed_normals(streams, self.size)

    def values(self, times: Sequence[float] | Tensor) -> Tensor:
        """W(t) for each time, shape (len(times), batch, *sample_shape), float64 on the device."""
        times = _as_times(times, "times")
        if times.numel() and not (bool(torch.isfinite(times).all()) and float(times.min()) >= 0.0
                                  and float(times.max()) <= 1.0):
            raise ValueError("times: expected times in [0, 1]")
        wanted = sorted(set(times.tolist()))
        known = self._path_at(wanted)
        out = torch.stack([known[t] for t in times.tolist()]) if len(times) else \
            torch.empty((0, len(self), self.size), dtype=torch.float64, device=self.device)
        return out.reshape(len(times), len(self), *self.sample_shape)

    def increments(self, grid: Sequence[float] | Tensor) -> Tensor:
        """The standardised increments ξ_k = (W(t_{k+1}) − W(t_k)) / √(t_{k+1} − t_k) over an increasing grid, shape
        (steps, batch, *sample_shape), in ``dtype`` on the device: standard normals, independent across steps."""
        return torch.cat(list(self.increment_blocks(grid)))

    def increment_blocks(self, grid: Sequence[float] | Tensor, block: int = 32) -> Iterator[Tensor]:
        """:meth:`increments` in consecutive blocks of about ``block`` steps, equal to it value for value, so a long
        grid never holds all its increments at once (blocks are cut only between times of different leaves)."""
        grid = _as_times(grid, "grid")
        if grid.numel() < 2 or not bool((torch.diff(grid) > 0).all()):
            raise ValueError("grid: expected an increasing grid of at least 2 times")
        if not (bool(torch.isfinite(grid).all()) and float(grid[0]) >= 0.0 and float(grid[-1]) <= 1.0):
            raise ValueError("grid: expected times in [0, 1]")
        return self._blocks(grid.tolist(), check_int(block, "block"))

    def _blocks(self, times: list[float], block: int):
        start, previous = 0, None
        while start < len(times) - 1:
            stop = min(start + block, len(times) - 1)
            while stop < len(times) - 1 and self._same_leaf(times[stop], times[stop + 1]):
                stop += 1
            # The block's first time was read with the block before; its value is reused, not read again.
            span = times[start + (previous is not None):stop + 1]
            path = self.values(span)
            if previous is not None:
                path = torch.cat([previous.unsqueeze(0), path])
            steps = torch.tensor(times[start:stop + 1], dtype=torch.float64).diff()
            scale = queued_copy(steps.rsqrt(), self.device).view(-1, *([1] * (path.ndim - 1)))
            yield (torch.diff(path, dim=0) * scale).to(self.dtype)
            start, previous = stop, path[-1]

    def _same_leaf(self, s: float, t: float) -> bool:
        """Whether s and t both lie strictly inside one depth-L leaf (where t is bridged from s)."""
        scale = float(1 << self.depth)
        return math.floor(s * scale) == math.floor(t * scale) and s * scale != math.floor(s * scale)

    def _path_at(self, times: list[float]) -> dict[float, Tensor]:
        """{t: W(t) of shape (batch, size)} for sorted distinct times in [0, 1]."""
        zero = torch.zeros((len(self), self.size), dtype=torch.float64, device=self.device)
        root = self._normals(torch.tensor([1], dtype=torch.int64), _NODE_TAG)[0]  # W(1), node 2^0 + 0
        out: dict[float, Tensor] = {}
        # Each open time's bracket [a, b] at the current level, as dyadic numerators over 2^level, and W at the
        # numerators the brackets end on.
        level_values = {0: zero, 1: root}
        brackets = {}
        for t in times:
            if t == 0.0:
                out[t] = zero
            elif t == 1.0:
                out[t] = root
            else:
                brackets[t] = (0, 1)
        for level in range(1, self.depth + 1):
            if not brackets:
                break
            scale = 1 << level
            # The midpoints of the open brackets, numbered j/2^level with j odd.
            mids = sorted({a + b for a, b in brackets.values()})
            ids = torch.tensor([scale + j for j in mids], dtype=torch.int64)
            noise = self._normals(ids, _NODE_TAG)
            spread = math.sqrt(1.0 / (4 * (1 << (level - 1))))
            new_values = {}
            for row, j in enumerate(mids):
                left, right = level_values[(j - 1) // 2], level_values[(j + 1) // 2]
                new_values[j] = 0.5 * (left + right) + spread * noise[row]
            next_values: dict[int, Tensor] = {}
            next_brackets = {}
            for t, (a, b) in brackets.items():
                j = a + b
                node = new_values[j]
                if t * scale == j:
                    out[t] = node
                    continue
                lo, hi = (2 * a, j) if t * scale < j else (j, 2 * b)
                next_brackets[t] = (lo, hi)
                for k in (lo, hi):
                    next_values[k] = node if k == j else level_values[k // 2]
            brackets, level_values = next_brackets, next_values
        self._bridge_leaves(brackets, level_values, out)
        return out

    def _bridge_leaves(self, brackets: dict[float, tuple[int, int]], level_values: dict[int, Tensor],
                       out: dict) -> None:
        """Times inside depth-L leaves, each bridged from the nearest known time on its left to the leaf's right
        end, in increasing order within a leaf."""
        if not brackets:
            return
        width = 2.0 ** -self.depth
        by_leaf: dict[tuple[int, int], list[float]] = {}
        for t, bracket in brackets.items():
            by_leaf.setdefault(bracket, []).append(t)
        for queue in by_leaf.values():
            queue.sort()
        rounds = max(len(q) for q in by_leaf.values())
        left = {leaf: (leaf[0] * width, level_values[leaf[0]]) for leaf in by_leaf}
        for r in range(rounds):
            batch = [(leaf, q[r]) for leaf, q in by_leaf.items() if r < len(q)]
            bits = torch.tensor([t for _, t in batch], dtype=torch.float64).view(torch.int64)
            noise = self._normals(bits, _LEAF_TAG)
            for row, (leaf, t) in enumerate(batch):
                a, w_a = left[leaf]
                b, w_b = leaf[1] * width, level_values[leaf[1]]
                value = w_a + ((t - a) / (b - a)) * (w_b - w_a) + math.sqrt((t - a) * (b - t) / (b - a)) * noise[row]
                out[t] = value
                left[leaf] = (t, value)
