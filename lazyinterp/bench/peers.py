"""The peers, driven through their own packages (the ``bench`` extra): diffusers' flow schedulers and
flow_matching's schedule-transformed model with the midpoint rule."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..conversion import convert
from ..predictors import Model
from ..schedules import linear

Tensor = torch.Tensor


PEER_PACKAGES = {"diffusers": "diffusers", "flow_matching": "flow_matching"}


def peer_available(kind: str) -> bool:
    """Whether the package that drives samplers of this kind is installed (always, for lazyinterp's own)."""
    package = PEER_PACKAGES.get(kind)
    return package is None or importlib.util.find_spec(package) is not None


def linear_velocity(model: Model) -> Callable[[Tensor, Any], Tensor]:
    """v(x, t) under the linear schedule, v = η_X − η_Z, from a model trained under any schedule."""
    if model.schedule.name == "linear":
        return lambda x, t: model.predict(x, t, "velocity")
    predictor = convert(model, linear())

    def velocity(x: Tensor, t: Tensor | float) -> Tensor:
        eta_z, eta_x = predictor.eta(x, t)
        return eta_x - eta_z

    return velocity


def diffusers_scheduler(options: dict) -> Any:
    """A fresh diffusers flow scheduler, as the sampler's ``options`` name it."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    which = options["scheduler"]
    if which == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=options.get("shift", 1.0))
    if which == "heun":
        return FlowMatchHeunDiscreteScheduler()
    if which == "dpm":
        return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                           solver_order=2)
    if which == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    raise ValueError(f"unknown diffusers scheduler {which!r}")


def diffusers_sample(scheduler: Any, velocity: Callable[[Tensor, float], Tensor], noise: Tensor, steps: int) -> Tensor:
    """Run a diffusers flow scheduler from ``noise`` (σ = 1): output ε − x_data = −v(1 − σ, x), σ = timestep/1000."""
    scheduler.set_timesteps(steps)
    scale = float(scheduler.config.num_train_timesteps)
    x = noise
    for timestep in scheduler.timesteps:
        sigma = float(timestep) / scale
        x = scheduler.step(-velocity(x, 1.0 - sigma), timestep, x).prev_sample
    return x


def flow_matching_sample(velocity: Callable[[Tensor, Any], Tensor], noise: Tensor, steps: int) -> Tensor:
    """flow_matching: the linear model moved to its CosineScheduler, midpoint rule on a uniform grid.

    The midpoint rule evaluates at t_k and t_k + h/2 only, never at t = 1, where ScheduleTransformedModel
    divides by the cosine noise coefficient 0 and returns NaN; no clipping of the end time is needed.
    """
    from flow_matching.path.scheduler import CondOTScheduler, CosineScheduler, ScheduleTransformedModel
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    class Velocity(ModelWrapper):
        def __init__(self):
            super().__init__(None)

        def forward(self, x: Tensor, t: Tensor, **extras) -> Tensor:
            return velocity(x, t)

    model = ScheduleTransformedModel(Velocity(), CondOTScheduler(), CosineScheduler())
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=noise.dtype, device=noise.device)
    return ODESolver(model).sample(x_init=noise, step_size=None, method="midpoint", time_grid=grid)


def import_peers(kinds: Iterable[str]) -> None:
    """Import the peer packages of these sampler kinds ahead of time: importing one takes seconds, which must not
    count against the first run's time."""
    kinds = set(kinds)
    for kind in kinds & set(PEER_PACKAGES):
        importlib.import_module(PEER_PACKAGES[kind])
    if "diffusers" in kinds:
        diffusers_scheduler({"scheduler": "euler"})
    if "flow_matching" in kinds:
        importlib.import_module("flow_matching.solver")
