"""FLUX.1 (`FluxPipeline`, a `FluxTransformer2DModel`): double-stream `transformer_blocks.N` (image and text
streams, `:text` for the latter) and single-stream `single_transformer_blocks.N` (one joint [text; image] sequence:
its image part is the hook point).

Latents. FLUX's pipeline keeps its latents packed: 2x2 latent pixels x C channels -> one token of 4C, a
(H / 2) x (W / 2) grid read row-major (token i is at row i // (W / 2), column i % (W / 2)). Our loop keeps them
unpacked, [B, C, H, W] like every other family (dream, splice and decode work on them unchanged), and packs them
only around the transformer call (`pack` / `unpack`, exact inverses; the flow-matching Euler step is elementwise,
so stepping unpacked latents gives the pipeline's values). Each call sets `token_grid` to the packed grid, so hook
events carry it as their spatial shape and heat-maps, masks and steering windows land on the right pixels (one
token covers 2 x 2 latent pixels, 16 x 16 image pixels with FLUX's VAE).

Guidance. FLUX.1-dev is guidance-distilled: the guidance value is an input of the transformer (its guidance
embedding), there is no CFG batch, so hooks always see the whole (conditional) batch. FLUX.1-schnell takes no
guidance (it is ignored). The default resolution is the VAE's sample_size (1024 for FLUX.1, the pipeline's own
default of 128 x vae_scale_factor), since the transformer config has no sample size.
"""

from __future__ import annotations

import torch

from backend.models.base import Cond, DiffusionModel
from backend.models.flow_matching import FlowMatchMixin
from backend.models.latent import _VaeDecodeMixin


def pack(latents_BCHW: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: FluxPipeline._pack_latents (2x2 patches, row-major)."""
    b, c, h, w = latents_BCHW.shape
    x = latents_BCHW.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens_BTD: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack for latents of H x W: FluxPipeline._unpack_latents."""
    b, _, d = tokens_BTD.shape
    x = tokens_BTD.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def token_position(index: int, grid: tuple[int, int]) -> tuple[int, int]:
    """(row, col) in the packed token grid of image token `index` (row-major)."""
    return divmod(int(index), int(grid[1]))


class FluxModel(FlowMatchMixin, _VaeDecodeMixin, DiffusionModel):
    """FLUX.1-dev (guidance embedding, 28 steps, guidance 3.5) and FLUX.1-schnell (4 steps, no guidance)."""

    family = "flux"
    linear_sigmas = True

    def __init__(self, pipe, spec: str, max_sequence_length: int = 512):
        super().__init__(pipe, denoiser=pipe.transformer, spec=spec)
        self.distilled = bool(self.denoiser.config.guidance_embeds)
        self.default_steps = 28 if self.distilled else 4
        self.default_guidance = 3.5 if self.distilled else 0.0
        self.guidance = self.default_guidance
        """The guidance embedding's value for encode_prompts (generate sets it)."""
        tok2 = getattr(pipe, "tokenizer_2", None)
        self.max_sequence_length = min(max_sequence_length, tok2.model_max_length) if tok2 else max_sequence_length
        self.latent_channels = self.denoiser.config.in_channels // 4

    @property
    def default_resolution(self) -> tuple[int, int]:
        size = int(self.pipe.vae.config.sample_size)
        return size, size

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """The pipeline's: a multiple of 2 latent pixels (the packing) per side."""
        scale = self.pipe.vae_scale_factor
        return 2 * (height // (scale * 2)), 2 * (width // (scale * 2))

    def image_tokens(self) -> int:
        h, w = self.latent_size(*self.current_size())
        return (h // 2) * (w // 2)

    def encode_prompts(self, prompts, cfg):
        """The prompts' states; never an unconditional half (no CFG batch: guidance is an input, or none)."""
        states, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        cond = {"encoder_hidden_states": states, "pooled_projections": pooled}
        if self.distilled:
            cond["guidance"] = torch.full([len(prompts)], float(self.guidance), device=self.device,
                                          dtype=torch.float32)
        return cond, None

    def generate(self, prompts, seeds, n_steps=None, guidance=None, height=None, width=None, on_step=None,
                 output="image"):
        self.guidance = self.default_guidance if guidance is None else float(guidance)
        try:
            return super().generate(prompts, seeds, n_steps, guidance, height, width, on_step, output)
        finally:
            self.guidance = self.default_guidance

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The velocity for unpacked latents x [B, C, H, W] at timesteps t (scheduler units, 0..1000)."""
        b, _, h, w = x.shape
        states = cond["encoder_hidden_states"]
        self.token_grid = (h // 2, w // 2)
        self.text_tokens = int(states.shape[1])
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, states.dtype)
        txt_ids = torch.zeros(states.shape[1], 3, device=x.device, dtype=states.dtype)
        timestep = t.reshape(-1).to(x.device).expand(b).to(x.dtype)
        out = self.denoiser(hidden_states=pack(x), timestep=timestep / 1000, img_ids=img_ids, txt_ids=txt_ids,
                            **cond, return_dict=False)[0]
        return unpack(out, h, w)
