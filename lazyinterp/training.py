"""Rectified-flow (linear-schedule) training of a velocity network on MNIST-like data.

The loss is the conditional flow-matching objective under I_t = (1 - t) Z + t X:

    L = E_{t ~ U(0,1), Z, X} || v_theta(I_t, t) - (X - Z) ||^2,

whose minimiser is v(t, x) = E[X - Z | I_t = x], the linear schedule's velocity. Training keeps an
exponential moving average (EMA) of the weights, which is what gets exported.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checks import check_int
from .devices import check_device
from .models import CheckpointInfo, UNet, UNetConfig, save_checkpoint


@dataclass
class TrainConfig:
    """The training run: data, steps, batch size, optimiser, EMA, checkpoints and the network's shape."""

    data: str = "mnist"
    steps: int = 6000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 200
    ema_decay: float = 0.999
    seed: int = 0
    channels: tuple[int, ...] = (16, 32, 64)
    blocks_per_level: int = 1
    attention_at_bottom: bool = True
    checkpoint_every: int = 500
    threads: int = 0  # 0: leave torch's default
    limit_data: int = 0  # 0: all images; else the first N (for quick tests)
    device: str = "cpu"
    extra: dict = field(default_factory=dict)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the platform tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_config(cfg: TrainConfig) -> None:
    """A ValueError or TypeError naming the first field of ``cfg`` that cannot train."""
    for name, low in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("checkpoint_every", 1), ("limit_data", 0)):
        check_int(getattr(cfg, name), name, low)
    # More threads than CPUs only oversubscribes them, and a huge count crashes torch's thread pool.
    check_int(cfg.threads, "threads", 0, available_cpus())
    float32_max = float(torch.finfo(torch.float32).max)
    if isinstance(cfg.lr, bool) or not isinstance(cfg.lr, (int, float)) or not 0 < cfg.lr <= float32_max:
        raise ValueError(f"lr: expected a positive number a float32 parameter can take, got {cfg.lr!r}")
    if isinstance(cfg.ema_decay, bool) or not isinstance(cfg.ema_decay, (int, float)) or not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay: expected a number in [0, 1), got {cfg.ema_decay!r}")
    if not cfg.channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 8 or c % 8
                               for c in cfg.channels):
        raise ValueError(f"channels: each width must be a positive multiple of 8, got {cfg.channels!r}")


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def flow_matching_loss(net: torch.nn.Module, x_data: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Conditional flow-matching loss for the linear schedule at uniformly drawn times."""
    batch = x_data.shape[0]
    z = torch.randn(x_data.shape, generator=generator, device=x_data.device)
    t = torch.rand(batch, generator=generator, device=x_data.device)
    tt = t.view(-1, *([1] * (x_data.ndim - 1)))
    x_t = (1 - tt) * z + tt * x_data
    return (net(x_t, t) - (x_data - z)).pow(2).mean()


def _state_path(out_dir: Path) -> Path:
    return out_dir / "train_state.pt"


def train(cfg: TrainConfig, out_dir: Path | str, *, images: np.ndarray | None = None,
          progress: bool = True, command: str | None = None) -> Path:
    """Train (or resume) in ``out_dir``; returns the path of the exported EMA checkpoint.

    Every ``checkpoint_every`` steps the full training state is written atomically to
    ``train_state.pt``, so an interrupted run resumes where it stopped with the same data order.
    """
    from .data import load, to_model_units
    from .fetch import atomic_path

    check_config(cfg)
    device = check_device(cfg.device)
    if images is None:
        images, _ = load(cfg.data, "train")
    if cfg.limit_data:
        images = images[: cfg.limit_data]
    if cfg.batch_size > len(images):
        raise ValueError(f"batch_size: {cfg.batch_size} is more than the {len(images)} training images")
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = to_model_units(images).to(device)

    torch.manual_seed(cfg.seed)
    net = UNet(UNetConfig(channels=tuple(cfg.channels), blocks_per_level=cfg.blocks_per_level,
                          attention_at_bottom=cfg.attention_at_bottom)).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    index_gen = torch.Generator().manual_seed(cfg.seed + 2)
    step = 0
    losses: list[float] = []

    state_file = _state_path(out_dir)
    if state_file.is_file():
        state = torch.load(state_file, map_location=device, weights_only=True)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"].cpu() if device.type == "cpu" else state["gen"])
        index_gen.set_state(state["index_gen"])
        step = int(state["step"])
        losses = list(state["losses"])

    def save_state() -> None:
        with atomic_path(state_file) as tmp:
            torch.save({"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "gen": gen.get_state(), "index_gen": index_gen.get_state(), "step": step,
                        "losses": losses}, tmp)

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", unit="step",
               dynamic_ncols=True)
    log_path = out_dir / "train_log.jsonl"
    log = open(log_path, "a")
    started = time.time()
    try:
        net.train()
        while step < cfg.steps:
            idx = torch.randint(0, data.shape[0], (cfg.batch_size,), generator=index_gen)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            loss = flow_matching_loss(net, data[idx.to(device)], gen)
            loss_value = loss.item()  # one read of the device per step
            if not math.isfinite(loss_value):
                # Raised before this step's update reaches the saved state: a rerun resumes from the last good
                # checkpoint (with another --lr, or as it was).
                raise ValueError(f"lr: the loss became {loss_value} at step {step + 1} with learning rate "
                                 f"{_lr_at(step, cfg):.3g}; lower it")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - decay)
            step += 1
            losses.append(loss_value)
            bar.update(1)
            if step % 50 == 0 or step == cfg.steps:
                recent = float(np.mean(losses[-50:]))
                bar.set_postfix(loss=f"{recent:.4f}")
                log.write(json.dumps({"step": step, "loss": recent, "lr": _lr_at(step - 1, cfg),
                                      "elapsed_s": round(time.time() - started, 1)}) + "\n")
                log.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_state()
                export(ema, cfg, out_dir / "model.safetensors", command=command, losses=losses)
    except BaseException:
        # A run that stopped before its first checkpoint leaves nothing to resume: no empty log, and no folder
        # that this call created.
        if not state_file.exists():
            log.close()
            if log_path.stat().st_size == 0:
                log_path.unlink()
            if created and not any(out_dir.iterdir()):
                out_dir.rmdir()
        raise
    finally:
        bar.close()
        log.close()
    return out_dir / "model.safetensors"


def export(net: UNet, cfg: TrainConfig, path: Path, *, command: str | None = None,
           losses: list[float] | None = None) -> None:
    """Write ``net`` as a lazyinterp checkpoint, with the training config and command in its metadata."""
    training = {**asdict(cfg), "channels": list(cfg.channels),
                "command": command or " ".join(shlex.quote(a) for a in sys.argv),
                "final_loss": float(np.mean(losses[-200:])) if losses else None,
                "torch": torch.__version__, "pid": os.getpid()}
    info = CheckpointInfo(network=net.config.to_dict(), schedule="linear", predicts="velocity",
                          data=cfg.data, training=training)
    save_checkpoint(path, net, info)
