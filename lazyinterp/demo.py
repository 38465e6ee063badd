"""The main job: few-step MNIST generation with the bundled model, native versus lazy schedules.

Linear Euler, lazy VP Euler (scalar σ, and matched to the model's own covariance, with its own last step or the
model's η_X as the last step), lazy VP with two-step
Adams–Bashforth (the default lazy ODE solver) and the point-mass optimal SDE (Euler–Maruyama, the second-order
exponential step, and AB2 on the drift, its default) at NFE 2, 4 and 8 from the same noise,
scored by FID-MNIST next to a 100-NFE reference (linear Heun, 50 steps).
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .fetch import atomic_path, save_figure
from .generate import SamplerSpec, generate, image_grid
from .samplers import default_known_start
from .solvers import steps_for_nfe

DEMO_SAMPLERS: dict[str, dict] = {
    "linear Euler": dict(schedule="linear", solver="euler"),
    "lazy VP Euler": dict(schedule="lazy-vp", solver="euler"),
    "lazy VP Euler in time α": dict(schedule="lazy-vp", solver="euler-alpha"),
    "lazy VP Euler, covariance": dict(schedule="lazy-vp", solver="euler", covariance="model"),
    "lazy VP Euler, covariance, denoising last step": dict(schedule="lazy-vp", solver="euler", covariance="model",
                                                           last_step="denoise"),
    "lazy VP AB2": dict(schedule="lazy-vp", solver="ab2"),
    "point-mass SDE, Euler–Maruyama": dict(schedule="point-mass", diffusion="optimal", solver="euler"),
    "point-mass SDE, exponential 2M step": dict(schedule="point-mass", diffusion="optimal", solver="exponential-2m"),
    "point-mass SDE, AB2 drift (default)": dict(schedule="point-mass", diffusion="optimal", solver="ab2"),
}
REFERENCE = ("linear Heun", dict(schedule="linear", solver="heun"), 100)


def demo_steps(options: dict, nfe: int) -> int:
    """The number of steps at which ``options`` (li.sample's defaults otherwise) costs exactly ``nfe`` evaluations."""
    last_step = options.get("last_step") or ("denoise" if options.get("diffusion", "ode") != "ode" else "euler")
    steps = steps_for_nfe(options.get("solver") or "euler", nfe, last_step, default_known_start(options["schedule"]))
    if steps is None:
        raise ValueError(f"nfe: no step count of {options} costs exactly {nfe} evaluations")
    return steps


def comparison_figure(path: Path, cells: dict[str, dict[int, torch.Tensor]], nfes: list[int],
                      fids: dict[str, dict[int, float]]) -> None:
    """Rows are samplers, columns NFE; each cell tiles the same first samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(cells)
    fig, axes = plt.subplots(len(rows), len(nfes), figsize=(2.6 * len(nfes), 2.8 * len(rows)), squeeze=False)
    for i, name in enumerate(rows):
        for j, nfe in enumerate(nfes):
            ax = axes[i][j]
            ax.imshow(image_grid(cells[name][nfe], ncol=6), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"NFE {nfe}: FID {fids[name][nfe]:.1f}", fontsize=9)
            if j == 0:
                ax.set_ylabel(textwrap.fill(name, 26), fontsize=10)
    save_figure(fig, path)


def markdown_table(fids: dict[str, dict[int, float]], nfes: list[int], reference: float, n: int) -> str:
    """The demo's FID table: one row per sampler, one column per NFE, the best of each column in bold."""
    head = "| sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |"
    lines = [f"FID-MNIST on {n} samples (lower is better); reference {REFERENCE[0]} at {REFERENCE[2]} NFE: "
             f"{reference:.2f}", "", head, "|---|" + "---|" * len(nfes)]
    for name, row in fids.items():
        best = {k: min(r[k] for r in fids.values()) for k in nfes}
        cells = [f"**{row[k]:.2f}**" if row[k] == best[k] else f"{row[k]:.2f}" for k in nfes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(model_name: str = "mnist", *, n: int = 1000, nfes: tuple[int, ...] = (2, 4, 8), seed: int = 0,
             batch_size: int = 250, out_dir: Path | str = "demo", device: str = "cpu", progress: bool = True,
             echo: Callable[[str], Any] = print) -> dict:
    """Run the comparison and write ``comparison.png``, ``results.json`` and ``table.md`` into ``out_dir``."""
    from .devices import check_device
    from .fetch import ensure_writable

    check_device(device)
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"out_dir: cannot create {out_dir} ({exc.strerror or exc})") from None
    try:
        ensure_writable(out_dir / "results.json", "out_dir")
        return _run_demo(model_name, nfes, n, seed, batch_size, out_dir, device, progress, echo)
    except BaseException:
        # The folder was made only to check that it can be written; a failed run leaves no empty one behind.
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def _run_demo(model_name: str, nfes: Sequence[int], n: int, seed: int, batch_size: int, out_dir: Path, device: str,
              progress: bool, echo: Callable[[str], Any]) -> dict:
    from .metrics import check_fid_applies, evaluate
    from .models import load_model

    model, info = load_model(model_name, device)
    check_fid_applies(info.data)
    shape = (1, 28, 28)
    started = time.time()
    fids: dict[str, dict[int, float]] = {}
    reports: dict[str, dict[int, dict]] = {}
    cells: dict[str, dict[int, torch.Tensor]] = {}
    for name, options in DEMO_SAMPLERS.items():
        fids[name], reports[name], cells[name] = {}, {}, {}
        for nfe in nfes:
            spec = SamplerSpec(steps=demo_steps(options, nfe), **options)
            x = generate(model, spec, n, shape, seed=seed, batch_size=batch_size, device=device,
                         progress=progress, desc=f"{name} NFE {nfe}")
            report = evaluate(x)
            fids[name][nfe] = report["fid"]
            reports[name][nfe] = {"steps": spec.steps, **{k: v for k, v in report.items() if k != "class_histogram"}}
            cells[name][nfe] = x[:24]
            echo(f"{name:>16} NFE {nfe:>2}: FID {report['fid']:7.2f}  confidence {report['mean_confidence']:.3f}")
    ref_name, ref_options, ref_nfe = REFERENCE
    x = generate(model, SamplerSpec(steps=ref_nfe // 2, **ref_options), n, shape, seed=seed,
                 batch_size=batch_size, device=device, progress=progress, desc=f"reference {ref_nfe} NFE")
    reference = evaluate(x)
    echo(f"{ref_name:>16} NFE {ref_nfe}: FID {reference['fid']:7.2f}  confidence {reference['mean_confidence']:.3f}")
    table = markdown_table(fids, list(nfes), reference["fid"], n)
    results = {"model": model_name, "n": n, "seed": seed, "nfes": list(nfes),
               "fid": {k: {str(j): v for j, v in row.items()} for k, row in fids.items()},
               "reports": {k: {str(j): v for j, v in row.items()} for k, row in reports.items()},
               "reference": {"sampler": ref_name, "nfe": ref_nfe,
                             **{k: v for k, v in reference.items() if k != "class_histogram"}},
               "seconds": round(time.time() - started, 1)}
    comparison_figure(out_dir / "comparison.png", cells, list(nfes), fids)
    with atomic_path(out_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_path(out_dir / "table.md") as tmp:
        tmp.write_text(table + "\n")
    echo("")
    echo(table)
    echo(f"\nwrote {out_dir / 'comparison.png'}, {out_dir / 'table.md'}, {out_dir / 'results.json'} "
         f"in {results['seconds']:.0f} s")
    return results
