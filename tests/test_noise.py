import random

import numpy as np
import pytest
import torch

from lazyinterp.noise import NoiseStreams, sample_seed, sample_seeds


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


@pytest.mark.parametrize("count", [-1, 1.5, True])
def test_block_count_is_validated(count):
    with pytest.raises(ValueError, match="count"):
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


@pytest.mark.parametrize("workers", [0, -2, 1.5, True])
def test_workers_are_validated(workers):
    with pytest.raises(ValueError, match="workers"):
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


def test_batched_seeds_refuse_negative_indices():
    with pytest.raises(ValueError, match="indices"):
        sample_seeds(0, [3, -1])
