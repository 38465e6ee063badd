"""The ``lazyinterp`` command line: fetch, train, sample, demo, bench.

Every failure the user can cause ends in one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import shlex
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .cli_errors import UserError, as_option_message, friendly_errors, one_line_warning

if TYPE_CHECKING:
    from .distributed import Context


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange without NaN or inf, which its bounds let through (every comparison with NaN is False)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The value as a float, refused unless finite."""
        import math

        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


class OneLineErrorGroup(click.Group):
    """A command group whose usage errors (a bad option value, an unknown option or command) print one line,
    ``error: <what was wrong>``, instead of click's usage block, and exit with status 2; warnings print one line
    each, ``warning: <message>``."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:  # noqa: D102
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = one_line_warning
                result = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            # A bare ``lazyinterp`` (or a group without its command) shows the help, which is not an error line.
            shows_help = isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ()))
            if isinstance(exc, click.UsageError) and not shows_help:
                click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            else:
                exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        # Without standalone mode click returns --help's exit code, or the command's return value (None).
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Few-step sampling for pretrained flow and diffusion models."""


# Arguments of li.sample that its errors name, and the `lazyinterp sample` options that set them.
SAMPLE_OPTIONS = {"grid": "--time-grid", "grid_shift": "--grid-shift", "sigma": "--sigma", "steps": "--steps",
                  "solver": "--solver", "diffusion": "--diffusion", "last_step": "--last-step",
                  "covariance": "--covariance", "sde_noise": "--sde-noise", "center": "--center"}


# The TrainConfig fields that its errors name, likewise.
TRAIN_OPTIONS = {"batch_size": "--batch-size", "device": "--device", "lr": "--lr", "threads": "--threads",
                 "steps": "--steps", "warmup": "--warmup", "ema_decay": "--ema-decay", "channels": "--channels",
                 "checkpoint_every": "--checkpoint-every", "limit_data": "--limit-data"}


@main.command()
@click.argument("dataset", type=click.Choice(["mnist", "fashion-mnist"]))
@click.option("--force", is_flag=True, help="Fetch again even if a verified copy is cached.")
@friendly_errors
def fetch(dataset: str, force: bool) -> None:
    """Fetch a data set into the cache ($LAZYINTERP_CACHE) and verify it."""
    from .data import fetch as fetch_dataset

    path = fetch_dataset(dataset, force=force)
    click.echo(str(path))


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory: training state, log and model.safetensors.")
@click.option("--data", default="mnist", type=click.Choice(["mnist", "fashion-mnist"]), show_default=True)
@click.option("--steps", default=6000, type=click.IntRange(min=1), show_default=True)
@click.option("--batch-size", default=128, type=click.IntRange(min=1), show_default=True)
@click.option("--lr", default=2e-3, type=FiniteFloatRange(min=0, min_open=True), show_default=True)
@click.option("--warmup", default=200, type=click.IntRange(min=0), show_default=True,
              help="Steps of linear learning-rate warm-up before the cosine decay.")
@click.option("--ema-decay", default=0.999, type=FiniteFloatRange(min=0, max=1, max_open=True), show_default=True,
              help="Decay of the exported exponential moving average of the weights.")
@click.option("--channels", default="16,32,64", show_default=True, help="UNet widths per level.")
@click.option("--seed", default=0, type=int, show_default=True)
@click.option("--checkpoint-every", default=500, type=click.IntRange(min=1), show_default=True)
@click.option("--threads", default=0, type=click.IntRange(min=0), help="torch threads (0: default).")
@click.option("--limit-data", default=0, type=click.IntRange(min=0), help="Use only the first N images.")
@click.option("--device", default="cpu", show_default=True)
@friendly_errors(out_of_memory_line="out of memory; use a smaller --batch-size")
def train(out_dir: Path, data: str, steps: int, batch_size: int, lr: float, warmup: int, ema_decay: float,
          channels: str, seed: int, checkpoint_every: int, threads: int, limit_data: int, device: str) -> None:
    """Train a velocity UNet with the linear (rectified-flow) schedule; resumes if OUT has a state."""
    from .training import TrainConfig
    from .training import train as run_training

    try:
        widths = tuple(int(c) for c in channels.split(","))
    except ValueError as exc:
        raise UserError(f"--channels: expected comma-separated integers, got {channels!r}") from exc
    cfg = TrainConfig(data=data, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
                      channels=widths, seed=seed,
                      checkpoint_every=checkpoint_every, threads=threads, limit_data=limit_data,
                      device=device)
    command = "lazyinterp " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        path = run_training(cfg, out_dir, command=command)
    except (ValueError, TypeError) as exc:
        raise UserError(as_option_message(exc, TRAIN_OPTIONS)) from exc
    click.echo(str(path))


def parse_diffusion(value: str | None, schedule: str) -> object:
    """``--diffusion``: "ode", "optimal" or a number κ; by default "optimal" for point-mass, else "ode"."""
    if value is None:
        return "optimal" if schedule == "point-mass" else "ode"
    if value in ("ode", "optimal"):
        return value
    try:
        kappa = float(value)
    except ValueError:
        raise UserError(f"--diffusion: expected 'ode', 'optimal' or a number kappa >= 0, got {value!r}") from None
    if not kappa >= 0 or kappa == float("inf"):
        raise UserError(f"--diffusion: kappa must be a finite number >= 0, got {value}")
    return kappa


SCHEDULE_NAMES = ["linear", "cosine", "vp", "lazy-vp", "point-mass"]


@main.command()
@click.option("--model", "model_name", default="mnist", show_default=True,
              help="A bundled model name or a .safetensors checkpoint path.")
@click.option("--schedule", default="lazy-vp", type=click.Choice(SCHEDULE_NAMES), show_default=True)
@click.option("--steps", default=4, type=click.IntRange(min=1), show_default=True)
@click.option("--solver", default=None,
              type=click.Choice(["euler", "euler-alpha", "heun", "ab2", "ab2-pc", "exponential", "exponential-2m"]),
              help="Default for an ODE on a lazy schedule: ab2, or ab2-pc from 12 steps on; for the point-mass "
              "SDE with eps*: ab2; for other SDEs: exponential-2m; else euler.")
@click.option("--diffusion", default=None, help="ode, optimal, or kappa (eps = kappa * eps*). "
              "Default: optimal for point-mass, else ode.")
@click.option("--sigma", default=None, type=FiniteFloatRange(min=0, min_open=True),
              help="sigma of a lazy schedule (default: estimated from the model).")
@click.option("--last-step", default=None, type=click.Choice(["euler", "denoise"]))
@click.option("--time-grid", default=None, type=click.Choice(["uniform", "model", "linear"]),
              help="Time grid: uniform; model, the noise levels of the model's uniform grid; or linear, those of the "
              "linear schedule's (the default for lazy schedules; the same as model for flow-matching models). For a "
              "lazy schedule with sigma more than 2x (lazy-vp) or 4x (point-mass) from 1, both move toward its own "
              "uniform grid.")
@click.option("--grid-shift", default=1.0, show_default=True, type=FiniteFloatRange(min=0, min_open=True),
              help="Divide the SNR of every node of the model or linear grid by this (diffusers' shift); > 1 "
              "spends more steps at high noise.")
@click.option("--center/--no-center", default=None,
              help="Sample X - E[X] with the model's E[X] (default: on for lazy schedules).")
@click.option("--covariance", is_flag=True,
              help="lazy-vp ODE: one lazy schedule per principal direction of the covariance, estimated from the "
              "model's own samples (exact for any Gaussian data).")
@click.option("--sde-noise", default="independent", show_default=True,
              type=click.Choice(["independent", "keyed", "brownian"]),
              help="SDE noise: a fresh normal per step from host generators, the same law computed on the device "
              "(keyed; faster on a GPU), or one Brownian path per sample that every step count reads alike (more "
              "steps refine the same sample).")
@click.option("--n", "-n", "n", default=64, type=click.IntRange(min=1), show_default=True)
@click.option("--batch-size", default=250, type=click.IntRange(min=1), show_default=True)
@click.option("--seed", default=0, type=int, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default="samples.npz", show_default=True)
@click.option("--grid", "grid_png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a PNG image grid of (up to 256 of) the samples.")
@click.option("--fid", is_flag=True, help="Also print FID-MNIST of the samples (statistics reduced over ranks).")
@click.option("--shard-size", default=1000, type=click.IntRange(min=1), show_default=True,
              help="Samples per shard file; an interrupted run resumes at the first missing shard.")
@click.option("--max-shards", default=None, type=click.IntRange(min=1),
              help="Stop each process after this many new shards (rerun to continue).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (one GPU per process).")
@click.option("--cuda-graph", is_flag=True,
              help="Replay each batch as one captured CUDA graph (--device cuda): no host work per step.")
@click.option("--fitted", "fitted_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Sample with the Euler steps of `lazyinterp fit` (they replace the sampler options).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
@click.pass_context
def sample(click_ctx: click.Context, model_name: str, schedule: str, steps: int, solver: str, diffusion: str | None,
           sigma: float | None, last_step: str | None, time_grid: str | None, grid_shift: float, center: bool | None,
           covariance: bool, sde_noise: str, n: int, batch_size: int, seed: int,
           out: Path, grid_png: Path | None, fid: bool, shard_size: int, max_shards: int | None, device: str,
           cuda_graph: bool, fitted_path: Path | None, quiet: bool) -> None:
    """Sample a model under any schedule; writes an npz with `samples` (N, 1, 28, 28) float32.

    Runs as one process or under torchrun (gloo on CPU, nccl on CUDA): the output is the same either way.
    """
    import torch
    from tqdm import tqdm

    from . import distributed
    from .fetch import ensure_writable
    from .generate import SamplerSpec, generate, image_grid, save_png, save_samples
    from .grids import SNR_MATCHED_GRIDS
    from .metrics import check_fid_applies
    from .models import load_model
    from .samplers import check_settings
    from .schedules import LazySchedule, get_schedule

    ensure_writable(out, "--out")
    if grid_png is not None:
        ensure_writable(grid_png, "--grid")
    if fid and n < 2:
        raise UserError(f"--fid: FID compares feature covariances, so it needs at least 2 samples, got -n {n}")
    if cuda_graph and not device.startswith("cuda"):
        raise UserError(f"--cuda-graph: needs --device cuda, got {device}")
    if sigma is not None and schedule not in ("lazy-vp", "point-mass"):
        raise UserError("--sigma: only the lazy schedules (lazy-vp, point-mass) take sigma")
    fitted = None
    if fitted_path is not None:
        sampler_options = ("schedule", "steps", "solver", "diffusion", "sigma", "last_step", "time_grid", "grid_shift",
                           "center", "covariance", "sde_noise", "cuda_graph")
        given = [name for name in sampler_options
                 if click_ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
        if given:
            raise UserError(f"--fitted: the fitted steps replace --{given[0].replace('_', '-')}; leave it out")
        from .fitting import FittedEuler

        fitted = FittedEuler.load(fitted_path)
    diffusion_spec = parse_diffusion(diffusion, schedule)
    target = get_schedule(schedule)
    # Checked before any output, shard or progress bar exists; li.sample's default grid for the schedule.
    grid_name = time_grid or ("linear" if isinstance(target, LazySchedule) else "uniform")
    if grid_shift != 1.0 and grid_name not in SNR_MATCHED_GRIDS:
        default = "" if time_grid else f", the default for --schedule {schedule}"
        raise UserError(f"--grid-shift: applies to --time-grid model or linear only, got {grid_name}{default}")
    try:
        check_settings(target, diffusion_spec, solver, last_step, covariance)
    except ValueError as exc:
        raise UserError(as_option_message(exc, SAMPLE_OPTIONS)) from None
    spec = SamplerSpec(schedule=schedule, steps=steps, diffusion=diffusion_spec,
                       solver=solver, sigma=sigma, last_step=last_step, grid=time_grid, center=center,
                       grid_shift=grid_shift, covariance="model" if covariance else None, sde_noise=sde_noise,
                       fitted=fitted)
    try:
        ctx = distributed.setup(device)
    except ValueError as exc:
        raise UserError(f"--{exc}") from None
    try:
        model, info = load_model(model_name, ctx.device)
        if fid:  # its ValueError becomes one line in the handler below
            check_fid_applies(info.data, "--fid")
        manifest = {"model": str(model_name), "n": n, "seed": seed, "shard_size": shard_size,
                    "spec": {k: str(v) for k, v in vars(spec).items()}}
        distributed.check_manifest(out, manifest, ctx)
        shape = (1, 28, 28)
        if fitted is not None and fitted.sample_shape != shape:
            raise UserError(f"--fitted: the steps were fitted to samples of shape {fitted.sample_shape}, this model's "
                            f"are {shape}")
        with tqdm(total=n, disable=quiet or not ctx.is_main, desc="sample", unit="img", dynamic_ncols=True) as bar:
            def produce(indices: range):
                return generate(model, spec, len(indices), shape, seed=seed, batch_size=batch_size,
                                device=ctx.device, start=indices.start, progress=False, cuda_graph=cuda_graph)

            # Only rank 0 shows progress, counting its own shards times the number of ranks.
            done, total = distributed.run_shards(out, n, shard_size, ctx, produce, max_shards=max_shards,
                                                 progress=lambda k: bar.update(min(k * ctx.world, n - bar.n)))
        if done < total:
            if ctx.is_main:
                click.echo(f"stopped with {done} of {total} shards in {distributed.shard_dir(out)}; "
                           "run the same command again to resume")
            return
        fid_value = None
        if fid:
            fid_value = _distributed_fid(out, n, shard_size, ctx)
        if ctx.is_main:
            samples = torch.from_numpy(distributed.gather(out, n, shard_size))
            if fitted is not None:
                schedule, steps, solver = "fitted", fitted.nfe + 1, f"fitted Euler ({fitted_path})"
            save_samples(out, samples, seed=seed, schedule=schedule, steps=steps, solver=solver,
                         diffusion=str(spec.diffusion), model=str(model_name), data_transform=info.data_transform)
            if grid_png is not None:
                save_png(grid_png, image_grid(samples[:256]))
            distributed.remove_shards(out)
            click.echo(f"wrote {n} samples to {out}" + (f" and {grid_png}" if grid_png else ""))
            if fid_value is not None:
                click.echo(f"FID-MNIST {fid_value:.3f} on {n} samples")
        ctx.barrier()
    except BaseException as exc:
        # A job that failed before its first shard leaves nothing to resume: no folder either.
        folder = distributed.shard_dir(out)
        if ctx.is_main and folder.is_dir() and not any(folder.glob("shard-*.npz")):
            distributed.remove_shards(out)
        if isinstance(exc, ValueError):
            raise UserError(as_option_message(exc, SAMPLE_OPTIONS)) from exc
        raise
    finally:
        distributed.teardown(ctx)


def _distributed_fid(out: Path, n: int, shard_size: int, ctx: Context) -> float | None:
    """FID-MNIST of all shards: each rank featurises its own shards, the moment sums are all-reduced."""
    import numpy as np
    import torch

    from . import distributed, metrics

    stats = metrics.FeatureStats()
    shards = distributed.shard_ranges(n, shard_size)
    for j in range(ctx.rank, len(shards), ctx.world):
        with np.load(distributed.shard_path(out, j, len(shards)), allow_pickle=False) as f:
            features, _ = metrics.features_and_probs(torch.from_numpy(f["samples"]))
        stats.update(features)
    stats = distributed.all_reduce_stats(stats, ctx)
    return metrics.fid_from_stats(stats) if ctx.is_main else None


@main.command()
@click.option("--model", "model_name", default="mnist", show_default=True)
@click.option("--n", "-n", "n", default=1000, type=click.IntRange(min=2), show_default=True,
              help="Samples per sampler and NFE.")
@click.option("--seed", default=0, type=int, show_default=True)
@click.option("--batch-size", default=250, type=click.IntRange(min=1), show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default="demo",
              show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def demo(model_name: str, n: int, seed: int, batch_size: int, out_dir: Path, device: str, quiet: bool) -> None:
    """Linear Euler vs lazy VP Euler vs point-mass SDE at NFE 2, 4, 8 on the bundled model, with FID-MNIST."""
    from .demo import run_demo

    try:
        run_demo(model_name, n=n, seed=seed, batch_size=batch_size, out_dir=out_dir, device=device,
                 progress=not quiet, echo=click.echo)
    except ValueError as exc:
        raise UserError(as_option_message(exc, {"device": "--device"})) from exc


@main.command()
@click.option("--model", "model_name", default="mnist", show_default=True,
              help="A bundled model name or a checkpoint path.")
@click.option("--nfe", required=True, type=click.IntRange(min=1), help="Network evaluations per sample.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The safetensors file for `lazyinterp sample --fitted`.")
@click.option("--samples", default=4096, type=click.IntRange(min=2), show_default=True,
              help="Paths of the model's own ODE to fit on (one eighth held out).")
@click.option("--iterations", default=2000, type=click.IntRange(min=0), show_default=True)
@click.option("--batch-size", default=512, type=click.IntRange(min=1), show_default=True)
@click.option("--reference-nfe", default=None, type=click.IntRange(min=2),
              help="Evaluations of the reference ODE solution [default: max(128, 32 NFE)].")
@click.option("--seed", default=1, type=click.IntRange(min=0), show_default=True,
              help="Seed of the fit's noise (use another than the samples you will score).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def fit(model_name: str, nfe: int, out: Path, samples: int, iterations: int, batch_size: int,
        reference_nfe: int | None, seed: int, device: str, quiet: bool) -> None:
    """Fit Euler steps in per-direction lazy coordinates to a model's own ODE paths (li.fit_euler)."""
    import torch

    from .devices import check_device
    from .fetch import ensure_writable
    from .fitting import fit_euler
    from .models import load_model
    from .noise import NoiseStreams

    ensure_writable(out, "--out")
    try:
        dev = check_device(device, "--device")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    model, _ = load_model(model_name, dev)
    shape = (1, 28, 28)
    noise = NoiseStreams(seed, range(samples), shape, device=dev).draw()
    try:
        with torch.enable_grad():
            fitted = fit_euler(model, nfe, noise=noise, iterations=iterations, batch_size=batch_size,
                               reference_nfe=reference_nfe, progress=not quiet)
    except ValueError as exc:
        raise UserError(as_option_message(exc, {"reference_nfe": "--reference-nfe", "batch_size": "--batch-size",
                                                "noise": "--samples", "nfe": "--nfe"})) from None
    fitted.save(out)
    report = fitted.report
    click.echo(f"wrote {out}: {nfe} NFE, held-out path error {report['held_out_path_error']:.4g} "
               f"(DDIM's steps {report['held_out_path_error_initial']:.4g}), {report['fit_evaluations']} network calls")


def _register_bench() -> None:
    from .bench import bench

    main.add_command(bench)


_register_bench()


if __name__ == "__main__":  # pragma: no cover
    main()
