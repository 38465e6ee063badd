"""The benchmark's outputs: a Markdown table, a log-log plot and JSON, each written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..fetch import atomic_path, save_figure
from .samplers import FITTED_SCHEDULE, SAMPLERS

# The schedules whose Euler rows the summary sets against linear Euler at twice the NFE.
LAZY_SCHEDULES = ("lazy-vp", FITTED_SCHEDULE)


def format_value(value: float | None) -> str:
    """Four significant digits, or a dash for a missing value."""
    return "–" if value is None else f"{value:.4g}"


def _table(results: dict, key: str) -> list[str]:
    nfes = results["nfe"]
    rows: dict[str, dict[int, float | None]] = {}
    labels: dict[str, tuple[str, str]] = {}
    for r in results["results"]:
        if (key == "path_error" and r.get("stochastic")) or (key == "sde_path_error" and key not in r):
            continue
        rows.setdefault(r["sampler"], {})[r["nfe"]] = r.get(key)
        labels[r["sampler"]] = (r["label"], r["family"])
    best = {}
    for k in nfes:
        values = [row[k] for row in rows.values() if row.get(k) is not None]
        best[k] = min(values) if values else None
    lines = ["| sampler | family | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
             "|---|---|" + "---:|" * len(nfes)]
    for name, row in rows.items():
        cells = []
        for k in nfes:
            v = row.get(k)
            cells.append(f"**{format_value(v)}**" if v is not None and v == best[k] else format_value(v))
        label, family = labels[name]
        lines.append(f"| {label} | {family} | " + " | ".join(cells) + " |")
    return lines


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def summary(results: dict) -> dict[str, list[dict[str, Any]]]:
    """What the tables say about ours against the rest, from ``results`` alone.

    ``best``: per NFE, the lowest value among ours and among the peers and baselines, with ``ratio`` = ours / rest.
    ``euler_vs_linear_euler_2n``: per N, the best deterministic Euler-type sampler on a lazy schedule at N NFE
    against linear Euler at 2N NFE (value and path error each); ``ratio`` < 1 means the lazy one is better.
    """
    rows = results["results"]
    best = []
    for k in results["nfe"]:
        at_k = [r for r in rows if r["nfe"] == k and r.get("value") is not None]
        ours = min((r for r in at_k if r["family"] == "ours"), key=lambda r: r["value"], default=None)
        rest = min((r for r in at_k if r["family"] in ("peer", "baseline")), key=lambda r: r["value"], default=None)
        if ours is None or rest is None:
            continue
        best.append({"nfe": k, "ours": ours["sampler"], "ours_value": ours["value"], "rest": rest["sampler"],
                     "rest_value": rest["value"], "ratio": _ratio(ours["value"], rest["value"])})
    by_name = {s.name: s for s in SAMPLERS}
    lazy = [r for r in rows if r["sampler"] in by_name and r.get("value") is not None
            and by_name[r["sampler"]].euler_schedule in LAZY_SCHEDULES]
    linear = {r["nfe"]: r for r in rows if r["sampler"] == "linear-euler" and r.get("value") is not None}
    euler = []
    for k in results["nfe"]:
        best_lazy = min((r for r in lazy if r["nfe"] == k), key=lambda r: r["value"], default=None)
        twice = linear.get(2 * k)
        if best_lazy is None or twice is None:
            continue
        euler.append({"n": k, "lazy": best_lazy["sampler"], "lazy_value": best_lazy["value"],
                      "lazy_path_error": best_lazy.get("path_error"), "linear_value": twice["value"],
                      "linear_path_error": twice.get("path_error"),
                      "ratio": _ratio(best_lazy["value"], twice["value"])})
    return {"best": best, "euler_vs_linear_euler_2n": euler}


def _summary_lines(results: dict) -> list[str]:
    data = summary(results)
    labels = {r["sampler"]: r["label"] for r in results["results"]}
    lines: list[str] = []
    if data["best"]:
        lines += ["", "Best of ours against the best peer or baseline at each NFE (ratio = ours / theirs):", "",
                  "| NFE | best of ours | value | best peer or baseline | value | ratio |",
                  "|---:|---|---:|---|---:|---:|"]
        lines += [f"| {b['nfe']} | {labels[b['ours']]} | {format_value(b['ours_value'])} | {labels[b['rest']]} | "
                  f"{format_value(b['rest_value'])} | {format_ratio(b['ratio'])} |" for b in data["best"]]
    if data["euler_vs_linear_euler_2n"]:
        lines += ["", "Lazy Euler at N NFE (the best Euler-type lazy row) against linear Euler at 2N "
                  "(ratio = lazy / linear, values):", "",
                  "| N | lazy Euler at N | value | path error | linear Euler at 2N: value | path error | ratio |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {e['n']} | {labels[e['lazy']]} | {format_value(e['lazy_value'])} | "
                  f"{format_value(e['lazy_path_error'])} | {format_value(e['linear_value'])} | "
                  f"{format_value(e['linear_path_error'])} | {format_ratio(e['ratio'])} |"
                  for e in data["euler_vs_linear_euler_2n"]]
    return lines


def format_ratio(value: float | None) -> str:
    """Two decimals, or a dash."""
    return "–" if value is None else f"{value:.2f}"


def percentages(fractions: dict[str, float]) -> str:
    """"name 1.23%, ..." for a {name: fraction} mapping."""
    return ", ".join(f"{k} {100 * v:.2f}%" for k, v in fractions.items())


def markdown_report(results: dict) -> str:
    """The value table (rows samplers, columns NFE, best per column in bold) and the path-error table."""
    ref = results["reference"]
    scale = results.get("workload_info", {}).get("mode_scale", 1.0)
    modes = f" with component covariances × {scale:g}" if scale != 1.0 else ""
    lines = [f"### {results['workload']}{modes}: {results['metric_label']} (lower is better), n = {results['n']}, "
             f"seed {results['seed']}", ""]
    ref_line = (f"Reference: linear Heun at {ref['nfe']} NFE ({ref['steps']} steps) from the same noise: "
                f"{format_value(ref.get('value'))}")
    if "noise_floor" in ref:
        ref_line += (f"; noise floor (fresh target samples of the same size, mean ± std of 5): "
                     f"{format_value(ref['noise_floor'])} ± {format_value(ref.get('noise_floor_std'))}")
    lines += [ref_line + ".", ""]
    lines += _table(results, "value")
    lines += _summary_lines(results)
    if any(r.get("path_error") is not None for r in results["results"]):
        lines += ["", f"Path error: mean ‖x − x_ref‖₂ per sample to the reference ({ref['nfe']}-NFE linear Heun) "
                  "from the same noise; ODE samplers only.", ""]
        lines += _table(results, "path_error")
    sde_ref = results.get("sde_reference")
    if sde_ref and any(r.get("sde_path_error") is not None for r in results["results"]):
        lines += ["", f"SDE path error: mean ‖x − x_ref‖₂ per sample to the {sde_ref['sampler']} at "
                  f"{sde_ref['nfe']} NFE ({sde_ref['steps']} steps; {results['metric_label']} "
                  f"{format_value(sde_ref.get('value'))}), every run on the same per-sample Brownian paths "
                  "(`sde_noise=\"brownian\"`); samplers of that SDE only.", ""]
        lines += _table(results, "sde_path_error")
    if results.get("overhead"):
        setup = results.get("overhead_setup", {})
        lines += ["", f"Sampler overhead (time outside the network / network time, batch {setup.get('batch')}, "
                  f"{setup.get('steps')} steps): {percentages(results['overhead'])}."]
        if results.get("overhead_direct"):
            lines += ["", "The sampler's own time measured directly (the network replaced by a stored output), as a "
                      f"fraction of network time: {percentages(results['overhead_direct'])}."]
        if results.get("overhead_cuda_graph"):
            lines += ["", "The same with both sides replayed as CUDA graphs (`cuda_graph=True`): "
                      f"{percentages(results['overhead_cuda_graph'])}."]
    if results.get("skipped"):
        pairs = ", ".join(f"{s['sampler']}@{s['nfe']}" if s["nfe"] is not None else f"{s['sampler']} ({s['reason']})"
                          for s in results["skipped"])
        lines += ["", f"Not run (no step count gives the exact NFE, or unavailable): {pairs}."]
    return "\n".join(lines) + "\n"


STYLES = {"peer": "--", "baseline": ":", "ours": "-"}


def plot_results(results: dict, path: Path | str) -> None:
    """Metric and path error against NFE on log-log axes; dashed peers, dotted baselines, solid ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The legend gets a panel of its own: with some twenty samplers it would cover the data on either plot.
    fig, (*axes, legend_panel) = plt.subplots(1, 3, figsize=(17, 5.2), width_ratios=(1, 1, 0.42))
    names = list(dict.fromkeys(r["sampler"] for r in results["results"]))
    cmap = plt.get_cmap("tab20")
    # tab20 pairs a dark and a light shade of each hue: use all dark shades before any light one.
    colours = [cmap(j) for j in (*range(0, 20, 2), *range(1, 20, 2))]
    for i, name in enumerate(names):
        rows = [r for r in results["results"] if r["sampler"] == name]
        for ax, key in zip(axes, ("value", "path_error"), strict=True):
            pts = [(r["nfe"], r[key]) for r in rows if r.get(key) is not None and r[key] > 0]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, STYLES.get(rows[0]["family"], "-"), marker="o", ms=3, color=colours[i % 20],
                        label=rows[0]["label"])
        sde = [(r["nfe"], r["sde_path_error"]) for r in rows if (r.get("sde_path_error") or 0) > 0]
        if sde:
            xs, ys = zip(*sde, strict=True)
            axes[1].plot(xs, ys, "-.", marker="x", ms=4, color=colours[i % 20])
    ref = results["reference"]
    if ref.get("value"):
        axes[0].axhline(ref["value"], color="grey", lw=0.8, label=f"reference ({ref['nfe']} NFE)")
    if ref.get("noise_floor"):
        axes[0].axhline(ref["noise_floor"], color="grey", lw=0.8, ls="-.", label="noise floor")
    axes[0].set_ylabel(results["metric_label"])
    axes[1].set_ylabel("path error: ODE samplers (o) to the ODE reference,\n"
                       "SDE samplers (x) to the SDE reference on the same Brownian paths")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_xticks(results["nfe"], [str(k) for k in results["nfe"]])
        ax.minorticks_off()
        ax.grid(True, which="both", lw=0.3)
    legend_panel.axis("off")
    legend_panel.legend(*axes[0].get_legend_handles_labels(), loc="center left", fontsize=7, frameon=False)
    fig.suptitle(f"{results['workload']}, n = {results['n']}")
    save_figure(fig, path)


def write_json(results: dict, path: Path | str) -> None:
    """Write ``results`` as JSON (no NaN or inf) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")


def write_text(text: str, path: Path | str) -> None:
    """Write ``text`` to ``path`` atomically: a reader sees the old file or the whole new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_safe(obj: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float):
        return _finite_or_none(obj)
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
