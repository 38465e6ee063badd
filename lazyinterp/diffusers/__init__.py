r"""Use with 🤗 diffusers: a pipeline scheduler and :class:`~lazyinterp.Model` adapters.

This package imports ``diffusers`` (the optional ``lazyinterp[diffusers]`` extra); ``import lazyinterp`` never does.

* :class:`LazyScheduler` — a drop-in scheduler for flow-matching pipelines (SD3, FLUX and others built on
  ``FlowMatchEulerDiscreteScheduler``) and for DDPM-style UNet pipelines (Stable Diffusion 1.x/2.x, SDXL, DDPM,
  DDIM) that samples the pipeline's network under any lazyinterp schedule, diffusion coefficient and solver, by the
  exact conversion of theory §3.
* :func:`flow_transformer_model` — a diffusers flow transformer (SD3, FLUX) with fixed conditioning as an
  :class:`~lazyinterp.Model`, so :func:`lazyinterp.sample` drives it directly.
* :func:`ddpm_model` and :func:`ddpm_schedule` — a DDPM-style UNet (ε-, v- or x₀-prediction on discrete
  ``alphas_cumprod``) as an :class:`~lazyinterp.Model` on a continuous VP schedule;
  :func:`continuous_noise_schedule` for a v-prediction UNet on continuous noise levels (Stable Video Diffusion).
* :func:`sigmas_to_grid` and :func:`grid_to_sigmas` — between diffusers' ``sigmas`` and lazyinterp time grids.

Conventions. diffusers' flow models write x_σ = (1 − σ) x_data + σ ε and predict ``output = ε − x_data``; in
lazyinterp's time τ = 1 − σ this is the linear schedule with velocity v = E[X − Z | I_τ] = −output, and the
pipelines' ``timesteps`` are 1000 σ.

The scheduler and the grid conversions are in :mod:`~lazyinterp.diffusers.scheduler`, the model adapters in
:mod:`~lazyinterp.diffusers.models`.
"""

from .models import continuous_noise_schedule, ddpm_model, ddpm_schedule, flow_transformer_model
from .scheduler import LazyScheduler, LazySchedulerOutput, grid_to_sigmas, sigmas_to_grid

__all__ = [
    "LazyScheduler", "LazySchedulerOutput", "continuous_noise_schedule", "ddpm_model", "ddpm_schedule",
    "flow_transformer_model",
    "grid_to_sigmas", "sigmas_to_grid",
]
