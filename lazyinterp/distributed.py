"""Scale-out with torch.distributed: sharded sampling, resumable shard files, reduced FID statistics.

Launch with ``torchrun --nproc_per_node K -m lazyinterp sample ...``; without torchrun the same code runs as one
process. The job of ``n`` samples is cut into fixed shards of ``shard_size`` samples, independent of the number
of processes; rank r takes shards r, r + K, r + 2K, ... Sample i always draws its noise from (seed, i) and
the network runs on fixed-size chunks, so the gathered output is bit-identical for any K and batch size.

Each shard is written atomically into ``OUT.shards/``; an interrupted run resumes and skips finished shards.
Rank 0 gathers the shards in order into ``OUT`` (atomically) and removes the shard folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from .devices import check_device
from .fetch import atomic_path

if TYPE_CHECKING:
    from .metrics import FeatureStats


@dataclass
class Context:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0, the process that writes outputs."""
        return self.rank == 0

    barriers: int = 0

    def barrier(self) -> None:
        """Wait for every rank.

        A process that leaves right after a gloo barrier can close its socket while rank 0 is still inside the
        barrier, which rank 0 reports as "connection reset by peer"; so the other ranks also wait, through the
        rendezvous store, until rank 0 has left the barrier.
        """
        if self.world == 1:
            return
        dist.barrier()
        self.barriers += 1
        key = f"lazyinterp/left-barrier/{self.barriers}"
        store = dist.distributed_c10d._get_default_store()
        if self.is_main:
            store.set(key, "1")
        else:
            store.wait([key])

    def part(self, count: int) -> range:
        """This rank's contiguous share of ``count`` items (shares differ in size by at most one)."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (small, picklable), in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """The concatenation of every rank's rows in rank order (ranks may hold different row counts)."""
        if self.world == 1:
            return local
        counts = self.all_gather_object(int(local.shape[0]))
        # Collectives need equal shapes: pad every rank's rows to the longest, then trim.
        padded = local.new_zeros((max(counts), *local.shape[1:]), device=self.collective_device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(local.device)

    @property
    def collective_device(self) -> torch.device:
        """Where collectives take their tensors: the GPU under nccl, the CPU under gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def setup(device: str = "cpu") -> Context:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); a lone process needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = check_device(device, kinds=("cpu", "cuda"))  # the backends of gloo and nccl
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return Context(0, 1, dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        return Context(rank, world, dev, owns_group=True)
    return Context(dist.get_rank(), dist.get_world_size(), dev)


def teardown(ctx: Context) -> None:
    """Destroy the process group, if this context created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


class Shards(Sequence[range]):
    """The global sample indices of each shard, computed when asked for, so that a job of any size costs no memory
    until its samples exist."""

    def __init__(self, n: int, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size: expected at least 1, got {shard_size}")
        self.n, self.size = n, shard_size

    def __len__(self) -> int:
        return -(-self.n // self.size)

    def __getitem__(self, index: int | slice) -> range | list[range]:
        if isinstance(index, slice):
            return [self[j] for j in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"shard {index} of {len(self)}")
        low = index * self.size
        return range(low, min(low + self.size, self.n))


def shard_ranges(n: int, shard_size: int) -> Shards:
    """The global sample indices of each shard."""
    return Shards(n, shard_size)


def shard_dir(out: Path) -> Path:
    """The folder of ``out``'s shards: ``<out>.shards`` beside it."""
    return out.with_name(out.name + ".shards")


def shard_path(out: Path, index: int, count: int) -> Path:
    """The file of shard ``index`` of ``count``."""
    return shard_dir(out) / f"shard-{index:05d}-of-{count:05d}.npz"


def count_shards(out: Path, count: int) -> int:
    """How many of the ``count`` shards of ``out`` exist (by listing the folder, not by asking for each)."""
    return sum(1 for _ in shard_dir(out).glob(f"shard-*-of-{count:05d}.npz"))


def check_manifest(out: Path, manifest: dict, ctx: Context) -> None:
    """Record the job's settings beside its shards, and refuse to mix shards of different settings."""
    folder = shard_dir(out)
    path = folder / "manifest.json"
    if ctx.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        # A run that stopped before its first shard (a bad setting, an interrupt) left nothing to protect.
        if not path.exists() or not any(folder.glob("shard-*.npz")):
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(manifest, sort_keys=True, indent=1))
    ctx.barrier()
    recorded = json.loads(path.read_text())
    if recorded != json.loads(json.dumps(manifest, sort_keys=True)):
        raise ValueError(f"--out: {folder} holds shards of a run with other settings; remove it or change --out")


def run_shards(out: Path, n: int, shard_size: int, ctx: Context, produce: Callable[[range], Any], *,
               max_shards: int | None = None,
               progress: Callable[[int], Any] | None = None) -> tuple[int, int]:
    """Produce this rank's missing shards with ``produce(indices) -> tensor``; returns (done, total) shards.

    ``max_shards`` stops this rank after that many new shards (a time-limited job resumes on the next run).
    """
    shards = shard_ranges(n, shard_size)
    made = 0
    for j in range(ctx.rank, len(shards), ctx.world):
        path = shard_path(out, j, len(shards))
        if path.exists():
            if progress is not None:
                progress(len(shards[j]))
            continue
        if max_shards is not None and made >= max_shards:
            break
        samples = produce(shards[j])
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, samples=samples.detach().cpu().float().numpy(),
                         indices=np.arange(shards[j].start, shards[j].stop))
        made += 1
        if progress is not None:
            progress(len(shards[j]))
    ctx.barrier()
    # Rank 0 counts and tells the others: once it has left the barrier it may gather and remove the shards, and a
    # slower rank counting the files itself could then see none, skip the final barrier and exit under it.
    done = count_shards(out, len(shards)) if ctx.is_main else None
    return ctx.broadcast_object(done), len(shards)


def gather(out: Path, n: int, shard_size: int) -> np.ndarray:
    """All shards' samples in global order (call once every shard exists)."""
    shards = shard_ranges(n, shard_size)
    parts = []
    for j, indices in enumerate(shards):
        with np.load(shard_path(out, j, len(shards)), allow_pickle=False) as f:
            if not np.array_equal(f["indices"], np.arange(indices.start, indices.stop)):
                raise ValueError(f"--out: shard {j} holds the wrong samples; remove {shard_dir(out)}")
            parts.append(f["samples"])
    return np.concatenate(parts)


def remove_shards(out: Path) -> None:
    """Delete the shards of ``out`` and their folder (once ``out`` is written)."""
    folder = shard_dir(out)
    for path in folder.glob("*"):
        path.unlink()
    folder.rmdir()


def all_reduce_stats(stats: FeatureStats, ctx: Context) -> FeatureStats:
    """Sum FeatureStats (n, sum, outer_sum) across ranks, in float64."""
    if ctx.world == 1:
        return stats
    device = ctx.collective_device
    n = torch.tensor([float(stats.n)], dtype=torch.float64, device=device)
    total = torch.as_tensor(stats.sum, dtype=torch.float64, device=device).clone()
    outer = torch.as_tensor(stats.outer_sum, dtype=torch.float64, device=device).clone()
    for tensor in (n, total, outer):
        dist.all_reduce(tensor)
    return type(stats)(int(n.item()), total.cpu().numpy(), outer.cpu().numpy(), stats.extractor)
