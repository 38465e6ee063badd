"""Lazy schedules on trained models of 2-D targets: thin curves (the two moons) and clusters of three widths.

The benchmark's mixtures have exact models; this study trains one per target. A small MLP learns the
linear-schedule velocity by flow matching, 4000 Adam steps on 2 CPU cores (about 20 s). The targets:

* ``moons``: two half circles of radius 2, offset as in scikit-learn's ``make_moons``, with Gaussian noise of std
  0.1, centred;
* ``eight-gaussians``: eight equal components N(m_k, 0.25² I) with m_k on the circle of radius 2, the proportions
  of FFJORD's "8gaussians" (std 0.5 at radius 4): the components hold 3% of the variance;
* ``eight-gaussians-tight``: the same with std 0.1 (0.5% of the variance): clusters that act like points;
* ``gmm-2d``: samples of the benchmark's ``gmm-2d`` mixture (2%), whose exact model ``lazyinterp bench`` uses.

Every sampler starts from the same noise (n = 16000) and is scored by the sliced W2 distance to 48000 fresh target
samples (64 fixed directions) and by the mean distance to a converged solution from the same noise (linear Heun,
500 steps), at exactly counted NFE. The lazy schedules' known start makes their N + 1 steps cost N evaluations,
as in ``lazyinterp bench``; peers (diffusers' flow schedulers) run when diffusers is installed.

    python docs/studies/trained_2d.py --out docs/studies/trained_2d

writes trained_2d-<target>.json, .md and .png (the metric and the path error against NFE) for each target.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lazyinterp as li
from lazyinterp.bench import gmm_2d
from lazyinterp.fetch import atomic_path, save_figure
from lazyinterp.metrics import SlicedW2

NFES = (1, 2, 3, 4, 6, 8, 12, 16)
SAMPLES, TARGET_POINTS, DIRECTIONS = 16000, 48000, 64


def moons(n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples of the scaled, centred two moons."""
    angle = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    arcs = torch.where(upper[:, None], torch.stack([angle.cos(), angle.sin()], 1),
                       torch.stack([1 - angle.cos(), 0.5 - angle.sin()], 1))
    return 2.0 * (arcs + 0.05 * torch.randn(n, 2, generator=generator) - torch.tensor([0.5, 0.25]))


def eight_gaussians(std: float) -> Callable[[int, torch.Generator], torch.Tensor]:
    """The sampler of eight equal components N(m_k, std² I), m_k = 2 (cos 2πk/8, sin 2πk/8)."""
    def draw(n: int, generator: torch.Generator) -> torch.Tensor:
        angle = 2 * math.pi * torch.randint(0, 8, (n,), generator=generator) / 8
        return 2.0 * torch.stack([angle.cos(), angle.sin()], 1) + std * torch.randn(n, 2, generator=generator)
    return draw


def bench_gmm_2d(n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples of the benchmark's gmm-2d mixture, in float32."""
    return gmm_2d().sample(n, generator).float()


TARGETS = {"moons": moons, "eight-gaussians": eight_gaussians(0.25), "eight-gaussians-tight": eight_gaussians(0.1),
           "gmm-2d": bench_gmm_2d}


class VelocityMLP(torch.nn.Module):
    """v(x, t): three hidden layers of 256 on (x, t and 8 Fourier features of t)."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.register_buffer("freqs", torch.arange(1, 9, dtype=torch.float32) * math.pi)
        self.net = torch.nn.Sequential(torch.nn.Linear(19, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.SiLU(), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, 1).float()
        return self.net(torch.cat([x.float(), t, (t * self.freqs).sin(), (t * self.freqs).cos()], 1))


def train(data: Callable[[int, torch.Generator], torch.Tensor], seed: int, iterations: int = 4000,
          batch: int = 512) -> VelocityMLP:
    """Flow matching on the linear schedule: minimise E‖v(I_t, t) − (X − Z)‖², I_t = (1 − t)Z + tX."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = VelocityMLP()
    optimiser = torch.optim.Adam(net.parameters(), 2e-3)
    for step in range(iterations):
        if step == 3 * iterations // 4:
            for group in optimiser.param_groups:
                group["lr"] = 5e-4
        x, z = data(batch, generator), torch.randn(batch, 2, generator=generator)
        t = torch.rand(batch, generator=generator)
        loss = ((net((1 - t[:, None]) * z + t[:, None] * x, t) - (x - z)) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.eval()


def samplers(model: li.Model) -> dict[str, tuple[str, Callable[[torch.Tensor, int], torch.Tensor]]]:
    """name -> (family, function of (noise, NFE) giving the samples); each checks that it cost exactly that NFE."""

    def li_sampler(steps_for: Callable[[int], int], **kwargs: object) -> Callable[[torch.Tensor, int], torch.Tensor]:
        def draw(z: torch.Tensor, nfe: int) -> torch.Tensor:
            start = dict(shape=tuple(z.shape), generator=0) if kwargs.get("schedule") == "point-mass" else dict(noise=z)
            model.nfe = 0
            x, info = li.sample(model, steps=steps_for(nfe), return_info=True, **start, **kwargs)
            assert model.nfe - info.estimation_nfe == nfe, (kwargs, nfe, model.nfe, info.estimation_nfe)
            return x
        return draw

    def known_start(nfe: int) -> int:  # the lazy schedules' first evaluation is free
        return nfe + 1

    out = {
        "linear Euler": ("baseline", li_sampler(int)),
        "linear AB2": ("baseline", li_sampler(int, solver="ab2")),
        "lazy VP Euler": ("ours", li_sampler(known_start, schedule="lazy-vp", solver="euler")),
        "lazy VP Euler, covariance-matched": ("ours", li_sampler(known_start, schedule="lazy-vp", solver="euler",
                                                                 covariance="model")),
        "lazy VP, li.sample's default solver": ("ours", li_sampler(known_start, schedule="lazy-vp")),
        "point-mass SDE, li.sample's default solver": ("ours", li_sampler(known_start, schedule="point-mass",
                                                                          diffusion="optimal")),
    }
    if importlib.util.find_spec("diffusers") is not None:
        from lazyinterp.bench.peers import diffusers_sample, diffusers_scheduler, linear_velocity

        velocity = linear_velocity(model)

        def peer(options: dict) -> Callable[[torch.Tensor, int], torch.Tensor]:
            def draw(z: torch.Tensor, nfe: int) -> torch.Tensor:
                model.nfe = 0
                x = diffusers_sample(diffusers_scheduler(options), velocity, z, nfe)
                assert model.nfe == nfe, (options, nfe, model.nfe)
                return x
            return draw

        out["diffusers FlowMatchEuler"] = ("peer", peer({"scheduler": "euler"}))
        out["diffusers DPM-Solver++(2M) flow"] = ("peer", peer({"scheduler": "dpm"}))
        out["diffusers UniPC flow"] = ("peer", peer({"scheduler": "unipc"}))
    return out


def run(name: str, seed: int, samples: int = SAMPLES, iterations: int = 4000) -> dict:
    """Train on the target ``name`` for ``iterations`` steps, sample every sampler at every NFE from the same noise
    (``samples`` of it), and score."""
    data = TARGETS[name]
    start = time.perf_counter()
    with torch.enable_grad():
        net = train(data, seed, iterations)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        return _sample_and_score(name, seed, samples, net, seconds)


def _sample_and_score(name: str, seed: int, samples: int, net: torch.nn.Module, seconds: float) -> dict:
    data = TARGETS[name]
    model = li.Model(net, "linear", "velocity")
    z = torch.randn(samples, 2, generator=torch.Generator().manual_seed(seed + 1))
    target = data(-(-TARGET_POINTS // samples) * samples, torch.Generator().manual_seed(seed + 2))
    directions = torch.randn(DIRECTIONS, 2, generator=torch.Generator().manual_seed(seed + 3))
    sliced_w2 = SlicedW2.from_points(target, samples, directions)

    reference = li.sample(model, z, steps=500, solver="heun")
    floor = sliced_w2(data(samples, torch.Generator().manual_seed(seed + 4)))
    rows = {}
    for sampler, (family, draw) in samplers(model).items():
        values, paths = [], []
        for k in NFES:
            x = draw(z, k)
            values.append(sliced_w2(x))
            paths.append(None if "SDE" in sampler else float((x - reference).norm(dim=1).mean()))
        rows[sampler] = {"family": family, "value": values, "path_error": paths}
        print(sampler, " ".join(f"{v:.4g}" for v in values), flush=True)
    return {"target": name, "seed": seed, "train_seconds": round(seconds, 1), "nfe": list(NFES), "n": samples,
            "reference": {"sampler": "linear Heun, 500 steps", "value": sliced_w2(reference)}, "noise_floor": floor,
            "samplers": rows}


def markdown(results: dict) -> str:
    """The metric and path-error tables, best per column in bold, and the lazy-Euler-at-N check."""
    nfes = results["nfe"]
    lines = [f"### {results['target']}, trained velocity MLP: sliced W2 to the target (lower is better), "
             f"n = {results['n']}",
             "", f"Reference (linear Heun, 500 steps, same noise): {results['reference']['value']:.4g}; noise floor "
             f"(fresh target samples): {results['noise_floor']:.4g}.", ""]
    for key, title in (("value", None), ("path_error", "Path error: mean distance to the reference from the same noise "
                                                       "(ODE samplers).")):
        if title:
            lines += ["", title, ""]
        lines += ["| sampler | family | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
                  "|---|---|" + "---:|" * len(nfes)]
        rows = {n: r for n, r in results["samplers"].items() if any(v is not None for v in r[key])}
        best = [min(r[key][i] for r in rows.values()) for i in range(len(nfes))]
        for name, row in rows.items():
            cells = [f"**{v:.4g}**" if v == best[i] else f"{v:.4g}" for i, v in enumerate(row[key])]
            lines.append(f"| {name} | {row['family']} | " + " | ".join(cells) + " |")
    lazy, linear = results["samplers"]["lazy VP Euler"]["value"], results["samplers"]["linear Euler"]["value"]
    pairs = [(k, lazy[i], linear[nfes.index(2 * k)]) for i, k in enumerate(nfes) if 2 * k in nfes]
    lines += ["", "Lazy VP Euler at N against linear Euler at 2N: " + "; ".join(
        f"N = {k}: {a:.4g} vs {b:.4g}" for k, a, b in pairs) + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """The metric and the path error against NFE, log-log; dashed peers, dotted baselines, solid ours."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"peer": "--", "baseline": ":", "ours": "-"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.get_cmap("tab10")
    for i, (name, row) in enumerate(results["samplers"].items()):
        for ax, key in zip(axes, ("value", "path_error"), strict=True):
            points = [(k, v) for k, v in zip(results["nfe"], row[key], strict=True) if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), styles[row["family"]], marker="o", ms=3, color=colours(i % 10),
                        label=name)
    axes[0].axhline(results["reference"]["value"], color="grey", lw=0.8, label="reference (linear Heun, 500 steps)")
    axes[0].axhline(results["noise_floor"], color="grey", lw=0.8, ls="-.", label="noise floor")
    axes[0].set_ylabel("sliced W2 to the target")
    axes[1].set_ylabel("mean distance to the reference (ODE samplers)")
    for ax in axes:
        ax.set(xscale="log", yscale="log", xlabel="NFE")
        ax.set_xticks(results["nfe"], [str(k) for k in results["nfe"]])
        ax.minorticks_off()
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{results['target']}, trained velocity MLP, n = {results['n']}")
    save_figure(fig, path)


def main() -> None:
    """Parse the arguments, run, write the JSON, the tables and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("trained_2d"), help="output prefix")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {', '.join(TARGETS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.targets.split(","):
        if name not in TARGETS:
            parser.error(f"--targets: unknown target {name!r}; expected {', '.join(TARGETS)}")
        results = run(name, args.seed)
        out = args.out.with_name(f"{args.out.name}-{name}")
        with atomic_path(out.with_suffix(".json")) as tmp:
            Path(tmp).write_text(json.dumps(results, indent=1) + "\n")
        with atomic_path(out.with_suffix(".md")) as tmp:
            Path(tmp).write_text(markdown(results))
        plot(results, out.with_suffix(".png"))
        print(markdown(results))


if __name__ == "__main__":
    main()
