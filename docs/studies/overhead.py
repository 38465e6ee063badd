"""The sampler overhead of ``li.sample`` on the bundled MNIST model, in every mode and for every SDE noise.

``measure_overhead`` (``lazyinterp.bench``) gives T_sample / T_net − 1 for lazy VP Euler and the point-mass SDE
(Euler–Maruyama and the 2M step), the network's time being that of the same calls back to back. This script runs
it for each batch size, eagerly, replayed as a CUDA graph (on a GPU) and directly measured (the network replaced
by a stored output), with the host's, keyed and Brownian noise for the SDE:

    python docs/studies/overhead.py --device cuda --batches 256,2048 --out docs/studies/overhead

writes overhead.json and overhead.md (one row per batch and mode, one column per sampler and noise). On a CPU the
CUDA-graph rows are left out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lazyinterp.bench import measure_overhead
from lazyinterp.fetch import atomic_path
from lazyinterp.models import load_model

SDE_NOISES = ("independent", "keyed", "brownian")


def measure(device: str, batches: list[int], chunk: int, repeats: int) -> dict:
    """Every (batch, mode) row of fractions, with what the run was on."""
    model, _ = load_model("mnist", device, chunk=chunk)
    modes = {"eager": {}, "direct": {"direct": True}}
    if torch.device(device).type == "cuda":
        modes["CUDA graph"] = {"cuda_graph": True}
    rows = []
    for batch in batches:
        for mode, options in modes.items():
            start = time.perf_counter()
            fractions = measure_overhead(model, (1, 28, 28), torch.float32, batch=batch, repeats=repeats,
                                         device=device, sde_noises=SDE_NOISES, **options)
            rows.append({"batch": batch, "mode": mode, "fractions": fractions,
                         "seconds": round(time.perf_counter() - start, 2)})
            print(f"batch {batch}, {mode}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in fractions.items()),
                  flush=True)
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "chunk": chunk, "repeats": repeats,
            "threads": torch.get_num_threads(), "rows": rows}


def markdown(results: dict) -> str:
    """One row per (batch, mode), one column per sampler and noise, in percent of network time."""
    names = list(results["rows"][0]["fractions"])
    lines = [f"Sampler overhead on {results['device']} (torch {results['torch']}, network chunk {results['chunk']}, "
             f"median of {results['repeats']}), percent of network time:", "",
             "| batch | mode | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for row in results["rows"]:
        cells = " | ".join(f"{100 * row['fractions'][name]:.2f}%" for name in names)
        lines.append(f"| {row['batch']} | {row['mode']} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the arguments, measure, write the JSON and the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="256,2048", help="comma-separated batch sizes")
    parser.add_argument("--chunk", type=int, default=500, help="samples per network call, as the mnist benchmark")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/studies/overhead"))
    args = parser.parse_args()
    results = measure(args.device, [int(b) for b in args.batches.split(",")], args.chunk, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(results, indent=1) + "\n")
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
