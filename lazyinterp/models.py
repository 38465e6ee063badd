"""Networks and checkpoints: a small time-conditioned UNet, and safetensors checkpoints with their config.

A checkpoint is a ``.safetensors`` file whose metadata holds a JSON config: the network's constructor
arguments, the schedule it was trained under, what it predicts, and how data maps to model units.
Loading never unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .fetch import atomic_path

if TYPE_CHECKING:
    from .predictors import Model

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED = {"mnist": ASSETS / "mnist_unet.safetensors"}


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or not a lazyinterp checkpoint."""


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of ``1000 t`` (t of shape (B,)), as in transformer position encodings."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    """Pre-norm residual block: GroupNorm, SiLU, 3×3 conv, with the time embedding as a scale and shift."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """h = conv(SiLU(norm(x))), h ← norm(h)(1 + scale) + shift, out = skip(x) + conv(SiLU(h))."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(min(8, channels), channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + attention(norm(x)) over the h·w positions."""
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


@dataclass
class UNetConfig:
    """The UNet's shape: channels per level, residual blocks per level, attention at the bottom."""

    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128)
    blocks_per_level: int = 1
    attention_at_bottom: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values (the checkpoint's metadata)."""
        return {**asdict(self), "channels": list(self.channels)}


class UNet(nn.Module):
    """A small UNet ``net(x, t)`` for 28x28 images; ``t`` has shape (B,) with values in [0, 1]."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = config or UNetConfig()
        self.config = cfg
        ch = list(cfg.channels)
        emb_dim = 4 * ch[0]
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [ch[0]]
        c = ch[0]
        for level, width in enumerate(ch):
            for _ in range(cfg.blocks_per_level):
                self.down.append(ResBlock(c, width, emb_dim))
                c = width
                skips.append(c)
            if level < len(ch) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1 = ResBlock(c, c, emb_dim)
        self.mid_attn = SelfAttention(c) if cfg.attention_at_bottom else nn.Identity()
        self.mid2 = ResBlock(c, c, emb_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, width in reversed(list(enumerate(ch))):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(ResBlock(c + skips.pop(), width, emb_dim))
                c = width
            if level > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.out_norm = nn.GroupNorm(min(8, c), c)
        self.out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output at ``x`` and times ``t`` (one per sample), the shape of ``x``."""
        cfg = self.config
        emb = self.time_mlp(timestep_embedding(t, cfg.channels[0]).to(x.dtype))
        h = self.stem(x)
        hs = [h]
        blocks = iter(self.down)
        for level in range(len(cfg.channels)):
            for _ in range(cfg.blocks_per_level):
                h = next(blocks)(h, emb)
                hs.append(h)
            if level < len(cfg.channels) - 1:
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        blocks = iter(self.up)
        ups = iter(self.upsample)
        for level in reversed(range(len(cfg.channels))):
            for _ in range(cfg.blocks_per_level + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), emb)
            if level > 0:
                h = next(ups)(F.interpolate(h, size=hs[-1].shape[-2:], mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))


@dataclass
class CheckpointInfo:
    """What a checkpoint says about its network and training."""

    network: dict[str, Any]
    schedule: str = "linear"
    predicts: str = "velocity"
    data: str = "mnist"
    data_transform: str = "x / 127.5 - 1"
    training: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: Path | str, net: UNet, info: CheckpointInfo,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``net``'s weights and ``info`` atomically to a safetensors file."""
    tensors = {f"net.{k}": v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    for key, value in (extra_tensors or {}).items():
        tensors[key] = value.detach().contiguous().cpu()
    metadata = {"lazyinterp": json.dumps(asdict(info))}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_checkpoint(path: Path | str) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Tensors and info of a checkpoint; raises :class:`CheckpointError` with a one-line reason."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; expected a .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        info = CheckpointInfo(**json.loads(metadata["lazyinterp"]))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a valid lazyinterp checkpoint ({exc})") from exc
    except Exception as exc:  # safetensors raises bare exceptions on some truncations
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({exc})") from exc
    return tensors, info


def load_network(path: Path | str) -> tuple[UNet, CheckpointInfo]:
    """Rebuild the UNet stored in ``path`` (in eval mode)."""
    tensors, info = read_checkpoint(path)
    cfg = dict(info.network)
    cfg["channels"] = tuple(cfg.get("channels", UNetConfig.channels))
    try:
        net = UNet(UNetConfig(**cfg))
        state = {k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")}
        net.load_state_dict(state)
    except (TypeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not match its network config ({exc})") from exc
    return net.eval(), info


def resolve_model_path(name_or_path: str) -> Path:
    """A bundled model name (``mnist``) or a checkpoint path."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model: expected a bundled name ({', '.join(BUNDLED)}) or a checkpoint path, "
                        f"got {type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    if name_or_path in BUNDLED:
        return BUNDLED[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists():
        return path
    raise CheckpointError(
        f"unknown model {name_or_path!r}: expected a bundled name ({', '.join(BUNDLED)}) "
        "or a path to a .safetensors checkpoint"
    )


EVAL_CHUNK = 50


def load_model(name_or_path: str | Path, device: torch.device | str = "cpu", chunk: int | None = EVAL_CHUNK
               ) -> tuple[Model, CheckpointInfo]:
    """A bundled model name or checkpoint path as an :class:`~lazyinterp.Model` ready for sampling.

    The network runs on fixed chunks of ``chunk`` samples so that samples do not depend on the batch size.
    """
    from .devices import check_device
    from .predictors import Model

    device = check_device(device)
    net, info = load_network(resolve_model_path(name_or_path))
    return Model(net.to(device), info.schedule, info.predicts, chunk=chunk), info
