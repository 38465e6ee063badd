"""EDM's Karras grid against the default SNR-matched grid, for the lazy VP ODE on the benchmark's mixtures.

Karras et al.'s noise levels σ_i = (σ_max^{1/ρ} + i/(N − 1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7, σ_min = 0.002, are
a common few-step grid for denoisers. Here they are read as SNRs 1/σ_i and placed on the lazy VP schedule of the
model's own σ (the times where its SNR takes those values), after the known start at t = 0 and before t = 1, so
that N + 1 intervals cost N evaluations as the default grid's do. Both grids run lazy VP Euler and AB2 on
``gmm-2d`` and ``gmm-64d`` with the benchmark's model, noise (seed 0, n = 16000) and metric (sliced W2 to the
target).

    python docs/studies/karras_grid.py --out docs/studies/karras_grid

writes karras_grid.json, karras_grid.md and karras_grid.png (metric against NFE, one panel per workload).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lazyinterp as li
from lazyinterp.bench import make_workload
from lazyinterp.fetch import atomic_path, save_figure
from lazyinterp.noise import NoiseStreams

NFES = (1, 2, 3, 4, 6, 8)
WORKLOADS = ("gmm-2d", "gmm-64d")
GRIDS = {"default": None, "karras, sigma_max 80": 80.0, "karras, sigma_max 20": 20.0}
SOLVERS = ("euler", "ab2")


def karras_sigmas(count: int, sigma_max: float, sigma_min: float = 0.002, rho: float = 7.0) -> torch.Tensor:
    """EDM's ``count`` noise levels from ``sigma_max`` down to ``sigma_min``."""
    ramp = torch.arange(count, dtype=torch.float64) / max(count - 1, 1)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def karras_grid(schedule: li.Schedule, nfe: int, sigma_max: float) -> torch.Tensor:
    """t = 0, the times where ``schedule``'s SNR is 1/σ_i for ``nfe`` Karras levels, and t = 1."""
    inner = torch.as_tensor(schedule.snr_inverse(1 / karras_sigmas(nfe, sigma_max)), dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), inner, torch.ones(1, dtype=torch.float64)])


def run(n: int) -> dict:
    results = {}
    for name in WORKLOADS:
        workload = make_workload(name, n)
        z = NoiseStreams(0, range(n), workload.sample_shape, dtype=workload.dtype).draw()
        _, info = li.sample(workload.model, z[:4], steps=2, schedule="lazy-vp", return_info=True)
        target = info.schedule
        rows = results[name] = {"sigma": info.sigma, "values": {}}
        for solver in SOLVERS:
            for grid_name, sigma_max in GRIDS.items():
                values = []
                for nfe in NFES:
                    grid = {"steps": nfe + 1} if sigma_max is None else {"grid": karras_grid(target, nfe, sigma_max)}
                    x = li.sample(workload.model, z, schedule=target, solver=solver, **grid)
                    values.append(workload.score(x, None)["value"])
                rows["values"][f"{solver}, {grid_name}"] = values
                print(name, solver, grid_name, " ".join(f"{v:.4g}" for v in values), flush=True)
    return results


def markdown(results: dict, n: int) -> str:
    lines = []
    for name, rows in results.items():
        lines += [f"### {name}: lazy VP (σ {rows['sigma']:.3f}) on the default grid and on Karras grids", "",
                  f"Sliced W2 to the target (lower is better), n = {n}, noise seed 0.", "",
                  "| solver, grid | " + " | ".join(f"NFE {k}" for k in NFES) + " |",
                  "|---|" + "---:|" * len(NFES)]
        for label, values in rows["values"].items():
            lines.append(f"| {label} | " + " | ".join(f"{v:.4g}" for v in values) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4))
    for ax, (name, rows) in zip(axes, results.items(), strict=True):
        for label, values in rows["values"].items():
            ax.plot(NFES, values, marker="o", ls="-" if "default" in label else "--", label=label)
        ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="sliced W2 to the target", title=name)
        ax.set_xticks(NFES, [str(k) for k in NFES])
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("karras_grid"), help="output prefix")
    parser.add_argument("-n", type=int, default=16000)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    results = run(args.n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps({"nfe": NFES, "n": args.n, "results": results}, indent=1))
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        Path(tmp).write_text(markdown(results, args.n))
    plot(results, args.out.with_suffix(".png"))
    print(markdown(results, args.n))


if __name__ == "__main__":
    main()
