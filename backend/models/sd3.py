"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`, an `SD3Transformer2DModel` MMDiT denoiser).

Hook points are the joint blocks `transformer_blocks.N` (image stream; `transformer_blocks.N:text` their text
stream, except the last block's, which outputs none). Three text encoders (two CLIPs, a T5) through the pipeline's
own encode_prompt; classifier-free guidance batches [uncond; cond] as the pipeline does; the flow-matching
schedule as backend/models/flow_matching.py sets it. The image tokens are the latent's patches, row-major over a
(H / patch) x (W / patch) grid (`token_grid`).
"""

from __future__ import annotations

import torch

from backend.models.base import Cond, DiffusionModel
from backend.models.flow_matching import FlowMatchMixin
from backend.models.latent import _VaeDecodeMixin


class StableDiffusion3Model(FlowMatchMixin, _VaeDecodeMixin, DiffusionModel):
    """SD3 / SD3.5: CFG on guidance > 1, T5 text up to 256 tokens (the pipeline's default)."""

    family = "sd3"
    default_steps = 28
    default_guidance = 7.0
    default_max_shift = 1.16

    def __init__(self, pipe, spec: str, max_sequence_length: int = 256):
        super().__init__(pipe, denoiser=pipe.transformer, spec=spec)
        tok3 = getattr(pipe, "tokenizer_3", None)
        self.max_sequence_length = min(max_sequence_length, tok3.model_max_length) if tok3 else max_sequence_length
        self.latent_channels = self.denoiser.config.in_channels

    @property
    def default_resolution(self) -> tuple[int, int]:
        size = self.denoiser.config.sample_size * self.pipe.vae_scale_factor
        return size, size

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.pipe.vae_scale_factor, width // self.pipe.vae_scale_factor

    def image_tokens(self) -> int:
        h, w = self.latent_size(*self.current_size())
        patch = self.denoiser.config.patch_size
        return (h // patch) * (w // patch)

    def encode_prompts(self, prompts, cfg):
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=cfg, max_sequence_length=self.max_sequence_length,
        )
        make = lambda h, p: {"encoder_hidden_states": h, "pooled_projections": p}  # noqa: E731
        return make(cond, pooled), (make(uncond, uncond_pooled) if cfg else None)

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        patch = self.denoiser.config.patch_size
        self.token_grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        self.text_tokens = int(cond["encoder_hidden_states"].shape[1])
        timestep = t.reshape(-1).to(x.device).expand(x.shape[0])
        return self.denoiser(hidden_states=x, timestep=timestep, **cond, return_dict=False)[0]
