import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

from lazyinterp.noise import (
    KeyedStreams,
    NoiseStreams,
    keyed_normals,
    mix64,
    sample_seed,
    sample_seeds,
    splitmix64,
)

F64 = torch.float64


def test_block_draws_depend_only_on_seed_and_index():
    whole = NoiseStreams(3, range(6), (2, 5)).draw_block(4)
    assert whole.shape == (4, 6, 2, 5) and whole.dtype == torch.float32
    part = NoiseStreams(3, [4, 1], (2, 5)).draw_block(4)
    assert torch.equal(part[:, 0], whole[:, 4]) and torch.equal(part[:, 1], whole[:, 1])
    assert not torch.equal(NoiseStreams(4, range(6), (2, 5)).draw_block(4), whole)
    # Draws within a block are independent standard normals.
    big = NoiseStreams(0, range(64), (32,), dtype=torch.float64).draw_block(16)
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02
    corr = torch.corrcoef(big[:, :, 0].T)
    assert float((corr - torch.eye(64)).abs().max()) < 0.8


def test_float32_and_float64_blocks_share_the_noise():
    a = NoiseStreams(1, range(3), (4,), dtype=torch.float64).draw_block(2)
    b = NoiseStreams(1, range(3), (4,), dtype=torch.float32).draw_block(2)
    torch.testing.assert_close(a.float(), b)


@pytest.mark.parametrize("count, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_block_count_is_validated(count, error):
    with pytest.raises(error, match="count: expected an integer >= 0"):
        NoiseStreams(0, range(2), (3,)).draw_block(count)


def test_seeds_differ_across_indices_and_base_seeds():
    seeds = {sample_seed(s, i) for s in range(4) for i in range(256)}
    assert len(seeds) == 4 * 256 and all(0 <= x < 2**63 for x in seeds)


def test_parallel_draws_equal_serial_draws():
    serial = NoiseStreams(5, range(7), (3, 4), workers=1)
    parallel = NoiseStreams(5, range(7), (3, 4), workers=3)
    assert torch.equal(serial.draw(), parallel.draw())
    assert torch.equal(serial.draw_block(5), parallel.draw_block(5))
    assert NoiseStreams(5, range(7), (3,)).workers == 1  # the CPU's cores run the network


@pytest.mark.parametrize("workers, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)])
def test_workers_are_validated(workers, error):
    with pytest.raises(error, match="workers: expected an integer >= 1"):
        NoiseStreams(0, range(2), (3,), workers=workers)


def _numpy_sample_seed(seed: int, index: int) -> int:
    state = np.random.SeedSequence(entropy=int(seed) & ((1 << 128) - 1), spawn_key=(int(index),))
    return int(state.generate_state(1, dtype=np.uint64)[0]) >> 1


def test_batched_seeds_equal_numpys_seed_sequence():
    # Seeds and indices of one to five 32-bit words, zero and negative seeds included.
    rng = random.Random(0)
    seeds = [0, 1, 2**32 - 1, 2**32, 2**64 + 5, 2**127 + 3, -1, -(2**70)]
    seeds += [rng.getrandbits(b) for b in (8, 40, 70, 128)]
    indices = [0, 1, 255, 2**32 - 1, 2**32, 2**62, 2**64 + 1, 2**100] + [rng.getrandbits(b) for b in (8, 33, 64)]
    for seed in seeds:
        assert sample_seeds(seed, indices) == [_numpy_sample_seed(seed, i) for i in indices]
        assert sample_seed(seed, indices[3]) == _numpy_sample_seed(seed, indices[3])
    # Ranges take a vectorised path; this one crosses from one word to two.
    span = range(2**32 - 3, 2**32 + 3, 2)
    assert sample_seeds(5, span) == [_numpy_sample_seed(5, i) for i in span]
    assert sample_seeds(5, range(0)) == []


def test_batched_seeds_refuse_negative_indices():
    with pytest.raises(ValueError, match="indices"):
        sample_seeds(0, [3, -1])
    with pytest.raises(ValueError, match="indices"):
        sample_seeds(0, range(-2, 3))


def test_indices_may_be_any_integer_sequence_but_not_floats():
    """A list, a tuple, an integer numpy array and an integer tensor of the same indices give the same seeds;
    float or boolean indices would be truncated silently, so they are refused."""
    expected = [_numpy_sample_seed(5, i) for i in (4, 1, 9)]
    for indices in ([4, 1, 9], (4, 1, 9), np.array([4, 1, 9]), torch.tensor([4, 1, 9]), [np.int64(4), 1, 9]):
        assert sample_seeds(5, indices) == expected
    for bad in ([4.0, 1.0], np.array([4.0]), torch.tensor([True]), [True], "41", 4):
        with pytest.raises(TypeError, match="indices: expected a range or a sequence of non-negative integers"):
            sample_seeds(5, bad)


MASK = (1 << 64) - 1


def _python_mix64(value: int) -> int:
    z = value & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_splitmix64_gives_the_published_reference_outputs():
    # The first outputs of SplitMix64 seeded with 0 (Vigna's splitmix64.c).
    out = splitmix64(torch.tensor(0, dtype=torch.int64), 4)
    assert [int(v) & MASK for v in out] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F,
                                            0xF88BB8A8724C81EC]


def test_mix64_wraps_like_unsigned_64_bit_arithmetic():
    rng = np.random.default_rng(0)
    values = [int(v) for v in rng.integers(-(1 << 63), (1 << 63) - 1, size=200, dtype=np.int64)]
    values += [0, -1, (1 << 63) - 1, -(1 << 63)]
    keys = torch.tensor(values, dtype=torch.int64)
    got = mix64(keys)
    assert [int(v) & MASK for v in got] == [_python_mix64(v) for v in values]
    assert torch.equal(keys, torch.tensor(values, dtype=torch.int64))  # the keys are not hashed in place
    with pytest.raises(TypeError, match="x: expected an int64 tensor"):
        mix64(torch.zeros(3))


def test_keyed_normals_are_independent_standard_normals():
    keys = torch.arange(2000, dtype=torch.int64) * 7919
    draws = keyed_normals(keys, 51)  # odd: the last pair is cut
    assert draws.shape == (2000, 51) and draws.dtype == F64
    assert stats.kstest(draws.flatten().numpy(), "norm").pvalue > 1e-3
    # Entries of one key, and the same entry across keys, are uncorrelated.
    corr = torch.corrcoef(draws.T)
    assert (corr - torch.eye(51, dtype=F64)).abs().max() < 4.5 / math.sqrt(2000)
    assert torch.equal(keyed_normals(keys[:7], 51), draws[:7])


def test_keyed_draws_depend_only_on_seed_index_and_step():
    whole = KeyedStreams(3, range(6), (2, 5)).draw_block(4)
    assert whole.shape == (4, 6, 2, 5) and whole.dtype == torch.float32
    part = KeyedStreams(3, [4, 1], (2, 5))
    one_by_one = torch.stack([part.draw() for _ in range(4)])
    assert torch.equal(one_by_one, whole[:, [4, 1]])
    split = KeyedStreams(3, range(6), (2, 5))
    assert torch.equal(torch.cat([split.draw_block(1), split.draw_block(0), split.draw_block(3)]), whole)
    assert not torch.equal(KeyedStreams(4, range(6), (2, 5)).draw_block(4), whole)
    wide = KeyedStreams(3, range(6), (2, 5), dtype=F64).draw_block(4)
    assert torch.equal(wide.float(), whole)


def test_keyed_streams_rebuilt_from_their_keys_draw_the_same():
    source = KeyedStreams(3, [4, 1, 7], (2, 5))
    rebuilt = KeyedStreams.from_keys(source.keys.clone(), (2, 5), F64)
    assert source.keys.dtype == torch.int64 and source.keys.shape == (3,)
    assert torch.equal(rebuilt.draw_block(4).float(), source.draw_block(4))
    assert torch.equal(rebuilt.draw(), KeyedStreams(3, [4, 1, 7], (2, 5), dtype=F64).draw_block(5)[4])
    for keys in (source.keys.double(), source.keys[None], [1, 2]):
        with pytest.raises(TypeError, match="keys: expected a 1-d int64 tensor"):
            KeyedStreams.from_keys(keys, (2, 5))
    with pytest.raises(ValueError, match="sample_shape"):
        KeyedStreams.from_keys(source.keys, (0,))


def test_keyed_draws_are_independent_standard_normals():
    draws = KeyedStreams(0, range(300), (7,), dtype=F64).draw_block(10)
    assert stats.kstest(draws.flatten().numpy(), "norm").pvalue > 1e-3
    # Uncorrelated across steps, and between neighbouring samples.
    over_steps = torch.corrcoef(draws[:, :, 0])
    assert (over_steps - torch.eye(10, dtype=F64)).abs().max() < 4.5 / math.sqrt(300)
    pairs = torch.stack([draws[:, :-1].flatten(), draws[:, 1:].flatten()])
    assert abs(float(torch.corrcoef(pairs)[0, 1])) < 4.5 / math.sqrt(pairs.shape[1])


def test_keyed_draws_of_a_large_batch_are_computed_in_parts_with_the_same_values(monkeypatch):
    import lazyinterp.noise as noise

    whole = KeyedStreams(9, range(5), (3, 4), dtype=F64).draw_block(6)
    monkeypatch.setattr(noise, "_KEYED_CHUNK", 25)  # two samples' worth per part, across step boundaries
    assert torch.equal(KeyedStreams(9, range(5), (3, 4), dtype=F64).draw_block(6), whole)


def test_keyed_streams_refuse_bad_arguments():
    with pytest.raises(ValueError, match="count: expected an integer >= 0"):
        KeyedStreams(0, range(2), (3,)).draw_block(-1)
    for kwargs, error, message in [
        (dict(seed=1.5), TypeError, "seed: expected an int"),
        (dict(indices=[-1]), ValueError, "indices: expected non-negative"),
        (dict(indices=[0.5, 1.0]), TypeError, "indices: expected a range or a sequence of non-negative integers"),
        (dict(indices=3), TypeError, "indices: expected a range or a sequence of non-negative integers"),
        (dict(sample_shape=(2, 0)), ValueError, "sample_shape: expected the shape of one sample, positive sizes"),
        (dict(sample_shape=(2, 1.0)), TypeError, "sample_shape: expected the shape of one sample, a tuple of integers"),
        (dict(sample_shape=3), TypeError, "sample_shape: expected the shape of one sample, a tuple of integers"),
        (dict(device="nope"), ValueError, "device: expected a torch device"),
        (dict(dtype=torch.int32), TypeError, "dtype: expected a floating-point torch.dtype"),
    ]:
        with pytest.raises(error, match=message):
            KeyedStreams(**{"seed": 1, "indices": range(2), "sample_shape": (3,), **kwargs})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_keyed_draws_on_cuda_are_the_cpu_draws():
    """Integer hashing is exact on any device; only Box–Muller's log, cos and sin may round apart."""
    cpu = KeyedStreams(2, range(64), (1, 28, 28), dtype=F64).draw_block(8)
    cuda = KeyedStreams(2, range(64), (1, 28, 28), dtype=F64, device="cuda").draw_block(8)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-12)
