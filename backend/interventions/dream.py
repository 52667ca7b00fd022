"""Deep dream: optimise an input latent (pixels, for the demo model) so that one unit fires, and record how.

This file owns the `dreams` table, the images under media/dreams/, `DreamConfig` and its separate defaults
for channels and features, the regularisers, and the optimisation loop.

Objective. The optimised latent x is read as a *clean* latent. At each target step s (step 0 and the unit's
peak steps) the denoiser sees it through the scheduler's noise at that step's timestep t,
    input = sqrt(a') x + sqrt(1 - a') eps,   a' = abar_t + see_through (1 - abar_t),
with the empty prompt and no guidance (the steered-prior setting). see_through = 0 is exactly the scheduler's
`add_noise` (followed by `scale_model_input`, which is the identity for DDIM/DDPM and turns Euler's
x + sigma eps into the same form); at step 0 abar_t is ~0, so some see-through is what lets the image matter
there. The unit's activation is the spatial mean of channel c of the layer's tokens [B, T, C], or of SAE
latent i of those tokens (reported: the SAE code; optimised: its dense pre-activation, which has a gradient
even while the latent is outside the top-k). Seeds x target steps run as one denoiser batch, cut off at the
hooked layer (the rest of the network is not needed).

One optimisation step: random jitter (torch.roll), rotation and scale (affine_grid / grid_sample) per seed;
loss = -mean over target steps of the activation + total variation + range + moment penalties; the gradient
w.r.t. x is blurred (Gaussian, sigma decaying linearly over the steps), preconditioned in Fourier space (scaled
by 1 / frequency ** spectral_decay) and normalised per seed; x moves by lr times that direction.

Snapshots (every `snapshot_every` steps, plus the first and the last) evaluate the activation without
augmentation and with fixed noise per seed, so values along a trajectory are comparable; they carry the
penalty values and the decoded image. The denoiser (and SAE) are frozen during the call and restored after;
no hook outlives it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from backend.errors import DifflensError
from backend.models.base import DiffusionModel, to_uint8

KINDS = ("channel", "feature")
TABLE = "dreams"


@dataclass
class DreamConfig:
    """How a unit is dreamed; `default_config(kind)` gives the documented defaults for channels and features."""

    opt_steps: int = 100
    """Optimisation steps per dream."""
    lr: float = 0.05
    """Step size: each step moves the latent by lr times its (blurred, preconditioned) gradient normalised to
    RMS 1 per seed, i.e. about lr per pixel."""
    lr_end: float = 0.01
    """Step size at the last step (decays linearly from lr)."""
    snapshot_every: int = 10
    """A snapshot (activation, penalties, image) every this many steps, plus the first and the last."""
    max_target_steps: int = 3
    """Denoising steps the activation is measured at: step 0 and the unit's highest peaks, this many in all."""
    see_through: float = 0.3
    """Share of the scheduler noise made transparent: a' = abar_t + see_through * (1 - abar_t); 0 is exact
    scheduler noise (the image is then invisible at step 0), 1 is no noise."""
    fresh_noise: bool = True
    """Draw new noise every step (else one fixed noise per seed and target step throughout)."""
    tv_weight: float = 0.5
    """Weight of the total-variation penalty (mean absolute difference of neighbouring pixels)."""
    range_weight: float = 10.0
    """Weight of the range penalty (mean squared excess of |x| over range_limit)."""
    range_limit: float = 1.0
    """Latent values beyond +-range_limit are penalised: 1 for pixel-space models ([-1, 1]); raise it for
    latent-space models (SD latents reach about +-4)."""
    moment_weight: float = 1.0
    """Weight of the moment penalty: (mean - moment_mean)^2 + (std - moment_std)^2 of each seed's latent."""
    moment_mean: float = 0.0
    """Target mean of the latent (the demo model's images: 0.0 in [-1, 1])."""
    moment_std: float = 0.25
    """Target standard deviation of the latent (the demo model's images: about 0.21-0.26)."""
    blur_sigma_start: float = 1.0
    """Gaussian blur of the gradient (pixels of the latent) at the first step."""
    blur_sigma_end: float = 0.0
    """Blur sigma at the last step (the sigma decays linearly; below 0.1 no blur)."""
    spectral: bool = True
    """Precondition the gradient in Fourier space (scale each frequency by 1 / f ** spectral_decay)."""
    spectral_decay: float = 1.0
    """Exponent of the 1 / frequency preconditioning (0: none)."""
    jitter: int = 1
    """Random shift (torch.roll) of up to this many latent pixels per step and seed."""
    rotate_degrees: float = 5.0
    """Random rotation of up to this many degrees per step and seed."""
    scale_range: float = 0.05
    """Random scaling by a factor in [1 - scale_range, 1 + scale_range] per step and seed."""
    init_std: float = 0.1
    """Standard deviation of the random start (around moment_mean) when no initial latent is given."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Seeds of the dreams run together (each seed: its own start, noise and augmentation)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_config(kind: str) -> DreamConfig:
    """The defaults for a channel or an SAE feature (features: sparser and sharper, so more noise visible,
    weaker smoothing and a larger step)."""
    check_kind(kind)
    if kind == "channel":
        return DreamConfig()
    return DreamConfig(lr=0.08, see_through=0.4, tv_weight=0.25, blur_sigma_start=0.75)


def validate_config(cfg: DreamConfig) -> DreamConfig:
    """Raise a one-line DifflensError for a setting out of range."""
    if cfg.opt_steps < 1:
        raise DifflensError(f"dream opt_steps must be at least 1 (got {cfg.opt_steps})")
    if cfg.snapshot_every < 1:
        raise DifflensError(f"dream snapshot_every must be at least 1 (got {cfg.snapshot_every})")
    if cfg.max_target_steps < 1:
        raise DifflensError(f"dream max_target_steps must be at least 1 (got {cfg.max_target_steps})")
    if not 0.0 <= cfg.see_through <= 1.0:
        raise DifflensError(f"dream see_through must be in [0, 1] (got {cfg.see_through})")
    if not cfg.seeds:
        raise DifflensError("dream needs at least one seed")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise DifflensError(f"dream seeds must be distinct (got {cfg.seeds})")
    for name in ("lr", "lr_end", "tv_weight", "range_weight", "moment_weight", "blur_sigma_start", "blur_sigma_end",
                 "spectral_decay", "jitter", "rotate_degrees", "scale_range", "init_std", "range_limit"):
        if getattr(cfg, name) < 0:
            raise DifflensError(f"dream {name} must be >= 0 (got {getattr(cfg, name)})")
    if cfg.scale_range >= 1:
        raise DifflensError(f"dream scale_range must be below 1 (got {cfg.scale_range})")
    return cfg


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise DifflensError(f"unknown unit kind {kind!r}; use channel or feature")


@dataclass
class DreamResult:
    """What one dream produced: snapshot rows, their images and the final latents."""

    rows: list[dict]
    """One per (target step, seed, snapshot): step, seed, opt_step, activation, penalties (JSON string)."""
    images: dict[tuple[int, int], np.ndarray]
    """(seed, opt_step) -> uint8 image [H, W, 3] of the latent at that snapshot."""
    latents_SCHW: torch.Tensor
    """The optimised latents, one per seed."""
    target_steps: list[int]
    timesteps: list[int]
    seconds: float


# ---------------------------------------------------------------------------------------------- regularisers
def total_variation_S(x_SCHW: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertically and horizontally neighbouring values, per image."""
    dy = (x_SCHW[:, :, 1:, :] - x_SCHW[:, :, :-1, :]).abs().flatten(1).mean(1)
    dx = (x_SCHW[:, :, :, 1:] - x_SCHW[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dy + dx


def range_penalty_S(x_SCHW: torch.Tensor, limit: float) -> torch.Tensor:
    """Mean squared excess of |x| over limit, per image (0 when every value is inside [-limit, limit])."""
    return (x_SCHW.abs() - limit).relu().pow(2).flatten(1).mean(1)


def moment_penalty_S(x_SCHW: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(mean(x) - mean)^2 + (std(x) - std)^2 per image."""
    flat = x_SCHW.flatten(1)
    return (flat.mean(1) - mean).pow(2) + (flat.std(1) - std).pow(2)


def blur_sigmas(cfg: DreamConfig) -> np.ndarray:
    """The gradient-blur sigma of each optimisation step: linear from blur_sigma_start to blur_sigma_end."""
    return np.linspace(cfg.blur_sigma_start, cfg.blur_sigma_end, cfg.opt_steps)


def step_sizes(cfg: DreamConfig) -> np.ndarray:
    """The step size of each optimisation step: linear from lr to lr_end."""
    return np.linspace(cfg.lr, cfg.lr_end, cfg.opt_steps)


def gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    """A normalised 1-D Gaussian of 2 * radius + 1 taps."""
    pos = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (pos / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x_BCHW: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders; identity for sigma below 0.1."""
    if sigma < 0.1:
        return x_BCHW
    _, c, h, w = x_BCHW.shape
    radius = min(math.ceil(3 * sigma), h - 1, w - 1)
    if radius < 1:
        return x_BCHW
    k = gaussian_kernel(sigma, radius).to(x_BCHW)
    ky = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kx = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    out = F.conv2d(F.pad(x_BCHW, (0, 0, radius, radius), mode="reflect"), ky, groups=c)
    return F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kx, groups=c)


def spectral_scale_HF(h: int, w: int, decay: float) -> torch.Tensor:
    """1 / max(f, 1 / max(h, w)) ** decay on the rfft2 grid [h, w // 2 + 1] (f in cycles per pixel), RMS 1."""
    fy = torch.fft.fftfreq(h).view(-1, 1)
    fx = torch.fft.rfftfreq(w).view(1, -1)
    f = torch.sqrt(fy ** 2 + fx ** 2).clamp_min(1.0 / max(h, w))
    scale = f.pow(-decay)
    return scale / scale.pow(2).mean().sqrt()


def spectral_precondition(g_BCHW: torch.Tensor, decay: float) -> torch.Tensor:
    """The gradient with each spatial frequency scaled by 1 / f ** decay (same shape; low frequencies favoured)."""
    if decay == 0:
        return g_BCHW
    h, w = g_BCHW.shape[-2:]
    spec = torch.fft.rfft2(g_BCHW.float())
    out = torch.fft.irfft2(spec * spectral_scale_HF(h, w, decay).to(spec.device), s=(h, w))
    return out.to(g_BCHW.dtype)


def normalised_per_image(g_BCHW: torch.Tensor) -> torch.Tensor:
    """Each image's gradient divided by its RMS (a zero gradient stays zero)."""
    rms = g_BCHW.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1)
    return g_BCHW / rms.clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------- augmentation
def augmented(x_SCHW: torch.Tensor, cfg: DreamConfig, generators: list[torch.Generator]) -> torch.Tensor:
    """Each image rolled by a random jitter, then rotated and scaled by a random affine map (reflected borders)."""
    s = x_SCHW.shape[0]
    draws_S4 = torch.stack([torch.rand(4, generator=g) for g in generators])  # dy, dx, angle, scale in [0, 1)
    out = x_SCHW
    if cfg.jitter > 0:
        shifts = ((draws_S4[:, :2] * (2 * cfg.jitter + 1)).floor() - cfg.jitter).long().tolist()
        out = torch.stack([torch.roll(out[i], shifts=(dy, dx), dims=(1, 2)) for i, (dy, dx) in enumerate(shifts)])
    if cfg.rotate_degrees > 0 or cfg.scale_range > 0:
        angle_S = (draws_S4[:, 2] * 2 - 1) * math.radians(cfg.rotate_degrees)
        scale_S = 1 + (draws_S4[:, 3] * 2 - 1) * cfg.scale_range
        cos, sin = torch.cos(angle_S) / scale_S, torch.sin(angle_S) / scale_S
        zero = torch.zeros(s)
        theta_S23 = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta_S23.to(out), list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out


# ---------------------------------------------------------------------------------------------- the objective
class _Reached(Exception):
    """Raised by the hook once the hooked layer has run: the rest of the denoiser is not needed."""


@contextmanager
def frozen(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Parameters without gradients for the block; every requires_grad flag is restored after, even on error."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


@contextmanager
def unguided(model: DiffusionModel) -> Iterator[None]:
    """The model marked as running without CFG (hooks then read the whole batch); its flags restored after."""
    saved = model.cfg_active, model.step_index
    model.cfg_active = False
    try:
        yield
    finally:
        model.cfg_active, model.step_index = saved


def layer_tokens_BTC(model: DiffusionModel, layer: str, read: str, input_BCHW: torch.Tensor,
                     timesteps_B: torch.Tensor, cond: dict) -> torch.Tensor:
    """The hooked layer's tokens [B, T, C] for one denoiser batch, stopping the forward once the layer has run."""
    from backend.models.hooks import read_activations

    got: list[torch.Tensor] = []

    def keep(ev) -> None:
        got.append(ev.tokens)
        raise _Reached

    with read_activations(model, [layer], keep, read=read, half="both"):
        try:
            model.predict_noise(input_BCHW, timesteps_B, cond)
        except _Reached:
            pass
    if not got:
        raise DifflensError(f"layer {layer!r} did not run in the denoiser's forward pass; pick another hook point")
    return got[0]


def unit_activation_B(tokens_BTC: torch.Tensor, kind: str, unit: int, sae=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, activation) per batch row: spatial means of the unit. For a channel both are channel `unit`;
    for a feature the objective is SAE latent `unit`'s dense pre-activation (differentiable everywhere) and the
    activation its SAE code (top-k / threshold applied, as capture records it)."""
    if kind == "channel":
        act_B = tokens_BTC[:, :, unit].mean(1)
        return act_B, act_B
    b, t, c = tokens_BTC.shape
    x_ND = sae.normalise(tokens_BTC.reshape(b * t, c).to(sae.W_dec.dtype))
    pre_N = sae.pre_acts(x_ND)[:, unit]
    with torch.no_grad():
        code_N = sae.encode(x_ND, dense=True)[:, unit]
    return pre_N.view(b, t).mean(1), code_N.view(b, t).mean(1)


def see_through_weights(alphas_cumprod: torch.Tensor, timesteps: list[int],
                        see_through: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(signal, noise) weights [T] of each target timestep: sqrt(a') and sqrt(1 - a'), a' as in the docstring."""
    abar = alphas_cumprod[torch.as_tensor(timesteps, dtype=torch.long)].double()
    a = abar + see_through * (1 - abar)
    return a.sqrt().float(), (1 - a).sqrt().float()


def target_timesteps(model: DiffusionModel, target_steps: list[int], n_steps: int) -> list[int]:
    """Scheduler timesteps of the target denoising steps (from a copy: the model's scheduler is left as is)."""
    scheduler = copy.deepcopy(model.scheduler)
    scheduler.set_timesteps(n_steps, device="cpu")
    ts = scheduler.timesteps
    bad = [s for s in target_steps if not 0 <= s < len(ts)]
    if bad:
        raise DifflensError(f"target step(s) {bad} out of range: a generation of {n_steps} steps has steps "
                            f"0..{len(ts) - 1}")
    return [int(round(float(ts[s]))) for s in target_steps]


def unit_count(model: DiffusionModel, layer: str, kind: str, read: str, sae=None) -> int:
    """How many units (channels of the layer, or SAE latents) there are, from one small forward pass."""
    if kind == "feature":
        return int(sae.cfg.n_latents)
    return int(probe_tokens_BTC(model, layer, read).shape[-1])


@torch.no_grad()
def probe_tokens_BTC(model: DiffusionModel, layer: str, read: str) -> torch.Tensor:
    """The layer's tokens for one random latent at a middle timestep and the empty prompt."""
    cond, _ = model.encode_prompts([""], cfg=False)
    x = model.initial_latents([torch.Generator().manual_seed(0)])
    t = torch.full((1,), 500, device=model.device)
    with unguided(model):
        return layer_tokens_BTC(model, layer, read, x, t, cond)


def check_unit(model: DiffusionModel, layer: str, kind: str, unit: int, read: str, sae=None) -> None:
    """Raise a one-line DifflensError for an unknown kind, a feature without SAE or a unit out of range."""
    check_kind(kind)
    if kind == "feature" and sae is None:
        raise DifflensError(f"feature dreams need an SAE trained on {layer!r}; train one with "
                            "`python cli.py train-sae`, or dream a channel (--kind channel)")
    n = unit_count(model, layer, kind, read, sae)
    if kind == "feature":
        d = int(probe_tokens_BTC(model, layer, read).shape[-1])
        if d != sae.cfg.d_in:
            raise DifflensError(f"the SAE takes {sae.cfg.d_in}-dim inputs but {layer!r} has {d} channels; "
                                "use the SAE trained on this layer")
    if not 0 <= unit < n:
        what = "channels" if kind == "channel" else "SAE features"
        raise DifflensError(f"unknown {kind} {unit} of {layer!r}: it has {n} {what} (0..{n - 1})")


# ---------------------------------------------------------------------------------------------- one dream
def initial_latents_SCHW(model: DiffusionModel, cfg: DreamConfig, init_latents: torch.Tensor | None) -> torch.Tensor:
    """The start of each seed: the given latents (e.g. the steered prior; [1 or S, C, H, W]) or a small random
    latent around moment_mean drawn from the seed."""
    s = len(cfg.seeds)
    if init_latents is not None:
        x = init_latents.detach().to(model.device, torch.float32)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[0] not in (1, s):
            raise DifflensError(f"init_latents must be [C, H, W], [1, C, H, W] or [{s}, C, H, W] (one per seed); "
                                f"got {tuple(init_latents.shape)}")
        return x.expand(s, -1, -1, -1).clone()
    shape = model.initial_latents([torch.Generator().manual_seed(0)]).shape[1:]
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in cfg.seeds])
    return (cfg.moment_mean + cfg.init_std * noise).to(model.device, torch.float32)


def penalties_S(x_SCHW: torch.Tensor, cfg: DreamConfig) -> dict[str, torch.Tensor]:
    """The unweighted regulariser values of each seed's latent."""
    return {"tv": total_variation_S(x_SCHW), "range": range_penalty_S(x_SCHW, cfg.range_limit),
            "moment": moment_penalty_S(x_SCHW, cfg.moment_mean, cfg.moment_std)}


def weighted_penalty_S(pen: dict[str, torch.Tensor], cfg: DreamConfig) -> torch.Tensor:
    return cfg.tv_weight * pen["tv"] + cfg.range_weight * pen["range"] + cfg.moment_weight * pen["moment"]


class _Dreamer:
    """The batch of one dream: seeds x target steps rows, ordered target-major (row = k * S + seed index)."""

    def __init__(self, model: DiffusionModel, layer: str, kind: str, unit: int, timesteps: list[int],
                 cfg: DreamConfig, sae, read: str):
        alphas = getattr(model.scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise DifflensError(f"{type(model.scheduler).__name__} has no alphas_cumprod, so dream cannot noise "
                                "a latent to a timestep; use a DDIM/DDPM/Euler-family scheduler")
        self.model, self.layer, self.kind, self.unit, self.cfg, self.sae, self.read = (
            model, layer, kind, unit, cfg, sae, read)
        self.n_seeds, self.n_targets = len(cfg.seeds), len(timesteps)
        b = self.n_seeds * self.n_targets
        signal_T, noise_T = see_through_weights(alphas.cpu(), timesteps, cfg.see_through)
        self.signal_B = signal_T.repeat_interleave(self.n_seeds).view(-1, 1, 1, 1).to(model.device)
        self.noise_B = noise_T.repeat_interleave(self.n_seeds).view(-1, 1, 1, 1).to(model.device)
        self.timesteps_B = torch.as_tensor(timesteps, device=model.device).repeat_interleave(self.n_seeds)
        with torch.no_grad():
            self.cond, _ = model.encode_prompts([""] * b, cfg=False)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in cfg.seeds]
        self.fixed_noise_B: torch.Tensor | None = None  # drawn once the latent's shape is known (noise_for)
        self.eval_noise_B: torch.Tensor | None = None

    def noise_draw_B(self, generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        """Noise [T * S, *shape]: each seed's rows from its own generator (so a seed's dream ignores its batch)."""
        per_seed = [torch.randn((self.n_targets, *shape), generator=g) for g in generators]  # S x [T, ...]
        return torch.stack(per_seed, 1).flatten(0, 1).to(self.model.device, self.model.dtype)

    def noise_for(self, shape: tuple[int, ...], fixed: bool) -> torch.Tensor:
        if fixed:
            if self.fixed_noise_B is None:
                self.fixed_noise_B = self.noise_draw_B(self.generators, shape)
            return self.fixed_noise_B
        return self.noise_draw_B(self.generators, shape)

    def eval_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.eval_noise_B is None:
            self.eval_noise_B = self.noise_draw_B(
                [torch.Generator().manual_seed(int(s) + 104729) for s in self.cfg.seeds], shape)
        return self.eval_noise_B

    def activations_TS(self, x_SCHW: torch.Tensor, noise_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, activation) [T, S] of the latents seen through noise at each target timestep."""
        x_BCHW = x_SCHW.to(self.model.dtype).repeat(self.n_targets, 1, 1, 1)
        inputs = self.signal_B * x_BCHW + self.noise_B * noise_BCHW
        tokens = layer_tokens_BTC(self.model, self.layer, self.read, inputs, self.timesteps_B, self.cond)
        obj_B, act_B = unit_activation_B(tokens.float(), self.kind, self.unit, self.sae)
        return obj_B.view(self.n_targets, self.n_seeds), act_B.view(self.n_targets, self.n_seeds)

    def gradient_SCHW(self, x_SCHW: torch.Tensor) -> torch.Tensor:
        """d(loss)/dx for one augmented, noised batch (loss = -objective + weighted penalties, summed over seeds)."""
        x = x_SCHW.detach().requires_grad_(True)
        seen = augmented(x, self.cfg, self.generators)
        obj_TS, _ = self.activations_TS(seen, self.noise_for(tuple(x.shape[1:]), fixed=not self.cfg.fresh_noise))
        loss = (weighted_penalty_S(penalties_S(x, self.cfg), self.cfg) - obj_TS.mean(0)).sum()
        (grad,) = torch.autograd.grad(loss, x)
        return grad

    @torch.no_grad()
    def snapshot(self, x_SCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(objective, activation) [T, S] without augmentation and with fixed noise, and the penalties [S]."""
        obj_TS, act_TS = self.activations_TS(x_SCHW, self.eval_noise(tuple(x_SCHW.shape[1:])))
        return obj_TS, act_TS, penalties_S(x_SCHW, self.cfg)


def snapshot_steps(cfg: DreamConfig) -> list[int]:
    """Optimisation steps with a snapshot: 0, every snapshot_every, and the last (opt_steps)."""
    return sorted(set(range(0, cfg.opt_steps + 1, cfg.snapshot_every)) | {cfg.opt_steps})


def dream_unit(model: DiffusionModel, layer: str, kind: str, unit: int, target_steps: list[int],
               cfg: DreamConfig | None = None, sae=None, read: str = "output", n_steps: int | None = None,
               init_latents: torch.Tensor | None = None, progress: bool = False) -> DreamResult:
    """Dream one unit on a loaded model (no run directory needed).

    target_steps are denoising steps of an n_steps generation (default: the model's default step count) at
    which the activation is measured and maximised; sae is required for kind="feature"; read is "output" or
    "delta" as in capture; init_latents (e.g. the steered prior) replaces the random start.
    """
    cfg = validate_config(cfg or default_config(kind))
    check_unit(model, layer, kind, unit, read, sae)
    if not target_steps:
        raise DifflensError("dream needs at least one target step")
    t0 = time.time()
    n_steps = n_steps or model.default_steps
    timesteps = target_timesteps(model, list(target_steps), n_steps)
    sigmas, lrs = blur_sigmas(cfg), step_sizes(cfg)
    snaps = set(snapshot_steps(cfg))
    rows: list[dict] = []
    images: dict[tuple[int, int], np.ndarray] = {}
    sae_module = sae if isinstance(sae, torch.nn.Module) else None
    with frozen(model.denoiser, sae_module), unguided(model):
        dreamer = _Dreamer(model, layer, kind, unit, timesteps, cfg, sae, read)
        x = initial_latents_SCHW(model, cfg, init_latents)
        for k in tqdm(range(cfg.opt_steps + 1), desc=f"dream {layer} {kind} {unit}", unit="step",
                      disable=not progress):
            if k in snaps:
                record_snapshot(dreamer, x, k, list(target_steps), rows, images)
            if k == cfg.opt_steps:
                break
            g = gaussian_blur(dreamer.gradient_SCHW(x), float(sigmas[k]))
            if cfg.spectral:
                g = spectral_precondition(g, cfg.spectral_decay)
            x = (x - float(lrs[k]) * normalised_per_image(g)).detach()
    return DreamResult(rows, images, x.detach().cpu(), list(target_steps), timesteps, round(time.time() - t0, 3))


def record_snapshot(dreamer: _Dreamer, x_SCHW: torch.Tensor, opt_step: int, target_steps: list[int],
                    rows: list[dict], images: dict[tuple[int, int], np.ndarray]) -> None:
    """Append one row per (target step, seed) and one image per seed for the latents at opt_step."""
    obj_TS, act_TS, pen = dreamer.snapshot(x_SCHW)
    with torch.no_grad():
        imgs = to_uint8(dreamer.model.decode(x_SCHW.to(dreamer.model.dtype)))
    for si, seed in enumerate(dreamer.cfg.seeds):
        images[(int(seed), opt_step)] = imgs[si]
        values = {k: round(float(v[si]), 6) for k, v in pen.items()}
        values["total"] = round(float(weighted_penalty_S({k: v[si] for k, v in pen.items()}, dreamer.cfg)), 6)
        for ti, step in enumerate(target_steps):
            extra = {"objective": round(float(obj_TS[ti, si]), 6)} if dreamer.kind == "feature" else {}
            rows.append({"step": int(step), "seed": int(seed), "opt_step": opt_step,
                         "activation": float(act_TS[ti, si]), "penalties": json.dumps({**values, **extra})})


# ---------------------------------------------------------------------------------------------- a run's dream
def image_rel_path(layer: str, kind: str, unit: int, seed: int, opt_step: int) -> str:
    """Where a dream snapshot image lives, relative to the run directory."""
    return f"media/dreams/{layer}/{kind}-{unit:05d}/seed{seed}-opt{opt_step:04d}.png"


def shard_name(unit: int) -> str:
    """The dreams table file of one unit inside its (layer, kind) partition."""
    return f"unit-{unit:06d}"


def peak_steps(store, layer: str, kind: str, unit: int) -> list[int] | None:
    """The unit's peak steps, highest first, from the peaks table; None when the run has no peaks for this
    (layer, kind) (not analysed)."""
    import polars as pl

    part = store.partition_dir("peaks", layer, kind)
    files = sorted(part.glob("*.parquet")) if part.is_dir() else []
    if not files:
        return None
    peaks = pl.read_parquet(files).filter(pl.col("unit") == unit).sort("rank")
    return [int(s) for s in peaks["step"].to_list()]


def choose_target_steps(peaks: list[int] | None, max_targets: int) -> list[int]:
    """Step 0 followed by the highest peaks (no repeats), at most max_targets steps."""
    steps = [0]
    for s in peaks or []:
        if s not in steps:
            steps.append(s)
    return steps[:max_targets]


def run_steps(store, config: dict, model: DiffusionModel) -> int:
    """Denoising steps of the run's generations (its steps table, else its capture setting or the model's)."""
    path = store.root / "tables" / "steps.parquet"
    if path.exists():
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows
    return int(config.get("capture", {}).get("steps") or 0) or model.default_steps


def load_run_sae(store, layer: str, device: str):
    from sae.io import SAELoadError, load_sae

    if not store.sae_dir(layer).is_dir():
        raise DifflensError(f"no SAE for layer {layer!r} in {store.root} (no {store.relative(store.sae_dir(layer))}/); "
                            "train one with `python cli.py train-sae`, or dream a channel (--kind channel)")
    try:
        return load_sae(store.sae_dir(layer), device=device)
    except SAELoadError as exc:
        raise DifflensError(f"cannot load the SAE of {layer!r}: {exc}") from exc


def dreams_table(result: DreamResult, layer: str, kind: str, unit: int) -> pa.Table:
    """The dreams shard of one unit (layer and kind live in the partition path), sorted by (step, seed, opt_step)."""
    rows = sorted(result.rows, key=lambda r: (r["step"], r["seed"], r["opt_step"]))
    return pa.table({
        "unit": pa.array([unit] * len(rows), pa.int32()),
        "step": pa.array([r["step"] for r in rows], pa.int16()),
        "seed": pa.array([r["seed"] for r in rows], pa.int64()),
        "opt_step": pa.array([r["opt_step"] for r in rows], pa.int32()),
        "activation": pa.array([r["activation"] for r in rows], pa.float32()),
        "penalties": pa.array([r["penalties"] for r in rows], pa.string()),
        "image": pa.array([image_rel_path(layer, kind, unit, r["seed"], r["opt_step"]) for r in rows], pa.string()),
    })


def dream_run(run_dir: str | Path, layer: str, kind: str, unit: int, cfg: DreamConfig | None = None,
              seeds: list[int] | None = None, init_latents: torch.Tensor | None = None,
              progress: bool = True, model: DiffusionModel | None = None) -> dict:
    """Dream one unit of a run: its model, read setting, SAE and peak steps come from the run directory.

    cfg defaults to default_config(kind); seeds, when given, replace cfg.seeds; `model`, when given, is the run's
    model already loaded (so a caller dreaming several units loads it once).

    Writes media/dreams/<layer>/<kind>-<unit>/seed<seed>-opt<N>.png and replaces the unit's shard
    tables/dreams/layer=<layer>/kind=<kind>/unit-<unit>.parquet; returns a summary (also in the manifest).
    """
    from backend.models import load_model, parse_dtype
    from backend.run.store import RunStore

    check_kind(kind)
    cfg = copy.deepcopy(cfg or default_config(kind))
    if seeds is not None:
        cfg.seeds = [int(s) for s in seeds]
    cfg = validate_config(cfg)
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    if manifest is None or "config" not in manifest:
        raise DifflensError(f"{run_dir} is not a difflens run (no manifest.json with a config); "
                            "run `python cli.py run-all` or `capture` first")
    config = manifest["config"]
    device = config.get("device", "cpu")
    read = config.get("capture", {}).get("read", "output")
    notes = []
    peaks = peak_steps(store, layer, kind, unit)
    if peaks is None:
        notes.append(f"{layer}/{kind} has no peaks table (run not analysed): dreaming at step 0 only; run "
                     "`python cli.py analyze` to target the unit's peak steps too")
    elif not peaks:
        notes.append(f"{kind} {unit} of {layer} has no peaks (a dead unit?): dreaming at step 0 only")
    targets = choose_target_steps(peaks, cfg.max_target_steps)
    sae = load_run_sae(store, layer, device) if kind == "feature" else None
    if model is None:
        model = load_model(config["model"], device=device, dtype=parse_dtype(config.get("dtype", "float32")))
    n_steps = run_steps(store, config, model)
    if progress:
        for note in notes:
            tqdm.write(note)
    result = dream_unit(model, layer, kind, unit, targets, cfg, sae=sae, read=read, n_steps=n_steps,
                        init_latents=init_latents, progress=progress)
    unit_dir = store.root / "media" / "dreams" / layer / f"{kind}-{unit:05d}"
    written = set()
    for (seed, opt_step), img in result.images.items():
        rel = image_rel_path(layer, kind, unit, seed, opt_step)
        store.write_png(rel, img)
        written.add(rel)
    table = dreams_table(result, layer, kind, unit)
    shard = store.write_table_shard(TABLE, shard_name(unit), table, layer=layer, kind=kind)
    for stale in unit_dir.glob("*.png"):  # images of an earlier dream of this unit that this one did not replace
        if store.relative(stale) not in written:
            stale.unlink(missing_ok=True)
    final = [r for r in result.rows if r["opt_step"] == cfg.opt_steps]
    first = [r for r in result.rows if r["opt_step"] == 0]
    summary = {
        "layer": layer, "kind": kind, "unit": unit, "target_steps": targets, "timesteps": result.timesteps,
        "seeds": list(cfg.seeds), "opt_steps": cfg.opt_steps, "seconds": result.seconds, "notes": notes,
        "activation_start": float(np.mean([r["activation"] for r in first])),
        "activation_end": float(np.mean([r["activation"] for r in final])),
        "table": store.relative(shard), "images": store.relative(unit_dir),
        "final_images": [image_rel_path(layer, kind, unit, s, cfg.opt_steps) for s in cfg.seeds],
    }
    store.update_stage("dream", status="done", finished=time.time(), last=summary)
    return summary
