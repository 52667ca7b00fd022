"""Adapters for latent-diffusion pipelines from diffusers: Stable Diffusion 1.x/2.x, SDXL (and SDXL-Turbo),
and PixArt-alpha (a transformer denoiser). Prompt encoding reuses the pipeline's own methods and the initial
latents are drawn as its prepare_latents draws them, so our loop matches the pipeline's `__call__` (tested with
each family's shipped scheduler); only the loop itself is ours (to hook it)."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from backend.models.base import Cond, DiffusionModel


def filled(negative: list[str | None] | None) -> list[str] | None:
    """Negative prompts for a pipeline's encode_prompt: None rows as "" (what SD and PixArt encode by default)."""
    return None if negative is None else [neg or "" for neg in negative]


class _VaeDecodeMixin:
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], float32 [B, 3, H, W], decoded decode_batch latents at a time (the VAE's activations at
        full resolution are most of a generation's peak memory). A float16 VAE whose config asks for it
        (force_upcast: SD/SDXL VAEs overflow in float16) decodes in float32."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        dtype = torch.float32 if upcast else vae.dtype
        cfg = vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None) is not None:  # SD3 / FLUX VAEs
            latents = latents + cfg.shift_factor
        step = self.decode_batch if self.decode_batch and self.decode_batch > 0 else max(len(latents), 1)
        if upcast:
            vae.to(torch.float32)
        try:
            images = [vae.decode(latents[i:i + step].to(dtype), return_dict=False)[0].float()
                      for i in range(0, len(latents), step)]
        finally:
            if upcast:
                vae.to(torch.float16)
        image = torch.cat(images) if images else torch.zeros(0, 3, 0, 0)
        return (image / 2 + 0.5).clamp(0, 1)

    def initial_latents(self, generators, height=None, width=None) -> torch.Tensor:
        """The pipeline's prepare_latents, but scaled by *our* scheduler after its set_timesteps: the pipeline's
        scheduler is not the one stepped, and Euler's init_noise_sigma depends on the schedule ("leading" spacing,
        SDXL-base: 13.16 at 50 steps, 14.65 before set_timesteps)."""
        h, w = height or self.default_resolution[0], width or self.default_resolution[1]
        scale = self.pipe.vae_scale_factor
        shape = (len(generators), self.denoiser.config.in_channels, int(h) // scale, int(w) // scale)
        noise = randn_tensor(shape, generator=list(generators), device=self.device, dtype=self.dtype)
        return noise * self.scheduler.init_noise_sigma

    @property
    def default_resolution(self) -> tuple[int, int]:
        size = self.denoiser.config.sample_size * self.pipe.vae_scale_factor
        return size, size


class StableDiffusionModel(_VaeDecodeMixin, DiffusionModel):
    """Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`)."""

    family = "stable-diffusion"
    default_steps = 30
    default_guidance = 7.5

    def __init__(self, pipe, spec: str):
        super().__init__(pipe, denoiser=pipe.unet, spec=spec)

    def encode_prompts(self, prompts, cfg, negative=None):
        cond, uncond = self.pipe.encode_prompt(list(prompts), self.device, 1, cfg, negative_prompt=filled(negative))
        return {"encoder_hidden_states": cond}, ({"encoder_hidden_states": uncond} if cfg else None)


class StableDiffusionXLModel(_VaeDecodeMixin, DiffusionModel):
    """SDXL and SDXL-Turbo (`StableDiffusionXLPipeline`): two text encoders, pooled embeds, size conditioning."""

    family = "sdxl"
    default_steps = 30
    default_guidance = 5.0

    def __init__(self, pipe, spec: str):
        super().__init__(pipe, denoiser=pipe.unet, spec=spec)
        self._size: tuple[int, int] | None = None

    def initial_latents(self, generators, height=None, width=None):
        self._size = (height or self.default_resolution[0], width or self.default_resolution[1])
        return super().initial_latents(generators, *self._size)

    def _time_ids(self, n: int, pooled: torch.Tensor) -> torch.Tensor:
        size = self._size or self.default_resolution
        te2 = self.pipe.text_encoder_2
        proj_dim = int(pooled.shape[-1]) if te2 is None else te2.config.projection_dim
        ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=pooled.dtype, text_encoder_projection_dim=proj_dim)
        return ids.to(self.device).repeat(n, 1)

    def encode_prompts(self, prompts, cfg, negative=None):
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=filled(negative),
        )
        if cfg and negative is not None and self.pipe.config.force_zeros_for_empty_prompt:
            # the pipeline zeroes the unconditional embeddings of a call without negative_prompt: so do we for the
            # prompts without one in a batch where others have one
            none = torch.tensor([neg is None for neg in negative], device=uncond.device)
            uncond = uncond.masked_fill(none[:, None, None], 0)
            uncond_pooled = uncond_pooled.masked_fill(none[:, None], 0)
        n = len(prompts)
        make = lambda h, p: {  # noqa: E731
            "encoder_hidden_states": h,
            "added_cond_kwargs": {"text_embeds": p, "time_ids": self._time_ids(n, p)},
        }
        return make(cond, pooled), (make(uncond, uncond_pooled) if cfg else None)

    def generate(self, prompts, seeds, n_steps=None, guidance=None, height=None, width=None, on_step=None,
                 output="image", **kwargs):
        # size conditioning must be known before the prompts are encoded
        self._size = (height or self.default_resolution[0], width or self.default_resolution[1])
        return super().generate(prompts, seeds, n_steps, guidance, height, width, on_step, output, **kwargs)


class PixArtAlphaModel(_VaeDecodeMixin, DiffusionModel):
    """PixArt-alpha (`PixArtAlphaPipeline`): a DiT denoiser with T5 text states; hook `transformer_blocks.N`."""

    family = "pixart-alpha"
    default_steps = 20
    default_guidance = 4.5

    def __init__(self, pipe, spec: str, max_sequence_length: int = 120):
        super().__init__(pipe, denoiser=pipe.transformer, spec=spec)
        self.max_sequence_length = max_sequence_length

    def encode_prompts(self, prompts, cfg, negative=None):
        cond, mask, uncond, uncond_mask = self.pipe.encode_prompt(
            list(prompts), cfg, negative_prompt=filled(negative) or "", device=self.device, clean_caption=False,
            max_sequence_length=self.max_sequence_length,
        )
        n = len(prompts)
        make = lambda h, m: {  # noqa: E731
            "encoder_hidden_states": h, "encoder_attention_mask": m, "added_cond_kwargs": self._micro_cond(n, h),
        }
        return make(cond, mask), (make(uncond, uncond_mask) if cfg else None)

    def _micro_cond(self, n: int, states: torch.Tensor) -> dict:
        if self.denoiser.config.sample_size != 128:
            return {"resolution": None, "aspect_ratio": None}
        h, w = self.default_resolution
        return {
            "resolution": torch.tensor([h, w]).repeat(n, 1).to(self.device, states.dtype),
            "aspect_ratio": torch.tensor([float(h / w)]).repeat(n, 1).to(self.device, states.dtype),
        }

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        timestep = (t[None] if t.ndim == 0 else t).to(x.device).expand(x.shape[0])
        patch = self.denoiser.config.patch_size
        self.token_grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        out = self.denoiser(x, timestep=timestep, **cond, return_dict=False)[0]
        latent_channels = self.denoiser.config.in_channels
        if self.denoiser.config.out_channels // 2 == latent_channels:  # learned sigma: keep the noise half
            out = out.chunk(2, dim=1)[0]
        return out
