"""diffusers networks as :class:`~lazyinterp.Model`: flow transformers (SD3, FLUX) with fixed conditioning, and
DDPM-style UNets on a continuous VP schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..checks import check_number
from ..devices import DeviceLike
from ..predictors import Model
from ..schedules import Schedule, as_time

Tensor = torch.Tensor
_F64 = torch.float64

# diffusers' prediction types of DDPM-style models, and the lazyinterp prediction each is read as.
_DDPM_KINDS = {"epsilon": "noise", "v_prediction": "data", "sample": "data"}

# Keyword arguments of diffusers transformers and UNets that carry no batch dimension.
_UNBATCHED = frozenset({"txt_ids", "img_ids", "joint_attention_kwargs", "cross_attention_kwargs",
                        "attention_kwargs", "skip_layers"})


def _fit_batch(name: str, value: Any, batch: int) -> Any:
    """``value`` with batch size ``batch``: as is, or expanded from 1. Non-tensors and id tensors pass."""
    if name in _UNBATCHED or not isinstance(value, Tensor) or value.ndim == 0:
        return value
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(f"{name}: batch size {value.shape[0]} does not match the latents' batch {batch}; give one "
                     "conditioning per sample or a single one (li.sample's mean and sigma estimates probe with their "
                     "own batch: pass center=False and a sigma, or a single conditioning)")


def _is_flux(transformer: Any) -> bool:
    return "flux" in type(transformer).__name__.lower()


def _module_dtype(module: Any, default: torch.dtype = torch.float32) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    param = next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None
    return param.dtype if param is not None and param.is_floating_point() else default


def _pack_flux(latents: Tensor) -> Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C) in 2×2 patches, as ``FluxPipeline._pack_latents``."""
    batch, channels, height, width = latents.shape
    out = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return out.reshape(batch, (height // 2) * (width // 2), channels * 4)


def _unpack_flux(latents: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`_pack_flux`, as ``FluxPipeline._unpack_latents``."""
    batch, _, c4 = latents.shape
    out = latents.reshape(batch, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(batch, c4 // 4, height, width)


def _flux_image_ids(height: int, width: int, device: DeviceLike, dtype: torch.dtype) -> Tensor:
    """Position ids (row, column) of the packed patches, as ``FluxPipeline._prepare_latent_image_ids``."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def flow_transformer_model(transformer: Any, *, guidance_scale: float = 1.0, negative_kwargs: dict | None = None,
                           timestep_scale: float | None = None,
                           timestep_fn: Callable[[Tensor], Tensor] | None = None, **fixed_kwargs: Any) -> Model:
    r"""A diffusers flow transformer with fixed conditioning as an :class:`~lazyinterp.Model` (linear, velocity).

    The network is called as ``transformer(hidden_states=x, timestep=σ·scale, **fixed_kwargs)`` with σ = 1 − t,
    and lazyinterp's velocity is v = −output (diffusers predicts ε − x_data). SD3 and most transformers take
    ``timestep`` = 1000 σ; FLUX pipelines divide by 1000, so FLUX transformers get σ (``timestep_scale`` defaults
    to 1 for FLUX classes and 1000 otherwise). A transformer whose timestep is not proportional to σ takes
    ``timestep_fn``, σ ↦ timestep: CogView4's pipeline passes the unshifted timesteps 1000 s while the latents sit
    at σ = μ/(μ + 1/s − 1) (its linear time shift with the pipeline's ``mu``), so there
    ``timestep_fn=lambda sigma: 1000 * sigma / (sigma + mu * (1 - sigma))``.

    FLUX works on packed latents (B, H/2·W/2, 4C) with ``img_ids`` and ``txt_ids``. Either pass packed noise with
    those ids (as the pipeline builds them), or pass unpacked (B, C, H, W) noise: it is packed for the call and
    unpacked after, with ids made as ``FluxPipeline`` makes them. ``txt_ids`` default to zeros.

    Classifier-free guidance: with ``guidance_scale`` w > 1 and ``negative_kwargs`` (e.g. the negative
    ``encoder_hidden_states`` and ``pooled_projections``), output = u + w (c − u), computed in one batched call
    [negative, positive] as the SD3 pipeline does. FLUX-dev's distilled guidance is just the fixed ``guidance``
    argument (a number, or a (B,) tensor as the pipeline passes it).

    Conditioning tensors with a batch dimension are used as is when it matches the latents' batch and
    expanded when it is 1. ``li.sample``'s mean and σ estimates (centring and ``sigma=None``) call the model
    on 8 probes, so use one conditioning for them, or pass ``center=False`` and an explicit sigma.

    Args:
        transformer: e.g. ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``.
        guidance_scale: the CFG weight w (1 disables it).
        negative_kwargs: the keyword arguments that differ for the unconditional branch.
        timestep_scale: the multiplier from σ to the transformer's ``timestep``.
        timestep_fn: instead of ``timestep_scale``, a function from σ (a float64 CPU tensor) to the timesteps.
        **fixed_kwargs: the transformer's other inputs (``encoder_hidden_states``, ``pooled_projections``, …).
    """
    if not callable(transformer):
        raise TypeError(f"transformer: expected a callable module, got {type(transformer).__name__}")
    cfg, neg = _check_guidance(guidance_scale, negative_kwargs, fixed_kwargs)
    flux = _is_flux(transformer)
    if timestep_fn is not None and not callable(timestep_fn):
        raise TypeError(f"timestep_fn: expected a function of sigma, got {type(timestep_fn).__name__}")
    if timestep_fn is not None and timestep_scale is not None:
        raise ValueError("timestep_fn, timestep_scale: give one of them")
    scale = float(timestep_scale) if timestep_scale is not None else (1.0 if flux else 1000.0)

    def call(hidden: Tensor, timestep: Tensor, kwargs: dict) -> Tensor:
        return _output_tensor(transformer(hidden_states=hidden, timestep=timestep, return_dict=False, **kwargs))

    def net(x: Tensor, t: Tensor) -> Tensor:
        dtype = _module_dtype(transformer)
        batch = x.shape[0]
        hidden = x.to(dtype)
        kwargs = {k: _fit_batch(k, val, batch) for k, val in fixed_kwargs.items()}
        if isinstance(kwargs.get("guidance"), (int, float)):
            kwargs["guidance"] = torch.full((batch,), float(kwargs["guidance"]), device=hidden.device)
        packed = None
        if flux and hidden.ndim == 4:
            _, channels, height, width = hidden.shape
            hidden = _pack_flux(hidden)
            packed = (height, width)
            if "img_ids" not in kwargs:
                kwargs["img_ids"] = _flux_image_ids(height // 2, width // 2, hidden.device, dtype)
        if flux and "img_ids" not in kwargs:
            raise ValueError("img_ids: packed FLUX latents (B, H/2*W/2, 4C) need their img_ids (as the pipeline "
                             "makes them); or pass unpacked (B, C, H, W) latents")
        if flux and "txt_ids" not in kwargs and isinstance(kwargs.get("encoder_hidden_states"), Tensor):
            kwargs["txt_ids"] = torch.zeros(kwargs["encoder_hidden_states"].shape[1], 3, device=hidden.device,
                                            dtype=dtype)
        # Float64 on the CPU: accelerators such as MPS have no float64.
        noise_level = 1 - t.detach().to("cpu", _F64)
        label = scale * noise_level if timestep_fn is None else torch.as_tensor(timestep_fn(noise_level))
        timestep = label.to(device=hidden.device, dtype=dtype)
        out = _guided(call, hidden, timestep, kwargs, neg, guidance_scale) if cfg else call(hidden, timestep, kwargs)
        if packed is not None:
            out = _unpack_flux(out, *packed)
        return -out

    return Model(net, "linear", "velocity", net_dtype=torch.float32)


def _output_tensor(out: Any) -> Tensor:
    """A diffusers model's output tensor, from the tuple or output object it returns."""
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


def _check_guidance(guidance_scale: Any, negative_kwargs: dict | None, fixed_kwargs: dict) -> tuple[bool, dict]:
    """Whether classifier-free guidance is on, and the negative keyword arguments, checked against the fixed ones."""
    if isinstance(guidance_scale, bool) or not (isinstance(guidance_scale, (int, float))
                                                and math.isfinite(guidance_scale)):
        raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale!r}")
    cfg = guidance_scale != 1.0
    if cfg and not negative_kwargs:
        raise ValueError("negative_kwargs: classifier-free guidance (guidance_scale != 1) needs the negative "
                         "conditioning")
    neg = dict(negative_kwargs or {})
    missing = sorted(set(neg) - set(fixed_kwargs))
    if missing:
        raise ValueError(f"negative_kwargs: {', '.join(missing)} have no positive counterpart in the keyword "
                         "arguments")
    return cfg, neg


def _guided(call: Callable[[Tensor, Tensor, dict], Tensor], hidden: Tensor, timestep: Tensor, kwargs: dict,
            neg: dict, guidance_scale: float) -> Tensor:
    """u + w (c − u) from one batched call [negative, positive], as the pipelines make it."""
    batch = hidden.shape[0]
    both = dict(kwargs)
    for k, val in neg.items():
        val = _fit_batch(k, val, batch)
        both[k] = torch.cat([val.to(hidden.device), kwargs[k]]) \
            if isinstance(val, Tensor) and k not in _UNBATCHED else val
    for k, val in kwargs.items():
        if k not in neg and isinstance(val, Tensor) and k not in _UNBATCHED and val.ndim > 0:
            both[k] = torch.cat([val, val])
    uncond, cond = call(torch.cat([hidden, hidden]), torch.cat([timestep, timestep]), both).chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def _alphas_cumprod(scheduler_or_betas: Any) -> Tensor:
    abar = getattr(scheduler_or_betas, "alphas_cumprod", None)
    if abar is None:
        if isinstance(scheduler_or_betas, (SchedulerMixin, ConfigMixin)):
            raise ValueError("scheduler_or_betas: the scheduler has no alphas_cumprod (a DDPM-style scheduler is "
                             "needed, e.g. DDPMScheduler or DDIMScheduler)")
        try:
            betas = torch.as_tensor(np.asarray(scheduler_or_betas, dtype=np.float64) if not isinstance(
                scheduler_or_betas, Tensor) else scheduler_or_betas, dtype=_F64).flatten()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError("scheduler_or_betas: expected a DDPM-style scheduler or a 1-D sequence of betas") from exc
        if not (bool(torch.isfinite(betas).all()) and float(betas.min()) > 0 and float(betas.max()) <= 1):
            raise ValueError("scheduler_or_betas: betas must lie in (0, 1]")
        abar = torch.cumprod(1 - betas, 0)
    return torch.as_tensor(abar).detach().to(device="cpu", dtype=_F64).flatten()


def ddpm_schedule(alphas_cumprod: Any) -> Schedule:
    r"""The continuous VP schedule of a discrete DDPM ``alphas_cumprod`` ᾱ_n, n = 0..T−1.

    Time: index n sits at t_n = (T − 1 − n)/T, so t = 0 is the noisiest index T − 1 and t = 1 is one index past
    0: the clean end, where ᾱ = 1 exactly (DDIM's ``set_alpha_to_one`` final step). The continuous index is
    u(t) = T − 1 − T t ∈ [−1, T − 1], and α = √(1 − ᾱ), β = √ᾱ.

    * Between integer indices the log-SNR λ = log(ᾱ/(1 − ᾱ)) is linear in u, so the schedule passes through every
      ᾱ_n exactly.
    * On the clean piece u ∈ [−1, 0], where λ runs to +∞, α is linear in u instead: α = (1 + u) α(index 0), so
      α_1 = 0 exactly with a finite α̇ (a linear 1 − ᾱ would make α̇ infinite there).
    * A zero-terminal-SNR schedule (ᾱ_{T−1} = 0) is treated alike on its noisiest piece: β is linear in u there,
      so β_0 = 0 exactly.

    α̇, β̇ are exact piecewise (one-sided at the integer nodes), and r⁻¹ is in closed form.

    The schedule is built with ``check=False``: for usual DDPM betas β_0 = √ᾱ_{T−1} is small but not 0
    (about 6e-3 for linear betas 1e-4..0.02), which breaks the β(0) = 0 boundary check. As for
    :func:`lazyinterp.vp`, samplers start from pure noise α_0 Z at t = 0 and conversions clamp the matched time.
    The SNR's monotonicity is checked here instead (ᾱ must decrease strictly).

    The schedule has ``index(t)``, the continuous index u(t), ``num_train_timesteps`` T, and the network's timestep
    ``timestep(t)`` (u(t) within [0, T − 1]) with its inverse ``time_of_timestep(u)``.
    """
    try:
        abar = torch.as_tensor(alphas_cumprod).detach().to(device="cpu", dtype=_F64).flatten()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"alphas_cumprod: expected a 1-D sequence of numbers, got {type(alphas_cumprod).__name__}"
                        ) from exc
    n_steps = abar.numel()
    if n_steps < 3:
        raise ValueError("alphas_cumprod: expected at least 3 values")
    if not (bool(torch.isfinite(abar).all()) and float(abar.min()) >= 0 and float(abar.max()) < 1):
        raise ValueError("alphas_cumprod: values must lie in [0, 1)")
    if not bool((torch.diff(abar) < 0).all()):
        raise ValueError("alphas_cumprod: must decrease strictly with the index")
    big = float(n_steps)
    zero_terminal = float(abar[-1]) == 0.0
    # λ is interpolated on [0, last]; beyond `last` (the zero-terminal piece) β is.
    last = n_steps - 2 if zero_terminal else n_steps - 1
    lam = torch.log(abar[: last + 1]) - torch.log1p(-abar[: last + 1])
    slopes = torch.diff(lam)  # per unit index, negative
    alpha_clean = math.sqrt(1 - float(abar[0]))  # α at index 0
    beta_noisy = math.sqrt(float(abar[-2]))  # β at index T − 2

    def index(t: Tensor | float) -> Tensor:
        return (big - 1) - big * as_time(t)

    def pieces(t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(α, β, α̇, β̇) at t, piece by piece."""
        u = (big - 1) - big * t
        i0 = u.clamp(0.0, float(last)).floor().clamp(max=last - 1).long()
        lam_u = lam[i0] + (u.clamp(0.0, float(last)) - i0) * slopes[i0]
        a_bar = torch.sigmoid(lam_u)
        alpha, beta = torch.sqrt(torch.sigmoid(-lam_u)), torch.sqrt(a_bar)
        dlam = -big * slopes[i0]
        dalpha, dbeta = -0.5 * alpha * a_bar * dlam, 0.5 * beta * (1 - a_bar) * dlam
        clean = u < 0
        a_c = (1 + u).clamp(min=0.0) * alpha_clean
        b_c = torch.sqrt(1 - a_c * a_c)
        alpha, beta = torch.where(clean, a_c, alpha), torch.where(clean, b_c, beta)
        dalpha = torch.where(clean, torch.full_like(u, -big * alpha_clean), dalpha)
        dbeta = torch.where(clean, big * alpha_clean * a_c / b_c, dbeta)
        if zero_terminal:
            noisy = u > last
            b_n = (big - 1 - u).clamp(min=0.0) * beta_noisy
            a_n = torch.sqrt(1 - b_n * b_n)
            alpha, beta = torch.where(noisy, a_n, alpha), torch.where(noisy, b_n, beta)
            dbeta = torch.where(noisy, torch.full_like(u, big * beta_noisy), dbeta)
            dalpha = torch.where(noisy, -big * beta_noisy * b_n / a_n, dalpha)
        return alpha, beta, dalpha, dbeta

    def snr_inverse(r: Tensor) -> Tensor:
        lam_r = 2 * torch.log(r)
        j = torch.searchsorted(-lam, -lam_r)
        i0 = (j - 1).clamp(0, last - 1)
        u = i0 + (lam_r - lam[i0]) / slopes[i0]
        u = torch.where(lam_r > lam[0], 1 / (alpha_clean * torch.sqrt(1 + r * r)) - 1, u)
        if zero_terminal:
            u = torch.where(lam_r < lam[last], (big - 1) - r / torch.sqrt(1 + r * r) / beta_noisy, u)
        u = torch.where(torch.isinf(r), torch.full_like(u, -1.0), u)
        return ((big - 1) - u.clamp(-1.0, big - 1)) / big

    sched = Schedule(lambda t: pieces(t)[0], lambda t: pieces(t)[1], dalpha=lambda t: pieces(t)[2],
                     dbeta=lambda t: pieces(t)[3], snr_inverse=snr_inverse, name=f"ddpm({n_steps})", check=False)
    sched.index = index
    sched.num_train_timesteps = n_steps
    sched.timestep = lambda t: index(t).clamp(0.0, big - 1)
    sched.time_of_timestep = lambda u: ((big - 1) - as_time(u)) / big
    sched.continuous_noise = False
    return sched


def continuous_noise_schedule(sigma_min: float, sigma_max: float, steps: int = 1000) -> Schedule:
    r"""The VP schedule of a network on continuous noise levels σ = α/β in [``sigma_min``, ``sigma_max``] whose
    timestep is c_noise = ¼ ln σ (EDM's, as ``EulerDiscreteScheduler(timestep_type="continuous")`` feeds a
    v-prediction UNet: Stable Video Diffusion).

    It is :func:`ddpm_schedule` of ᾱ_n = 1/(1 + σ_n²) with ln σ_n uniform from ln ``sigma_min`` (index 0) to
    ln ``sigma_max`` (index T − 1): the log-SNR −2 ln σ is linear in the index, as that schedule interpolates it,
    so σ(t) is exactly log-linear. ``timestep(t)`` is ¼ ln σ(t) and ``time_of_timestep`` its inverse.
    """
    sigma_min = check_number(sigma_min, "sigma_min", positive=True)
    sigma_max = check_number(sigma_max, "sigma_max", positive=True)
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected sigma_min < sigma_max, got {sigma_min!r} and {sigma_max!r}")
    log_sigma = torch.linspace(math.log(sigma_min), math.log(sigma_max), steps, dtype=_F64)
    sched = ddpm_schedule(torch.sigmoid(-2 * log_sigma))  # 1/(1 + σ²)
    index, big = sched.index, float(steps)

    def timestep(t: Tensor | float) -> Tensor:
        u = index(t).clamp(0.0, big - 1)  # never beyond the trained range
        return 0.25 * (math.log(sigma_min) + (math.log(sigma_max) - math.log(sigma_min)) * u / (big - 1))

    def time_of_timestep(c_noise: Tensor | float) -> Tensor:
        u = (4 * as_time(c_noise) - math.log(sigma_min)) / (math.log(sigma_max) - math.log(sigma_min)) * (big - 1)
        return ((big - 1) - u) / big

    sched.timestep, sched.time_of_timestep = timestep, time_of_timestep
    sched.continuous_noise = True
    sched.name = f"continuous({sigma_min:g}, {sigma_max:g})"
    return sched


def unet_schedule(scheduler_or_betas: Any) -> Schedule:
    """The schedule a DDPM-style UNet is read on, from a scheduler's ``alphas_cumprod`` and config (or from the
    betas given): :func:`network_schedule`."""
    config = getattr(scheduler_or_betas, "config", None)
    get = config.get if config is not None else (lambda key: None)
    return network_schedule(_alphas_cumprod(scheduler_or_betas), get("prediction_type"), get("timestep_type"),
                            get("sigma_min"), get("sigma_max"))


def network_schedule(alphas_cumprod: Tensor, prediction_type: str | None, timestep_type: str | None,
                     sigma_min: float | None, sigma_max: float | None) -> Schedule:
    """As ``EulerDiscreteScheduler`` reads its config: a v-prediction network with ``timestep_type="continuous"``
    is on :func:`continuous_noise_schedule` (``sigma_min`` and ``sigma_max``, else ``alphas_cumprod``'s range),
    any other on :func:`ddpm_schedule` of ``alphas_cumprod``. The schedule's ``continuous_noise`` says which."""
    if timestep_type == "continuous" and prediction_type == "v_prediction":
        return continuous_noise_schedule(*noise_range(alphas_cumprod, sigma_min, sigma_max))
    return ddpm_schedule(alphas_cumprod)


def noise_range(alphas_cumprod: Tensor, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    """(sigma_min, sigma_max) of a continuous-noise config: as given, else the noise levels √((1 − ᾱ)/ᾱ) of
    ``alphas_cumprod``'s first and last index (a zero-terminal last index: its neighbour's)."""
    abar = alphas_cumprod[alphas_cumprod > 0]
    low = float(torch.sqrt((1 - abar[0]) / abar[0])) if sigma_min is None else sigma_min
    high = float(torch.sqrt((1 - abar[-1]) / abar[-1])) if sigma_max is None else sigma_max
    return low, high


def ddpm_model(unet: Any, scheduler_or_betas: Any, prediction_type: str | None = None, class_labels: Any = None,
               *, guidance_scale: float = 1.0, negative_kwargs: dict | None = None, **unet_kwargs: Any) -> Model:
    r"""A DDPM-style UNet as an :class:`~lazyinterp.Model` on :func:`ddpm_schedule` of its ``alphas_cumprod``.

    The network is called as ``unet(x, u, class_labels=..., **unet_kwargs)`` with the float timestep
    u(t) = T − 1 − T t (index n at t = (T − 1 − n)/T). It is never asked beyond index 0 (``model.t_max`` is the
    time of index 0): on the clean piece up to t = 1 its index-0 predictions are held, and the exact ODE
    solution with held (η_Z, η_X), x_t = α_t η_Z + β_t η_X, ends at the index-0 data prediction, as DDIM's last
    step with ``set_alpha_to_one`` does. The prediction maps to lazyinterp's (α = √(1 − ᾱ) is the noise and
    β = √ᾱ the data coefficient):

    * ``"epsilon"``: η_Z = output (``predicts="noise"``);
    * ``"v_prediction"``: diffusers' v = √ᾱ ε − √(1 − ᾱ) x₀ = β η_Z − α η_X, so with α² + β² = 1,
      η_X = β x − α v (``predicts="data"``, which stays well conditioned where β is small);
    * ``"sample"``: η_X = output.

    UNets with a learned variance (2C output channels for C input channels) give their first C channels. A
    v-prediction scheduler with ``timestep_type="continuous"`` (Stable Video Diffusion) describes a network on
    continuous noise levels instead: the model is on :func:`continuous_noise_schedule` and the network is called with
    the timestep ¼ ln σ (:func:`unet_schedule`).

    Schedules whose noisiest index is not pure noise (β_0 = √ᾱ_{T−1} > 0, e.g. linear betas) cover SNRs from
    r_0 = β_0/α_0 only. A target that starts at SNR 0 (lazy VP, cosine, point mass) matches target times below
    r'⁻¹(r_0) to t = 0 of the model, where the conversion is not exact: an O(β_0) error at the start, the size of
    DDPM's own pure-noise start. A target restricted to [r_0, ∞] (e.g. α = cos θ, β = sin θ with θ from
    atan r_0 to π/2) avoids it; zero-terminal-SNR schedules have r_0 = 0.

    Args:
        unet: e.g. ``UNet2DModel``; anything called as above returning ``.sample`` or a tuple.
        scheduler_or_betas: a DDPM-style scheduler (its ``alphas_cumprod``) or the betas.
        prediction_type: as above; default the scheduler's ``config.prediction_type``, else ``"epsilon"``.
        class_labels: fixed class labels (one per sample, or one for all).
        guidance_scale: the classifier-free guidance weight w (1 disables it): output = u + w (c − u) from one
            batched call [negative, positive], as Stable Diffusion pipelines make it.
        negative_kwargs: the inputs that differ for the unconditional branch (e.g. the negative
            ``encoder_hidden_states``, or ``class_labels`` of the null class).
        **unet_kwargs: other fixed inputs (e.g. ``encoder_hidden_states`` for a conditional UNet).
    """
    if not callable(unet):
        raise TypeError(f"unet: expected a callable module, got {type(unet).__name__}")
    if prediction_type is None:
        prediction_type = getattr(getattr(scheduler_or_betas, "config", None), "prediction_type", None) or "epsilon"
    kind = ddpm_prediction_kind(prediction_type)
    schedule = unet_schedule(scheduler_or_betas)
    fixed = dict(unet_kwargs)
    if class_labels is not None:
        fixed["class_labels"] = torch.as_tensor(class_labels)
    cfg, neg = _check_guidance(guidance_scale, negative_kwargs, fixed)

    def call(hidden: Tensor, timestep: Tensor, kwargs: dict) -> Tensor:
        out = _output_tensor(unet(hidden, timestep, return_dict=False, **kwargs))
        if out.shape[1] == 2 * hidden.shape[1] and out.shape[2:] == hidden.shape[2:]:
            out = out[:, : hidden.shape[1]]
        return out

    def net(x: Tensor, t: Tensor) -> Tensor:
        dtype = _module_dtype(unet)
        batch = x.shape[0]
        kwargs = {k: _fit_batch(k, val, batch) for k, val in fixed.items()}
        if "class_labels" in kwargs:
            kwargs["class_labels"] = kwargs["class_labels"].to(x.device)
        timestep = schedule.timestep(t).to(device=x.device, dtype=torch.float32)
        hidden = x.to(dtype)
        out = _guided(call, hidden, timestep, kwargs, neg, guidance_scale) if cfg else call(hidden, timestep, kwargs)
        return ddpm_output_to_prediction(out.to(x.dtype), x, t, schedule, prediction_type)

    model = Model(net, schedule, kind)
    model.t_max = ddpm_time_range(model)[1]
    return model


def ddpm_prediction_kind(prediction_type: Any) -> str:
    """The lazyinterp prediction kind that a DDPM ``prediction_type`` is read as: ``"epsilon"`` → ``"noise"``,
    ``"v_prediction"`` and ``"sample"`` → ``"data"`` (see :func:`ddpm_model`); a ValueError naming
    ``prediction_type`` for any other."""
    if prediction_type not in _DDPM_KINDS:
        raise ValueError(f"prediction_type: expected one of {', '.join(_DDPM_KINDS)}, got {prediction_type!r}")
    return _DDPM_KINDS[prediction_type]


def ddpm_output_to_prediction(out: Tensor, x: Tensor, t: Tensor | float, schedule: Schedule,
                              prediction_type: str) -> Tensor:
    r"""A DDPM network's ``out`` at (x, t) as the prediction of :func:`ddpm_prediction_kind`: itself, except for
    ``"v_prediction"``, where diffusers' v = √ᾱ ε − √(1 − ᾱ) x₀ = β η_Z − α η_X gives η_X = β x − α v
    (α² + β² = 1)."""
    if prediction_type != "v_prediction":
        return out
    tt = as_time(t)
    shape = (x.shape[0], *([1] * (x.ndim - 1))) if tt.ndim else ()
    a, b = (c.to(device=x.device, dtype=x.dtype).reshape(shape) for c in (schedule.alpha(tt), schedule.beta(tt)))
    return b * x - a * out


def ddpm_time_range(model: Model) -> tuple[float, float]:
    """(t_min, t_max) at which a DDPM network on ``model.schedule`` is evaluated: the model's own, with t_max at
    most the time of index 0. Beyond index 0 the network was never trained; holding its index-0 predictions keeps
    η_Z continuous up to t = 1, where a data prediction's η_Z would otherwise jump to 0 (the α = 0 convention) and
    a Heun corrector at t = 1 would turn that jump into a first-order error."""
    steps = model.schedule.num_train_timesteps
    return model.t_min, min(model.t_max, (steps - 1) / steps)
