"""Devices named by the user: parsed, and checked to exist on this machine before any work starts."""

from __future__ import annotations

from typing import Any, TypeAlias

import torch

# A device as torch.device() takes it: a torch.device or its name ('cpu', 'cuda:1').
DeviceLike: TypeAlias = torch.device | str


def check_device(device: Any, argument: str = "device", kinds: tuple[str, ...] | None = None) -> torch.device:
    """``device`` (a torch.device or its name) as a torch.device that can hold tensors here, or a ValueError
    naming ``argument``: an unknown name, a device type outside ``kinds`` (when given, e.g. the backends a process
    group supports), a backend this build of torch lacks (CUDA on a CPU-only wheel), a GPU index beyond the
    machine's, or the ``meta`` device, which holds no values to sample."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or (kinds is not None and dev.type not in kinds):
        expected = ("a torch device or its name ('cpu', 'cuda', 'cuda:1')" if kinds is None else
                    ", ".join(kinds) + (" or cuda:N" if "cuda" in kinds else ""))
        raise ValueError(f"{argument}: expected {expected}, got {device!r}")
    if dev.type == "meta":
        raise ValueError(f"{argument}: the meta device holds no values; expected e.g. 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{argument}: {str(device)!r} asked for, but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{argument}: {str(device)!r} asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        return dev
    if dev.type != "cpu":
        try:  # other backends (mps, xpu, ...) are usable when a tensor can be placed there
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise ValueError(f"{argument}: {str(device)!r} is not available here "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return dev
