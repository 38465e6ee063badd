import importlib.util
import json
import math

import pytest
import torch
from click.testing import CliRunner

import lazyinterp as li
from lazyinterp.bench import (
    MAX_REFERENCE_NFE,
    SAMPLERS,
    SDE_REFERENCE_STEPS,
    SamplerDef,
    bench,
    check_mode_scale,
    code_identity,
    diffusers_sample,
    gmm_2d,
    linear_velocity,
    markdown_report,
    parse_nfe,
    run_bench,
    scale_modes,
    sde_reference_grid,
    summary,
)
from lazyinterp.bench import runs as runs_module
from lazyinterp.noise import NoiseStreams

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
HAS_FLOW_MATCHING = importlib.util.find_spec("flow_matching") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def available(spec) -> bool:
    return {"diffusers": HAS_DIFFUSERS, "flow_matching": HAS_FLOW_MATCHING}.get(spec.kind, True)


def test_plans_cost_exactly_the_requested_nfe():
    for spec in SAMPLERS:
        for k in range(1, 21):
            plan = spec.plan(k)
            second_order = spec.options.get("solver") == "heun" or spec.options.get("scheduler") == "heun"
            if plan is None:
                assert second_order or spec.kind == "flow_matching", (spec.name, k)
                continue
            steps = plan["steps"]
            if spec.kind == "li":
                solver = spec.options.get("solver", "euler")
                assert li.count_nfe(solver, steps, plan["last_step"], spec.known_start) == k, (spec.name, k)
                if second_order:
                    assert steps >= 2 or plan["last_step"] == "euler", (spec.name, k)
            elif spec.kind == "fitted":  # N + 1 steps, the first without the network
                assert steps == k + 1, (spec.name, k)
            elif spec.kind == "diffusers":
                assert (2 * steps - 1 if second_order else steps) == k, (spec.name, k)
                assert not second_order or steps >= 2
            else:
                assert 2 * steps == k
    heun = next(s for s in SAMPLERS if s.name == "lazy-vp-heun")
    # Lazy VP centres the data, so its first evaluation (at t = 0) is free: Heun costs 2N − 1, or 2N − 2 with a
    # denoising last step.
    assert heun.known_start and heun.plan(1) == {"steps": 1, "last_step": "euler"}
    assert heun.plan(4) == {"steps": 3, "last_step": "denoise"}
    linear_heun = SamplerDef("x", "x", "baseline", "li", {"schedule": "linear", "solver": "heun"})
    assert linear_heun.plan(1) is None and linear_heun.plan(3) == {"steps": 2, "last_step": "denoise"}
    euler = next(s for s in SAMPLERS if s.name == "lazy-vp-euler")
    assert euler.plan(4) == {"steps": 5, "last_step": "euler"}


def test_parse_nfe():
    assert parse_nfe("4, 1,2,2") == [1, 2, 4]
    for bad in ("0", "a", "", "1,-2", "1.5"):
        with pytest.raises(ValueError, match="nfe"):
            parse_nfe(bad)


@pytest.mark.parametrize("arguments, name, error", [
    ({"workload": "cifar"}, "workload", ValueError), ({"n": 1}, "n", ValueError), ({"n": True}, "n", TypeError),
    ({"n": 2.5}, "n", TypeError), ({"reference_nfe": 1}, "reference_nfe", ValueError),
    ({"reference_nfe": MAX_REFERENCE_NFE + 1}, "reference_nfe", ValueError),
    ({"batch_size": 0}, "batch_size", ValueError),
    ({"batch_size": "all"}, "batch_size", TypeError), ({"max_runs": 0}, "max_runs", ValueError),
    ({"chunk": 0}, "chunk", ValueError), ({"chunk": 1.0}, "chunk", TypeError),
])
def test_run_bench_names_an_argument_out_of_bounds_before_sampling(tmp_path, arguments, name, error):
    arguments = {"workload": "gmm-2d", **arguments}
    with pytest.raises(error, match=f"^{name}: "):
        run_bench(nfe=[1], samplers=["linear-euler"], progress=False, work_dir=tmp_path, **arguments)
    assert list(tmp_path.iterdir()) == []


def test_gmm2d_bench_writes_valid_outputs(tmp_path):
    names = ["linear-euler", "linear-em-clipped", "lazy-vp-euler", "lazy-vp-euler-model-grid", "lazy-vp-heun",
             "point-mass-sde"]
    if HAS_DIFFUSERS:
        names += ["fm-euler", "fm-heun"]
    if HAS_FLOW_MATCHING:
        names.append("fmlib-cosine-midpoint")
    out_json, out_md, out_png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    result = CliRunner().invoke(bench, [
        "--workload", "gmm-2d", "--n", "200", "--nfe", "1,2,4", "--reference-nfe", "40", "--seed", "3",
        "--samplers", ",".join(names), "--json", str(out_json), "--markdown", str(out_md), "--plot", str(out_png),
        "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads(out_json.read_text())
    assert data["workload"] == "gmm-2d" and data["metric"] == "sliced_w2" and data["n"] == 200
    assert data["reference"]["nfe"] == 40 and data["reference"]["value"] > 0
    families = {r["family"] for r in data["results"]}
    assert {"baseline", "ours"} <= families
    if HAS_DIFFUSERS or HAS_FLOW_MATCHING:
        assert "peer" in families
    ran = {(r["sampler"], r["nfe"]) for r in data["results"]}
    skipped = {(s["sampler"], s["nfe"]) for s in data["skipped"]}
    for name in names:
        spec = next(s for s in SAMPLERS if s.name == name)
        for k in (1, 2, 4):
            assert ((name, k) in ran) == (spec.plan(k) is not None), (name, k)
            assert ((name, k) in skipped) == (spec.plan(k) is None), (name, k)
    assert ("lazy-vp-heun", 1) in ran and ("lazy-vp-heun", 2) in ran
    value = {(r["sampler"], r["nfe"]): r["value"] for r in data["results"]}
    assert value[("lazy-vp-euler", 2)] != value[("lazy-vp-euler-model-grid", 2)]  # the grids really differ
    for r in data["results"]:
        assert r["nfe"] in (1, 2, 4) and set(r) >= {"sampler", "family", "nfe", "value", "seconds", "path_error"}
        assert math.isfinite(r["value"]) and r["value"] >= 0 and r["seconds"] >= 0
        assert (r["path_error"] is None) == r["stochastic"]
    table = out_md.read_text()
    assert "| lazy VP Euler, uniform grid | ours |" in table and "**" in table
    # The summary: lazy Euler at 1 and 2 NFE against linear Euler at 2 and 4, as in the rows themselves.
    assert [e["n"] for e in data["summary"]["euler_vs_linear_euler_2n"]] == [1, 2]
    for e in data["summary"]["euler_vs_linear_euler_2n"]:
        assert e["linear_value"] == value[("linear-euler", 2 * e["n"])]
        assert e["lazy_value"] == min(value[(name, e["n"])] for name in ("lazy-vp-euler", "lazy-vp-euler-model-grid"))
    assert "Lazy Euler at N NFE" in table
    assert "Reference: linear Heun at 40 NFE" in table
    assert table in result.stdout
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md", "r.png"]


def test_ode_samplers_converge_to_the_reference_path(monkeypatch):
    """Every ODE sampler solves the same probability-flow ODE (the schedule conversions are exact), so at 64 NFE
    on the exact mixture velocity each lands on the converged linear-Heun solution from the same noise."""
    # The fitted sampler starts from DDIM's steps, converged at 64 NFE; a short fit keeps the test short.
    monkeypatch.setattr(runs_module, "FIT_SAMPLES", 256)
    monkeypatch.setattr(runs_module, "FIT_ITERATIONS", 20)
    names = [s.name for s in SAMPLERS if not s.stochastic and available(s)]
    data = run_bench("gmm-2d", nfe=[64], n=300, reference_nfe=400, samplers=names, progress=False)
    assert {r["sampler"] for r in data["results"]} == set(names) - {"fm-heun"}  # 2N − 1 is odd
    for r in data["results"]:
        # First-order pieces (an Euler or a denoising last step) leave O(h) ≈ 0.02 at h = 1/32.
        assert r["path_error"] < 0.03, r
    few = run_bench("gmm-2d", nfe=[4], n=300, reference_nfe=400, samplers=["linear-euler"], progress=False)
    assert few["results"][0]["path_error"] > 0.05  # the metric sees discretisation error when there is some


def test_sde_samplers_converge_to_the_sde_reference_on_shared_brownian_paths():
    """On shared Brownian paths the point-mass SDE samplers approach the 512-step Euler–Maruyama solution of their
    SDE as NFE grows (strong convergence); samplers of another SDE, and ODE samplers, get no SDE path error."""
    names = ["point-mass-sde-model-grid", "point-mass-sde-ab2", "linear-em-clipped", "linear-euler"]
    data = run_bench("gmm-2d", nfe=[4, 128], n=300, reference_nfe=20, samplers=names, progress=False)
    assert data["sde_reference"]["nfe"] == 511 and data["sde_reference"]["steps"] == 512
    error = {(r["sampler"], r["nfe"]): r.get("sde_path_error") for r in data["results"]}
    for name in ("point-mass-sde-model-grid", "point-mass-sde-ab2"):
        assert error[(name, 128)] < 0.1 * error[(name, 4)], error
        assert error[(name, 128)] < 0.05
    assert all(error[(name, k)] is None for name in ("linear-em-clipped", "linear-euler") for k in (4, 128))
    assert "SDE path error" in markdown_report(data)
    off = run_bench("gmm-2d", nfe=[4], n=300, reference_nfe=20, samplers=["point-mass-sde"], progress=False,
                    sde_path_error=False)
    assert off["sde_reference"] is None and "sde_path_error" not in off["results"][0]


@pytest.mark.parametrize("sigma", [0.5, 1.5])
def test_sde_reference_grid_is_dyadic_and_close_to_the_snr_matched_grid(sigma):
    grid = sde_reference_grid(sigma)
    snr = li.snr_matched_grid(SDE_REFERENCE_STEPS, li.point_mass(sigma), "linear")
    assert grid[0] == 0 and grid[-1] == 1 and bool((torch.diff(grid) > 0).all())
    assert torch.equal(torch.round(grid * 2.0**20) / 2.0**20, grid)  # on the Brownian paths' nodes
    assert len(grid) == len(snr)
    assert torch.allclose(torch.diff(grid), torch.diff(snr), rtol=0.13, atol=0)


def test_mode_scale_multiplies_the_component_covariances_and_keeps_the_rest():
    """Cov X = Σ_k w_k (C_k + (m_k − μ)(m_k − μ)ᵀ): scaling every C_k by s moves Cov X by (s − 1) Σ_k w_k C_k."""
    base = gmm_2d()
    wide = scale_modes(base, 4.0)
    torch.testing.assert_close(wide.covs, 4.0 * base.covs)
    torch.testing.assert_close(wide.means, base.means)
    torch.testing.assert_close(wide.weights, base.weights)
    within = (base.weights[:, None, None] * base.covs).sum(0)
    torch.testing.assert_close(wide.cov, base.cov + 3.0 * within)
    assert scale_modes(base, 1.0) is base


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), (True, TypeError), ("2", TypeError)])
def test_mode_scale_refuses_what_is_not_a_positive_number(bad, error):
    with pytest.raises(error, match="^mode_scale: expected a positive"):
        check_mode_scale(bad)


def test_mode_scale_reaches_the_target_the_cache_and_the_report(tmp_path):
    def run(scale):
        return run_bench("gmm-2d", nfe=[2], n=200, reference_nfe=8, samplers=["linear-euler"], progress=False,
                         mode_scale=scale, work_dir=tmp_path)

    plain, wide = run(1.0), run(4.0)
    assert wide["workload_info"]["mode_scale"] == 4.0
    assert "with component covariances × 4" in markdown_report(wide)
    assert "covariances" not in markdown_report(plain)
    # The same noise through the same sampler: only the target differs, so the reference moves.
    assert wide["reference"]["value"] != plain["reference"]["value"]
    assert wide["results"][0]["path_error"] != plain["results"][0]["path_error"]
    with pytest.raises(ValueError, match="mode_scale: only the mixture"):
        run_bench("mnist", nfe=[1], n=4, mode_scale=2.0, progress=False)


def test_diffusers_euler_loop_reproduces_linear_euler():
    diffusers = pytest.importorskip("diffusers")
    model = li.GaussianMixture.gaussian(torch.zeros(3), torch.tensor(1.0)).model("linear")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    model.nfe = 0
    ours = diffusers_sample(sched, linear_velocity(model), noise, 6)
    assert model.nfe == 6
    grid = 1.0 - sched.sigmas.double()  # the scheduler's own grid, 1 → 0.001 → 0 in σ
    native = li.sample(model, noise, schedule="linear", grid=grid)
    torch.testing.assert_close(ours, native, atol=2e-5, rtol=1e-5)
    uniform = li.sample(model, noise, schedule="linear", steps=6)
    assert (ours - uniform).abs().max() > 1e-3  # the comparison would notice a different grid


def invoke(args):
    result = CliRunner().invoke(bench, args)
    return result, result.stderr.strip().splitlines()


@pytest.mark.parametrize("args, needle", [
    (["--workload", "cifar"], "--workload"),
    (["--nfe", "0"], "--nfe"),
    (["--nfe", "a"], "--nfe"),
    (["--nfe", "1,,2.5"], "--nfe"),
    (["--n", "1"], "--n"),
    (["--n", "many"], "--n"),
    (["--samplers", "lazy-vp-euler,nope"], "nope"),
    (["--reference-nfe", "1"], "--reference-nfe"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
    (["--max-runs", "0"], "--max-runs: expected an integer >= 1, got 0"),
    (["--chunk", "-3"], "--chunk: expected an integer >= 1, got -3"),
    (["--reference-nfe", "1000000000000"], "--reference-nfe: expected an integer from 2 to 2097152"),
    (["--nfe", "4,1000000000000"], "--nfe: each NFE must be from 1 to 1048576"),
    (["--mode-scale", "0"], "--mode-scale"),
    (["--mode-scale", "nan"], "--mode-scale"),
    (["--mode-scale", "wide"], "--mode-scale"),
    (["--workload", "mnist", "--mode-scale", "2"], "--mode-scale"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, needle):
    out = tmp_path / "out.json"
    result, lines = invoke([*args, "--json", str(out), "--quiet"])
    assert result.exit_code != 0
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_returns_nan_is_a_one_line_error(tmp_path):
    from lazyinterp.models import load_network, resolve_model_path, save_checkpoint

    net, info = load_network(resolve_model_path("mnist"))
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    broken = tmp_path / "nan.safetensors"
    save_checkpoint(broken, net, info)
    out = tmp_path / "out.json"
    result, lines = invoke(["--workload", "mnist", "--model", str(broken), "--n", "4", "--nfe", "1", "--samplers",
                            "linear-euler", "--reference-nfe", "2", "--work-dir", str(tmp_path / "work"),
                            "--json", str(out), "--quiet"])
    assert result.exit_code != 0
    assert len(lines) == 1 and lines[0].startswith("error: reference (linear Heun, 2 NFE)"), result.stderr
    assert "NaN" in lines[0] and not out.exists()


def test_cli_unwritable_outputs_leave_no_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for option in ("--json", "--markdown", "--plot"):
        result, lines = invoke(["--n", "20", "--nfe", "1", "--samplers", "linear-euler", "--reference-nfe", "4",
                                option, str(blocker / "out"), "--quiet"])
        assert result.exit_code != 0 and len(lines) == 1 and option in lines[0], result.stderr
    result, lines = invoke(["--json", str(tmp_path / "missing" / "out.json"), "--quiet"])
    assert result.exit_code != 0 and len(lines) == 1 and "does not exist" in lines[0]
    result, lines = invoke(["--json", str(tmp_path), "--quiet"])
    assert result.exit_code != 0 and len(lines) == 1 and "directory" in lines[0]
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_cli_failure_during_the_run_writes_nothing(tmp_path):
    out = tmp_path / "r.json"
    result, lines = invoke(["--workload", "mnist", "--model", str(tmp_path / "absent.safetensors"), "--n", "4",
                            "--json", str(out), "--quiet"])
    assert result.exit_code != 0 and len(lines) == 1 and "does not exist" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


RESUME_ARGS = ["--workload", "gmm-2d", "--n", "120", "--nfe", "1,2,4", "--reference-nfe", "20", "--seed", "2",
               "--samplers", "linear-euler,lazy-vp-ab2,point-mass-sde", "--quiet"]


def _values(path):
    data = json.loads(path.read_text())
    return data["reference"]["value"], [(r["sampler"], r["nfe"], r["value"], r["path_error"]) for r in data["results"]]


def test_interrupted_bench_resumes_to_the_identical_result(tmp_path):
    work = tmp_path / "work"
    straight = tmp_path / "straight.json"
    result, _ = invoke([*RESUME_ARGS, "--work-dir", str(work), "--json", str(straight)])
    assert result.exit_code == 0, result.stderr
    assert list(work.iterdir()) == []  # a finished benchmark leaves nothing behind

    out = tmp_path / "resumed.json"
    first, _ = invoke([*RESUME_ARGS, "--work-dir", str(work), "--json", str(out), "--max-runs", "4"])
    assert first.exit_code == 0 and "run the same command again" in first.stdout, first.output
    assert not out.exists()
    (folder,) = work.iterdir()
    assert len(list(folder.glob("run-*.json"))) == 4 and (folder / "reference.safetensors").is_file()
    # A temporary file left by a writer killed mid-write is ignored.
    (folder / ".run-lazy-vp-ab2-4.json.x.tmp").write_text('{"sampler": "lazy-vp-ab2", "nfe": ')
    second = CliRunner().invoke(bench, [*RESUME_ARGS[:-1], "--work-dir", str(work), "--json", str(out)])
    assert second.exit_code == 0, second.output
    assert "resuming from" in second.stderr and "4 runs are cached" in second.stderr
    assert _values(out) == _values(straight)
    assert not folder.exists()


def test_bench_cache_is_kept_per_configuration_and_fresh_discards_it(tmp_path):
    work = tmp_path / "work"
    invoke([*RESUME_ARGS, "--work-dir", str(work), "--max-runs", "1"])
    invoke([*RESUME_ARGS[:2], "--n", "130", *RESUME_ARGS[4:], "--work-dir", str(work), "--max-runs", "1"])
    folders = sorted(work.iterdir())
    assert len(folders) == 2  # another n is another configuration, never mixed with the first
    for folder in folders:
        assert len(list(folder.glob("run-*.json"))) == 1
    result, _ = invoke([*RESUME_ARGS, "--work-dir", str(work), "--fresh", "--max-runs", "2"])
    assert result.exit_code == 0
    counts = sorted(len(list(f.glob("run-*.json"))) for f in work.iterdir())
    assert counts == [1, 2]  # the fresh run started over: 2 new runs, not 1 cached + 2 new


def test_unreadable_bench_cache_is_a_one_line_error(tmp_path):
    work = tmp_path / "work"
    invoke([*RESUME_ARGS, "--work-dir", str(work), "--max-runs", "1"])
    (folder,) = work.iterdir()
    (folder / "reference.safetensors").write_bytes(b"\0" * 10)
    result, lines = invoke([*RESUME_ARGS, "--work-dir", str(work)])
    assert result.exit_code != 0 and len(lines) == 1 and "--fresh" in lines[0], result.stderr
    result, _ = invoke([*RESUME_ARGS, "--work-dir", str(work), "--fresh"])
    assert result.exit_code == 0, result.stderr


def test_cli_device_errors_are_one_line(tmp_path):
    for device, needle in (("tpu", "expected cpu, cuda"), ("cuda:0" if not torch.cuda.is_available() else "x",
                                                            "--device")):
        result, lines = invoke([*RESUME_ARGS, "--device", device, "--work-dir", str(tmp_path)])
        assert result.exit_code != 0 and len(lines) == 1 and needle in lines[0], result.stderr


def test_overhead_measurement_tells_a_cheap_network_from_a_costly_one():
    import time

    from lazyinterp.bench import measure_overhead

    class Net(torch.nn.Module):
        def __init__(self, seconds):
            super().__init__()
            self.seconds = seconds

        def forward(self, x, t):
            if self.seconds:
                time.sleep(self.seconds)
            return -x

    def overhead(seconds, direct=False):
        model = li.Model(Net(seconds), "linear", "velocity")
        # A batch other than the 8 probes of the E[X] and σ estimates, which call the network with their own.
        return measure_overhead(model, (4,), torch.float64, batch=6, steps=6, repeats=3, direct=direct)

    costly, cheap = overhead(0.02), overhead(0.0)
    assert set(costly) == {"lazy-vp-euler", "point-mass-sde", "point-mass-sde-exp2m", "point-mass-sde-keyed",
                           "point-mass-sde-exp2m-keyed"}
    for name in costly:
        # li.sample's own work per step (well under a millisecond) against 20 ms networks, and against a
        # network that costs next to nothing.
        assert -0.2 < costly[name] < 0.3, costly
        assert cheap[name] > 1.0, cheap
    # Measured directly (the network replaced by its stored output) the sampler's time is positive and small
    # against the 20 ms network, ten times larger against a 2 ms one, and no sleep of the network is in it.
    direct_costly, direct_cheaper = overhead(0.02, direct=True), overhead(0.002, direct=True)
    for name in direct_costly:
        assert 0 < direct_costly[name] < 0.1, direct_costly
        assert direct_cheaper[name] > 3 * direct_costly[name], (direct_cheaper, direct_costly)


def test_the_overhead_of_each_requested_sde_noise_is_measured_and_named_by_it():
    from lazyinterp.bench import measure_overhead

    model = li.Model(lambda x, t: -x, "linear", "velocity")
    result = measure_overhead(model, (3,), torch.float64, batch=5, steps=4, repeats=1,
                              sde_noises=("independent", "brownian"))
    assert set(result) == {"lazy-vp-euler", "point-mass-sde", "point-mass-sde-brownian", "point-mass-sde-exp2m",
                           "point-mass-sde-exp2m-brownian"}
    assert all(math.isfinite(v) for v in result.values()), result


def test_the_code_identity_changes_with_any_source_file_subpackages_included(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not source")
    before = code_identity(tmp_path)
    (tmp_path / "notes.txt").write_text("changed, still not source")
    assert code_identity(tmp_path) == before
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    changed = code_identity(tmp_path)
    assert changed != before
    # The same bytes under another name are another code base.
    (tmp_path / "sub" / "b.py").rename(tmp_path / "sub" / "c.py")
    assert code_identity(tmp_path) not in (before, changed)
    assert len(code_identity()) == 64 and code_identity() == code_identity()



def test_the_fitted_sampler_is_fitted_on_noise_of_its_own_and_counts_only_its_run(monkeypatch, tmp_path):
    """Its evaluations are exactly N per sample (the fit's are not counted), it is scored like every row, its fit
    is reported, it enters the lazy-Euler comparison, and its fit's noise is none of the scored samples'."""
    monkeypatch.setattr(runs_module, "FIT_SAMPLES", 256)
    monkeypatch.setattr(runs_module, "FIT_ITERATIONS", 300)
    data = run_bench("gmm-2d", nfe=[2, 4], n=400, reference_nfe=200, samplers=["linear-euler", "lazy-fitted-euler"],
                     progress=False, work_dir=tmp_path)
    row = {r["sampler"]: r for r in data["results"] if r["nfe"] == 2}
    fitted = row["lazy-fitted-euler"]
    assert fitted["nfe"] == 2 and fitted["steps"] == 3 and math.isfinite(fitted["value"])
    assert fitted["fit"]["samples"] == 256 and fitted["fit"]["iterations"] == 300 and fitted["fit"]["nfe"] == 2
    assert fitted["fit"]["held_out_path_error"] < fitted["fit"]["held_out_path_error_initial"]
    assert fitted["path_error"] < row["linear-euler"]["path_error"]
    assert data["summary"]["euler_vs_linear_euler_2n"][0]["lazy"] == "lazy-fitted-euler"
    noise = NoiseStreams(0, range(400), (2,), dtype=torch.float64).draw()
    fit_noise = NoiseStreams(0, range(runs_module.FIT_NOISE_OFFSET, runs_module.FIT_NOISE_OFFSET + 256), (2,),
                             dtype=torch.float64).draw()
    assert not bool(torch.isclose(noise[:, None, :], fit_noise[None]).all(-1).any())


def test_euler_rows_are_the_deterministic_one_evaluation_euler_samplers():
    schedules = {s.name: s.euler_schedule for s in SAMPLERS}
    assert schedules["lazy-fitted-euler"] == "lazy-fitted"
    assert schedules["linear-euler"] == "linear"
    assert schedules["lazy-vp-euler-alpha"] == schedules["lazy-vp-cov-euler-denoise"] == "lazy-vp"
    for name in ("linear-ab2", "lazy-vp-ab2", "lazy-vp-heun", "point-mass-sde", "fm-euler", "linear-em-clipped"):
        assert schedules[name] is None, name


def _row(sampler, family, nfe, value, path_error=None):
    return {"sampler": sampler, "label": sampler.upper(), "family": family, "nfe": nfe, "value": value,
            "path_error": path_error}


def test_summary_sets_the_best_of_ours_against_the_rest_and_lazy_euler_against_linear_euler_at_twice_the_nfe():
    results = {"nfe": [1, 2, 4], "results": [
        _row("fm-euler", "peer", 1, 2.0), _row("fm-euler", "peer", 2, 1.0), _row("fm-euler", "peer", 4, 0.5),
        _row("linear-euler", "baseline", 1, 4.0, 3.0), _row("linear-euler", "baseline", 2, 0.8, 0.6),
        _row("linear-euler", "baseline", 4, 0.4, 0.3),
        _row("lazy-vp-euler", "ours", 1, 1.0, 0.7), _row("lazy-vp-euler", "ours", 2, 0.6, 0.5),
        _row("lazy-vp-cov-euler", "ours", 1, 1.2, 0.9), _row("lazy-vp-cov-euler", "ours", 2, 0.5, 0.2),
        _row("lazy-vp-ab2", "ours", 1, 0.1), _row("lazy-vp-ab2", "ours", 4, 0.2),
    ]}
    data = summary(results)
    best = {b["nfe"]: (b["ours"], b["ours_value"], b["rest"], b["rest_value"], b["ratio"]) for b in data["best"]}
    assert best[1] == ("lazy-vp-ab2", 0.1, "fm-euler", 2.0, pytest.approx(0.05))
    assert best[2] == ("lazy-vp-cov-euler", 0.5, "linear-euler", 0.8, pytest.approx(0.625))
    assert best[4] == ("lazy-vp-ab2", 0.2, "linear-euler", 0.4, pytest.approx(0.5))
    # AB2 is not Euler; N = 4 has no linear Euler at 8 and no lazy Euler row.
    euler = {e["n"]: e for e in data["euler_vs_linear_euler_2n"]}
    assert set(euler) == {1, 2}
    assert (euler[1]["lazy"], euler[1]["lazy_value"], euler[1]["linear_value"]) == ("lazy-vp-euler", 1.0, 0.8)
    assert euler[1]["ratio"] == pytest.approx(1.25) and euler[1]["linear_path_error"] == 0.6
    assert (euler[2]["lazy"], euler[2]["lazy_path_error"], euler[2]["linear_value"]) == ("lazy-vp-cov-euler", 0.2, 0.4)
    report = markdown_report({**results, "workload": "w", "metric_label": "m", "n": 1, "seed": 0,
                              "reference": {"nfe": 10, "steps": 5, "value": 0.1}})
    assert "| 2 | LAZY-VP-COV-EULER | 0.5 | 0.2 | 0.4 | 0.3 | 1.25 |" in report
    assert "| 1 | LAZY-VP-AB2 | 0.1 | FM-EULER | 2 | 0.05 |" in report


def test_a_fit_that_fails_is_the_run_s_failure_not_a_crash(monkeypatch):
    from lazyinterp.distributed import Context
    from lazyinterp.predictors import NonFiniteError

    def failing_fit(*args, **kwargs):
        raise NonFiniteError("net returned NaN or inf at t=0.5", t=0.5)

    monkeypatch.setattr(runs_module, "fit_euler", failing_fit)
    model = gmm_2d().model("linear")
    with pytest.raises(runs_module.RunFailed, match="fit: net returned NaN"):
        runs_module.fitted_steps(model, 2, torch.zeros(1, 2, dtype=torch.float64), 0, Context())
