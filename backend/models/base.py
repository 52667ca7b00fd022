"""The `DiffusionModel` adapter interface and the denoising loop every family shares.

An adapter wraps a loaded diffusers pipeline and exposes: the denoiser module (hook points are its submodule
paths), `encode_prompts`, `timesteps(n_steps)`, one denoising `step`, and `decode`. With classifier-free
guidance the denoiser's batch is `[uncond; cond]` (the order diffusers pipelines use).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch

Cond = dict  # keyword arguments of the denoiser that carry the prompt (may nest, e.g. added_cond_kwargs)


def cat_cond(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditioning dicts along the batch (tensors), keeping non-tensors from a."""
    out = {}
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.cat([v, b[k]])
        elif isinstance(v, dict):
            out[k] = cat_cond(v, b[k])
        else:
            out[k] = v
    return out


def to_uint8(images_B3HW: torch.Tensor) -> np.ndarray:
    """Float images in [0, 1] [B, 3, H, W] to uint8 [B, H, W, 3]."""
    return (images_B3HW.clamp(0, 1).permute(0, 2, 3, 1).cpu().float().numpy() * 255).round().astype(np.uint8)


def seed_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, so an image depends on its seed, not on its batch."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


class DiffusionModel:
    """Base adapter. Subclasses set `family` and implement encode_prompts, initial_latents and decode."""

    family = "base"
    default_steps = 30
    default_guidance = 7.5

    def __init__(self, pipe, denoiser: torch.nn.Module, spec: str):
        self.pipe = pipe
        self.denoiser = denoiser
        self.spec = spec
        # a private scheduler: stateful schedulers must not be shared with the pipeline's own __call__
        self.scheduler = copy.deepcopy(pipe.scheduler)
        # read by hooks (backend/models/hooks.py): the step being denoised and whether the batch is [uncond; cond]
        self.step_index = 0
        self.cfg_active = False

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def default_resolution(self) -> tuple[int, int]:
        raise NotImplementedError

    # ------------------------------------------------------------------ interface
    def encode_prompts(self, prompts: list[str], cfg: bool) -> tuple[Cond, Cond | None]:
        """Denoiser kwargs for the prompts and, with CFG, for the unconditional (negative) prompt."""
        raise NotImplementedError

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise a one-line DifflensError for a prompt this model cannot encode (default: any text is fine)."""

    def initial_latents(self, generators: list[torch.Generator], height: int | None = None,
                        width: int | None = None) -> torch.Tensor:
        """Seeded noise scaled by self.scheduler.init_noise_sigma: call timesteps(n_steps) first."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], float32 [B, 3, H, W]."""
        raise NotImplementedError

    def timesteps(self, n_steps: int) -> torch.Tensor:
        """Set up the scheduler for a new generation of n_steps and return its timesteps, one per denoiser call.

        Their number can exceed n_steps: PNDM (PLMS with skip_prk_steps, the scheduler SD 1.x ships) evaluates the
        denoiser n_steps + 1 times, its second timestep twice. Size per-step buffers by len(timesteps), not n_steps.
        """
        self.scheduler.set_timesteps(n_steps, device=self.device)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        return self.scheduler.timesteps

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.denoiser(x, t, **cond, return_dict=False)[0]

    def extra_step_kwargs(self, generators: list[torch.Generator] | None) -> dict:
        import inspect

        params = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = 0.0
        if "generator" in params and generators is not None:
            kwargs["generator"] = generators
        return kwargs

    def step(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None,
             guidance: float, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """One denoising step; with uncond (CFG) the denoiser sees the batch [uncond; cond]."""
        self.cfg_active = uncond is not None
        x = torch.cat([latents, latents]) if uncond is not None else latents
        x = self.scheduler.scale_model_input(x, t)
        kwargs = cat_cond(uncond, cond) if uncond is not None else cond
        noise = self.predict_noise(x, t, kwargs)
        if uncond is not None:
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        return self.scheduler.step(noise, t, latents, **self.extra_step_kwargs(generators), return_dict=False)[0]

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], n_steps: int | None = None,
                 guidance: float | None = None, height: int | None = None, width: int | None = None,
                 on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1]. CFG is on when guidance > 1 (as in diffusers pipelines)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        n_steps = n_steps or self.default_steps
        guidance = self.default_guidance if guidance is None else guidance
        cfg = guidance > 1.0
        cond, uncond = self.encode_prompts(list(prompts), cfg)
        generators = seed_generators(seeds)
        # the schedule first: the initial noise scale (init_noise_sigma) can depend on it (Euler, "leading" spacing)
        timesteps = self.timesteps(n_steps)
        latents = self.initial_latents(generators, height, width)
        for i, t in enumerate(timesteps):
            self.step_index = i
            latents = self.step(latents, t, cond, uncond, guidance, generators)
            if on_step is not None:
                on_step(i, t, latents)
        return self.decode(latents)
