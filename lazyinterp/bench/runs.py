"""One sampler run over all samples, in batches, shared among the ranks of a torch.distributed job."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from ..distributed import Context
from ..fitting import FittedEuler, fit_euler
from ..noise import NoiseStreams, sample_seed
from ..predictors import Model, NonFiniteError, model_cache
from ..samplers import sample
from .peers import diffusers_sample, diffusers_scheduler, flow_matching_sample, linear_velocity
from .samplers import SamplerDef, li_kwargs
from .workloads import Workload

Tensor = torch.Tensor


def run_batch(spec: SamplerDef, plan: dict, model: Model, noise: Tensor, indices: range, seed: int,
              velocity: Callable) -> tuple[Tensor, int]:
    """Samples for one batch and the network evaluations they cost per sample (estimation excluded)."""
    model.nfe = 0
    if spec.kind == "li":
        kwargs = li_kwargs(spec, plan)
        base_point = spec.options["schedule"] == "point-mass"
        x, info = sample(model, None if base_point else noise, shape=tuple(noise.shape), device=noise.device,
                         generator=sample_seed(seed, 1 << 62), indices=indices, return_info=True, **kwargs)
        return x, model.nfe - info.estimation_nfe
    if spec.kind == "fitted":
        return fitted_steps(model, plan["steps"] - 1, noise, seed).sample(model, noise), model.nfe
    if spec.kind == "diffusers":
        return diffusers_sample(diffusers_scheduler(spec.options), velocity, noise, plan["steps"]), model.nfe
    return flow_matching_sample(velocity, noise, plan["steps"]), model.nfe


class RunFailed(RuntimeError):
    """A sampler could not run (a network NaN, or σ that cannot be estimated) on some rank."""


# The fit's noise: per-sample streams of the benchmark's seed from this index on, which no benchmark sample reaches.
FIT_NOISE_OFFSET = 1 << 40
FIT_SAMPLES = 4096
FIT_ITERATIONS = 2000


def fitted_steps(model: Model, nfe: int, like: Tensor, seed: int, ctx: Context | None = None) -> FittedEuler:
    """:func:`~lazyinterp.fitting.fit_euler` for ``nfe`` on the model's own noise (never the scored samples'), of the
    sample shape, dtype and device of the benchmark's noise ``like``,
    fitted once per model and kept on it; the fit's evaluations are not counted as the run's. Under
    torch.distributed (``ctx``) rank 0 fits and every rank samples with its steps, so that a sample does not depend
    on the rank that draws it."""
    cache = model_cache(model).setdefault("fitted_euler", {})
    sample_shape = tuple(like.shape[1:])
    key = (nfe, sample_shape, like.dtype, seed)
    if ctx is not None and key not in cache:
        # A fit that fails is the run's failure on every rank (RunFailed), not a crash of the benchmark.
        outcome: FittedEuler | str | None = None
        if ctx.is_main:
            try:
                outcome = fitted_steps(model, nfe, like, seed)
            except (NonFiniteError, ValueError) as exc:
                outcome = f"fit: {str(exc).splitlines()[0]}"
        outcome = ctx.broadcast_object(outcome)
        if isinstance(outcome, str):
            raise RunFailed(outcome)
        cache[key] = outcome
    if key not in cache:
        noise = NoiseStreams(seed, range(FIT_NOISE_OFFSET, FIT_NOISE_OFFSET + FIT_SAMPLES), sample_shape,
                             dtype=like.dtype).draw().to(like.device)
        evaluations = model.nfe
        start = time.perf_counter()
        with torch.enable_grad():
            fitted = fit_euler(model, nfe, noise=noise, iterations=FIT_ITERATIONS)
        fitted.report["fit_seconds"] = round(time.perf_counter() - start, 2)
        model.nfe = evaluations
        cache[key] = fitted
    return cache[key]


def _batches(n: int, batch_size: int) -> list[range]:
    return [range(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]


@torch.no_grad()
def run_sampler(spec: SamplerDef, plan: dict, workload: Workload, noise: Tensor, batch_size: int, seed: int,
                progress: bool = False, desc: str = "", ctx: Context | None = None) -> tuple[Tensor, set[int], float]:
    """All ``n`` samples of one (sampler, plan), the per-sample NFE seen in each batch, and wall seconds.

    Under torch.distributed each rank runs a contiguous share of the batches and every rank gets all samples
    back in order. Sample i depends only on its noise (seed, i), so the result is the same for any split.
    """
    ctx = ctx or Context()
    velocity = linear_velocity(workload.model)
    batches = _batches(noise.shape[0], batch_size)
    share = ctx.part(len(batches))
    mine = batches[share.start:share.stop]
    out, seen, error = [], set(), None
    if spec.kind == "fitted":
        fitted_steps(workload.model, plan["steps"] - 1, noise, seed, ctx)
    start = time.perf_counter()
    with tqdm(total=sum(len(idx) for idx in mine), disable=not progress or len(mine) < 2 or not ctx.is_main,
              desc=desc, leave=False, unit="sample", dynamic_ncols=True, file=sys.stderr) as bar:
        try:
            for idx in mine:
                x, used = run_batch(spec, plan, workload.model, noise[idx.start:idx.stop], idx, seed, velocity)
                out.append(x.detach())
                seen.add(int(used))
                bar.update(len(idx))
        except (NonFiniteError, ValueError) as exc:
            error = str(exc).splitlines()[0] or type(exc).__name__
    # Every rank learns of a failure anywhere, so that none waits in a collective the others skip.
    reports = ctx.all_gather_object((error, sorted(seen)))
    errors = [e for e, _ in reports if e is not None]
    if errors:
        raise RunFailed(errors[0])
    local = torch.cat(out) if out else noise[:0]
    x = ctx.all_gather_rows(local)
    return x, set().union(*(set(s) for _, s in reports)), time.perf_counter() - start
