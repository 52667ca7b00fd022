"""The `DiffusionModel` adapter interface and the denoising loop every family shares.

An adapter wraps a loaded diffusers pipeline and exposes: the denoiser module (hook points are its submodule
paths), `encode_prompts`, `timesteps(n_steps)`, one denoising `step`, and `decode`. With classifier-free
guidance the denoiser's batch is `[uncond; cond]` (the order diffusers pipelines use); the unconditional half is
the empty prompt, or a generation's negative prompt. Extra conditioning (a ControlNet's control images) enters
through `add_control` as more denoiser kwargs, CFG-doubled with the rest.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


@contextmanager
def deterministic_kernels(device: torch.device | str) -> Iterator[None]:
    """Deterministic kernels for the block on a CUDA device (the flags are restored after; elsewhere nothing
    changes: CPU kernels give the same result for the same batch).

    torch.use_deterministic_algorithms(True, warn_only=True) (an op without a deterministic kernel warns instead
    of failing), cudnn.deterministic and no cudnn autotuning (benchmark picks kernels by timing, so differently
    from run to run). cuBLAS needs CUBLAS_WORKSPACE_CONFIG before it initialises: it is set here (":4096:8") when
    unset, which takes effect only if no CUDA matmul ran yet in the process (else torch warns once).
    Capture and the heat-map replay both generate under it, so a replay of the capture's batches reproduces it.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]


CONDITION_COLUMNS = {"negative_prompt": "negative_prompts", "control_image": "control_images"}
"""The generations table's condition columns and the generate() arguments they feed (one item per image)."""


def condition_arguments(**columns) -> dict:
    """generate() keyword arguments from per-image condition values given by generations column
    (negative_prompt=[...], control_image=[...]: CONDITION_COLUMNS): each list is passed only when one of its items is
    set (None and "" are unset), so a batch without any passes neither."""
    unknown = sorted(set(columns) - set(CONDITION_COLUMNS))
    if unknown:
        raise ValueError(f"unknown condition columns {unknown}; use {sorted(CONDITION_COLUMNS)}")
    return {CONDITION_COLUMNS[c]: list(values) for c, values in columns.items() if any(values)}


def given_negatives(negative_prompts: list[str | None] | None, n: int, cfg: bool) -> list[str | None] | None:
    """The negative prompts of a batch of n, "" read as None; None when there is none (the default unconditional
    prompt). A negative prompt without CFG would be ignored: a ValueError."""
    if negative_prompts is None:
        return None
    if len(negative_prompts) != n:
        raise ValueError(f"got {len(negative_prompts)} negative prompts for {n} prompts; give one per prompt")
    negatives = [neg or None for neg in negative_prompts]
    if all(neg is None for neg in negatives):
        return None
    if not cfg:
        raise ValueError("a negative prompt needs classifier-free guidance (guidance > 1); without it it is ignored")
    return negatives


class DiffusionModel:
    """Base adapter. Subclasses set `family` and implement encode_prompts, initial_latents and decode."""

    family = "base"
    model_kind = "diffusion"
    """"diffusion" (prompts in, images out) or "classifier" (images in: backend/models/classifier.py)."""
    default_steps = 30
    default_guidance = 7.5
    decode_batch = 4
    """Images per VAE decode call (latent-space models; 0: the whole batch at once). Decoding takes far more
    memory per image than denoising (SDXL at 1024 px: several GB), so a batch is decoded in slices."""

    def __init__(self, pipe, denoiser: torch.nn.Module, spec: str):
        self.pipe = pipe
        self.denoiser = denoiser
        self.spec = spec
        # a private scheduler: stateful schedulers must not be shared with the pipeline's own __call__
        self.scheduler = copy.deepcopy(pipe.scheduler)
        # read by hooks (backend/models/hooks.py): the step being denoised and whether the batch is [uncond; cond]
        self.step_index = 0
        self.cfg_active = False
        # set by transformer adapters at each denoiser call (hooks.py): (h, w) of the image-token grid, row-major,
        # and the text length (splits a single-stream block's joint sequence)
        self.token_grid: tuple[int, int] | None = None
        self.text_tokens = 0

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
    def encode_prompts(self, prompts: list[str], cfg: bool,
                       negative: list[str | None] | None = None) -> tuple[Cond, Cond | None]:
        """Denoiser kwargs for the prompts and, with CFG, for the unconditional prompts: each prompt's negative
        prompt (negative[i]; None: the pipeline's own default, as its __call__ without negative_prompt)."""
        raise NotImplementedError

    def add_control(self, cond: Cond, uncond: Cond | None, control_images: list | None, height: int | None,
                    width: int | None) -> tuple[Cond, Cond | None]:
        """cond and uncond with the control images' conditioning added (a ControlNet adapter's); here: none."""
        if control_images is not None:
            raise ValueError(f"{self.family} model {self.spec} has no ControlNet; load it with controlnet=DIR")
        return cond, uncond

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise a one-line DifflensError for a prompt this model cannot encode (default: any text is fine)."""

    def initial_latents(self, generators: list[torch.Generator], height: int | None = None,
                        width: int | None = None) -> torch.Tensor:
        """Seeded noise scaled by self.scheduler.init_noise_sigma: call timesteps(n_steps) first."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], float32 [B, 3, H, W] (a VAE decodes decode_batch images at a time)."""
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

    def timesteps_of(self, n_steps: int) -> torch.Tensor:
        """The timesteps of a generation of n_steps, from a copy of the scheduler (the model's is left as it was)."""
        saved = self.scheduler
        self.scheduler = copy.deepcopy(saved)
        try:
            return self.timesteps(n_steps)
        finally:
            self.scheduler = saved

    def model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's input for latents x at t: the scheduler's scale_model_input (flow matching has none)."""
        scale = getattr(self.scheduler, "scale_model_input", None)
        return x if scale is None else scale(x, t)

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
        x = self.model_input(x, t)
        kwargs = cat_cond(uncond, cond) if uncond is not None else cond
        noise = self.predict_noise(x, t, kwargs)
        if uncond is not None:
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        return self.scheduler.step(noise, t, latents, **self.extra_step_kwargs(generators), return_dict=False)[0]

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], n_steps: int | None = None,
                 guidance: float | None = None, height: int | None = None, width: int | None = None,
                 on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                 output: str = "image", negative_prompts: list[str | None] | None = None,
                 control_images: list | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1], or with output="latent" the final latents undecoded (no VAE pass: for
        callers that want latents only). CFG is on when guidance > 1 (as in diffusers pipelines). On a GPU the
        kernels are deterministic (deterministic_kernels), so the same batch gives the same values again.

        negative_prompts: one per prompt (None or "": no negative prompt), the unconditional half of CFG;
        control_images: one per prompt (a path or PIL image) for a ControlNet adapter."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        if output not in ("image", "latent"):
            raise ValueError(f"output must be 'image' or 'latent' (got {output!r})")
        n_steps = n_steps or self.default_steps
        guidance = self.default_guidance if guidance is None else guidance
        cfg = guidance > 1.0
        negatives = given_negatives(negative_prompts, len(prompts), cfg)
        with deterministic_kernels(self.device):
            cond, uncond = (self.encode_prompts(list(prompts), cfg, negatives) if negatives is not None
                            else self.encode_prompts(list(prompts), cfg))
            cond, uncond = self.add_control(cond, uncond, control_images, height, width)
            generators = seed_generators(seeds)
            # the schedule first: the initial noise scale (init_noise_sigma) can depend on it (Euler, "leading")
            timesteps = self.timesteps(n_steps)
            latents = self.initial_latents(generators, height, width)
            for i, t in enumerate(timesteps):
                self.step_index = i
                latents = self.step(latents, t, cond, uncond, guidance, generators)
                if on_step is not None:
                    on_step(i, t, latents)
            return latents if output == "latent" else self.decode(latents)
