"""The ``lazyinterp`` command line: fetch, train, sample, demo, bench.

Every failure the user can cause ends in one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import functools
import shlex
import sys
from pathlib import Path

import click


class UserError(click.ClickException):
    """A one-line error shown without a traceback."""

    def show(self, file=None) -> None:  # noqa: D401
        click.echo(f"error: {self.format_message()}", err=True)


def friendly_errors(func):
    """Turn the library's ValueError/TypeError/OSError family into one-line CLI errors."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from .fetch import FetchError

        try:
            return func(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted; no partial output was written", err=True)
            sys.exit(130)
        except (ValueError, TypeError, FetchError, FileNotFoundError) as exc:
            raise UserError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        except OSError as exc:
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            raise UserError(f"{exc.strerror or exc}{where}") from exc

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Few-step sampling for pretrained flow and diffusion models."""


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
@click.option("--lr", default=2e-3, type=click.FloatRange(min=0, min_open=True), show_default=True)
@click.option("--channels", default="16,32,64", show_default=True, help="UNet widths per level.")
@click.option("--seed", default=0, type=int, show_default=True)
@click.option("--checkpoint-every", default=500, type=click.IntRange(min=1), show_default=True)
@click.option("--threads", default=0, type=click.IntRange(min=0), help="torch threads (0: default).")
@click.option("--limit-data", default=0, type=click.IntRange(min=0), help="Use only the first N images.")
@click.option("--device", default="cpu", show_default=True)
@friendly_errors
def train(out_dir: Path, data: str, steps: int, batch_size: int, lr: float, channels: str, seed: int,
          checkpoint_every: int, threads: int, limit_data: int, device: str) -> None:
    """Train a velocity UNet with the linear (rectified-flow) schedule; resumes if OUT has a state."""
    from .training import TrainConfig
    from .training import train as run_training

    try:
        widths = tuple(int(c) for c in channels.split(","))
    except ValueError as exc:
        raise UserError(f"--channels: expected comma-separated integers, got {channels!r}") from exc
    if not widths or min(widths) < 8 or any(w % 8 for w in widths):
        raise UserError(f"--channels: each width must be a positive multiple of 8, got {channels!r}")
    cfg = TrainConfig(data=data, steps=steps, batch_size=batch_size, lr=lr, channels=widths, seed=seed,
                      checkpoint_every=checkpoint_every, threads=threads, limit_data=limit_data,
                      device=device)
    command = "lazyinterp " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path = run_training(cfg, out_dir, command=command)
    click.echo(str(path))


if __name__ == "__main__":  # pragma: no cover
    main()
