import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from lazyinterp import data, distributed
from lazyinterp.cli import main
from lazyinterp.training import TrainConfig, train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    images, _ = data.load("mnist", "test")
    cfg = TrainConfig(steps=2, batch_size=8, channels=(8, 16), checkpoint_every=10, warmup=1)
    return train(cfg, tmp_path_factory.mktemp("ckpt"), images=images[:32], progress=False)


def sample_args(checkpoint, out, schedule, batch_size, *extra):
    return ["sample", "--model", str(checkpoint), "--schedule", schedule, "--steps", "2", "-n", "11",
            "--seed", "5", "--shard-size", "4", "--batch-size", str(batch_size), "--out", str(out), "--quiet",
            *extra]


def torchrun(nproc, args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "lazyinterp", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize(("schedule", "extra"), [("lazy-vp", ()), ("point-mass", ()),
                                                 ("point-mass", ("--sde-noise", "keyed"))])
def test_two_gloo_processes_match_one_process_bit_for_bit(checkpoint, tmp_path, schedule, extra):
    one = tmp_path / "one.npz"
    result = CliRunner().invoke(main, sample_args(checkpoint, one, schedule, 3, *extra))
    assert result.exit_code == 0, result.output
    two = tmp_path / "two.npz"
    proc = torchrun(2, sample_args(checkpoint, two, schedule, 2, *extra))
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = np.load(one)["samples"], np.load(two)["samples"]
    assert a.shape == (11, 1, 28, 28)
    assert np.array_equal(a, b)
    assert not distributed.shard_dir(two).exists()


def test_interrupted_run_resumes_to_the_identical_result(checkpoint, tmp_path):
    straight = tmp_path / "straight.npz"
    assert CliRunner().invoke(main, sample_args(checkpoint, straight, "lazy-vp", 4)).exit_code == 0
    out = tmp_path / "resumed.npz"
    first = CliRunner().invoke(main, sample_args(checkpoint, out, "lazy-vp", 4, "--max-shards", "1"))
    assert first.exit_code == 0 and "run the same command again" in first.output
    assert not out.exists()
    shards = sorted(p.name for p in distributed.shard_dir(out).glob("shard-*"))
    assert shards == ["shard-00000-of-00003.npz"]
    # A half-written temporary file from a killed writer is ignored.
    (distributed.shard_dir(out) / ".shard-00001-of-00003.npz.abc.tmp").write_bytes(b"partial")
    second = CliRunner().invoke(main, sample_args(checkpoint, out, "lazy-vp", 4))
    assert second.exit_code == 0, second.output
    assert np.array_equal(np.load(straight)["samples"], np.load(out)["samples"])


def test_shards_are_computed_when_asked_for():
    shards = distributed.shard_ranges(11, 4)
    assert len(shards) == 3 and list(shards) == [range(0, 4), range(4, 8), range(8, 11)]
    assert shards[-1] == range(8, 11) and shards[1:] == [range(4, 8), range(8, 11)]
    with pytest.raises(IndexError):
        shards[3]
    assert len(distributed.shard_ranges(12, 4)) == 3 and list(distributed.shard_ranges(3, 10)) == [range(0, 3)]
    huge = distributed.shard_ranges(10**15, 2)  # no list of 5 * 10^14 ranges
    assert len(huge) == 5 * 10**14 and huge[-1] == range(10**15 - 2, 10**15)
    with pytest.raises(ValueError, match="shard_size: expected at least 1"):
        distributed.shard_ranges(10, 0)


def test_a_job_of_any_size_makes_its_first_shards_and_stops(checkpoint, tmp_path):
    out = tmp_path / "huge.npz"
    args = sample_args(checkpoint, out, "lazy-vp", 4, "--max-shards", "1")
    args[args.index("-n") + 1] = str(10**12)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "stopped with 1 of 250000000000 shards" in result.output
    assert [p.name for p in distributed.shard_dir(out).glob("shard-*")] == ["shard-00000-of-250000000000.npz"]


def test_resume_refuses_shards_of_other_settings(checkpoint, tmp_path):
    out = tmp_path / "x.npz"
    CliRunner().invoke(main, sample_args(checkpoint, out, "lazy-vp", 4, "--max-shards", "1"))
    result = CliRunner().invoke(main, sample_args(checkpoint, out, "linear", 4))
    assert result.exit_code != 0 and "other settings" in result.output


def test_a_run_that_failed_before_its_first_shard_does_not_block_the_next(checkpoint, tmp_path):
    """A setting refused inside sampling leaves a manifest but no shard; a corrected run starts afresh."""
    out = tmp_path / "x.npz"
    failed = CliRunner().invoke(main, sample_args(checkpoint, out, "lazy-vp", 4, "--grid-shift", "1e-30"))
    assert failed.exit_code != 0 and "--grid-shift: 1e-30 moves nodes" in failed.output
    assert not any(distributed.shard_dir(out).glob("shard-*"))
    result = CliRunner().invoke(main, sample_args(checkpoint, out, "lazy-vp", 4, "--grid-shift", "2"))
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_fid_statistics_reduce_across_processes(checkpoint, tmp_path):
    args = ["--fid"]
    one = CliRunner().invoke(main, sample_args(checkpoint, tmp_path / "a.npz", "lazy-vp", 4, *args))
    assert one.exit_code == 0, one.output
    proc = torchrun(2, sample_args(checkpoint, tmp_path / "b.npz", "lazy-vp", 4, *args))
    assert proc.returncode == 0, proc.stderr[-2000:]
    fid_one = [line for line in one.output.splitlines() if line.startswith("FID-MNIST")]
    fid_two = [line for line in proc.stdout.splitlines() if line.startswith("FID-MNIST")]
    assert len(fid_one) == 1 and len(fid_two) == 1
    assert float(fid_one[0].split()[1]) == pytest.approx(float(fid_two[0].split()[1]), rel=1e-6)


def test_bench_over_two_gloo_processes_matches_one_process(checkpoint, tmp_path):
    """Each rank samples a share of every run; the samples, hence the path errors, are bit-identical, and FID
    (feature moments all-reduced across ranks) agrees to rounding."""
    samplers = "linear-euler,lazy-vp-ab2,point-mass-sde"
    if importlib.util.find_spec("diffusers") is not None:
        samplers += ",fm-euler"
    args = ["bench", "--workload", "mnist", "--model", str(checkpoint), "-n", "11", "--nfe", "1,2",
            "--reference-nfe", "4", "--samplers", samplers, "--no-overhead", "--quiet",
            "--work-dir", str(tmp_path / "work")]
    one = CliRunner().invoke(main, [*args, "--batch-size", "4", "--json", str(tmp_path / "one.json")])
    assert one.exit_code == 0, one.output
    proc = torchrun(2, [*args, "--batch-size", "3", "--json", str(tmp_path / "two.json")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert (a["processes"], b["processes"]) == (1, 2)
    assert b["reference"]["value"] == pytest.approx(a["reference"]["value"], rel=1e-6)
    assert len(a["results"]) == len(b["results"]) == len(samplers.split(",")) * 2
    for x, y in zip(a["results"], b["results"], strict=True):
        assert (x["sampler"], x["nfe"], x["path_error"]) == (y["sampler"], y["nfe"], y["path_error"])
        assert y["value"] == pytest.approx(x["value"], rel=1e-6)
        # The classifier sees batches of another size on each rank: float32 kernels differ in the last bits.
        assert y["mean_confidence"] == pytest.approx(x["mean_confidence"], rel=1e-6)
    assert list((tmp_path / "work").iterdir()) == []
