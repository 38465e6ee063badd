"""How the command line reports failures: one line on stderr, ``error: <what was wrong>``, a non-zero exit status
and no traceback, with the library's argument names given as the options that set them."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from types import FrameType
from typing import IO, Any, NoReturn

import click


class UserError(click.ClickException):
    """A one-line error shown without a traceback."""

    def show(self, file: IO[str] | None = None) -> None:  # noqa: D401
        """Print the message as one ``error:`` line on stderr."""
        click.echo(f"error: {self.format_message()}", err=True)


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     file: IO[str] | None = None, line: str | None = None) -> None:
    """Show a warning as one line on stderr, ``warning: <message>``, without Python's file, line and source."""
    click.echo(f"warning: {' '.join(str(message).split())}", err=True)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` reports a failed allocation: Python's MemoryError, torch's OutOfMemoryError (a GPU) or the
    RuntimeError of torch's CPU allocator."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


# What a command that draws samples says on a failed allocation; one without -n (train) passes its own line.
OUT_OF_MEMORY = "out of memory; ask for fewer samples (-n) or a smaller --batch-size"


def one_line_message(exc: BaseException, out_of_memory_line: str = OUT_OF_MEMORY) -> str:
    """An error as one line: a failed allocation as ``out_of_memory_line``, an operating-system error's reason and
    the file it concerns, else the first line of its message (its type's name when it has none)."""
    if out_of_memory(exc):
        return out_of_memory_line
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def as_option_message(exc: BaseException, options: dict[str, str]) -> str:
    """An error as one line (:func:`one_line_message`), with the library argument it starts with named as the
    option that sets it (``options``: argument name -> option, e.g. ``{"grid": "--time-grid"}``)."""
    message = one_line_message(exc)
    name, colon, reason = message.partition(":")
    return f"{options[name]}:{reason}" if colon and name in options else message


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, ``timeout``), raised in the main thread so that a command cleans up as on Ctrl-C."""


def _raise_terminated(signum: int, frame: FrameType | None) -> NoReturn:
    raise Terminated


def friendly_errors(func: Callable[..., Any] | None = None, *, out_of_memory_line: str = OUT_OF_MEMORY) -> Any:
    """Turn the library's ValueError/TypeError/OSError family into one-line CLI errors (a failed allocation into
    ``out_of_memory_line``), and SIGTERM into the same clean stop as Ctrl-C. Used as ``@friendly_errors`` or
    ``@friendly_errors(out_of_memory_line=...)``."""
    if func is None:
        return functools.partial(friendly_errors, out_of_memory_line=out_of_memory_line)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import signal
        import threading

        from .fetch import FetchError

        installed, previous = False, None
        if threading.current_thread() is threading.main_thread():
            previous, installed = signal.signal(signal.SIGTERM, _raise_terminated), True
        try:
            return func(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            click.echo(f"error: {'terminated' if terminated else 'interrupted'}; no partial output was written",
                       err=True)
            sys.exit(143 if terminated else 130)
        except (ValueError, TypeError, FetchError, OSError) as exc:
            raise UserError(one_line_message(exc, out_of_memory_line)) from exc
        except (MemoryError, RuntimeError) as exc:
            if not out_of_memory(exc):
                raise
            raise UserError(out_of_memory_line) from exc
        finally:
            if installed:  # None: a handler set outside Python, which cannot be put back; the default stands in
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return wrapper
