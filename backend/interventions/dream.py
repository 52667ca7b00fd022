"""Deep dream: optimise an input latent (pixels, for the demo model) so that one unit fires, and record how.

This file owns the `dreams` table, the images under media/dreams/, `DreamConfig` and its separate defaults
for channels and features, the latent scale each model's dreams are measured in, the regularisers, and the
optimisation loop. A run's model, settings, SAEs and unit checks come from its RunContext (backend/run/context.py).

Objective. The optimised latent x is read as a *clean* latent. At each target step s (step 0 and the unit's
peak steps) the denoiser sees it through the scheduler's noise at that step's timestep t,
    input = sqrt(a') x + sqrt(1 - a') eps,   a' = abar_t + see_through (1 - abar_t),
with the empty prompt and no guidance (the steered-prior setting). see_through = 0 is exactly the scheduler's
`add_noise` (followed by `scale_model_input`, which is the identity for DDIM/DDPM and turns Euler's
x + sigma eps into the same form); at step 0 abar_t is ~0, so some see-through is what lets the image matter
there. The unit's activation is the spatial mean of channel c of the layer's tokens [B, T, C], or of SAE
latent i of those tokens (reported: the SAE code; optimised: its dense pre-activation, which has a gradient
even while the latent is outside the top-k). Seeds x target steps run as one denoiser batch, cut off at the
hooked layer (the rest of the network is not needed), or in micro-batches of `micro_batch` rows whose gradients
are summed (the same gradient, less memory). The denoiser runs in its own dtype (the latent stays float32); in
float16 its backward pass is loss-scaled (`LossScale`, dynamic), or the small gradients of a weak unit would flush
to zero.

Latent scale. The latent lives in the model's own units: pixels in [-1, 1] for a pixel-space model (the demo: mean
0, std 0.25), VAE latents for a latent-space model (SD's reach about +-4 at std ~1). The scale-carrying settings
(moment_mean, moment_std, range_limit) default to None, filled per model by `latent_scale`: the demo's pixel values
for a pixel-space model, and for a latent-space model values fitted once (cached on the model) to latents it
generates itself. Everything else is scale-free: step sizes and the random start are in units of moment_std, and
the penalties are computed on x / moment_std, so the defaults tuned on the demo carry over to every model.

One optimisation step: random jitter (torch.roll), rotation and scale (affine_grid / grid_sample) per seed;
loss = -mean over target steps of the activation + total variation + range + moment penalties; the gradient
w.r.t. x is blurred (Gaussian, sigma decaying linearly over the steps), preconditioned in Fourier space (scaled
by 1 / frequency ** spectral_decay) and normalised per seed; x moves by lr * moment_std times that direction.

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
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from backend.errors import DifflensError
from backend.models.base import DiffusionModel, to_uint8
from backend.models.noising import check_noisable, ddpm_see_through
from backend.models.noising import see_through_weights as noised_weights
from backend.run.context import check_kind

if TYPE_CHECKING:
    from backend.run.context import RunContext

TABLE = "dreams"


@dataclass
class DreamConfig:
    """How a unit is dreamed; `default_config(kind)` gives the documented defaults for channels and features.
    moment_mean, moment_std and range_limit are in the model's latent units; None (the default) means the model's
    own (`latent_scale`). The other settings do not depend on the model's latent scale."""

    opt_steps: int = 100
    """Optimisation steps per dream."""
    lr: float = 0.2
    """Step size in units of moment_std: each step moves the latent by lr * moment_std times its (blurred,
    preconditioned) gradient normalised to RMS 1 per seed, i.e. about that much per latent pixel."""
    lr_end: float = 0.04
    """Step size at the last step, in units of moment_std (decays linearly from lr)."""
    snapshot_every: int = 10
    """A snapshot (activation, penalties, image) every this many steps, plus the first and the last."""
    max_target_steps: int = 3
    """Denoising steps the activation is measured at: step 0 and the unit's highest peaks, this many in all."""
    see_through: float = 0.3
    """Share of the scheduler noise made transparent: a' = abar_t + see_through * (1 - abar_t); 0 is exact
    scheduler noise (the image is then invisible at step 0), 1 is no noise."""
    fresh_noise: bool = True
    """Draw new noise every step (else one fixed noise per seed and target step throughout)."""
    tv_weight: float = 0.125
    """Weight of the total-variation penalty (mean absolute difference of neighbouring values of x / moment_std)."""
    range_weight: float = 0.625
    """Weight of the range penalty (mean squared excess of |x| over range_limit, in units of moment_std)."""
    range_limit: float | None = None
    """Latent values beyond +-range_limit are penalised. None: the model's (latent_scale: 1 for pixel-space models,
    whose images are in [-1, 1]; for latent-space models fitted to their latents, about 4 for SD)."""
    moment_weight: float = 0.0625
    """Weight of the moment penalty: ((mean - moment_mean)^2 + (std - moment_std)^2) / moment_std^2 per seed."""
    moment_mean: float | None = None
    """Target mean of the latent. None: the model's (latent_scale: 0.0 for pixel-space models; fitted otherwise)."""
    moment_std: float | None = None
    """Target standard deviation of the latent, and the unit of lr, lr_end, init_std and the penalties. None: the
    model's (latent_scale: 0.25 for pixel-space models, the demo's images; fitted otherwise, about 1 for SD)."""
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
    init_std: float = 0.4
    """Standard deviation of the random start (around moment_mean) in units of moment_std, when no initial latent
    is given."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Seeds of the dreams run together (each seed: its own start, noise and augmentation)."""
    micro_batch: int = 0
    """Rows (seeds x target steps) the denoiser sees per forward and backward pass; 0: all at once. The gradients
    of the micro-batches are summed, so the result is the same: lower it when a dream runs out of memory (SDXL at
    1024 px holds every row's activations for the backward pass)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SCALE_FIELDS = ("moment_mean", "moment_std", "range_limit")
"""DreamConfig fields in the model's latent units (None: the model's, from latent_scale)."""


def default_config(kind: str) -> DreamConfig:
    """The defaults for a channel or an SAE feature (features: sparser and sharper, so more noise visible,
    weaker smoothing and a larger step). The latent scale is left to the model (SCALE_FIELDS are None)."""
    check_kind(kind)
    if kind == "channel":
        return DreamConfig()
    return DreamConfig(lr=0.32, see_through=0.4, tv_weight=0.0625, blur_sigma_start=0.75)


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
        value = getattr(cfg, name)
        if value is not None and not value >= 0:
            raise DifflensError(f"dream {name} must be >= 0 (got {value})")
    if cfg.moment_std is not None and not cfg.moment_std > 0:
        raise DifflensError(f"dream moment_std must be > 0 (got {cfg.moment_std})")
    if cfg.moment_mean is not None and not math.isfinite(cfg.moment_mean):
        raise DifflensError(f"dream moment_mean must be finite (got {cfg.moment_mean})")
    if cfg.micro_batch < 0:
        raise DifflensError(f"dream micro_batch must be >= 0 (0: every row at once; got {cfg.micro_batch})")
    if cfg.scale_range >= 1:
        raise DifflensError(f"dream scale_range must be below 1 (got {cfg.scale_range})")
    return cfg


# ---------------------------------------------------------------------------------------------- latent scale
@dataclass(frozen=True)
class LatentScale:
    """Statistics of a model's clean latents: what the scale-carrying DreamConfig fields default to."""

    mean: float
    """moment_mean: mean of a latent."""
    std: float
    """moment_std: standard deviation of a latent."""
    limit: float
    """range_limit: |values| beyond it are rare (pixels: the [-1, 1] range)."""


PIXEL_SCALE = LatentScale(mean=0.0, std=0.25, limit=1.0)
"""Pixel-space models: images in [-1, 1]; mean and std of the demo model's images (std about 0.21-0.26)."""
FALLBACK_SCALE = LatentScale(mean=0.0, std=1.0, limit=4.0)
"""Latent-space models whose samples give no usable fit: the unit variance VAE scaling factors aim at."""
FIT_SEEDS = (0, 1)
FIT_STEPS = 10
"""Denoising steps of the fit's generations at most: the scale of a clean latent is settled well before a full
schedule, and a 50-step fit of SD 1.5 at 512 px on a CPU would take minutes."""
"""Samples a latent-space model generates (empty prompt, default steps and resolution, no guidance) for its fit."""
FIT_QUANTILE = 0.999
"""range_limit is this quantile of |x| over the fit's samples."""
_SCALE_CACHE = "_difflens_latent_scale"
"""Attribute of a DiffusionModel holding (denoiser, LatentScale) once fitted."""


def pixel_space(model: DiffusionModel) -> bool:
    """The model denoises pixels (no VAE: the demo), so its latents are images in [-1, 1]."""
    return getattr(model.pipe, "vae", None) is None


def latent_scale(model: DiffusionModel) -> LatentScale:
    """The scale of the model's clean latents: PIXEL_SCALE for a pixel-space model; for a latent-space model,
    fitted once (cached on the model) to the final latents of FIT_SEEDS generations (FIT_STEPS steps at most) of
    the empty prompt without guidance: mean and std of each latent (averaged over seeds) and the FIT_QUANTILE of
    |x| as the limit."""
    if pixel_space(model):
        return PIXEL_SCALE
    cached = getattr(model, _SCALE_CACHE, None)
    if cached is None or cached[0] is not model.denoiser:
        cached = (model.denoiser, _fit_scale(model))
        setattr(model, _SCALE_CACHE, cached)
    return cached[1]


@torch.no_grad()
def _fit_scale(model: DiffusionModel) -> LatentScale:
    saved = model.scheduler, model.step_index, model.cfg_active
    model.scheduler = copy.deepcopy(saved[0])  # generate sets the scheduler up; the model's is left as it was
    try:
        final = model.generate([""] * len(FIT_SEEDS), list(FIT_SEEDS), min(model.default_steps, FIT_STEPS),
                               guidance=1.0, output="latent")
    finally:
        model.scheduler, model.step_index, model.cfg_active = saved
    x = final.float().flatten(1).cpu()
    if not bool(torch.isfinite(x).all()):
        return FALLBACK_SCALE
    mean, std = float(x.mean(1).mean()), float(x.std(1).mean())
    limit = float(torch.quantile(x.abs().flatten(), FIT_QUANTILE))
    if not std > 1e-6 or not limit > 0:
        return FALLBACK_SCALE
    return LatentScale(mean=round(mean, 4), std=round(std, 4), limit=round(max(limit, abs(mean) + std), 4))


def for_model(cfg: DreamConfig, model: DiffusionModel) -> DreamConfig:
    """A copy of cfg with every SCALE_FIELDS value left None filled from the model's latent_scale."""
    missing = [name for name in SCALE_FIELDS if getattr(cfg, name) is None]
    if not missing:
        return copy.deepcopy(cfg)
    scale = latent_scale(model)
    values = {"moment_mean": scale.mean, "moment_std": scale.std, "range_limit": scale.limit}
    return dataclasses.replace(copy.deepcopy(cfg), **{name: values[name] for name in missing})


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
    config: DreamConfig
    """The settings used, the latent scale filled in (for_model)."""


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
    """The step size of each optimisation step, in units of moment_std: linear from lr to lr_end."""
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


see_through_weights = ddpm_see_through
"""(signal, noise) weights [T] of DDPM timesteps (the flow-matching form: backend/models/noising.py)."""


def target_timesteps(model: DiffusionModel, target_steps: list[int], n_steps: int) -> list[int]:
    """Scheduler timesteps of the target denoising steps (from a copy: the model's scheduler is left as is)."""
    ts = model.timesteps_of(n_steps).cpu()
    bad = [s for s in target_steps if not 0 <= s < len(ts)]
    if bad:
        raise DifflensError(f"target step(s) {bad} out of range: a generation of {n_steps} steps has steps "
                            f"0..{len(ts) - 1}")
    return [int(round(float(ts[s]))) for s in target_steps]


def check_dream_unit(model: DiffusionModel, layer: str, kind: str, unit: int, sae=None) -> int:
    """unit as an int, or a one-line DifflensError for an unknown kind or layer, a feature without (or with the
    wrong) SAE, or a unit out of range (backend/run/context.py check_unit; the channel count from the model's one
    probe pass, backend/models/layers.py)."""
    from backend.models.layers import layer_channels
    from backend.run.context import check_unit as check

    check_kind(kind)
    if kind == "feature" and sae is None:
        raise DifflensError(f"feature dreams need an SAE trained on {layer!r}; train one with "
                            "`python cli.py train-sae`, or dream a channel (--kind channel)")
    channels = layer_channels(model, layer)
    if kind == "channel":
        return check("channel", unit, channels, layer)
    if channels != sae.cfg.d_in:
        raise DifflensError(f"the SAE takes {sae.cfg.d_in}-dim inputs but {layer!r} has {channels} channels; "
                            "use the SAE trained on this layer")
    return check("feature", unit, int(sae.cfg.n_latents), layer)


# ---------------------------------------------------------------------------------------------- one dream
def initial_latents_SCHW(model: DiffusionModel, cfg: DreamConfig, init_latents: torch.Tensor | None) -> torch.Tensor:
    """The start of each seed: the given latents (e.g. the steered prior; [1 or S, C, H, W]) or a small random
    latent around moment_mean (std init_std * moment_std) drawn from the seed. cfg: resolved (for_model)."""
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
    return (cfg.moment_mean + cfg.init_std * cfg.moment_std * noise).to(model.device, torch.float32)


def penalties_S(x_SCHW: torch.Tensor, cfg: DreamConfig) -> dict[str, torch.Tensor]:
    """The unweighted regulariser values of each seed's latent, in units of moment_std (the penalties of
    x / moment_std, so their weights do not depend on the model's latent scale). cfg: resolved (for_model)."""
    unit = cfg.moment_std
    u_SCHW = x_SCHW / unit
    return {"tv": total_variation_S(u_SCHW), "range": range_penalty_S(u_SCHW, cfg.range_limit / unit),
            "moment": moment_penalty_S(u_SCHW, cfg.moment_mean / unit, 1.0)}


def weighted_penalty_S(pen: dict[str, torch.Tensor], cfg: DreamConfig) -> torch.Tensor:
    return cfg.tv_weight * pen["tv"] + cfg.range_weight * pen["range"] + cfg.moment_weight * pen["moment"]


class LossScale:
    """Dynamic loss scaling of a backward pass through a float16 denoiser (as torch.amp.GradScaler scales a
    loss): float16 gradients below its smallest subnormal (6e-8) flush to zero, and a unit with tiny activations
    has such gradients, so the dream would not move. The loss is multiplied by `scale` before the backward pass
    and the latent's gradient (float32) divided by it after; a gradient that is not finite (the scaled backward
    overflowed) halves the scale and the backward is repeated; after `growth_interval` finite ones in a row the
    scale doubles (up to max_scale). Disabled (scale 1, no check) unless the denoiser runs in float16: bfloat16
    has float32's exponent range."""

    def __init__(self, enabled: bool, scale: float = 2.0 ** 16, growth_interval: int = 50,
                 max_scale: float = 2.0 ** 24, max_backoffs: int = 64):
        self.enabled = enabled
        self.scale = float(scale) if enabled else 1.0
        self.growth_interval, self.max_scale, self.max_backoffs = growth_interval, max_scale, max_backoffs
        self.good = 0
        self.backoffs = 0
        """Times the scale was halved (over the whole dream)."""

    @classmethod
    def for_model(cls, model: DiffusionModel) -> LossScale:
        return cls(enabled=model.dtype == torch.float16)

    def grad(self, loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """d(loss)/dx, computed through the scaled loss; frees the graph."""
        if not self.enabled:
            (g,) = torch.autograd.grad(loss, x)
            return g
        for _ in range(self.max_backoffs):
            (g,) = torch.autograd.grad(loss * self.scale, x, retain_graph=True)
            g = g.float() / self.scale
            if bool(torch.isfinite(g).all()):
                self.good += 1
                if self.good % self.growth_interval == 0:
                    self.scale = min(self.scale * 2, self.max_scale)
                return g
            self.scale, self.good, self.backoffs = self.scale / 2, 0, self.backoffs + 1
        raise DifflensError("the float16 dream's gradient is not finite at any loss scale (the denoiser overflows "
                            "in float16); dream in bfloat16 or float32 (--dtype)")


def _rows(cond, rows: slice, n: int):
    """The rows of a conditioning dict (nested dicts too) whose tensors have batch size n."""
    if isinstance(cond, dict):
        return {k: _rows(v, rows, n) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor) and cond.ndim > 0 and cond.shape[0] == n:
        return cond[rows]
    return cond


class _Dreamer:
    """The batch of one dream: seeds x target steps rows, ordered target-major (row = k * S + seed index). The
    denoiser sees them in micro-batches of cfg.micro_batch rows (0: all at once)."""

    def __init__(self, model: DiffusionModel, layer: str, kind: str, unit: int, timesteps: list[int],
                 cfg: DreamConfig, sae, read: str):
        check_noisable(model.scheduler)
        self.model, self.layer, self.kind, self.unit, self.cfg, self.sae, self.read = (
            model, layer, kind, unit, cfg, sae, read)
        self.n_seeds, self.n_targets = len(cfg.seeds), len(timesteps)
        self.n_rows = b = self.n_seeds * self.n_targets
        signal_T, noise_T = noised_weights(model.scheduler, timesteps, cfg.see_through)
        self.signal_B = signal_T.repeat_interleave(self.n_seeds).view(-1, 1, 1, 1).to(model.device)
        self.noise_B = noise_T.repeat_interleave(self.n_seeds).view(-1, 1, 1, 1).to(model.device)
        self.timesteps_B = torch.as_tensor(timesteps, device=model.device).repeat_interleave(self.n_seeds)
        self.seed_B = torch.arange(self.n_seeds, device=model.device).repeat(self.n_targets)
        with torch.no_grad():
            self.cond, _ = model.encode_prompts([""] * b, cfg=False)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in cfg.seeds]
        self.fixed_noise_B: torch.Tensor | None = None  # drawn once the latent's shape is known (noise_for)
        self.eval_noise_B: torch.Tensor | None = None
        self.loss_scale = LossScale.for_model(model)

    def micro_batches(self) -> list[slice]:
        step = self.cfg.micro_batch or self.n_rows
        return [slice(i, min(i + step, self.n_rows)) for i in range(0, self.n_rows, step)]

    def noise_draw_B(self, generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        """Noise [T * S, *shape]: each seed's rows from its own generator (so a seed's dream ignores its batch)."""
        per_seed = [torch.randn((self.n_targets, *shape), generator=g) for g in generators]  # S x [T, ...]
        return torch.stack(per_seed, 1).flatten(0, 1).to(self.model.device, torch.float32)

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

    def activations_R(self, x_SCHW: torch.Tensor, noise_BCHW: torch.Tensor,
                      rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, activation) of batch rows `rows`: the latents seen through noise at their timesteps."""
        x_RCHW = x_SCHW[self.seed_B[rows]]
        inputs = (self.signal_B[rows] * x_RCHW + self.noise_B[rows] * noise_BCHW[rows]).to(self.model.dtype)
        cond = _rows(self.cond, rows, self.n_rows)
        tokens = layer_tokens_BTC(self.model, self.layer, self.read, inputs, self.timesteps_B[rows], cond)
        return unit_activation_B(tokens.float(), self.kind, self.unit, self.sae)

    def activations_TS(self, x_SCHW: torch.Tensor, noise_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, activation) [T, S] of the latents seen through noise at each target timestep."""
        parts = [self.activations_R(x_SCHW, noise_BCHW, rows) for rows in self.micro_batches()]
        obj_B, act_B = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return obj_B.view(self.n_targets, self.n_seeds), act_B.view(self.n_targets, self.n_seeds)

    def gradient_SCHW(self, x_SCHW: torch.Tensor) -> torch.Tensor:
        """d(loss)/dx for one augmented, noised batch (loss = -objective + weighted penalties, summed over seeds;
        a seed's objective is its mean over target steps). The objective's gradient w.r.t. the augmented latent is
        summed over micro-batches (each backward loss-scaled through a float16 denoiser), then taken back through
        the augmentation once; the penalties' gradient (float32, on x) is added."""
        x = x_SCHW.detach().requires_grad_(True)
        seen = augmented(x, self.cfg, self.generators)  # the step's random draws: once, for every micro-batch
        noise = self.noise_for(tuple(x.shape[1:]), fixed=not self.cfg.fresh_noise)
        seen_leaf = seen.detach().requires_grad_(True)
        grad_seen = torch.zeros_like(seen_leaf)
        for rows in self.micro_batches():
            obj_R, _ = self.activations_R(seen_leaf, noise, rows)
            grad_seen += self.loss_scale.grad(-obj_R.sum() / self.n_targets, seen_leaf)
            del obj_R  # this micro-batch's graph goes before the next one's is built
        loss = weighted_penalty_S(penalties_S(x, self.cfg), self.cfg).sum() + (seen * grad_seen).sum()
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
    "delta" as in capture; init_latents (e.g. the steered prior) replaces the random start. cfg's latent scale
    fields left None are the model's (for_model); the result carries the config used.
    """
    cfg = validate_config(cfg or default_config(kind))
    unit = check_dream_unit(model, layer, kind, unit, sae)
    cfg = validate_config(for_model(cfg, model))
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
            x = (x - float(lrs[k]) * cfg.moment_std * normalised_per_image(g)).detach()
    return DreamResult(rows, images, x.detach().cpu(), list(target_steps), timesteps, round(time.time() - t0, 3),
                       cfg)


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


def dream_run(run: str | Path | RunContext, layer: str, kind: str, unit: int, cfg: DreamConfig | None = None,
              seeds: list[int] | None = None, init_latents: torch.Tensor | None = None,
              progress: bool = True, model: DiffusionModel | None = None) -> dict:
    """Dream one unit of a run (a run directory or an open RunContext): its model, read setting, denoising step
    count, SAE and peak steps come from the run (backend/run/context.py).

    cfg defaults to default_config(kind), its latent scale the model's (for_model); seeds, when given, replace
    cfg.seeds; `model`, when given, is the run's model already loaded (so a caller dreaming several units loads it
    once).

    Writes media/dreams/<layer>/<kind>-<unit>/seed<seed>-opt<N>.png and replaces the unit's shard
    tables/dreams/layer=<layer>/kind=<kind>/unit-<unit>.parquet; returns a summary (also in the manifest), with
    the settings used under "config".
    """
    from backend.run.context import as_context

    check_kind(kind)
    cfg = copy.deepcopy(cfg or default_config(kind))
    if seeds is not None:
        cfg.seeds = [int(s) for s in seeds]
    cfg = validate_config(cfg)
    ctx = as_context(run, model=model)
    store = ctx.store
    notes = []
    peaks = peak_steps(store, layer, kind, unit)
    if peaks is None:
        notes.append(f"{layer}/{kind} has no peaks table (run not analysed): dreaming at step 0 only; run "
                     "`python cli.py analyze` to target the unit's peak steps too")
    elif not peaks:
        notes.append(f"{kind} {unit} of {layer} has no peaks (a dead unit?): dreaming at step 0 only")
    targets = choose_target_steps(peaks, cfg.max_target_steps)
    model = model if model is not None else ctx.model
    sae = ctx.sae(layer) if kind == "feature" else None
    if progress:
        for note in notes:
            tqdm.write(note)
    result = dream_unit(model, layer, kind, unit, targets, cfg, sae=sae, read=ctx.read, n_steps=ctx.n_steps,
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
        "config": result.config.to_dict(),
    }
    store.update_stage("dream", status="done", finished=time.time(), last=summary)
    return summary
