"""The benchmark's workloads: the bundled MNIST model and two Gaussian mixtures with exact models, each with
the metric that scores its samples."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import distributed
from ..checks import check_positive
from ..distributed import Context
from ..fetch import sha256_file
from ..metrics import SLICED_DIRECTIONS, SlicedW2
from ..predictors import Model
from ..targets import GaussianMixture

Tensor = torch.Tensor

WORKLOADS = ("mnist", "gmm-2d", "gmm-64d")
# On the mixtures the sliced W2 of n exact samples sits at a floor that falls like 1/√n; with 4000 samples the floor
# (0.022 ± 0.003 on gmm-64d) exceeded the gaps between samplers from 6 NFE, so those could not be ranked.
DEFAULT_N = {"mnist": 2000, "gmm-2d": 16000, "gmm-64d": 16000}
DEFAULT_BATCH = {"mnist": 250}


def gmm_2d() -> GaussianMixture:
    """The ``gmm-2d`` target (see :mod:`lazyinterp.bench`)."""
    k = torch.arange(8, dtype=torch.float64)
    theta = 2 * math.pi * k / 8
    means = torch.tensor([1.0, -0.5], dtype=torch.float64) + 2.5 * torch.stack([theta.cos(), theta.sin()], 1)
    phi = theta + math.pi / 2
    rot = torch.stack([torch.stack([phi.cos(), -phi.sin()], -1), torch.stack([phi.sin(), phi.cos()], -1)], -2)
    diag = torch.diag(torch.tensor([0.35**2, 0.08**2], dtype=torch.float64))
    covs = rot @ diag @ rot.transpose(1, 2)
    weights = 1 + 0.6 * torch.sin(1.7 * k + 0.3)
    return GaussianMixture(weights, means, covs)


def gmm_64d() -> GaussianMixture:
    """The ``gmm-64d`` target (see :mod:`lazyinterp.bench`)."""
    gen = torch.Generator().manual_seed(64)
    comps, dim = 10, 64
    means = 0.5 + 0.5 * torch.randn(comps, dim, generator=gen, dtype=torch.float64)
    covs = []
    for _ in range(comps):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        eig = 10 ** (-2 * torch.rand(dim, generator=gen, dtype=torch.float64))
        covs.append(q @ torch.diag(eig) @ q.T)
    weights = 0.5 + torch.rand(comps, generator=gen, dtype=torch.float64)
    return GaussianMixture(weights, means, torch.stack(covs))


@dataclass
class Workload:
    """A model with the metric that scores its samples."""

    name: str
    model: Model
    sample_shape: tuple[int, ...]
    dtype: torch.dtype
    metric: str
    metric_label: str
    score: Callable[[Tensor, Context], dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    identity: str = ""  # what the model's results depend on, for matching cached runs


def _mnist_workload(model_name: str, device: torch.device | str = "cpu", chunk: int | None = None) -> Workload:
    from ..metrics import FeatureStats, check_fid_applies, class_report, features_and_probs, fid_from_stats
    from ..models import EVAL_CHUNK, load_model, resolve_model_path

    model, info = load_model(model_name, device, chunk=chunk or EVAL_CHUNK)
    check_fid_applies(info.data)

    def score(x: Tensor, ctx: Context) -> dict[str, Any]:
        """FID-MNIST with the classifier run on each rank's share and the feature moments all-reduced."""
        share = ctx.part(x.shape[0])
        feats, probs = features_and_probs(x[share.start:share.stop].float())
        stats = distributed.all_reduce_stats(FeatureStats.from_features(feats), ctx)
        report = class_report(ctx.all_gather_rows(torch.from_numpy(probs)))
        return {"value": fid_from_stats(stats), "mean_confidence": report["mean_confidence"],
                "class_entropy": report["class_entropy"]}

    return Workload("mnist", model, (1, 28, 28), torch.float32, "fid", "FID-MNIST", score,
                    {"model": str(model_name), "schedule": info.schedule, "predicts": info.predicts},
                    identity=sha256_file(resolve_model_path(model_name)))


def scale_modes(target: GaussianMixture, scale: float) -> GaussianMixture:
    """The mixture with every component's covariance multiplied by ``scale`` (means and weights kept)."""
    return target if scale == 1.0 else GaussianMixture(target.weights, target.means, target.covs * scale)


def check_mode_scale(mode_scale: Any, workload: str | None = None) -> float:
    """``mode_scale`` as a float, refused unless finite and positive, and unless 1 for ``workload`` "mnist", which
    has no modes to scale."""
    mode_scale = check_positive(mode_scale, "mode_scale")
    if workload == "mnist" and mode_scale != 1.0:
        raise ValueError("mode_scale: only the mixture workloads (gmm-2d, gmm-64d) have modes to scale")
    return mode_scale


def _gmm_workload(name: str, n: int, mode_scale: float = 1.0) -> Workload:
    target = scale_modes(gmm_2d() if name == "gmm-2d" else gmm_64d(), mode_scale)
    sliced = SlicedW2(target, n)
    # Mode weights of n samples fluctuate like a multinomial, which alone moves SW₂ by a visible amount on
    # well-separated modes: the floor is given as the mean and spread over several fresh samples.
    floors = torch.tensor([sliced(target.sample(n, torch.Generator().manual_seed(7 + i))) for i in range(5)])

    def score(x: Tensor, ctx: Context) -> dict[str, Any]:
        return {"value": sliced(x)}

    info = {"components": int(target.means.shape[0]), "dim": target.dim, "mode_scale": mode_scale,
            "directions": SLICED_DIRECTIONS,
            "target_points": sliced.k * n, "noise_floor": float(floors.mean()),
            "noise_floor_std": float(floors.std())}
    return Workload(name, target.model("linear"), (target.dim,), torch.float64, "sliced_w2",
                    "sliced W2 to the target", score, info)


def make_workload(name: str, n: int, model_name: str = "mnist", device: torch.device | str = "cpu",
                  chunk: int | None = None, mode_scale: float = 1.0) -> Workload:
    """The workload ``name``; ``device`` runs the mnist network (the mixtures' exact models stay on the CPU) in
    fixed chunks of ``chunk`` samples (default :data:`lazyinterp.models.EVAL_CHUNK`). ``mode_scale`` multiplies
    the mixtures' component covariances: how tight the modes are decides which schedule suits Euler
    (docs/findings.md)."""
    if name not in WORKLOADS:
        raise ValueError(f"workload: unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")
    mode_scale = check_mode_scale(mode_scale, name)
    return _mnist_workload(model_name, device, chunk) if name == "mnist" else _gmm_workload(name, n, mode_scale)
