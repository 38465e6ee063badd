"""The study scripts of docs/studies, which write the measurements the docs quote, still run (at tiny sizes)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

STUDIES = Path(__file__).resolve().parents[1] / "docs" / "studies"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"study_{name}", STUDIES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_overhead_study_script_writes_its_table(tmp_path):
    """docs/studies/overhead.py, which the GPU tables of docs/overhead.md come from, on the CPU at a tiny batch."""
    script = STUDIES / "overhead.py"
    out = tmp_path / "overhead"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--batches", "2", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert [(row["batch"], row["mode"]) for row in results["rows"]] == [(2, "eager"), (2, "direct")]
    names = set(results["rows"][0]["fractions"])
    assert {"lazy-vp-euler", "point-mass-sde-keyed", "point-mass-sde-brownian", "point-mass-sde-exp2m"} <= names
    table = out.with_suffix(".md").read_text()
    assert "| 2 | eager |" in table and "| 2 | direct |" in table


# A network trained for 30 steps has no consistent low-SNR reading of σ, which li.sample reports; diffusers' DPM-Solver
# warns about numpy 2 on its own.
@pytest.mark.filterwarnings("ignore::lazyinterp.LowestSNRWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")
def test_the_trained_2d_study_trains_samples_and_scores_every_sampler_at_exact_nfe():
    """Each sampler asserts inside the study that it cost exactly the NFE it is listed at."""
    study = load("trained_2d")
    results = study.run("moons", seed=0, samples=300, iterations=30)
    assert results["target"] == "moons" and results["n"] == 300 and results["nfe"] == list(study.NFES)
    rows = results["samplers"]
    assert {"linear Euler", "lazy VP Euler", "point-mass SDE, li.sample's default solver"} <= set(rows)
    for name, row in rows.items():
        assert len(row["value"]) == len(study.NFES) and all(math.isfinite(v) for v in row["value"]), name
        assert (row["path_error"][0] is None) == ("SDE" in name), name
    table = study.markdown(results)
    assert table.startswith("### moons, trained velocity MLP")
    assert "Lazy VP Euler at N against linear Euler at 2N" in table


@pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")
def test_the_ddpm_schedulers_study_counts_network_calls_and_scores_every_scheduler(tmp_path):
    """docs/studies/ddpm_schedulers.py at a tiny size: each scheduler's run is checked inside the study to make
    exactly the NFE it is listed at; LazyScheduler has no one-call run (its probes cost two)."""
    pytest.importorskip("diffusers")
    study = load("ddpm_schedulers")
    results = study.run(64)
    assert set(results) == {"gmm-2d", "gmm-64d"}
    for rows in results.values():
        assert {"DDIM", "UniPC", "LazyScheduler, lazy VP Euler"} <= set(rows)
        for label, row in rows.items():
            values = row["values"]
            assert len(values) == len(study.NFES)
            assert (values[0] is None) == (row["family"] == "lazyinterp"), label
            assert all(math.isfinite(v) for v in values if v is not None), label
    table = study.markdown(results, 64)
    assert table.count("| DDIM | diffusers |") == 2 and "| – |" in table
    study.plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
