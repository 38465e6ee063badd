r"""CUDA-graph replay of a whole sampling run.

A small network on a large GPU spends most of a step waiting for the host to launch its kernels, and every
operation a sampler adds per step (schedule arithmetic, the state update, the finite check) is one more launch.
Capturing the run once as a CUDA graph and replaying it launches the network and the sampler's arithmetic as
one unit: the host's per-step work drops out, and what remains of the sampler's cost is its own kernels.

A captured run is a function of its static inputs (the starting state and, for an SDE, the pre-drawn normal
increments, or with keyed noise the per-sample keys the graph computes its draws from): :func:`replay` copies new
values into them and replays, so each sample's result is the same as in eager mode up to the floating-point
rounding of the kernels the capture picked. Everything else (the grid,
σ, E[X], the network's weights, by address) is baked in; :func:`lazyinterp.sample` keys its captures on it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

_CAPTURING: ContextVar[bool] = ContextVar("lazyinterp_capturing", default=False)


def capturing() -> bool:
    """Whether :func:`capture` is recording right now (code that would read device values back, and so
    synchronise, must not run then)."""
    return _CAPTURING.get()


@dataclass
class CapturedRun:
    """A captured run: replay ``graph`` after writing into ``inputs``; ``output`` then holds the result."""

    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]
    output: Tensor
    calls: int = 0
    keep: object = None  # ``run`` and whatever else the captured kernels read, held alive with the graph
    finite: Tensor | None = None  # whether ``output`` is all finite, computed by the graph itself


def _count(counter: object) -> int:
    return int(getattr(counter, "nfe", 0))


def capture(run: Callable[..., Tensor], inputs: Sequence[Tensor], counter: object = None,
            keep: object = None) -> CapturedRun:
    """Captures ``run(*inputs)`` as a CUDA graph over static copies of ``inputs``, after one eager warm-up run
    on a side stream (kernels choose their algorithms and allocate workspaces outside the capture). The graph
    reads tensors by address, so the captured run holds ``run`` (and what its closure holds) and ``keep`` alive.

    ``counter`` (an :class:`~lazyinterp.Model`) has its ``nfe`` left as if the run had been evaluated once:
    the warm-up and the capture are not counted. Raises ValueError if ``run`` cannot be captured (it
    synchronises with the host, or moves host data to the device).
    """
    if not inputs or any(not isinstance(x, Tensor) or x.device.type != "cuda" for x in inputs):
        raise ValueError("inputs: expected CUDA tensors")
    device = inputs[0].device
    static = tuple(x.detach().clone() for x in inputs)
    before = _count(counter)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad():
        run(*(x.clone() for x in static))
    torch.cuda.current_stream(device).wait_stream(side)
    warm = _count(counter)
    graph = torch.cuda.CUDAGraph()
    token = _CAPTURING.set(True)
    try:
        with torch.cuda.graph(graph), torch.no_grad():
            output = run(*static)
            # Checked inside the graph: after a replay, reading this flag is the only work left for the host.
            finite = torch.isfinite(output).all() if isinstance(output, Tensor) else None
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _end_failed_capture(device)
        raise ValueError(f"cuda_graph: the run could not be captured as a CUDA graph ({first}); a network that "
                         f"synchronises with the host (.item(), .cpu(), printing tensors) cannot be") from None
    finally:
        _CAPTURING.reset(token)
    captured = CapturedRun(graph, static, output, calls=_count(counter) - warm, keep=(run, keep), finite=finite)
    if counter is not None and hasattr(counter, "nfe"):
        counter.nfe = before
    return captured


def _end_failed_capture(device: torch.device) -> None:
    """Leaves CUDA as it was before a capture that failed.

    A capture that breaks off leaves torch's CUDA random generator marked as capturing, so that every later
    random draw on the device fails ("Offset increment outside graph capture"); a complete capture of nothing
    marks it idle again.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the graph is empty, which is the point
        try:
            torch.cuda.synchronize(device)
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                pass
        except RuntimeError:
            pass  # best effort: the capture's own error is what the caller reports


def replay(captured: CapturedRun, inputs: Sequence[Tensor], counter: object = None) -> Tensor:
    """The run on new ``inputs`` (same shapes and dtypes as captured), as a new tensor; adds the run's network
    calls to ``counter.nfe``. ``captured.finite`` then says whether the result is all finite."""
    if len(inputs) != len(captured.inputs):
        raise ValueError(f"inputs: expected {len(captured.inputs)} tensors, got {len(inputs)}")
    for static, value in zip(captured.inputs, inputs, strict=True):
        if value.shape != static.shape:
            raise ValueError(f"inputs: expected shape {tuple(static.shape)}, got {tuple(value.shape)}")
        static.copy_(value)
    captured.graph.replay()
    if counter is not None and hasattr(counter, "nfe"):
        counter.nfe += captured.calls
    return captured.output.clone()
