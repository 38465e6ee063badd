"""Devices named by the user are checked before any work starts."""

import pytest
import torch

from lazyinterp.devices import check_device


def test_usable_devices_come_back_as_torch_devices():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("cpu")) == torch.device("cpu")
    if torch.cuda.is_available():
        assert check_device("cuda:0") == torch.device("cuda", 0)


@pytest.mark.parametrize("device,message", [
    ("tpu", "expected a torch device or its name"),
    (3.5, "expected a torch device or its name"),
    ("meta", "the meta device holds no values"),
])
def test_unknown_and_valueless_devices_are_refused(device, message):
    with pytest.raises(ValueError, match=f"^where: .*{message}"):
        check_device(device, "where")


def test_missing_gpus_are_refused_naming_what_is_there():
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        with pytest.raises(ValueError, match=f"device: 'cuda:{count}' asked for, but this machine has {count}"):
            check_device(f"cuda:{count}")
    else:
        for name in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match=f"device: '{name}' asked for, but CUDA is not available"):
                check_device(name)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here")
def test_a_backend_missing_from_this_build_is_refused():
    with pytest.raises(ValueError, match="device: 'mps' is not available here"):
        check_device("mps")


def test_kinds_limit_the_device_types():
    """A process group runs on gloo (CPU) or nccl (CUDA) only: other types are refused by name, unknown names the
    same way."""
    assert check_device("cpu:0", kinds=("cpu", "cuda")) == torch.device("cpu", 0)
    for device in ("mps", "meta", "gpu", "x:y"):
        with pytest.raises(ValueError, match=rf"^device: expected cpu, cuda or cuda:N, got '{device}'$"):
            check_device(device, kinds=("cpu", "cuda"))
    with pytest.raises(ValueError, match=r"^device: expected cpu, got 'cuda'$"):
        check_device("cuda", kinds=("cpu",))
