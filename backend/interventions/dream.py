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
from dataclasses import dataclass
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
from backend.run.config import (
    DREAM_KIND_TABLES,
    KIND_DREAM_DEFAULTS,
    ROBUSTNESS,
    DreamConfig,
    check_finite_settings,
    check_kind_tables,
)
from backend.run.context import check_kind
from backend.run.schema import is_feature

if TYPE_CHECKING:
    from backend.run.context import RunContext

TABLE = "dreams"


SCALE_FIELDS = ("moment_mean", "moment_std", "range_limit")
"""DreamConfig fields in the model's latent units (None: the model's, from latent_scale)."""


KIND_FIELDS = tuple(KIND_DREAM_DEFAULTS["channel"])
"""DreamConfig fields whose None means the unit kind's default (KIND_DREAM_DEFAULTS)."""
AUGMENT_FIELDS = ("jitter", "rotate_degrees", "scale_range")
"""DreamConfig fields whose None means the robustness preset's value (ROBUSTNESS)."""


def with_kind_table(cfg: DreamConfig, kind: str) -> DreamConfig:
    """cfg with its per-kind table ([dream.channel] for channels, [dream.feature] for any SAE's features) applied
    over the [dream] settings; the tables are then empty (the result is one kind's settings)."""
    table = cfg.feature if is_feature(kind) else cfg.channel
    return dataclasses.replace(copy.deepcopy(cfg), **copy.deepcopy(table), channel={}, feature={})


def for_kind(cfg: DreamConfig, kind: str) -> DreamConfig:
    """A copy of cfg with its per-kind table applied (with_kind_table), then the kind-dependent fields (KIND_FIELDS)
    and the augmentation group (AUGMENT_FIELDS) that are None filled from the kind's defaults and the robustness
    preset; an unknown preset is a one-line error."""
    check_kind(kind)
    cfg = with_kind_table(cfg, kind)
    check_preset(cfg.robustness)
    kind_values = KIND_DREAM_DEFAULTS["feature" if is_feature(kind) else "channel"]
    preset = dict(zip(AUGMENT_FIELDS, ROBUSTNESS[cfg.robustness], strict=True))
    filled = {name: value for name, value in {**kind_values, **preset}.items() if getattr(cfg, name) is None}
    return dataclasses.replace(copy.deepcopy(cfg), **filled)


def check_preset(name: str) -> str:
    if name not in ROBUSTNESS:
        raise DifflensError(f"unknown dream robustness preset {name!r}; use one of {', '.join(ROBUSTNESS)}")
    return name


def default_config(kind: str) -> DreamConfig:
    """The defaults for a channel or an SAE feature (features: sparser and sharper, so more noise visible,
    weaker smoothing and a larger step; KIND_DREAM_DEFAULTS). The latent scale is left to the model (SCALE_FIELDS
    are None)."""
    return for_kind(DreamConfig(), kind)


CHOICES = {"init": ("random", "prior"), "blur_schedule": ("linear", "cosine", "constant"),
           "blur_kernel": ("gaussian", "box")}


def validate_config(cfg: DreamConfig) -> DreamConfig:
    """Raise a one-line DifflensError for a setting out of range (None fields: not resolved yet, not checked); the
    per-kind tables are checked as their kind's settings."""
    check_kind_tables(cfg)
    for kind in DREAM_KIND_TABLES:
        if getattr(cfg, kind):
            validate_config(with_kind_table(cfg, kind))
    check_finite_settings("dream", cfg.to_dict())
    check_preset(cfg.robustness)
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise DifflensError(f"dream {name} is {getattr(cfg, name)!r}; use one of {', '.join(allowed)}")
    if cfg.opt_steps < 1:
        raise DifflensError(f"dream opt_steps must be at least 1 (got {cfg.opt_steps})")
    if cfg.snapshot_every < 1:
        raise DifflensError(f"dream snapshot_every must be at least 1 (got {cfg.snapshot_every})")
    if cfg.max_target_steps < 1:
        raise DifflensError(f"dream max_target_steps must be at least 1 (got {cfg.max_target_steps})")
    parse_targets(cfg.targets)
    if cfg.see_through is not None and not 0.0 <= cfg.see_through <= 1.0:
        raise DifflensError(f"dream see_through must be in [0, 1] (got {cfg.see_through})")
    if not cfg.seeds:
        raise DifflensError("dream needs at least one seed")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise DifflensError(f"dream seeds must be distinct (got {cfg.seeds})")
    for name in ("lr", "lr_end", "tv_weight", "tv_threshold", "range_weight", "moment_weight", "blur_sigma_start",
                 "blur_sigma_end", "spectral_decay", "jitter", "rotate_degrees", "scale_range", "init_std",
                 "range_limit"):
        value = getattr(cfg, name)
        if value is not None and not value >= 0:
            raise DifflensError(f"dream {name} must be >= 0 (got {value})")
    if cfg.moment_std is not None and not cfg.moment_std > 0:
        raise DifflensError(f"dream moment_std must be > 0 (got {cfg.moment_std})")
    if cfg.micro_batch < 0:
        raise DifflensError(f"dream micro_batch must be >= 0 (0: every row at once; got {cfg.micro_batch})")
    if cfg.scale_range is not None and cfg.scale_range >= 1:
        raise DifflensError(f"dream scale_range must be below 1 (got {cfg.scale_range})")
    return cfg


TARGET_WORDS = ("peaks", "active")


def parse_targets(text: str) -> list[int | str]:
    """dream.targets ("0,peaks", "0,5,active") as a list of step numbers and words; a one-line error otherwise."""
    out: list[int | str] = []
    for part in str(text).split(","):
        part = part.strip()
        if part in TARGET_WORDS:
            out.append(part)
        elif part.lstrip("-").isdigit():
            out.append(int(part))
        else:
            raise DifflensError(f"dream targets {text!r} not understood; use step numbers, peaks and active, "
                                "comma-separated (e.g. 0,peaks)")
    return out


def resolve_targets(targets: list[int | str], peaks: list[int] | None, active: tuple[int, int] | None,
                    max_targets: int) -> list[int]:
    """The target steps of one unit: the steps `targets` names in order (peaks: its peak steps, highest first;
    active: max_targets steps spread evenly over its active window), repeats dropped, at most max_targets."""
    steps: list[int] = []
    for item in targets:
        if item == "peaks":
            more = list(peaks or [])
        elif item == "active":
            more = [] if active is None or active[0] < 0 else [
                int(round(v)) for v in np.linspace(active[0], active[1], max_targets)]
        else:
            more = [int(item)]
        steps += [s for s in more if s not in steps]
    return steps[:max_targets]


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
def total_variation_S(x_SCHW: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Mean absolute difference of vertically and horizontally neighbouring values beyond threshold, per image."""
    dy = (x_SCHW[:, :, 1:, :] - x_SCHW[:, :, :-1, :]).abs()
    dx = (x_SCHW[:, :, :, 1:] - x_SCHW[:, :, :, :-1]).abs()
    if threshold > 0:
        dy, dx = (dy - threshold).relu(), (dx - threshold).relu()
    return dy.flatten(1).mean(1) + dx.flatten(1).mean(1)


def range_penalty_S(x_SCHW: torch.Tensor, limit: float) -> torch.Tensor:
    """Mean squared excess of |x| over limit, per image (0 when every value is inside [-limit, limit])."""
    return (x_SCHW.abs() - limit).relu().pow(2).flatten(1).mean(1)


def moment_penalty_S(x_SCHW: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(mean(x) - mean)^2 + (std(x) - std)^2 per image."""
    flat = x_SCHW.flatten(1)
    return (flat.mean(1) - mean).pow(2) + (flat.std(1) - std).pow(2)


def blur_sigmas(cfg: DreamConfig) -> np.ndarray:
    """The gradient-blur sigma of each optimisation step, from blur_sigma_start to blur_sigma_end by blur_schedule
    (linear, cosine, or constant: the start throughout)."""
    if cfg.blur_schedule == "constant":
        return np.full(cfg.opt_steps, float(cfg.blur_sigma_start))
    frac = np.linspace(0.0, 1.0, cfg.opt_steps)
    if cfg.blur_schedule == "cosine":
        frac = (1 - np.cos(np.pi * frac)) / 2
    return cfg.blur_sigma_start + (cfg.blur_sigma_end - cfg.blur_sigma_start) * frac


def step_sizes(cfg: DreamConfig) -> np.ndarray:
    """The step size of each optimisation step, in units of moment_std: linear from lr to lr_end."""
    return np.linspace(cfg.lr, cfg.lr_end, cfg.opt_steps)


def gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    """A normalised 1-D Gaussian of 2 * radius + 1 taps."""
    pos = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (pos / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x_BCHW: torch.Tensor, sigma: float, kernel: str = "gaussian") -> torch.Tensor:
    """Separable blur with reflected borders: Gaussian of sigma, or (kernel="box") a box of 2 * round(sigma) + 1
    taps; identity for sigma below 0.1."""
    if sigma < 0.1:
        return x_BCHW
    _, c, h, w = x_BCHW.shape
    radius = min(math.ceil(3 * sigma) if kernel == "gaussian" else max(1, round(sigma)), h - 1, w - 1)
    if radius < 1:
        return x_BCHW
    k = (gaussian_kernel(sigma, radius) if kernel == "gaussian" else torch.full((2 * radius + 1,),
                                                                                1 / (2 * radius + 1))).to(x_BCHW)
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


def unit_activation_B(tokens_BTC: torch.Tensor, kind: str, unit: int | torch.Tensor,
                      sae=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, activation) per batch row: spatial means of the unit (one unit, or one per row: a tensor [B] of
    unit indices, the batched atlas). For a channel both are channel `unit`; for a feature the objective is SAE
    latent `unit`'s dense pre-activation (differentiable everywhere) and the activation its SAE code (top-k /
    threshold applied, as capture records it)."""
    b, t, c = tokens_BTC.shape
    rows_B = torch.arange(b, device=tokens_BTC.device)
    units_B = torch.as_tensor(unit, device=tokens_BTC.device).expand(b)
    if not is_feature(kind):
        act_B = tokens_BTC[rows_B, :, units_B].mean(1)
        return act_B, act_B
    x_ND = sae.normalise(tokens_BTC.reshape(b * t, c).to(sae.W_dec.dtype))
    pre_BTN = sae.pre_acts(x_ND).view(b, t, -1)
    with torch.no_grad():
        code_BTN = sae.encode(x_ND, dense=True).view(b, t, -1)
    return pre_BTN[rows_B, :, units_B].mean(1), code_BTN[rows_B, :, units_B].mean(1)


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
    if is_feature(kind) and sae is None:
        raise DifflensError(f"feature dreams need an SAE trained on {layer!r}; train one with "
                            "`python cli.py train-sae`, or dream a channel (--kind channel)")
    channels = layer_channels(model, layer)
    if kind == "channel":
        return check("channel", unit, channels, layer)
    if channels != sae.cfg.d_in:
        raise DifflensError(f"the SAE takes {sae.cfg.d_in}-dim inputs but {layer!r} has {channels} channels; "
                            "use the SAE trained on this layer")
    return check(kind, unit, int(sae.cfg.n_latents), layer)


# ---------------------------------------------------------------------------------------------- one dream
def per_seed_latents(init_latents: torch.Tensor, s: int) -> torch.Tensor:
    """init_latents ([C, H, W], [1, C, H, W] or [s, C, H, W]) as s latents [s, C, H, W]."""
    x = init_latents.detach().float()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] not in (1, s):
        raise DifflensError(f"init_latents must be [C, H, W], [1, C, H, W] or [{s}, C, H, W] (one per seed); "
                            f"got {tuple(init_latents.shape)}")
    return x.expand(s, -1, -1, -1).clone()


def initial_latents_SCHW(model: DiffusionModel, cfg: DreamConfig, init_latents: torch.Tensor | None,
                         seeds: list[int] | None = None) -> torch.Tensor:
    """The start of each sample (seeds; default cfg.seeds): the given latents ([samples, C, H, W], e.g. the steered
    priors) or a small random latent around moment_mean (std init_std * moment_std) drawn from its seed. cfg:
    resolved (for_model)."""
    seeds = list(cfg.seeds) if seeds is None else seeds
    if init_latents is not None:
        x = per_seed_latents(init_latents, len(seeds))
        shape = model.initial_latents([torch.Generator().manual_seed(0)]).shape[1:]
        if tuple(x.shape[1:]) != tuple(shape):
            raise DifflensError(f"init_latents are {tuple(x.shape[1:])} but the model's latents are {tuple(shape)}")
        return x.to(model.device, torch.float32)
    shape = model.initial_latents([torch.Generator().manual_seed(0)]).shape[1:]
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds])
    return (cfg.moment_mean + cfg.init_std * cfg.moment_std * noise).to(model.device, torch.float32)


def penalties_S(x_SCHW: torch.Tensor, cfg: DreamConfig) -> dict[str, torch.Tensor]:
    """The unweighted regulariser values of each seed's latent, in units of moment_std (the penalties of
    x / moment_std, so their weights do not depend on the model's latent scale). cfg: resolved (for_model)."""
    unit = cfg.moment_std
    u_SCHW = x_SCHW / unit
    return {"tv": total_variation_S(u_SCHW, cfg.tv_threshold), "range": range_penalty_S(u_SCHW, cfg.range_limit / unit),
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


@dataclass(frozen=True)
class DreamSample:
    """One dream of a batch: a unit, a seed (its start, noise and augmentation draws) and its target steps."""

    unit: int
    seed: int
    targets: tuple[int, ...]


@dataclass
class SampleResult:
    """What one DreamSample produced."""

    sample: DreamSample
    rows: list[dict]
    """One per (snapshot, target step): step, seed, opt_step, activation, penalties (JSON string)."""
    images: dict[int, np.ndarray]
    """opt_step -> uint8 image [H, W, 3] of the latent at that snapshot."""
    latent_CHW: torch.Tensor
    """The optimised latent."""
    objective: float
    """The final objective (no augmentation, fixed noise), mean over the target steps."""


class _Dreamer:
    """The batch of dreams run together: one row per (sample, target step), ordered sample-major; each row
    carries its own unit (objective), timestep and weight (1 / the sample's target count), and each sample its own
    random generator (seeded by its seed), so a sample dreams the same whatever else is in its batch. The denoiser
    sees the rows in micro-batches of cfg.micro_batch rows (0: all at once)."""

    def __init__(self, model: DiffusionModel, layer: str, kind: str, samples: list[DreamSample],
                 timestep_of: dict[int, int], cfg: DreamConfig, sae, read: str):
        check_noisable(model.scheduler)
        self.model, self.layer, self.kind, self.samples, self.cfg, self.sae, self.read = (
            model, layer, kind, samples, cfg, sae, read)
        rows = [(i, step) for i, sample in enumerate(samples) for step in sample.targets]
        self.n_rows = b = len(rows)
        self.n_targets = [len(sample.targets) for sample in samples]
        dev = model.device
        signal_R, noise_R = noised_weights(model.scheduler, [timestep_of[s] for _, s in rows],
                                           cfg.see_through if cfg.noise else 1.0)
        self.signal_B = signal_R.view(-1, 1, 1, 1).to(dev)
        self.noise_B = noise_R.view(-1, 1, 1, 1).to(dev)
        self.timesteps_B = torch.as_tensor([timestep_of[s] for _, s in rows], device=dev)
        self.sample_B = torch.as_tensor([i for i, _ in rows], device=dev)
        self.unit_B = torch.as_tensor([samples[i].unit for i, _ in rows], device=dev)
        self.weight_B = torch.as_tensor([1.0 / self.n_targets[i] for i, _ in rows], device=dev)
        with torch.no_grad():
            self.cond, _ = model.encode_prompts([""] * b, cfg=False)
        self.generators = [torch.Generator().manual_seed(int(s.seed)) for s in samples]
        self.fixed_noise_B: torch.Tensor | None = None  # drawn once the latent's shape is known (noise_for)
        self.eval_noise_B: torch.Tensor | None = None
        self.loss_scale = LossScale.for_model(model)

    def micro_batches(self) -> list[slice]:
        step = self.cfg.micro_batch or self.n_rows
        return [slice(i, min(i + step, self.n_rows)) for i in range(0, self.n_rows, step)]

    def noise_draw_B(self, generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        """Noise [rows, *shape]: each sample's rows from its own generator (so a sample ignores its batch)."""
        per_sample = [torch.randn((t, *shape), generator=g) for g, t in zip(generators, self.n_targets, strict=True)]
        return torch.cat(per_sample).to(self.model.device, torch.float32)

    def noise_for(self, shape: tuple[int, ...], fixed: bool) -> torch.Tensor:
        if fixed:
            if self.fixed_noise_B is None:
                self.fixed_noise_B = self.noise_draw_B(self.generators, shape)
            return self.fixed_noise_B
        return self.noise_draw_B(self.generators, shape)

    def eval_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.eval_noise_B is None:
            self.eval_noise_B = self.noise_draw_B(
                [torch.Generator().manual_seed(int(s.seed) + 104729) for s in self.samples], shape)
        return self.eval_noise_B

    def activations_R(self, x_SCHW: torch.Tensor, noise_BCHW: torch.Tensor,
                      rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, activation) of batch rows `rows`: the latents seen through noise at their timesteps."""
        x_RCHW = x_SCHW[self.sample_B[rows]]
        inputs = (self.signal_B[rows] * x_RCHW + self.noise_B[rows] * noise_BCHW[rows]).to(self.model.dtype)
        cond = _rows(self.cond, rows, self.n_rows)
        tokens = layer_tokens_BTC(self.model, self.layer, self.read, inputs, self.timesteps_B[rows], cond)
        return unit_activation_B(tokens.float(), self.kind, self.unit_B[rows], self.sae)

    def activations_B(self, x_SCHW: torch.Tensor, noise_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, activation) [rows] of the latents seen through noise at each row's timestep."""
        parts = [self.activations_R(x_SCHW, noise_BCHW, rows) for rows in self.micro_batches()]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def gradient_SCHW(self, x_SCHW: torch.Tensor) -> torch.Tensor:
        """d(loss)/dx for one augmented, noised batch (loss = -objective + weighted penalties, summed over samples;
        a sample's objective is its mean over target steps). The objective's gradient w.r.t. the augmented latent
        is summed over micro-batches (each backward loss-scaled through a float16 denoiser), then taken back through
        the augmentation once; the penalties' gradient (float32, on x) is added."""
        x = x_SCHW.detach().requires_grad_(True)
        seen = augmented(x, self.cfg, self.generators)  # the step's random draws: once, for every micro-batch
        noise = self.noise_for(tuple(x.shape[1:]), fixed=not self.cfg.fresh_noise)
        seen_leaf = seen.detach().requires_grad_(True)
        grad_seen = torch.zeros_like(seen_leaf)
        for rows in self.micro_batches():
            obj_R, _ = self.activations_R(seen_leaf, noise, rows)
            grad_seen += self.loss_scale.grad(-(obj_R * self.weight_B[rows]).sum(), seen_leaf)
            del obj_R  # this micro-batch's graph goes before the next one's is built
        loss = weighted_penalty_S(penalties_S(x, self.cfg), self.cfg).sum() + (seen * grad_seen).sum()
        (grad,) = torch.autograd.grad(loss, x)
        return grad

    @torch.no_grad()
    def snapshot(self, x_SCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(objective, activation) [rows] without augmentation and with fixed noise, and the penalties [samples]."""
        obj_B, act_B = self.activations_B(x_SCHW, self.eval_noise(tuple(x_SCHW.shape[1:])))
        return obj_B, act_B, penalties_S(x_SCHW, self.cfg)


def snapshot_steps(cfg: DreamConfig) -> list[int]:
    """Optimisation steps with a snapshot: 0, every snapshot_every, and the last (opt_steps)."""
    return sorted(set(range(0, cfg.opt_steps + 1, cfg.snapshot_every)) | {cfg.opt_steps})


def resolved(cfg: DreamConfig | None, kind: str, model: DiffusionModel) -> DreamConfig:
    """cfg (default: the kind's defaults) with the kind's, the robustness preset's and the model's latent-scale
    values filled in, validated."""
    cfg = validate_config(cfg or default_config(kind))
    return validate_config(for_model(for_kind(cfg, kind), model))


def dream_samples(model: DiffusionModel, layer: str, kind: str, samples: list[DreamSample],
                  cfg: DreamConfig | None = None, sae=None, read: str = "output", n_steps: int | None = None,
                  init_latents: torch.Tensor | None = None, progress: bool = False,
                  desc: str = "dream") -> list[SampleResult]:
    """Dream a batch of samples (units x seeds x target-step groups) together on a loaded model: one forward and
    backward pass per optimisation step serves them all, each row with its own unit's objective.

    Target steps are denoising steps of an n_steps generation (default: the model's default step count); sae is
    required for features; read is "output" or "delta" as in capture; init_latents ([samples, C, H, W], e.g. the
    steered priors) replaces the random starts. cfg is resolved for the kind and model (`resolved`); cfg.seeds is
    not used (each sample has its seed)."""
    cfg = resolved(cfg, kind, model)
    if not samples:
        return []
    for unit in sorted({s.unit for s in samples}):
        check_dream_unit(model, layer, kind, unit, sae)
    if any(not s.targets for s in samples):
        raise DifflensError("dream needs at least one target step")
    n_steps = n_steps or model.default_steps
    steps = sorted({t for s in samples for t in s.targets})
    timestep_of = dict(zip(steps, target_timesteps(model, steps, n_steps), strict=True))
    sigmas, lrs = blur_sigmas(cfg), step_sizes(cfg)
    snaps = set(snapshot_steps(cfg))
    results = [SampleResult(s, [], {}, torch.empty(0), float("nan")) for s in samples]
    sae_module = sae if isinstance(sae, torch.nn.Module) else None
    with frozen(model.denoiser, sae_module), unguided(model):
        dreamer = _Dreamer(model, layer, kind, samples, timestep_of, cfg, sae, read)
        x = initial_latents_SCHW(model, cfg, init_latents, [s.seed for s in samples])
        for k in tqdm(range(cfg.opt_steps + 1), desc=desc, unit="step", disable=not progress):
            if k in snaps:
                record_snapshot(dreamer, x, k, results)
            if k == cfg.opt_steps:
                break
            g = gaussian_blur(dreamer.gradient_SCHW(x), float(sigmas[k]), cfg.blur_kernel)
            if cfg.spectral:
                g = spectral_precondition(g, cfg.spectral_decay)
            x = (x - float(lrs[k]) * cfg.moment_std * normalised_per_image(g)).detach()
    for i, res in enumerate(results):
        res.latent_CHW = x[i].detach().cpu()
    return results


def record_snapshot(dreamer: _Dreamer, x_SCHW: torch.Tensor, opt_step: int, results: list[SampleResult]) -> None:
    """Append to each sample's result one row per target step and its image for the latents at opt_step (and,
    at the last step, its objective)."""
    obj_B, act_B, pen = dreamer.snapshot(x_SCHW)
    with torch.no_grad():
        imgs = to_uint8(dreamer.model.decode(x_SCHW.to(dreamer.model.dtype)))
    row = 0
    for si, res in enumerate(results):
        res.images[opt_step] = imgs[si]
        values = {k: round(float(v[si]), 6) for k, v in pen.items()}
        values["total"] = round(float(weighted_penalty_S({k: v[si] for k, v in pen.items()}, dreamer.cfg)), 6)
        objectives = []
        for step in res.sample.targets:
            objectives.append(float(obj_B[row]))
            extra = {"objective": round(float(obj_B[row]), 6)} if is_feature(dreamer.kind) else {}
            res.rows.append({"step": int(step), "seed": int(res.sample.seed), "opt_step": opt_step,
                             "activation": float(act_B[row]), "penalties": json.dumps({**values, **extra})})
            row += 1
        res.objective = float(np.mean(objectives))


def dream_unit(model: DiffusionModel, layer: str, kind: str, unit: int, target_steps: list[int],
               cfg: DreamConfig | None = None, sae=None, read: str = "output", n_steps: int | None = None,
               init_latents: torch.Tensor | None = None, progress: bool = False) -> DreamResult:
    """Dream one unit on a loaded model (no run directory needed): one dream per seed of cfg.seeds, each
    maximising the unit's mean activation over target_steps (dream_samples; cfg.joint must be true).

    target_steps are denoising steps of an n_steps generation (default: the model's default step count) at
    which the activation is measured and maximised; sae is required for kind="feature"; read is "output" or
    "delta" as in capture; init_latents (e.g. the steered prior; [C, H, W], [1, ...] or one per seed) replaces the
    random start. cfg's fields left None are the kind's and the model's (resolved); the result carries the config
    used.
    """
    t0 = time.time()
    cfg = resolved(cfg, kind, model)
    if not cfg.joint:
        raise DifflensError("a single-unit dream optimises its target steps jointly (dream.joint = true); dream "
                            "them one at a time with `python cli.py atlas`")
    unit = check_dream_unit(model, layer, kind, unit, sae)
    if not target_steps:
        raise DifflensError("dream needs at least one target step")
    n_steps = n_steps or model.default_steps
    timesteps = target_timesteps(model, list(target_steps), n_steps)
    samples = [DreamSample(unit, int(seed), tuple(int(s) for s in target_steps)) for seed in cfg.seeds]
    starts = None if init_latents is None else per_seed_latents(init_latents, len(samples))
    results = dream_samples(model, layer, kind, samples, cfg, sae, read, n_steps, starts, progress,
                            desc=f"dream {layer} {kind} {unit}")
    rows = [r for res in results for r in res.rows]
    images = {(res.sample.seed, k): img for res in results for k, img in res.images.items()}
    latents = torch.stack([res.latent_CHW for res in results])
    return DreamResult(rows, images, latents, list(target_steps), timesteps, round(time.time() - t0, 3), cfg)


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
    """Step 0 followed by the highest peaks (no repeats), at most max_targets steps (targets "0,peaks")."""
    return resolve_targets([0, "peaks"], peaks, None, max_targets)


def prior_latents(ctx: RunContext, layer: str, kind: str, unit: int, seeds: list[int]) -> torch.Tensor:
    """The unit's steered-prior latents of seeds, as the atlas saved them ([seeds, C, H, W]); a one-line error when
    they were not computed."""
    from backend.interventions.atlas import load_prior_latents, saved_prior_seeds

    if not set(seeds) <= saved_prior_seeds(ctx, layer, kind, unit):
        raise DifflensError(f"init = prior needs the prior of {kind} {unit} of {layer} for seeds {list(seeds)}, but "
                            f"none is computed; run `python cli.py atlas --run {ctx.root} --layer {layer} --kind "
                            f"{kind} --units {unit}` first")
    return load_prior_latents(ctx, layer, kind, [(unit, int(s)) for s in seeds])


def active_window(ctx: RunContext, layer: str, kind: str, unit: int) -> tuple[int, int]:
    """The unit's (first_active, last_active) steps from the run's units table ((-1, -1): never active)."""
    import polars as pl

    row = ctx.units(layer, kind).filter(pl.col("unit") == unit)
    return (int(row["first_active"][0]), int(row["last_active"][0])) if row.height else (-1, -1)


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
    ctx = as_context(run, model=model).require_generator("dream")
    store = ctx.store
    notes = []
    peaks = peak_steps(store, layer, kind, unit)
    if peaks is None:
        notes.append(f"{layer}/{kind} has no peaks table (run not analysed): dreaming at step 0 only; run "
                     "`python cli.py analyze` to target the unit's peak steps too")
    elif not peaks:
        notes.append(f"{kind} {unit} of {layer} has no peaks (a dead unit?): dreaming at step 0 only")
    wanted = parse_targets(cfg.targets)
    active = active_window(ctx, layer, kind, unit) if "active" in wanted else None
    targets = resolve_targets(wanted, peaks, active, cfg.max_target_steps)
    if cfg.init == "prior" and init_latents is None:
        init_latents = prior_latents(ctx, layer, kind, unit, cfg.seeds)
    model = model if model is not None else ctx.model
    sae = ctx.sae(layer, kind) if is_feature(ctx.check_kind(layer, kind)) else None
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
