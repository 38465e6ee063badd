"""``run_bench``: every sampler at every NFE from the same noise, scored against the references."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..checks import check_int
from ..distributed import Context
from ..grids import MAX_STEPS
from ..noise import NoiseStreams
from ..samplers import sample
from ..solvers import count_nfe
from .cache import RunCache, code_identity, default_work_dir
from .overhead import OVERHEAD_BATCH, OVERHEAD_REPEATS, OVERHEAD_STEPS, measure_overhead
from .peers import PEER_PACKAGES, import_peers, peer_available
from .report import format_value, json_safe, summary
from .runs import RunFailed, fitted_steps, run_sampler
from .samplers import (
    MAX_REFERENCE_NFE,
    REFERENCE,
    SDE_REFERENCE,
    SamplerDef,
    sde_reference_grid,
    select_samplers,
    solves_reference_sde,
)
from .workloads import DEFAULT_BATCH, DEFAULT_N, WORKLOADS, Workload, make_workload

Tensor = torch.Tensor

DEFAULT_NFE = "1,2,3,4,6,8,12,16"


def parse_nfe(value: str | Iterable[int]) -> list[int]:
    """NFE values from "1,2,4" (or an iterable of ints): sorted, without duplicates, each >= 1."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = set()
    for item in items:
        text = str(item).strip()
        try:
            k = int(text)
        except ValueError:
            raise ValueError(f"nfe: expected comma-separated integers >= 1, got {text!r}") from None
        if not 1 <= k <= MAX_STEPS:
            raise ValueError(f"nfe: each NFE must be from 1 to {MAX_STEPS}, got {k}")
        out.add(k)
    if not out:
        raise ValueError("nfe: expected at least one NFE value")
    return sorted(out)


def _path_error(x: Tensor, reference: Tensor) -> float:
    diff = (x.detach().cpu().double() - reference.detach().cpu().double()).reshape(x.shape[0], -1)
    return float(diff.norm(dim=1).mean())


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("lazyinterp", "torch", "diffusers", "flow_matching"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def check_run_arguments(workload: str, *, n: int | None = None, reference_nfe: int = 1000,
                        batch_size: int | None = None, max_runs: int | None = None, chunk: int | None = None) -> None:
    """The bounds :func:`run_bench` holds its arguments to (None: the default), as a ValueError (or a TypeError,
    for a value that is not an integer) naming the argument; checked before anything is loaded or sampled."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload: unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")
    if n is not None:
        check_int(n, "n", 2)
    check_int(reference_nfe, "reference_nfe", 2, MAX_REFERENCE_NFE)
    for name, value in (("batch_size", batch_size), ("max_runs", max_runs), ("chunk", chunk)):
        if value is not None:
            check_int(value, name)


def run_bench(workload: str = "gmm-2d", *, nfe: str | Iterable[int] = DEFAULT_NFE, n: int | None = None,
              seed: int = 0, samplers: str | Sequence[str] | None = None, reference_nfe: int = 1000,
              model: str = "mnist", batch_size: int | None = None, progress: bool = True,
              overhead: bool | None = None, log: Callable[[str], None] | None = None,
              device: torch.device | str = "cpu", ctx: Context | None = None, work_dir: Path | str | None = None,
              fresh: bool = False, max_runs: int | None = None, chunk: int | None = None,
              sde_path_error: bool | None = None, mode_scale: float = 1.0,
              finish: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the benchmark and return its results (the dict that ``--json`` writes).

    Args:
        workload: "mnist", "gmm-2d" or "gmm-64d".
        nfe: the NFE values to compare, as "1,2,4" or integers.
        n: samples per run; default 2000 for mnist and 16000 for the mixtures.
        samplers: names to run (default all; peers whose package is missing are skipped with a note).
        reference_nfe: NFE of the linear-Heun reference solution from the same noise.
        model: the mnist model, a bundled name or a checkpoint path.
        batch_size: samples per batch; default 250 for mnist and all n for the mixtures.
        overhead: measure the sampler overhead (default: for mnist only, where the network is a real one).
        log: called with one line per finished run.
        device: where the mnist network runs ("cpu", "cuda", "cuda:1"); under torchrun use ``ctx``'s device.
        ctx: the torch.distributed context (:func:`lazyinterp.distributed.setup`); every rank calls run_bench
            with the same arguments and samples its share of each run; rank 0 holds the complete results (path
            errors, overhead), reads and writes the cache, and calls ``finish``.
        work_dir: where finished runs are kept until the benchmark completes (default :func:`default_work_dir`);
            a run interrupted for any reason resumes from there when called again with the same configuration.
        fresh: discard runs cached by an interrupted benchmark of the same configuration.
        max_runs: stop after this many new (sampler, NFE) runs; the result then has ``"complete": False`` and
            the next call resumes.
        chunk: the mnist network sees fixed chunks of this many samples (default 50), which makes samples
            independent of ``batch_size`` and of the number of processes; larger chunks are faster on a GPU.
        sde_path_error: also score the point-mass SDE samplers pathwise against :data:`SDE_REFERENCE` on shared
            Brownian paths (``sde_path_error``; default: for the mixtures, whose exact model makes the
            reference's SDE_REFERENCE_STEPS − 1 evaluations cheap).
        mode_scale: the mixtures only: multiply every component's covariance by this (1 is the workload as
            described in :mod:`lazyinterp.bench`; larger is closer to one Gaussian, smaller closer to point masses).
        finish: called with the complete results before the cached runs are removed (e.g. to write outputs).
    """
    ctx = ctx or Context(device=torch.device(device))
    nfes = parse_nfe(nfe)
    specs = select_samplers(samplers)
    check_run_arguments(workload, n=n, reference_nfe=reference_nfe, batch_size=batch_size, max_runs=max_runs,
                        chunk=chunk)
    n = DEFAULT_N[workload] if n is None else n
    batch_size = batch_size or DEFAULT_BATCH.get(workload, n)
    log = log if log is not None and ctx.is_main else (lambda line: None)
    progress = progress and ctx.is_main
    started = time.perf_counter()
    if sde_path_error is None:
        sde_path_error = workload != "mnist"

    skipped: list[dict[str, Any]] = []
    runnable = []
    for spec in specs:
        if peer_available(spec.kind):
            runnable.append(spec)
        elif samplers is not None:
            raise ValueError(f"samplers: {spec.name} needs the {PEER_PACKAGES[spec.kind]} package "
                             "(pip install 'lazyinterp[bench]')")
        else:
            skipped.append({"sampler": spec.name, "nfe": None, "reason": f"{PEER_PACKAGES[spec.kind]} not installed"})
    jobs = []
    for spec in runnable:
        for k in nfes:
            plan = spec.plan(k)
            if plan is None:
                skipped.append({"sampler": spec.name, "nfe": k, "reason": "no step count gives exactly this NFE"})
            else:
                jobs.append((spec, k, plan))

    wl = make_workload(workload, n, model, ctx.device, chunk, mode_scale)
    versions = _versions()
    cache = RunCache(default_work_dir() if work_dir is None else work_dir,
                     {"workload": workload, "mode_scale": float(mode_scale), "n": n, "seed": seed,
                      "reference_nfe": reference_nfe,
                      "model": wl.identity, "device": ctx.device.type, "versions": versions,
                      "code": code_identity(), "chunk": chunk, "sde_path_error": bool(sde_path_error)})
    if ctx.is_main:
        cache.start(fresh)
    # Rank 0 reads the cache and tells the others; only rank 0 computes path errors and needs the samples.
    cached_ref, cached_ref_x, cached_runs = cache.load() if ctx.is_main else (None, None, None)
    cached_ref, cached_runs = ctx.broadcast_object((cached_ref, cached_runs))
    if cached_ref is not None:
        log(f"resuming from {cache.folder}: the reference and {len(cached_runs)} runs are cached (--fresh discards "
            "them)")

    import_peers(spec.kind for spec in runnable)
    mdl = wl.model
    noise = NoiseStreams(seed, range(n), wl.sample_shape, dtype=wl.dtype).draw()
    if workload == "mnist":
        noise = noise.to(ctx.device)
    # E[X] and σ of the lazy schedules are estimated once per model and cached on it; doing it here keeps that
    # one-off cost out of every run's time and NFE.
    mdl.nfe = 0
    try:
        _, info = sample(mdl, noise[:1], steps=1, schedule="lazy-vp", return_info=True)
        sigma = {"value": info.sigma, "note": "estimated by li.sample from the model"}
        estimation_nfe = info.estimation_nfe
    except ValueError as exc:
        sigma = {"value": None, "note": f"li.sample could not estimate sigma: {exc}"}
        log(f"warning: {sigma['note']}")
        estimation_nfe = mdl.nfe

    # The pathwise SDE reference, planned here so that the progress bar counts it and the Brownian reruns.
    sde_spec = sde_plan = None
    sde_nfe = 0
    if sde_path_error and sigma["value"] is not None and any(solves_reference_sde(spec) for spec, _, _ in jobs):
        grid = sde_reference_grid(sigma["value"])
        sde_spec = dataclasses.replace(SDE_REFERENCE, options={**SDE_REFERENCE.options, "grid": grid})
        sde_plan = {"steps": len(grid) - 1, "last_step": sde_spec.options["last_step"]}
        sde_nfe = count_nfe(sde_spec.options["solver"], len(grid) - 1, sde_plan["last_step"], sde_spec.known_start)

    def job_nfe(spec: SamplerDef, k: int) -> int:
        """The evaluations per sample a job costs: twice k where it is rerun on Brownian paths."""
        return 2 * k if sde_spec is not None and solves_reference_sde(spec) else k

    # Progress in network evaluations per sample, so that the long references weigh what they cost.
    bar = tqdm(total=reference_nfe + sde_nfe + sum(job_nfe(spec, k) for spec, k, _ in jobs), disable=not progress,
               desc="reference", unit="NFE", dynamic_ncols=True, file=sys.stderr)
    ref_plan = REFERENCE.plan(reference_nfe)
    if cached_ref is not None:
        reference, ref_x = cached_ref, cached_ref_x
        log(f"reference linear Heun, {reference_nfe} NFE: {wl.metric} {reference['value']:.4g} (cached in "
            f"{cache.folder})")
    else:
        try:
            ref_x, ref_seen, ref_seconds = run_sampler(REFERENCE, ref_plan, wl, noise, batch_size, seed, progress,
                                                       f"reference {reference_nfe} NFE", ctx)
        except RunFailed as exc:  # no benchmark without its reference
            raise RuntimeError(f"reference ({REFERENCE.label}, {reference_nfe} NFE): {exc}") from None
        if ref_seen != {reference_nfe}:
            raise RuntimeError(f"reference: expected {reference_nfe} NFE, the model counted {sorted(ref_seen)}")
        reference = {"sampler": "linear Heun", "nfe": reference_nfe, "steps": ref_plan["steps"],
                     "last_step": ref_plan["last_step"], "seconds": round(ref_seconds, 3), **wl.score(ref_x, ctx)}
        for key in ("noise_floor", "noise_floor_std"):
            if key in wl.info:
                reference[key] = wl.info[key]
        if ctx.is_main:
            cache.save_reference(reference, ref_x)
        log(f"reference linear Heun, {reference_nfe} NFE: {wl.metric} {reference['value']:.4g}")
    bar.update(reference_nfe)

    sde_reference, sde_ref_x = None, None
    if sde_spec is not None:
        bar.set_description(f"SDE reference {sde_nfe} NFE")
        try:
            sde_ref_x, seen, seconds = run_sampler(sde_spec, sde_plan, wl, noise, batch_size, seed, progress,
                                                   f"SDE reference {sde_nfe} NFE", ctx)
        except RunFailed as exc:
            raise RuntimeError(f"SDE reference ({SDE_REFERENCE.label}): {exc}") from None
        if seen != {sde_nfe}:
            raise RuntimeError(f"SDE reference: expected {sde_nfe} NFE, the model counted {sorted(seen)}")
        sde_reference = {"sampler": SDE_REFERENCE.label, "nfe": sde_nfe, "steps": sde_plan["steps"],
                         "sde_noise": "brownian", "seconds": round(seconds, 3), **wl.score(sde_ref_x, ctx)}
        log(f"SDE reference ({SDE_REFERENCE.label}, {sde_nfe} NFE, Brownian noise): {wl.metric} "
            f"{sde_reference['value']:.4g}")
        bar.update(sde_nfe)

    results = []
    new_runs = 0
    complete = True
    for spec, k, plan in jobs:
        if (spec.name, k) in cached_runs:
            entry = cached_runs[(spec.name, k)]
            if entry.get("skipped"):
                skipped.append(entry["skipped"])
            else:
                results.append(entry)
            bar.update(job_nfe(spec, k))
            continue
        if max_runs is not None and new_runs >= max_runs:
            complete = False
            break
        bar.set_description(f"{spec.name} NFE {k}")
        entry = _run_entry(spec, k, plan, wl, noise, batch_size, seed, progress, ctx, ref_x, log, sde_ref_x)
        if entry.get("skipped"):
            skipped.append(entry["skipped"])
        else:
            results.append(entry)
        if ctx.is_main:
            cache.save_run(entry)
        new_runs += 1
        bar.update(job_nfe(spec, k))
    bar.close()

    out: dict[str, Any] = {
        "workload": workload, "metric": wl.metric, "metric_label": wl.metric_label, "n": n, "seed": seed,
        "nfe": nfes, "reference": reference, "sde_reference": sde_reference, "results": results, "skipped": skipped,
        "estimation_nfe": estimation_nfe, "workload_info": wl.info,
        "sigma": sigma,
        "samplers": {s.name: {"label": s.label, "family": s.family, "stochastic": s.stochastic} for s in runnable},
        "versions": versions, "torch_threads": torch.get_num_threads(), "device": str(ctx.device),
        "processes": ctx.world, "network_chunk": getattr(mdl, "chunk", None), "complete": complete,
    }
    if not complete:
        out["work_dir"] = str(cache.folder)
        return json_safe(out)
    if (overhead if overhead is not None else workload == "mnist") and ctx.is_main:
        out["overhead"] = measure_overhead(mdl, wl.sample_shape, wl.dtype, seed=seed, device=noise.device)
        out["overhead_direct"] = measure_overhead(mdl, wl.sample_shape, wl.dtype, seed=seed, device=noise.device,
                                                  direct=True)
        if noise.device.type == "cuda":
            out["overhead_cuda_graph"] = measure_overhead(mdl, wl.sample_shape, wl.dtype, seed=seed,
                                                          device=noise.device, cuda_graph=True)
        out["overhead_setup"] = {"batch": OVERHEAD_BATCH, "steps": OVERHEAD_STEPS, "repeats": OVERHEAD_REPEATS}
    out["summary"] = summary(out)
    out["seconds"] = round(time.perf_counter() - started, 2)
    out = json_safe(out)
    if finish is not None and ctx.is_main:
        finish(out)
    ctx.barrier()
    if ctx.is_main:
        cache.remove()
    return out


def _run_entry(spec: SamplerDef, k: int, plan: dict, wl: Workload, noise: Tensor, batch_size: int, seed: int,
               progress: bool, ctx: Context, ref_x: Tensor | None, log: Callable[[str], None],
               sde_ref_x: Tensor | None = None) -> dict[str, Any]:
    """One (sampler, NFE) run and its scores, or ``{"skipped": ...}`` when the evaluations did not add up; with
    ``sde_ref_x``, a sampler of the reference SDE is run again on Brownian paths for its ``sde_path_error``."""
    entry: dict[str, Any] = {"sampler": spec.name, "label": spec.label, "family": spec.family, "nfe": k,
                             "steps": plan["steps"]}
    if "last_step" in plan:
        entry["last_step"] = plan["last_step"]
    try:
        x, seen, seconds = run_sampler(spec, plan, wl, noise, batch_size, seed, progress, f"{spec.name} {k}", ctx)
    except RunFailed as exc:
        # A sampler that cannot run (a network NaN, or σ that cannot be estimated) is a result, not a crash.
        log(f"{spec.name:>28} NFE {k:>3}: failed: {exc}")
        return {**entry, "value": None, "seconds": None, "path_error": None, "stochastic": spec.stochastic,
                "error": str(exc)}
    if spec.kind == "fitted":
        entry["fit"] = fitted_steps(wl.model, k, noise, seed).report
    if seen != {k}:
        return {"sampler": spec.name, "nfe": k,
                "skipped": {"sampler": spec.name, "nfe": k,
                            "reason": f"the model counted {sorted(seen)} evaluations, not {k}"}}
    if bool(torch.isfinite(x).all()):
        entry.update(wl.score(x, ctx))
        entry["path_error"] = None if spec.stochastic or ref_x is None else _path_error(x, ref_x)
    else:
        entry.update({"value": None, "path_error": None, "error": "non-finite samples"})
    entry["seconds"] = round(seconds, 4)
    entry["stochastic"] = spec.stochastic
    if sde_ref_x is not None and solves_reference_sde(spec):
        entry["sde_path_error"] = _sde_path_error(spec, k, plan, wl, noise, batch_size, seed, ctx, sde_ref_x)
    pe, spe = entry.get("path_error"), entry.get("sde_path_error")
    log(f"{spec.name:>28} NFE {k:>3}: {wl.metric} {format_value(entry.get('value'))}"
        + (f", path error {format_value(pe)}" if pe is not None else "")
        + (f", SDE path error {format_value(spe)}" if spe is not None else "") + f" ({seconds:.2f} s)")
    return entry


def _sde_path_error(spec: SamplerDef, k: int, plan: dict, wl: Workload, noise: Tensor, batch_size: int, seed: int,
                    ctx: Context, sde_ref_x: Tensor) -> float | None:
    """The mean distance of ``spec``'s samples on the Brownian paths to the SDE reference's (None where a run
    fails or leaves a non-finite sample)."""
    brownian = dataclasses.replace(spec, options={**spec.options, "sde_noise": "brownian"})
    try:
        x, seen, _ = run_sampler(brownian, plan, wl, noise, batch_size, seed, ctx=ctx)
    except RunFailed:
        return None
    if seen != {k}:
        raise RuntimeError(f"{spec.name}: expected {k} NFE on Brownian paths, the model counted {sorted(seen)}")
    return _path_error(x, sde_ref_x) if bool(torch.isfinite(x).all()) else None
