"""LazyScheduler against diffusers' own schedulers on a DDPM ε-prediction model, at equal NFE.

The model is the exact ε-prediction network of each benchmark mixture (``gmm-2d``, ``gmm-64d``) under Stable
Diffusion's betas (scaled linear, 0.00085 to 0.012, T = 1000), so that only the sampler differs. Every scheduler
is made from Stable Diffusion's scheduler config, as a user swapping schedulers gets it, and is stepped as a
pipeline steps it (``init_noise_sigma``, ``scale_model_input``, one network call per timestep) from the same
initial latents (noise seed 0). The score is the benchmark's, sliced W2 to the target.

NFE is counted as network calls: a DDPM-family scheduler makes one per timestep; LazyScheduler with σ and E[X]
estimated makes two probe calls and skips the first node (N steps, N + 1 calls), so at NFE k it runs k − 1 steps.

    python docs/studies/ddpm_schedulers.py --out docs/studies/ddpm_schedulers

n is 4000 by default: LazyScheduler keeps one lane per sample (each has its own estimated σ and so its own
grid), about 2 ms of host work per sample and step on a CPU, which a pipeline's few images do not notice.

writes ddpm_schedulers.json, ddpm_schedulers.md and ddpm_schedulers.png (metric against NFE per workload).
"""
from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from lazyinterp.bench.report import write_json, write_text
from lazyinterp.bench.workloads import gmm_2d, gmm_64d
from lazyinterp.diffusers import LazyScheduler, ddpm_schedule
from lazyinterp.fetch import save_figure
from lazyinterp.metrics import SlicedW2
from lazyinterp.noise import NoiseStreams

NFES = (1, 2, 3, 4, 6, 8, 12)
WORKLOADS = {"gmm-2d": gmm_2d, "gmm-64d": gmm_64d}
# Stable Diffusion 1.x's scheduler_config.json.
SD_CONFIG = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "trained_betas": None, "clip_sample": False}
# (label, family, the scheduler, the network calls of its run at a given NFE → its step count, or None).
SAMPLERS: list[tuple[str, str, Callable[[], object], Callable[[int], int | None]]] = [
    ("DDIM", "diffusers", lambda: DDIMScheduler.from_config(SD_CONFIG), lambda k: k),
    ("Euler", "diffusers", lambda: EulerDiscreteScheduler.from_config(SD_CONFIG), lambda k: k),
    ("DPM-Solver++(2M)", "diffusers", lambda: DPMSolverMultistepScheduler.from_config(SD_CONFIG), lambda k: k),
    ("DPM-Solver++(2M) Karras", "diffusers",
     lambda: DPMSolverMultistepScheduler.from_config(SD_CONFIG, use_karras_sigmas=True), lambda k: k),
    ("UniPC", "diffusers", lambda: UniPCMultistepScheduler.from_config(SD_CONFIG), lambda k: k),
    ("LazyScheduler, lazy VP (default: AB2, σ and E[X] probed)", "lazyinterp",
     lambda: LazyScheduler.from_config(SD_CONFIG), lambda k: k - 1 if k > 1 else None),
    ("LazyScheduler, lazy VP Euler", "lazyinterp",
     lambda: LazyScheduler.from_config(SD_CONFIG, solver="euler"), lambda k: k - 1 if k > 1 else None),
    ("LazyScheduler, point-mass SDE", "lazyinterp",
     lambda: LazyScheduler.from_config(SD_CONFIG, schedule="point-mass"), lambda k: k - 1 if k > 1 else None),
]


def epsilon_network(mixture) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The exact ε of ``mixture`` under Stable Diffusion's betas, called with the scheduler's timestep."""
    schedule = ddpm_schedule(DDIMScheduler.from_config(SD_CONFIG).alphas_cumprod)
    model = mixture.model(schedule, "noise")
    steps = schedule.num_train_timesteps

    def net(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(timestep, dtype=torch.float64).flatten()
        return model.raw(x, ((steps - 1 - index) / steps).expand(x.shape[0]))

    return net


def sample(scheduler, net, z: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
    """A pipeline's loop: the final latents and the number of network calls."""
    scheduler.set_timesteps(steps)
    x = z * scheduler.init_noise_sigma
    # Pipelines pass their generator to schedulers whose step takes one.
    extra = {"generator": torch.Generator().manual_seed(0)} \
        if "generator" in inspect.signature(scheduler.step).parameters else {}
    calls = 0
    for t in scheduler.timesteps:
        out = net(scheduler.scale_model_input(x, t), t)
        calls += 1
        x = scheduler.step(out, t, x, **extra).prev_sample
    return x, calls


@torch.no_grad()
def run(n: int) -> dict:
    results = {}
    for name, make_mixture in WORKLOADS.items():
        mixture = make_mixture()
        score = SlicedW2(mixture, n)
        net = epsilon_network(mixture)
        z = NoiseStreams(0, range(n), (mixture.dim,), dtype=torch.float64).draw()
        rows = results[name] = {}
        for label, family, make, steps_at in SAMPLERS:
            values = []
            for nfe in NFES:
                steps = steps_at(nfe)
                if steps is None:
                    values.append(None)
                    continue
                x, calls = sample(make(), net, z, steps)
                if calls != nfe:
                    raise RuntimeError(f"{label}: {calls} network calls at NFE {nfe}")
                values.append(score(x))
            rows[label] = {"family": family, "values": values}
            print(name, label, " ".join("–" if v is None else f"{v:.4g}" for v in values), flush=True)
    return results


def markdown(results: dict, n: int) -> str:
    lines = []
    for name, rows in results.items():
        best = [min((r["values"][i] for r in rows.values() if r["values"][i] is not None), default=None)
                for i in range(len(NFES))]
        lines += [f"### {name} as a DDPM ε-prediction model (Stable Diffusion's betas): schedulers at equal NFE", "",
                  f"Sliced W2 to the target (lower is better), n = {n}, noise seed 0; best per NFE in bold.", "",
                  "| scheduler | from | " + " | ".join(f"NFE {k}" for k in NFES) + " |",
                  "|---|---|" + "---:|" * len(NFES)]
        for label, row in rows.items():
            cells = ["–" if v is None else (f"**{v:.4g}**" if v == best[i] else f"{v:.4g}")
                     for i, v in enumerate(row["values"])]
            lines.append(f"| {label} | {row['family']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2))
    axes = axes if len(results) > 1 else [axes]
    for ax, (name, rows) in zip(axes, results.items(), strict=True):
        for label, row in rows.items():
            points = [(k, v) for k, v in zip(NFES, row["values"], strict=True) if v is not None]
            ax.plot(*zip(*points, strict=True), marker="o", ls="-" if row["family"] == "lazyinterp" else "--",
                    label=label)
        ax.set(xscale="log", yscale="log", xlabel="NFE (network calls)", ylabel="sliced W2 to the target",
               title=f"{name}, DDPM ε-model")
        ax.set_xticks(NFES, [str(k) for k in NFES])
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("ddpm_schedulers"), help="output prefix")
    parser.add_argument("-n", type=int, default=4000)
    args = parser.parse_args()
    results = run(args.n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json({"nfe": NFES, "n": args.n, "results": results}, args.out.with_suffix(".json"))
    write_text(markdown(results, args.n), args.out.with_suffix(".md"))
    plot(results, args.out.with_suffix(".png"))
    print(markdown(results, args.n))


if __name__ == "__main__":
    main()
