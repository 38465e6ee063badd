"""The lazy VP ODE's default grid against the two grids it blends, on random Gaussian mixtures.

Each mixture has 1–20 dimensions, 1, 3 or 10 anisotropic components, and offsets and widths at random scales, so
its σ (estimated from the model, as ``li.sample`` does) ranges over several decades. Its exact model is trained
under the linear, vp or cosine schedule and predicts velocity, noise or data. For 2 / 4 / 8 NFE the default
sampler (``li.sample(model, z, steps=N + 1, schedule="lazy-vp")``) runs on its default grid (the blend of
``li.grids.matched_grid``), on the linear schedule's SNR-matched grid, on the lazy schedule's own uniform grid,
and on "switch", the rule the blend replaced (the linear grid for σ in [1/4, 4], else the own grid), from the same
noise. The distance is the
sliced W2 to a 400-step linear Heun solution from the same noise, divided by the data's scale √tr Σ.

    python docs/studies/grid_blend.py --out docs/studies/grid_blend

writes grid_blend.json, grid_blend.md and grid_blend.png (each grid's distance over the switch rule's, against σ).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import lazyinterp as li
from lazyinterp.fetch import atomic_path, save_figure
from lazyinterp.grids import snr_matched_grid
from lazyinterp.targets import GaussianMixture

NFES = (2, 4, 8)
GRIDS = ("default", "switch", "linear", "own")


def random_mixture(trial: int, gen: torch.Generator) -> tuple[GaussianMixture, str, str]:
    dim = (1, 2, 5, 20)[trial % 4]
    comps = (1, 3, 10)[(trial // 4) % 3]
    spread = float(10 ** (torch.rand(1, generator=gen) * 2 - 1))
    width = float(10 ** (torch.rand(1, generator=gen) * 2 - 1.5))
    f64 = torch.float64
    means = torch.randn(comps, dim, generator=gen, dtype=f64) * spread + 2 * torch.randn(dim, generator=gen, dtype=f64)
    root = torch.randn(comps, dim, dim, generator=gen, dtype=f64)
    covs = width**2 * (root @ root.transpose(1, 2) / dim + 0.1 * torch.eye(dim, dtype=f64))
    weights = torch.rand(comps, generator=gen, dtype=f64) + 0.2
    predicts = ("velocity", "noise", "data")[trial % 3]
    trained_under = ("linear", "vp", "cosine")[(trial // 3) % 3]
    return GaussianMixture(weights / weights.sum(), means, covs), trained_under, predicts


def sliced_distance(x: torch.Tensor, ref_sorted: torch.Tensor, directions: torch.Tensor) -> float:
    proj = torch.sort(x @ directions.T, dim=0).values
    return float((proj - ref_sorted).pow(2).mean().sqrt())


def run(seeds: list[int], trials: int, n: int) -> list[dict]:
    rows = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        for trial in range(trials):
            target, trained_under, predicts = random_mixture(trial, gen)
            z = torch.randn(n, target.dim, generator=gen, dtype=torch.float64)
            model = target.model(trained_under, predicts)
            reference = li.sample(target.model("linear"), z, steps=400, solver="heun")
            directions = torch.randn(64, target.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            directions /= directions.norm(dim=1, keepdim=True)
            ref_sorted = torch.sort(reference @ directions.T, dim=0).values
            scale = float(target.cov.trace().sqrt())
            row = {"seed": seed, "trial": trial, "dim": target.dim, "components": int(target.means.shape[0]),
                   "trained_under": trained_under, "predicts": predicts}
            for nfe in NFES:
                x, info = li.sample(model, z, steps=nfe + 1, schedule="lazy-vp", return_info=True)
                row["sigma"] = info.sigma
                grids = {"linear": snr_matched_grid(nfe + 1, info.schedule, li.linear()),
                         "own": snr_matched_grid(nfe + 1, info.schedule, info.schedule)}
                grids["switch"] = grids["linear"] if 0.25 <= info.sigma <= 4.0 else grids["own"]
                row[f"default@{nfe}"] = sliced_distance(x, ref_sorted, directions) / scale
                for name, grid in grids.items():
                    y = li.sample(model, z, grid=grid, schedule="lazy-vp")
                    row[f"{name}@{nfe}"] = sliced_distance(y, ref_sorted, directions) / scale
            rows.append(row)
            print(f"seed {seed} trial {trial:2d} sigma {row['sigma']:.3f} " + " ".join(
                f"{g}@{k} {row[f'{g}@{k}']:.4f}" for k in NFES for g in GRIDS), flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for nfe in NFES:
        geo = {g: math.exp(sum(math.log(r[f"{g}@{nfe}"] + 1e-6) for r in rows) / len(rows)) for g in GRIDS}
        changed = [r for r in rows if abs(r[f"default@{nfe}"] - r[f"switch@{nfe}"]) > 1e-12]
        better = sum(r[f"default@{nfe}"] < r[f"switch@{nfe}"] for r in changed)
        out[nfe] = {"geomean": geo, "changed": len(changed), "better_than_switch": better}
    return out


def markdown(rows: list[dict], summ: dict) -> str:
    lines = ["### Lazy VP default grid on random Gaussian mixtures", "",
             f"{len(rows)} mixtures; sliced W2 to a 400-step linear Heun solution from the same noise, over √tr Σ "
             "(lower is better). Geometric means:", "",
             "| NFE | default (blend) | switch at [1/4, 4] | linear grid | own grid | mixtures the blend changed | "
             "of which better than the switch |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for nfe, s in summ.items():
        g = s["geomean"]
        lines.append(f"| {nfe} | {g['default']:.4g} | {g['switch']:.4g} | {g['linear']:.4g} | {g['own']:.4g} | "
                     f"{s['changed']} | {s['better_than_switch']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(NFES), figsize=(4 * len(NFES), 3.6))
    for ax, nfe in zip(axes, NFES, strict=True):
        sigma = [r["sigma"] for r in rows]
        for g, marker in zip(("default", "linear", "own"), "os^", strict=True):
            ratio = [(r[f"{g}@{nfe}"] + 1e-6) / (r[f"switch@{nfe}"] + 1e-6) for r in rows]
            ax.scatter(sigma, ratio, label=g, marker=marker, s=14, alpha=0.7)
        ax.axhline(1.0, color="black", lw=0.6)
        for edge in (0.25, 0.5, 2.0, 4.0):
            ax.axvline(edge, color="grey", lw=0.5, ls=":")
        ax.set(xscale="log", yscale="log", xlabel="σ", title=f"{nfe} NFE")
    axes[0].set_ylabel("distance / the switch rule's")
    axes[0].legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("grid_blend"), help="output prefix")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("-n", type=int, default=2000)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = run([int(s) for s in args.seeds.split(",")], args.trials, args.n)
    summ = summary(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps({"rows": rows, "summary": summ}, indent=1))
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        Path(tmp).write_text(markdown(rows, summ))
    plot(rows, args.out.with_suffix(".png"))
    print(markdown(rows, summ))


if __name__ == "__main__":
    main()
