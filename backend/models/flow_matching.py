"""The flow-matching schedule SD3 and FLUX share (FlowMatchEulerDiscreteScheduler), set up as their pipelines set it.

A generation's timesteps come from the scheduler's set_timesteps with the pipeline's sigmas (FLUX: linspace(1, 1/n)
; SD3: the scheduler's own) and, where the scheduler shifts by resolution (use_dynamic_shifting: FLUX.1-dev,
SD3.5), the shift mu of the image's token count (the pipelines' calculate_shift). Timesteps are sigma x 1000
(num_train_timesteps), so the `steps` table's timestep column records the sigma of each step too; `sigmas(n)`
gives them directly. The initial noise is unscaled (sigma = 1 at the first step) and the denoiser input is the
latent itself (the scheduler has no scale_model_input).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor


class FlowMatchMixin:
    """Timesteps, sigmas and initial latents of a flow-matching adapter (before DiffusionModel in the bases)."""

    default_max_shift = 1.15
    """calculate_shift's max_shift when the scheduler config has none (FLUX 1.15, SD3 1.16)."""
    linear_sigmas = False
    """Pass sigmas = linspace(1, 1/n, n) to set_timesteps (FLUX's pipeline does; SD3's leaves them to the scheduler)."""

    def image_tokens(self) -> int:
        """Image tokens of a generation at the current size (the shift mu depends on them)."""
        raise NotImplementedError

    def schedule_kwargs(self, n_steps: int) -> dict:
        """set_timesteps arguments as the family's pipeline passes them."""
        cfg = self.scheduler.config
        kwargs = {}
        if self.linear_sigmas and not cfg.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / n_steps, n_steps)
        if cfg.get("use_dynamic_shifting", False) or self.linear_sigmas:
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            kwargs["mu"] = calculate_shift(self.image_tokens(), cfg.get("base_image_seq_len", 256),
                                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                           cfg.get("max_shift", self.default_max_shift))
        return kwargs

    def timesteps(self, n_steps: int) -> torch.Tensor:
        kwargs = self.schedule_kwargs(n_steps)
        if "sigmas" in kwargs:
            self.scheduler.set_timesteps(device=self.device, **kwargs)
        else:
            self.scheduler.set_timesteps(n_steps, device=self.device, **kwargs)
        self.scheduler.set_begin_index(0)
        return self.scheduler.timesteps

    def sigmas(self, n_steps: int) -> torch.Tensor:
        """The noise level of each step of a generation of n_steps (timesteps / num_train_timesteps), from a copy
        of the scheduler (the model's is left as it was)."""
        saved = self.scheduler
        self.scheduler = copy.deepcopy(saved)
        try:
            self.timesteps(n_steps)
            return self.scheduler.sigmas[:-1].clone()
        finally:
            self.scheduler = saved

    def generate(self, prompts, seeds, n_steps=None, guidance=None, height=None, width=None, on_step=None,
                 output="image"):
        # the shift mu depends on the image size, and the schedule is set before the latents are drawn
        self._size = (height or self.default_resolution[0], width or self.default_resolution[1])
        try:
            return super().generate(prompts, seeds, n_steps, guidance, height, width, on_step, output)
        finally:
            self._size = None

    def current_size(self) -> tuple[int, int]:
        return getattr(self, "_size", None) or self.default_resolution

    def initial_latents(self, generators, height=None, width=None) -> torch.Tensor:
        """Seeded noise [B, C, H / vae_scale, W / vae_scale], unscaled (the pipelines' prepare_latents)."""
        h, w = height or self.default_resolution[0], width or self.default_resolution[1]
        shape = (len(generators), self.latent_channels, *self.latent_size(int(h), int(w)))
        return randn_tensor(shape, generator=list(generators), device=self.device, dtype=self.dtype)
