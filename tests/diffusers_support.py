"""Tiny random SD3, FLUX, CogView4, Wan and Qwen-Image models and pipelines, built offline, and the helpers that
drive them: shared by the tests of :mod:`lazyinterp.diffusers`."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    CogView4Pipeline,
    CogView4Transformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)

import lazyinterp as li  # noqa: E402
from lazyinterp.diffusers import (  # noqa: E402
    LazyScheduler,
    flow_transformer_model,
)

SD3_CONFIG = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                  num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64,
                  out_channels=4, pos_embed_max_size=96)
FLUX_CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
# A tiny unconditional DDPM UNet on 8×8 single-channel images.
UNET_CONFIG = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   norm_num_groups=4)
# 64×64 "pixels" with the pipelines' VAE factor 8 give 8×8 latents: SD3 (B, 4, 8, 8); FLUX (B, 1, 8, 8), packed
# to (B, 16, 4).
SIZE = 64
BATCH = 2


def exact_output(x: torch.Tensor, t: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """diffusers' output ε − x_data = −v of the exact linear-schedule model for X ~ N(mean, std² I)."""
    t = t.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    xd = x.double()
    den = (1 - t) ** 2 + t**2 * std**2
    eta_x = mean + t * std**2 * (xd - t * mean) / den
    eta_z = (1 - t) * (xd - t * mean) / den
    return (eta_z - eta_x).to(x.dtype)


class ExactSD3(SD3Transformer2DModel):
    """The tiny SD3 transformer's class and config, computing the exact Gaussian output (timestep = 1000 σ)."""

    def forward(self, hidden_states, timestep=None, return_dict=True, **kwargs):
        return (exact_output(hidden_states, 1 - timestep.double() / 1000, self.data_mean, self.data_std),)


class ExactFlux(FluxTransformer2DModel):
    """The tiny FLUX transformer's class and config, computing the exact Gaussian output (timestep = σ)."""

    def forward(self, hidden_states, timestep=None, return_dict=True, **kwargs):
        return (exact_output(hidden_states, 1 - timestep.double(), self.data_mean, self.data_std),)


def exact(cls, config, mean=0.0, std=1.0):
    model = cls(**config)
    model.data_mean, model.data_std = mean, std
    return model


def noise(kind: str, seed: int = 1) -> torch.Tensor:
    """Initial latents, unpacked: (B, 4, 8, 8) for SD3 and (B, 1, 8, 8) for FLUX."""
    return torch.randn(BATCH, 4 if kind == "sd3" else 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def pack(z: torch.Tensor) -> torch.Tensor:
    return FluxPipeline._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])


def pipeline(kind: str, transformer, scheduler):
    if kind == "sd3":
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=None, text_encoder=None,
                                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                        tokenizer_3=None)
    else:
        pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_scheduler(kind: str):
    """The schedulers SD3 and FLUX ship with: a static shift 3, and FLUX-dev's dynamic shift."""
    if kind == "sd3":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)


def layout(kind: str, z: torch.Tensor) -> torch.Tensor:
    """Unpacked latents as the pipeline holds them (FLUX packs 2×2 patches)."""
    return z.clone() if kind == "sd3" else pack(z)


def run(kind: str, pipe, embeds, z: torch.Tensor, steps: int, **kwargs) -> torch.Tensor:
    """The pipeline's final latents (packed for FLUX) from the unpacked initial latents ``z``."""
    pe, pp = embeds[kind]
    extra = {} if kind == "flux" else {"guidance_scale": kwargs.pop("guidance_scale", 1.0)}
    return pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, num_inference_steps=steps, height=SIZE, width=SIZE,
                output_type="latent", latents=layout(kind, z), **extra, **kwargs).images


def lazy(kind: str, **config) -> LazyScheduler:
    return LazyScheduler.from_config(base_scheduler(kind).config, **config)


def li_model(kind: str, transformer, embeds, index=slice(None), packed=True, **kwargs) -> li.Model:
    """The adapter on the pipeline's conditioning; for FLUX on packed latents with the pipeline's image ids."""
    pe, pp = (e[index] for e in embeds[kind])
    if kind == "flux" and packed:
        kwargs["img_ids"] = FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    return flow_transformer_model(transformer, encoder_hidden_states=pe, pooled_projections=pp, **kwargs)


class SameSigmas(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler on LazyScheduler's default sigmas linspace(1, 1/N, N) when a pipeline passes
    only N, so that the two can be compared in pipelines that do (Wan)."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if sigmas is None and timesteps is None:
            sigmas, num_inference_steps = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps), None
        super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)


def other_pipeline(kind: str, scheduler) -> tuple:
    """A tiny CogView4 (which passes timesteps and sigmas), Wan (which passes only N, on 5-D video latents) or
    Qwen-Image (packed latents, dynamic shift) pipeline, with its call arguments."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    if kind == "cogview4":
        transformer = CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                                 attention_head_dim=4, num_attention_heads=4, text_embed_dim=32,
                                                 time_embed_dim=8, condition_dim=4, rope_axes_dim=(2, 2)).eval()
        pipe = CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler,
                                transformer=transformer)
        embeds = torch.randn(1, 16, 32, generator=g)
        args = dict(prompt_embeds=embeds, negative_prompt_embeds=embeds, latents=torch.randn(1, 4, 4, 4, generator=g))
    elif kind == "qwenimage":
        transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                                  attention_head_dim=16, num_attention_heads=2,
                                                  joint_attention_dim=16, axes_dims_rope=(4, 6, 6)).eval()
        pipe = QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                                 transformer=transformer)
        args = dict(prompt_embeds=torch.randn(1, 7, 16, generator=g), prompt_embeds_mask=torch.ones(1, 7).long(),
                    latents=torch.randn(1, 4, 16, generator=g))
    else:
        transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                            in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                            num_layers=1, rope_max_seq_len=32).eval()
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer)
        args = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), num_frames=1,
                    latents=torch.randn(1, 4, 1, 4, 4, generator=g))
    pipe.set_progress_bar_config(disable=True)
    guidance = {"true_cfg_scale": 1.0} if kind == "qwenimage" else {"guidance_scale": 1.0}
    return pipe, dict(height=32, width=32, output_type="latent", **guidance, **args)


OTHER_BASE = {"cogview4": lambda: FlowMatchEulerDiscreteScheduler(
                  base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True,
                  time_shift_type="linear"),
              "wan": lambda: SameSigmas(shift=3.0),
              "qwenimage": lambda: FlowMatchEulerDiscreteScheduler(
                  use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                  max_image_seq_len=8192)}


def random_covariance(dim: int, seed: int) -> torch.Tensor:
    """A random anisotropic SPD matrix: eigenvalues from 0.05 to 3 in a random basis."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return basis @ torch.diag(0.05 + 2.95 * torch.rand(dim, generator=g, dtype=torch.float64)) @ basis.T


def tiny_sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(**SD3_CONFIG).eval()


def tiny_flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX_CONFIG).eval()


def tiny_embeds():
    g = torch.Generator().manual_seed(3)
    return {"sd3": (torch.randn(BATCH, 7, 32, generator=g), torch.randn(BATCH, 64, generator=g)),
            "sd3_neg": (torch.randn(BATCH, 7, 32, generator=g), torch.randn(BATCH, 64, generator=g)),
            "flux": (torch.randn(BATCH, 7, 32, generator=g), torch.randn(BATCH, 32, generator=g))}
