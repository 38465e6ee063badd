"""The sampler's own cost: time spent outside the network, as a fraction of network time."""

from __future__ import annotations

import time

import torch

from .. import graphs
from ..noise import NoiseStreams
from ..predictors import Model
from ..samplers import sample
from .samplers import SAMPLERS, li_kwargs

Tensor = torch.Tensor

OVERHEAD_SAMPLERS = ("lazy-vp-euler", "point-mass-sde", "point-mass-sde-exp2m")
# The SDEs' overhead is measured with each of these noises: the host's per-sample generators (the default) and
# draws computed on the device (reported as "<sampler>-keyed").
OVERHEAD_SDE_NOISES = ("independent", "keyed")
OVERHEAD_BATCH, OVERHEAD_STEPS, OVERHEAD_REPEATS = 256, 8, 5


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_overhead(model: Model, sample_shape: tuple[int, ...], dtype: torch.dtype, *, seed: int = 0,
                     batch: int = OVERHEAD_BATCH, steps: int = OVERHEAD_STEPS, repeats: int = OVERHEAD_REPEATS,
                     device: torch.device | str = "cpu", cuda_graph: bool = False,
                     direct: bool = False, sde_noises: tuple[str, ...] = OVERHEAD_SDE_NOISES) -> dict[str, float]:
    r"""T_sample / T_net − 1 for lazy VP Euler and the point-mass SDE (Euler–Maruyama and the 2M step, each with
    every noise of ``sde_noises``, by default the host's and keyed noise, :data:`OVERHEAD_SDE_NOISES`; results are
    named ``<sampler>-<noise>`` but for the host's): the time ``li.sample`` spends beyond the network (schedule
    maths, conversion, noise draws, state updates, checks) as a fraction of network time.

    T_sample is the wall time of ``li.sample`` for one batch; T_net that of the same number of network calls on a
    batch of the same shape, back to back. Each synchronises the device once, at the end, so on an accelerator
    the sampler's own work counts only where the device has to wait for it. The median over ``repeats``
    interleaved pairs, after one warm-up run (which also estimates E[X] and σ).

    With ``cuda_graph`` both sides are replayed CUDA graphs (``li.sample(cuda_graph=True)``, and the network
    calls captured back to back), so what is left is the sampler's own device work.

    With ``direct`` the sampler's own time is measured, not inferred from a difference: ``li.sample`` runs with
    the network replaced by one that returns a stored output, and the fraction is T_sample / T_net. Where the
    network takes seconds (a CPU) the difference of two such times is mostly timing noise, while this stays
    precise. On an accelerator it counts the sampler's kernels in full, as if none overlapped the network's.
    """
    device = torch.device(device)
    noise = NoiseStreams(seed, range(batch), sample_shape, dtype=dtype).draw().to(device)
    net_dtype = model.net_dtype or dtype
    net_x, net_t = noise.to(net_dtype), torch.full((batch,), 0.5, device=device, dtype=net_dtype)

    @torch.no_grad()  # as li.sample runs the network
    def network_calls(x: Tensor, calls: int) -> Tensor:
        for _ in range(calls):
            out = model.net(x, net_t)
        return out

    net = model.net
    if direct:
        stored = network_calls(net_x, 1)

        def net(x: Tensor, t: Tensor) -> Tensor:
            # The warm-up's estimates of E[X] and σ probe with their own batch size: those calls are real.
            return stored if x.shape == stored.shape else model.net(x, t)
    bare = Model(net, model.schedule, model.predicts, t_min=model.t_min, net_dtype=net_dtype)

    captured_networks: dict[int, graphs.CapturedRun] = {}

    def network_seconds(calls: int) -> float:
        if cuda_graph and calls not in captured_networks:
            captured_networks[calls] = graphs.capture(lambda x: network_calls(x, calls), (net_x,))
        _synchronize(device)
        start = time.perf_counter()
        if cuda_graph:
            captured_networks[calls].graph.replay()
        else:
            network_calls(net_x, calls)
        _synchronize(device)
        return time.perf_counter() - start

    runs = []
    for name in OVERHEAD_SAMPLERS:
        spec = next(s for s in SAMPLERS if s.name == name)
        kwargs = li_kwargs(spec, spec.plan(steps))
        for sde_noise in sde_noises if spec.stochastic else ("independent",):
            label = name if sde_noise == "independent" else f"{name}-{sde_noise}"
            runs.append((label, spec, {**kwargs, "sde_noise": sde_noise}))
    result = {}
    for name, spec, kwargs in runs:
        start_noise = None if spec.options["schedule"] == "point-mass" else noise

        def run(start_noise: Tensor | None, kwargs: dict) -> float:
            _synchronize(device)
            start = time.perf_counter()
            sample(bare, start_noise, shape=tuple(noise.shape), device=device, generator=seed,
                   cuda_graph=cuda_graph, **kwargs)
            _synchronize(device)
            return time.perf_counter() - start

        bare.nfe = 0
        _, info = sample(bare, start_noise, shape=tuple(noise.shape), device=device, generator=seed,
                         cuda_graph=cuda_graph, return_info=True, **kwargs)
        calls = bare.nfe - info.estimation_nfe
        network_seconds(calls)
        fractions = []
        for _ in range(repeats):
            t_net = network_seconds(calls)
            # Directly measured, T_sample is the sampler's own time; otherwise it includes the network's.
            fractions.append(run(start_noise, kwargs) / t_net - (0 if direct else 1))
        result[name] = sorted(fractions)[len(fractions) // 2]
    return result
