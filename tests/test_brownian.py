import math

import pytest
import torch
from scipy import stats

from lazyinterp.brownian import BrownianPaths

F64 = torch.float64
def _paths(**kw):
    return BrownianPaths(kw.pop("seed", 5), kw.pop("indices", range(400)), kw.pop("shape", (50,)), dtype=F64, **kw)


def test_values_have_the_covariance_of_brownian_motion():
    # Dyadic times, times inside one leaf (bridged in turn) and times in separate leaves.
    times = [0.0, 0.1, 0.25, 0.3, 0.3 + 1e-5, 0.3 + 3e-5, 0.5, 0.77, 1.0]
    w = _paths(depth=8).values(times).reshape(len(times), -1)  # 20000 paths
    t = torch.tensor(times, dtype=F64)
    expected = torch.minimum(t[:, None], t[None, :])
    empirical = w @ w.T / w.shape[1]
    assert (empirical - expected).abs().max() < 5 * math.sqrt(2 / w.shape[1])
    increments = torch.diff(w, dim=0)
    spans = torch.diff(t)
    assert torch.allclose(increments.var(dim=1) / spans, torch.ones_like(spans), atol=0.05)
    assert stats.kstest((increments[3] / spans[3].sqrt()).numpy(), "norm").pvalue > 1e-3  # within a leaf


def test_a_refined_grid_reads_the_same_path():
    paths = _paths(indices=range(6), shape=(3,))
    coarse = torch.tensor([0.0, 0.013, 0.2, 0.5, 0.9, 1.0], dtype=F64)
    fine = torch.sort(torch.cat([coarse, torch.rand(60, generator=torch.Generator().manual_seed(1), dtype=F64)
                                 * 0.98 + 0.01])).values
    at = [int((fine == t).nonzero()[0]) for t in coarse]
    assert torch.equal(paths.values(coarse), paths.values(fine)[at])
    # Increments over the fine grid sum to those over the coarse one.
    xi_fine = paths.increments(fine) * torch.diff(fine).sqrt().view(-1, 1, 1)
    xi_coarse = paths.increments(coarse) * torch.diff(coarse).sqrt().view(-1, 1, 1)
    summed = torch.stack([xi_fine[a:b].sum(0) for a, b in zip(at[:-1], at[1:], strict=True)])
    assert torch.allclose(summed, xi_coarse, atol=1e-12)


def test_paths_depend_on_the_seed_and_sample_only():
    grid = torch.linspace(0, 1, 9, dtype=F64)
    whole = _paths(indices=range(8), shape=(2, 3)).values(grid)
    part = _paths(indices=[6, 1], shape=(2, 3)).values(grid)
    assert torch.equal(part, whole[:, [6, 1]])
    assert not torch.equal(_paths(seed=6, indices=range(8), shape=(2, 3)).values(grid), whole)
    low = BrownianPaths(5, range(8), (2, 3), dtype=torch.float32).increments(grid)
    assert low.dtype == torch.float32
    assert torch.equal(low, _paths(indices=range(8), shape=(2, 3)).increments(grid).float())


def test_bad_arguments_are_refused():
    paths = _paths(indices=range(2), shape=(3,))
    with pytest.raises(ValueError, match=r"times: expected times in \[0, 1\]"):
        paths.values([0.5, 1.5])
    with pytest.raises(ValueError, match="times: expected times"):
        paths.values([float("nan")])
    with pytest.raises(ValueError, match="grid: expected an increasing grid"):
        paths.increments([0.0, 0.5, 0.5, 1.0])
    for depth, error in ((0, ValueError), (53, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="depth: expected an integer from 1 to 52"):
            BrownianPaths(0, range(2), (3,), depth=depth)
    with pytest.raises(TypeError, match="times: expected a 1-D sequence of times"):
        paths.values("x")
    with pytest.raises(ValueError, match="grid: expected a 1-D sequence of times"):
        paths.increments([[0.0, 1.0]])
    with pytest.raises(ValueError, match=r"grid: expected times in \[0, 1\]"):
        paths.increment_blocks([0.0, 0.5, 1.5])  # refused when called, not when first read
    with pytest.raises(ValueError, match="block: expected an integer >= 1"):
        paths.increment_blocks([0.0, 1.0], block=0)
    with pytest.raises(TypeError, match="block: expected an integer >= 1"):
        paths.increment_blocks([0.0, 1.0], block=1.5)
    for kwargs, error, message in [
        (dict(seed="a"), TypeError, "seed: expected an int"),
        (dict(seed=1.5), TypeError, "seed: expected an int"),
        (dict(indices=[-1]), ValueError, "indices: expected non-negative"),
        (dict(indices=[0.5, 1.0]), TypeError, "indices: expected a range or a sequence of non-negative integers"),
        (dict(indices=3), TypeError, "indices: expected a range or a sequence of non-negative integers"),
        (dict(sample_shape=(0,)), ValueError, "sample_shape: expected the shape of one sample, positive sizes"),
        (dict(sample_shape="ab"), TypeError, "sample_shape: expected the shape of one sample, a tuple of integers"),
        (dict(device="nope"), ValueError, "device: expected a torch device"),
        (dict(dtype=torch.int64), TypeError, "dtype: expected a floating-point torch.dtype"),
    ]:
        with pytest.raises(error, match=message):
            BrownianPaths(**{"seed": 1, "indices": range(2), "sample_shape": (3,), **kwargs})


def test_increments_in_blocks_equal_the_whole_grid():
    # Clusters of times inside single leaves, so that blocks must not split them.
    paths = _paths(indices=range(4), shape=(2,), depth=6)
    base = torch.linspace(0, 1, 41, dtype=F64)[1:-1]
    grid = torch.sort(torch.cat([torch.tensor([0.0, 1.0], dtype=F64), base, base + 1e-4, base + 2e-4])).values
    whole = torch.diff(paths.values(grid), dim=0) / torch.diff(grid).sqrt().view(-1, 1, 1)
    for block in (1, 2, 5, 32, 1000):
        blocks = list(paths.increment_blocks(grid, block=block))
        torch.testing.assert_close(torch.cat(blocks), whole, rtol=1e-13, atol=1e-13)
        assert len(blocks) > 1 or block == 1000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_paths_on_cuda_are_the_cpu_paths():
    """The keys are integer arithmetic, the same on any device; only Box–Muller's log, cos and sin may round apart."""
    grid = torch.tensor([0.0, 0.013, 0.2, 0.2 + 1e-7, 0.5, 0.9, 1.0], dtype=F64)
    cpu = BrownianPaths(3, range(9), (4, 5), dtype=F64).increments(grid)
    cuda = BrownianPaths(3, range(9), (4, 5), device="cuda", dtype=F64).increments(grid)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-12, atol=1e-12)
