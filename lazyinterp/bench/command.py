"""``lazyinterp bench``, the command line of :func:`lazyinterp.bench.run_bench`."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from tqdm import tqdm

from .. import distributed
from ..cli_errors import UserError, as_option_message, one_line_message
from ..fetch import ensure_writable
from .benchmark import DEFAULT_NFE, check_run_arguments, parse_nfe, run_bench
from .report import markdown_report, percentages, plot_results, write_json, write_text
from .samplers import SAMPLER_NAMES, SDE_REFERENCE_STEPS, select_samplers
from .workloads import check_mode_scale

# Arguments that the library's errors name, and the options of `lazyinterp bench` that set them.
BENCH_OPTIONS = {"mode_scale": "--mode-scale", "nfe": "--nfe", "samplers": "--samplers", "device": "--device",
                 "workload": "--workload", "n": "--n", "reference_nfe": "--reference-nfe", "batch_size": "--batch-size",
                 "max_runs": "--max-runs", "chunk": "--chunk"}


class _OneLineErrors(click.Command):
    """Usage errors as one line (no usage banner), like every other failure of this command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise UserError(exc.format_message()) from None


@click.command("bench", cls=_OneLineErrors)
@click.option("--workload", default="gmm-2d", show_default=True, help="mnist, gmm-2d or gmm-64d.")
@click.option("--nfe", default=DEFAULT_NFE, show_default=True, help="Comma-separated NFE values.")
@click.option("--n", "-n", "n", default=None, type=int,
              help="Samples per run [default: 2000 mnist, 16000 gmm]; under torchrun write -n.")
@click.option("--seed", default=0, type=int, show_default=True)
@click.option("--samplers", default=None, help=f"Comma list of samplers [default: all]: {', '.join(SAMPLER_NAMES)}.")
@click.option("--reference-nfe", default=1000, type=int, show_default=True,
              help="NFE of the linear-Heun reference from the same noise.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write results as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None,
              help="Write the tables as Markdown.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="Write a PNG plot of the metric against NFE.")
@click.option("--model", "model_name", default="mnist", show_default=True,
              help="mnist workload: a bundled model name or a .safetensors checkpoint.")
@click.option("--batch-size", default=None, type=int, help="Samples per batch [default: 250 mnist, all n gmm].")
@click.option("--device", default="cpu", show_default=True,
              help="Device of the mnist network: cpu or cuda (one GPU per process under torchrun).")
@click.option("--chunk", default=None, type=int,
              help="mnist: the network sees fixed chunks of this many samples, so samples do not depend on "
                   "--batch-size or the process count [default: 50; larger is faster on a GPU].")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where finished runs are kept until the benchmark completes, so that an interrupted "
                   "benchmark resumes [default: $LAZYINTERP_CACHE/bench].")
@click.option("--fresh", is_flag=True, help="Discard the finished runs of an interrupted benchmark.")
@click.option("--max-runs", default=None, type=int,
              help="Stop after this many new (sampler, NFE) runs (rerun to continue).")
@click.option("--overhead/--no-overhead", default=None,
              help="Measure the sampler overhead outside the network [default: for mnist].")
@click.option("--sde-path-error/--no-sde-path-error", default=None,
              help=f"Score the point-mass SDE samplers pathwise against a {SDE_REFERENCE_STEPS}-step solution on "
              "the same Brownian paths [default: for the mixtures].")
@click.option("--mode-scale", default=1.0, type=float, show_default=True,
              help="Mixtures: multiply every component's covariance by this (wider or tighter modes).")
@click.option("--quiet", is_flag=True, help="No progress bars or per-run lines.")
def bench(workload: str, nfe: str, n: int | None, seed: int, samplers: str | None, reference_nfe: int,
          json_path: Path | None, markdown_path: Path | None, plot_path: Path | None, model_name: str,
          batch_size: int | None, device: str, work_dir: Path | None, fresh: bool, max_runs: int | None,
          chunk: int | None, overhead: bool | None, sde_path_error: bool | None, mode_scale: float,
          quiet: bool) -> None:
    """Compare samplers at exactly counted NFE: peers (diffusers, flow_matching), baselines and lazy schedules.

    Runs as one process or under torchrun (each rank samples a share of every run); the results are the same.
    """
    try:
        check_run_arguments(workload, n=n, reference_nfe=reference_nfe, batch_size=batch_size, max_runs=max_runs,
                            chunk=chunk)
        check_mode_scale(mode_scale, workload)
        parse_nfe(nfe)
        select_samplers(samplers)
    except (ValueError, TypeError) as exc:
        raise UserError(as_option_message(exc, BENCH_OPTIONS)) from None
    outputs = [(p, o) for p, o in ((json_path, "--json"), (markdown_path, "--markdown"), (plot_path, "--plot"))
               if p is not None]
    try:
        for path, option in outputs:
            ensure_writable(path, option)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    resolved = [p.absolute() for p, _ in outputs]
    if len(set(resolved)) != len(resolved):
        raise UserError("--json, --markdown, --plot: each output needs its own file")

    def write_outputs(results: dict) -> None:
        report = markdown_report(results)
        if json_path is not None:
            write_json(results, json_path)
        if markdown_path is not None:
            write_text(report, markdown_path)
        if plot_path is not None:
            plot_results(results, plot_path)
        click.echo(report, nl=False)

    try:
        ctx = distributed.setup(device)
    except ValueError as exc:
        raise UserError(as_option_message(exc, BENCH_OPTIONS)) from None
    try:
        results = run_bench(workload, nfe=nfe, n=n, seed=seed, samplers=samplers, reference_nfe=reference_nfe,
                            model=model_name, batch_size=batch_size, progress=not quiet,
                            log=None if quiet else lambda line: tqdm.write(line, file=sys.stderr), ctx=ctx,
                            work_dir=work_dir, fresh=fresh, max_runs=max_runs, overhead=overhead, chunk=chunk,
                            sde_path_error=sde_path_error, mode_scale=mode_scale, finish=write_outputs)
    except (ValueError, TypeError, RuntimeError, OSError, MemoryError) as exc:
        raise UserError(one_line_message(exc)) from None
    finally:
        distributed.teardown(ctx)
    if not ctx.is_main:
        return
    if not results["complete"]:
        click.echo(f"stopped after {max_runs} new runs; finished runs are in {results['work_dir']}; "
                   "run the same command again to resume")
        return
    if results.get("overhead"):
        click.echo(f"overhead outside the network: {percentages(results['overhead'])}", err=True)
    if results.get("overhead_direct"):
        click.echo(f"overhead outside the network, measured directly: {percentages(results['overhead_direct'])}",
                   err=True)
    if results.get("overhead_cuda_graph"):
        click.echo(f"overhead outside the network, CUDA graphs: {percentages(results['overhead_cuda_graph'])}",
                   err=True)
    if not quiet:
        click.echo(f"done in {results['seconds']:.1f} s", err=True)
