"""Interventions: steering along a unit's direction, SAE feature zeroing/scaling, and how much either changes images.

This module owns
  - the edits handed to hooks.edit_activations: `steering_edit` (add strength[step] x direction, optionally under
    a token mask) and `feature_edit` (the error-preserving SAE splice);
  - `unit_direction` (a channel's unit vector, or an SAE decoder row as the folded SAE applies it, unit-normalised),
    step selection and masks, `steered_generate` / `edited_generate`;
  - effect measures: `pixel_effect` (mean absolute difference on [0, 1]) and, on the demo model, the attributes
    that changed, read back from pixels by shapes.score_image;
  - the run-level entry points `steer_run`, `edit_run` and `concept_steering_report`, which read a run's `units`,
    `concepts` tables and SAEs and write the `interventions` and `steering_success` tables and media/steer/,
    media/edit/ images (always through RunStore, atomically, with deterministic shard names: a repeat replaces).

Strength. A steering strength is in activation units along the unit-norm direction. Run-level functions take a
relative `scale` instead: strength = scale x the unit's typical activation, its `max` in the `units` table (the
largest spatial max over generations and steps); for a feature that max is a code value, and the feature adds
code x decoder row, so the strength is scale x max x ||decoder row||: scale 1 adds the feature at its largest
recorded activation, at every masked token.

CFG. With classifier-free guidance the denoiser's batch is [uncond; cond] and the guided prediction is
uncond + g (cond - uncond). Steering adds to both halves (half="both", the default): to first order the guided
prediction then moves by exactly the edit's effect on one branch, the same as without guidance, so one strength
means the same with CFG on or off (the steered prior runs without CFG). Editing only the conditional half would
multiply the effect by g; only the unconditional half by (1 - g), which for g > 1 pushes *away* from the
direction. Feature edits are applied to both halves for the same reason.

Zeroing / scaling. With codes = encode(x), the layer receives decode(edited codes) + (x - decode(codes)): the SAE's
reconstruction error is kept, so only the edit changes the output. It is computed as
x + (decode(edited) - decode(codes)) = x + sum_k (edited_k - codes_k) W_dec[k], which equals the splice exactly
in real arithmetic and returns x bit for bit when nothing is edited.

Concept steering (demo model). concept_steering_report steers each concept's best feature on prompts that lack the
concept, at the late steps (the demo's colours are settled in the last denoising steps: steering only steps 10-16
of 20 changed nothing) and under each baseline image's object mask (steering every token also tints the
background), and counts the seeds whose scored image takes the concept (`hits`) and those where nothing else
changed (`clean_hits`).

Media. Table shards and PNGs go through RunStore (atomic temp + rename), at paths derived from a digest of the
intervention's settings.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
import torch
import torch.nn.functional as F

from backend.errors import DifflensError
from backend.models.base import DiffusionModel, to_uint8
from backend.models.hooks import Half, edit_activations
from backend.run.store import RunStore

Kind = Literal["channel", "feature"]
Mode = Literal["prior", "prompt"]
Steps = str | tuple[int, int]
"""Steps spec: "active" (the unit's first..last active step in the run), "all", "late" (the second half of the
trajectory), or an inclusive (first, last) window."""
Edit = Callable[[torch.Tensor, int], torch.Tensor]

DEFAULT_SCALE = 4.0
"""Default relative steering strength of steer_run (scale x the unit's max activation)."""
REPORT_SCALE = 6.0
"""Default scale of concept_steering_report (with steps "late" and mask "object"). Chosen on the shipped demo
model, layer up_blocks.1.attentions.1: at 6 the best feature of every colour turned 10/10 calibration seeds (two
different SAEs) and 20/20 held-out seeds of runs/demo to its colour; at 4-5 some colours stayed below 80%, and
above 8 more images lose their other attributes (shape, size) as well."""
DEFAULT_SEEDS = (0, 1, 2, 3)
AUROC_TIE = 0.002
"""concept_steering_report: features within this AUROC of a concept's best count as tied (see best_concept_units)."""
REGIONS = ("left", "right", "top", "bottom", "center")
PRESETS = ("none", "frequent", "rare", "all")

INTERVENTIONS_SCHEMA = pa.schema([
    ("unit", pa.int32()),             # -1: an edit of several features (see `features`)
    ("method", pa.string()),          # steer | zero | scale
    ("mode", pa.string()),            # prior | prompt (steering), edit
    ("prompt", pa.string()),
    ("seed", pa.int64()),
    ("strength", pa.float32()),       # absolute steering strength (NaN for edits)
    ("scale", pa.float32()),          # relative steering scale, or the scaling factor of an edit
    ("steps", pa.string()),           # the steps the edit applied at, e.g. "all" or "3-12"
    ("mask", pa.string()),            # region name / "array" / "" (none)
    ("features", pa.list_(pa.int32())),
    ("preset", pa.string()),          # edits: none | frequent | rare | all | custom
    ("n_steps", pa.int16()),
    ("guidance", pa.float32()),
    ("image", pa.string()),
    ("baseline_image", pa.string()),
    ("effect", pa.float32()),         # mean |image - baseline| on [0, 1]
    ("attributes", pa.string()),      # JSON: demo attributes of the image (null off the demo)
    ("baseline_attributes", pa.string()),
    ("changed_attributes", pa.string()),  # JSON {attribute: [before, after]} (null off the demo)
    ("concept", pa.string()),         # concept_steering_report: the concept steered towards
    ("concept_hit", pa.bool_()),      # ... and whether the image took it
    ("spec", pa.string()),            # the digest naming this intervention's shard and media folder
])

SUCCESS_SCHEMA = pa.schema([
    ("concept", pa.string()), ("unit", pa.int32()), ("auroc", pa.float32()), ("rank", pa.int16()),
    ("scale", pa.float32()), ("strength", pa.float32()), ("steps", pa.string()), ("mask", pa.string()),
    ("n_steps", pa.int16()), ("guidance", pa.float32()), ("seeds", pa.int32()), ("hits", pa.int32()),
    ("rate", pa.float32()), ("clean_hits", pa.int32()), ("clean_rate", pa.float32()), ("baseline_hits", pa.int32()),
])


# ---------------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class SteerSpec:
    """One steering experiment on a run (what steer_run does)."""

    layer: str
    """Hook point whose output is steered."""
    kind: Kind = "channel"
    """channel (a unit vector) or feature (an SAE decoder row; needs sae/<layer>/)."""
    unit: int = 0
    """Channel or feature index."""
    scale: float = DEFAULT_SCALE
    """Relative strength: strength = scale x the unit's typical activation (units.max, x decoder-row norm)."""
    strength: float | None = None
    """Absolute strength along the unit-norm direction; overrides scale (then the units table is not needed
    unless steps="active")."""
    steps: Steps = "active"
    """"active" (the unit's first..last active step in the run), "all", "late" (second half), or an inclusive
    (first, last) window."""
    mask: str | None = None
    """Spatial mask: a region (left, right, top, bottom, center), a .npy / image file (nonzero = inside), or
    "object": on the demo model, the shape found in each baseline image (see object_masks)."""
    mode: Mode = "prior"
    """prior: empty prompt without guidance (the steered prior); prompt: `prompt` with the run's guidance."""
    prompt: str | None = None
    """The prompt of mode "prompt"."""
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    """One image per seed, steered and baseline with the same seed."""
    n_steps: int | None = None
    """Denoising steps (default: the run's); an "active" window is rescaled to it."""
    guidance: float | None = None
    """CFG scale of mode "prompt" (default: the run's); the prior always runs without guidance."""
    half: Half = "both"
    """CFG half the addition goes to (both: see the module docstring)."""


@dataclass(frozen=True)
class FeatureEdit:
    """One edit of SAE codes: zero some features, scale others by factor (zero wins when both list one)."""

    name: str
    zero: tuple[int, ...] = ()
    scale: tuple[int, ...] = ()
    factor: float = 1.0


@dataclass
class InterventionResult:
    """What a run-level intervention wrote: its rows (as in the table), the grid PNG and the table shard."""

    rows: pl.DataFrame
    grid: Path
    shard: Path
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- checks


def check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise DifflensError(f"{name} must be a finite number; got {value}")
    return value


def check_unit(kind: str, unit: int, n_units: int, layer: str = "") -> int:
    if kind not in ("channel", "feature"):
        raise DifflensError(f"unknown unit kind {kind!r}; use channel or feature")
    if not 0 <= int(unit) < n_units:
        where = f" of {layer}" if layer else ""
        raise DifflensError(f"unknown {kind} {unit}{where}: valid {kind}s are 0..{n_units - 1}")
    return int(unit)


# ---------------------------------------------------------------------------------------------------------- directions


def unit_direction(kind: Kind, unit: int, n_channels: int, sae=None) -> torch.Tensor:
    """The unit-norm direction [C] of a unit: a channel's one-hot vector, or a feature's decoder row (folded SAE,
    i.e. in raw activation space) divided by its norm."""
    if kind not in ("channel", "feature"):
        raise DifflensError(f"unknown unit kind {kind!r}; use channel or feature")
    if kind == "channel":
        check_unit(kind, unit, n_channels)
        direction_C = torch.zeros(n_channels)
        direction_C[unit] = 1.0
        return direction_C
    if sae is None:
        raise DifflensError("a feature intervention needs the layer's SAE; train one with `python cli.py train-sae`")
    check_unit(kind, unit, sae.cfg.n_latents)
    if sae.cfg.d_in != n_channels:
        raise DifflensError(f"the SAE takes {sae.cfg.d_in} channels but the layer has {n_channels}")
    row_C = sae.W_dec[unit].detach().float().cpu()
    norm = float(row_C.norm())
    if norm == 0:
        raise DifflensError(f"feature {unit} has a zero decoder row, so it has no direction")
    return row_C / norm


def decoder_norm(sae, unit: int) -> float:
    return float(sae.W_dec[unit].detach().float().norm())


# ---------------------------------------------------------------------------------------------------------- steps


def parse_steps(text: str | tuple[int, int] | None) -> Steps:
    """ "active", "all", "late", "a-b" / "a:b" (inclusive) or a (first, last) tuple -> a Steps spec."""
    if text is None:
        return "active"
    if isinstance(text, tuple | list):
        first, last = (int(v) for v in text)
        return (first, last)
    text = str(text).strip()
    if text in ("active", "all", "late"):
        return text
    for sep in ("-", ":"):
        if sep in text:
            a, b = text.split(sep, 1)
            try:
                return (int(a), int(b))
            except ValueError:
                break
    raise DifflensError(f"steps {text!r} not understood; use active, all, late, or a window like 3-8 (inclusive)")


def rescale_window(first: int, last: int, n_from: int, n_to: int) -> tuple[int, int]:
    """An inclusive step window of an n_from-step trajectory as the steps covering it in an n_to-step one."""
    if n_from == n_to:
        return first, last
    lo = math.floor(first * n_to / n_from)
    hi = math.ceil((last + 1) * n_to / n_from) - 1
    return max(0, lo), min(n_to - 1, max(lo, hi))


def step_window(steps: Steps, n_steps: int, active: tuple[int, int] | None = None,
                run_steps: int | None = None) -> tuple[int, int]:
    """The inclusive window a Steps spec selects in an n_steps trajectory (active: the unit's run window)."""
    if steps == "all":
        return 0, n_steps - 1
    if steps == "late":
        return n_steps // 2, n_steps - 1
    if steps == "active":
        if active is None:
            raise DifflensError("steps=active needs the unit's active steps from the run's units table")
        first, last = active
        if first < 0:
            raise DifflensError("the unit is never active in this run (dead), so it has no active steps; "
                                "steer at steps all or a window like 3-8")
        return rescale_window(first, last, run_steps or n_steps, n_steps)
    first, last = steps
    if not 0 <= first <= last < n_steps:
        raise DifflensError(f"step window {first}-{last} is outside 0..{n_steps - 1} (inclusive, first <= last)")
    return first, last


def strength_schedule(strength: float, window: tuple[int, int], n_steps: int) -> list[float]:
    """strength at the window's steps, 0 elsewhere: the strength_by_step of steering_edit."""
    check_finite("strength", strength)
    return [float(strength) if window[0] <= s <= window[1] else 0.0 for s in range(n_steps)]


def describe_window(window: tuple[int, int], n_steps: int) -> str:
    return "all" if window == (0, n_steps - 1) else f"{window[0]}-{window[1]}"


# ---------------------------------------------------------------------------------------------------------- masks


def region_mask(name: str, res: int = 16) -> np.ndarray:
    """A [res, res] 0/1 mask of a named image region: a half (left/right/top/bottom) or the centre square."""
    if name not in REGIONS:
        raise DifflensError(f"unknown mask region {name!r}; use one of {', '.join(REGIONS)} or a .npy/.png file")
    c = (np.arange(res) + 0.5) / res
    y_HW, x_HW = np.meshgrid(c, c, indexing="ij")
    inside = {"left": x_HW < 0.5, "right": x_HW >= 0.5, "top": y_HW < 0.5, "bottom": y_HW >= 0.5,
              "center": (np.abs(x_HW - 0.5) < 0.25) & (np.abs(y_HW - 0.5) < 0.25)}[name]
    return inside.astype(np.float32)


def load_mask(spec: str | np.ndarray | None, res: int = 16) -> np.ndarray | None:
    """A mask [H, W] in [0, 1] from a region name, a .npy file, an image file (nonzero = inside) or an array."""
    if spec is None:
        return None
    if isinstance(spec, np.ndarray | torch.Tensor):
        mask_HW = np.asarray(spec, dtype=np.float32)
    elif str(spec) in REGIONS:
        mask_HW = region_mask(str(spec), res)
    else:
        path = Path(spec)
        if not path.is_file():
            raise DifflensError(f"mask {spec!r} is neither a region ({', '.join(REGIONS)}) nor a file")
        if path.suffix == ".npy":
            mask_HW = np.load(path).astype(np.float32)
        else:
            from PIL import Image

            mask_HW = (np.asarray(Image.open(path).convert("L"), dtype=np.float32) > 0).astype(np.float32)
    if mask_HW.ndim not in (1, 2, 3) or not np.isfinite(mask_HW).all():
        raise DifflensError(f"a mask must be a finite [H, W] (or [tokens], or [N, H, W]) array; got {mask_HW.shape}")
    for m in (mask_HW if mask_HW.ndim == 3 else [mask_HW]):
        check_mask_nonempty(m)
    return np.clip(mask_HW, 0, 1)


def object_masks(images_NHW3: np.ndarray) -> np.ndarray:
    """Demo model: per image, the coverage mask [N, H, W] of the shape shapes.score_image finds in it (the whole
    image where it finds none), so steering can act on the object and leave the background alone."""
    from backend.demo import shapes

    out = []
    for img in images_NHW3:
        a = shapes.score_image(img)
        res = img.shape[0]
        out.append(np.ones((res, res), np.float32) if a["shape"] == "none"
                   else shapes.coverage_mask(a["shape"], a["size"], a["position"], res))
    return np.stack(out)


def check_mask_nonempty(mask) -> None:
    if float(np.asarray(mask, dtype=np.float32).sum()) <= 0:
        raise DifflensError("the mask is empty (selects no position); give a region or a mask with nonzero pixels")


def mask_tokens(mask_HW: np.ndarray | torch.Tensor, n_tokens: int) -> torch.Tensor:
    """A [H, W] mask as weights [T] over a layer's T = h x w tokens (same aspect ratio; area-averaged, row-major
    like hooks.to_tokens). A [T] mask is returned as is."""
    mask = torch.as_tensor(np.asarray(mask_HW, dtype=np.float32))
    if mask.ndim == 1:
        if len(mask) != n_tokens:
            raise DifflensError(f"a token mask has {len(mask)} entries but the layer has {n_tokens} tokens")
        return mask
    h_img, w_img = mask.shape
    h = max(1, round(math.sqrt(n_tokens * h_img / w_img)))
    w = n_tokens // h
    if h * w != n_tokens:
        raise DifflensError(f"cannot lay a {h_img}x{w_img} mask over {n_tokens} tokens; is this layer a spatial map?")
    out_T = F.adaptive_avg_pool2d(mask[None, None], (h, w)).flatten()
    if float(out_T.sum()) <= 0:
        raise DifflensError(f"the mask covers no token of this layer's {h}x{w} grid; make it larger")
    return out_T


# ---------------------------------------------------------------------------------------------------------- edits


def token_weights(mask: np.ndarray | torch.Tensor, n_tokens: int, batch: int) -> torch.Tensor:
    """Per-token weights [1 or batch, T, 1] of a mask: [T] or [H, W] for every sample, or [N, H, W] one per
    sample (N divides the hooked batch: with CFG on both halves the batch is [uncond; cond], each in prompt
    order, so the masks repeat)."""
    mask = np.asarray(mask, dtype=np.float32)
    if mask.ndim < 3:
        return mask_tokens(mask, n_tokens)[None, :, None]
    if batch % len(mask):
        raise DifflensError(f"{len(mask)} per-sample masks do not fit a batch of {batch}; give one mask per prompt")
    per_NT = torch.stack([mask_tokens(m, n_tokens) for m in mask])
    return per_NT.repeat(batch // len(mask), 1)[:, :, None]


def steering_edit(direction_C: torch.Tensor, strength_by_step: Sequence[float],
                  mask_T: np.ndarray | torch.Tensor | None = None) -> Edit:
    """An edit for hooks.edit_activations: tokens [B, T, C] + strength_by_step[step] x direction [C], weighted per
    token by the mask: [T], a [H, W] mask laid over the layer's grid, or [N, H, W] one per prompt (see
    token_weights). Steps beyond the schedule and steps of strength 0 are left untouched (bit for bit)."""
    strengths = [check_finite("strength", s) for s in strength_by_step]
    direction_C = torch.as_tensor(direction_C, dtype=torch.float32)
    if direction_C.ndim != 1:
        raise DifflensError(f"a steering direction is one vector [C]; got shape {tuple(direction_C.shape)}")
    if not torch.isfinite(direction_C).all():
        raise DifflensError("the steering direction is not finite")
    if mask_T is not None:
        masks = np.asarray(mask_T, dtype=np.float32)
        for m in (masks if masks.ndim == 3 else [masks]):
            check_mask_nonempty(m)
    cache: dict = {}

    def edit(tokens_BTC: torch.Tensor, step: int) -> torch.Tensor:
        s = strengths[step] if 0 <= step < len(strengths) else 0.0
        if s == 0.0:
            return tokens_BTC
        b, t, c = tokens_BTC.shape
        key = (tokens_BTC.device, tokens_BTC.dtype, b, t)
        if key not in cache:
            if direction_C.shape[0] != c:
                raise DifflensError(f"the direction has {direction_C.shape[0]} channels but the layer has {c}")
            d = direction_C.to(tokens_BTC.device, tokens_BTC.dtype)
            cache[key] = d if mask_T is None else token_weights(mask_T, t, b).to(d) * d  # [C] or [1|B, T, C]
        return tokens_BTC + s * cache[key]

    return edit


def feature_edit(sae, zero: Sequence[int] = (), scale: Sequence[int] = (), factor: float = 1.0) -> Edit:
    """An edit splicing decode(edited codes) + (x - decode(codes)) into the layer: zero the features in `zero`,
    multiply those in `scale` by factor (negative allowed). Computed as x + sum_k (edited_k - codes_k) W_dec[k]."""
    n = sae.cfg.n_latents
    factor = check_finite("factor", factor)
    zero = sorted({check_unit("feature", u, n) for u in zero})
    scale = sorted({check_unit("feature", u, n) for u in scale} - set(zero))
    dev = sae.W_dec.device
    zero_t = torch.tensor(zero, dtype=torch.long, device=dev)
    scale_t = torch.tensor(scale, dtype=torch.long, device=dev)

    @torch.no_grad()
    def edit(tokens_BTC: torch.Tensor, _step: int) -> torch.Tensor:
        b, t, c = tokens_BTC.shape
        x_NC = tokens_BTC.reshape(b * t, c).to(dev, sae.W_dec.dtype)
        codes = sae.encode(x_NC)
        vals, idx = codes.values, codes.indices
        new = torch.where(torch.isin(idx, zero_t), torch.zeros_like(vals), vals)
        new = torch.where(torch.isin(idx, scale_t), new * factor, new)
        delta_NC = F.embedding_bag(idx, sae.W_dec, per_sample_weights=(new - vals).to(sae.W_dec.dtype), mode="sum")
        return tokens_BTC + delta_NC.to(tokens_BTC.device, tokens_BTC.dtype).reshape(b, t, c)

    return edit


# ---------------------------------------------------------------------------------------------------------- generation


def _settings(model: DiffusionModel, n_steps: int | None, guidance: float | None) -> tuple[int, float]:
    return (n_steps or model.default_steps), (model.default_guidance if guidance is None else guidance)


@torch.no_grad()
def edited_generate(model: DiffusionModel, layer: str, prompts: list[str], seeds: list[int], edit: Edit | None,
                    n_steps: int | None = None, guidance: float | None = None, half: Half = "both") -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] with edit applied to layer's output (None: plain generation)."""
    n_steps, guidance = _settings(model, n_steps, guidance)
    if edit is None:
        return model.generate(list(prompts), list(seeds), n_steps, guidance)
    with edit_activations(model, layer, edit, half=half):
        return model.generate(list(prompts), list(seeds), n_steps, guidance)


def steered_generate(model: DiffusionModel, layer: str, prompts: list[str], seeds: list[int],
                     direction_C: torch.Tensor, strength_by_step: Sequence[float],
                     mask_T: np.ndarray | torch.Tensor | None = None, n_steps: int | None = None,
                     guidance: float | None = None, half: Half = "both") -> torch.Tensor:
    """Images [B, 3, H, W] generated while layer's output gets strength_by_step[step] x direction (under mask)."""
    return edited_generate(model, layer, prompts, seeds, steering_edit(direction_C, strength_by_step, mask_T),
                           n_steps, guidance, half)


# ---------------------------------------------------------------------------------------------------------- effects


def pixel_effect(baseline_HW3: np.ndarray, image_HW3: np.ndarray) -> float:
    """Mean absolute pixel difference on [0, 1] (0: identical, 1: black vs white everywhere)."""
    a = np.asarray(baseline_HW3, dtype=np.float32) / 255.0
    b = np.asarray(image_HW3, dtype=np.float32) / 255.0
    return float(np.abs(a - b).mean())


def is_demo(model: DiffusionModel) -> bool:
    return getattr(model, "family", "") == "demo"


def attribute_changes(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    """{attribute: [before, after]} for the attributes that differ."""
    return {k: [before[k], after[k]] for k in before if before[k] != after.get(k)}


@dataclass
class Effect:
    """How one image differs from its baseline."""

    effect: float
    attributes: dict[str, str] | None = None
    baseline_attributes: dict[str, str] | None = None

    @property
    def changed(self) -> dict[str, list[str]] | None:
        if self.attributes is None:
            return None
        return attribute_changes(self.baseline_attributes, self.attributes)


def effects(baseline_NHW3: np.ndarray, images_NHW3: np.ndarray, demo: bool) -> list[Effect]:
    """Per image: pixel effect and (demo) scored attributes of image and baseline."""
    from backend.demo import shapes

    out = []
    for base, img in zip(baseline_NHW3, images_NHW3, strict=True):
        attrs = (shapes.score_image(img), shapes.score_image(base)) if demo else (None, None)
        out.append(Effect(pixel_effect(base, img), *attrs))
    return out


# ---------------------------------------------------------------------------------------------------------- run access


@dataclass
class RunContext:
    """A run opened for interventions: its store, manifest, generation settings and (lazily) model and SAEs."""

    store: RunStore
    manifest: dict
    model: DiffusionModel | None = None
    saes: dict = field(default_factory=dict)

    @property
    def run_steps(self) -> int:
        cap = self.manifest.get("stages", {}).get("capture", {})
        if cap.get("n_steps"):
            return int(cap["n_steps"])
        steps = self.store.root / "tables" / "steps.parquet"
        return pl.read_parquet(steps).height if steps.exists() else self.get_model().default_steps

    @property
    def run_guidance(self) -> float:
        cap = self.manifest.get("stages", {}).get("capture", {})
        return float(cap["guidance"]) if cap.get("guidance") is not None else self.get_model().default_guidance

    def get_model(self) -> DiffusionModel:
        if self.model is None:
            from backend.models import load_model, parse_dtype

            config = self.manifest.get("config", {})
            self.model = load_model(config.get("model", "demo"), device=config.get("device", "cpu"),
                                    dtype=parse_dtype(config.get("dtype", "float32")))
        return self.model

    def get_sae(self, layer: str):
        if layer not in self.saes:
            from sae.io import SAELoadError, load_sae

            try:
                self.saes[layer] = load_sae(self.store.sae_dir(layer), device=self.get_model().device)
            except SAELoadError as exc:
                raise DifflensError(f"layer {layer} has no SAE in {self.store.root} (needed for a feature "
                                    f"intervention); train one with `python cli.py train-sae`") from exc
        return self.saes[layer]

    def units(self, layer: str, kind: str) -> pl.DataFrame:
        part = self.store.partition_dir("units", layer, kind)
        files = sorted(part.glob("*.parquet"))
        if not files:
            raise DifflensError(f"{self.store.root} has no units table for {layer}/{kind}; run "
                                f"`python cli.py analyze --run {self.store.root}` first")
        return pl.concat([pl.read_parquet(f) for f in files]).sort("unit")


def open_run(run_dir: str | Path, model: DiffusionModel | None = None) -> RunContext:
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    if manifest is None:
        raise DifflensError(f"{run_dir} is not a run directory (no manifest.json); run `python cli.py run-all` first")
    return RunContext(store, manifest, model)


def layer_channels(model: DiffusionModel, layer: str) -> int:
    from backend.models.layers import check_layers, hook_points

    check_layers(model, [layer])
    for p in hook_points(model):
        if p.name == layer:
            return p.channels
    raise DifflensError(f"layer {layer!r} produced no tensor output, so it cannot be steered")


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def safe_name(name: str) -> str:
    return name.replace("/", "_").replace("=", "-").replace(" ", "_")


def write_grid(store: RunStore, rel: str, images_NHW3: np.ndarray, labels: list[str], cols: int) -> Path:
    from backend.analysis.grid import labelled_grid

    store.write_png(rel, labelled_grid(np.asarray(images_NHW3), labels, cols=max(1, cols)))
    return store.root / rel


def _rows_frame(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def to_json(obj) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True)


def _with_partition(table: pa.Table, layer: str, kind: str) -> pl.DataFrame:
    return pl.from_arrow(table).with_columns(layer=pl.lit(layer), kind=pl.lit(kind))


# ---------------------------------------------------------------------------------------------------------- steering


def typical_activation(ctx: RunContext, layer: str, kind: str, unit: int) -> tuple[float, tuple[int, int]]:
    """(the unit's max activation, its (first_active, last_active) steps) from the run's units table."""
    units = ctx.units(layer, kind)
    check_unit(kind, unit, units.height, layer)
    row = units.filter(pl.col("unit") == unit).row(0, named=True)
    return float(row["max"]), (int(row["first_active"]), int(row["last_active"]))


def resolve_strength(ctx: RunContext, spec: SteerSpec, sae) -> tuple[float, tuple[int, int] | None]:
    """(absolute strength, the unit's active window or None) for a spec."""
    need_units = spec.strength is None or spec.steps == "active"
    typical, active = typical_activation(ctx, spec.layer, spec.kind, spec.unit) if need_units else (0.0, None)
    if spec.strength is not None:
        return check_finite("strength", spec.strength), active
    scale = check_finite("scale", spec.scale)
    ref = typical * (decoder_norm(sae, spec.unit) if spec.kind == "feature" else 1.0)
    if ref <= 0 and scale != 0:
        raise DifflensError(f"{spec.kind} {spec.unit} of {spec.layer} never activates in this run (max 0), so a "
                            "relative scale means nothing; give an absolute --strength")
    return check_finite("strength", scale * ref), active


def steer(ctx: RunContext, spec: SteerSpec, concept: str | None = None,
          prompts: list[str] | None = None) -> InterventionResult:
    """Run one SteerSpec on ctx's run: baseline and steered image per seed, rows, grid and table shard. concept /
    prompts: concept_steering_report's target concept (scored into concept_hit) and one prompt per seed."""
    if spec.mode not in ("prior", "prompt"):
        raise DifflensError(f"unknown steering mode {spec.mode!r}; use prior or prompt")
    if spec.mode == "prompt" and not spec.prompt and prompts is None:
        raise DifflensError("mode prompt needs a prompt (--prompt \"...\")")
    seeds = [int(s) for s in spec.seeds]
    if not seeds:
        raise DifflensError("give at least one seed")
    model = ctx.get_model()
    n_channels = layer_channels(model, spec.layer)
    sae = ctx.get_sae(spec.layer) if spec.kind == "feature" else None
    if spec.kind == "channel":
        check_unit("channel", spec.unit, n_channels, spec.layer)
    direction_C = unit_direction(spec.kind, spec.unit, n_channels, sae)
    strength, active = resolve_strength(ctx, spec, sae)
    n_steps = spec.n_steps or ctx.run_steps
    window = step_window(spec.steps, n_steps, active, ctx.run_steps)
    schedule = strength_schedule(strength, window, n_steps)
    on_object = isinstance(spec.mask, str) and spec.mask == "object"
    if on_object and not is_demo(model):
        raise DifflensError("mask object needs the demo model (its shapes are found by the attribute scorer)")
    mask = None if on_object else load_mask(spec.mask, model.default_resolution[0])
    if spec.mode == "prior":
        prompts, guidance = [""] * len(seeds), 1.0
    else:
        prompts = prompts or [spec.prompt] * len(seeds)
        guidance = ctx.run_guidance if spec.guidance is None else spec.guidance
    baseline = to_uint8(edited_generate(model, spec.layer, prompts, seeds, None, n_steps, guidance))
    if on_object:
        mask = object_masks(baseline)
    steered = to_uint8(steered_generate(model, spec.layer, prompts, seeds, direction_C, schedule, mask, n_steps,
                                        guidance, spec.half))
    fx = effects(baseline, steered, is_demo(model))
    key = digest([asdict(spec), prompts, n_steps, guidance, strength])
    common = {"unit": spec.unit, "method": "steer", "mode": spec.mode, "strength": strength,
              "scale": spec.scale if spec.strength is None else float("nan"),
              "steps": describe_window(window, n_steps), "mask": _mask_name(spec.mask), "n_steps": n_steps,
              "guidance": guidance, "concept": concept, "spec": key}
    folder = f"media/steer/{safe_name(spec.layer)}/{spec.kind}-{spec.unit:05d}/{key}"
    base_folder = f"media/steer/baseline/{digest([prompts, seeds, n_steps, guidance])}"
    table = _rows_frame(_steer_rows(ctx.store, common, prompts, seeds, baseline, steered, fx, folder, base_folder),
                        INTERVENTIONS_SCHEMA)
    labels = [f"seed {s}" for s in seeds] + [f"{spec.kind} {spec.unit} x{strength:.3g} d={f.effect:.2f}" for f in fx]
    grid = write_grid(ctx.store, f"{folder}/grid.png", np.concatenate([baseline, steered]), labels, cols=len(seeds))
    shard = ctx.store.write_table_shard("interventions", f"steer-{spec.kind}-{spec.unit:05d}-{key}", table,
                                        layer=spec.layer, kind=spec.kind)
    return InterventionResult(_with_partition(table, spec.layer, spec.kind), grid, shard,
                              {"strength": strength, "window": window, "baseline": baseline, "steered": steered})


def _steer_rows(store: RunStore, common: dict, prompts: list[str], seeds: list[int], baseline: np.ndarray,
                steered: np.ndarray, fx: list[Effect], folder: str, base_folder: str) -> list[dict]:
    """One `interventions` row per seed, writing its steered and baseline PNGs."""
    rows = []
    concept = common["concept"]
    for i, (seed, prompt) in enumerate(zip(seeds, prompts, strict=True)):
        hit = None if concept is None or fx[i].attributes is None else _has_concept(fx[i].attributes, concept)
        rows.append({**common, "prompt": prompt, "seed": seed,
                     "image": store.write_png(f"{folder}/seed-{seed:06d}.png", steered[i]),
                     "baseline_image": store.write_png(f"{base_folder}/seed-{seed:06d}-{i:03d}.png", baseline[i]),
                     "effect": fx[i].effect, "attributes": to_json(fx[i].attributes),
                     "baseline_attributes": to_json(fx[i].baseline_attributes),
                     "changed_attributes": to_json(fx[i].changed), "concept_hit": hit})
    return rows


def _mask_name(mask) -> str:
    if mask is None:
        return ""
    return str(mask) if isinstance(mask, str | Path) else "array"


def steer_run(run_dir: str | Path, layer: str, kind: Kind, unit: int, scale: float = DEFAULT_SCALE,
              steps: Steps = "active", mask: str | None = None, mode: Mode = "prior", prompt: str | None = None,
              seeds: Sequence[int] = DEFAULT_SEEDS, strength: float | None = None, n_steps: int | None = None,
              guidance: float | None = None, half: Half = "both",
              model: DiffusionModel | None = None) -> InterventionResult:
    """Steer a run's unit (see SteerSpec); writes media/steer/... images and a grid, and `interventions` rows."""
    spec = SteerSpec(layer=layer, kind=kind, unit=int(unit), scale=float(scale), strength=strength,
                     steps=parse_steps(steps), mask=mask, mode=mode, prompt=prompt,
                     seeds=tuple(int(s) for s in seeds), n_steps=n_steps, guidance=guidance, half=half)
    ctx = open_run(run_dir, model)
    ctx.store.remove_stale_temporaries()
    return steer(ctx, spec)


# ---------------------------------------------------------------------------------------------------------- zeroing


def preset_features(units: pl.DataFrame | None, preset: str, n: int, n_latents: int) -> tuple[int, ...]:
    """Features a preset zeroes: none, all, the n most frequent (highest density in the `units` table of
    kind=feature) or the n rarest that ever fire (lowest density above 0)."""
    if preset not in PRESETS:
        raise DifflensError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    if preset == "none":
        return ()
    if preset == "all":
        return tuple(range(n_latents))
    if n <= 0:
        raise DifflensError(f"the number of features to zero must be positive; got {n}")
    alive = units.filter(pl.col("density") > 0)
    order = alive.sort(["density", "unit"], descending=[preset == "frequent", False])
    return tuple(int(u) for u in order["unit"].head(n))


def edit_run(run_dir: str | Path, layer: str, presets: Sequence[str] = PRESETS, n: int = 8,
             zero: Sequence[int] = (), scale: Sequence[int] = (), factor: float = 0.0,
             prompts: Sequence[str] | None = None, seeds: Sequence[int] = DEFAULT_SEEDS, steps: Steps = "all",
             n_steps: int | None = None, guidance: float | None = None,
             model: DiffusionModel | None = None) -> InterventionResult:
    """Zero / scale SAE features of layer and generate each edit next to the unedited image.

    Edits: each preset (none, frequent, rare, all: zero that many / every / no feature), a custom `zero` list, and,
    when `scale` lists features, scaling them by `factor` (negative too). Samples are prompts x seeds (default
    prompts: the run's first prompt). Writes media/edit/... and `interventions` rows (method zero or scale).
    """
    ctx = open_run(run_dir, model)
    ctx.store.remove_stale_temporaries()
    model = ctx.get_model()
    sae = ctx.get_sae(layer)
    edits = build_edits(ctx, layer, sae, presets, n, zero, scale, factor)
    n_steps = n_steps or ctx.run_steps
    guidance = ctx.run_guidance if guidance is None else guidance
    steps = parse_steps(steps)
    if steps == "active":
        raise DifflensError("an edit of several features has no active steps; use steps all, late or a window")
    window = step_window(steps, n_steps)
    fns = [_windowed(feature_edit(sae, e.zero, e.scale, e.factor), window) for e in edits]  # validates indices
    samples = _samples(ctx, prompts, seeds)
    s_prompts, s_seeds = [p for p, _ in samples], [s for _, s in samples]
    baseline = to_uint8(edited_generate(model, layer, s_prompts, s_seeds, None, n_steps, guidance))
    key = digest([layer, [asdict(e) for e in edits], samples, n_steps, guidance, window])
    folder = f"media/edit/{safe_name(layer)}/{key}"
    base_rel = [ctx.store.write_png(f"{folder}/baseline/{i:03d}-seed-{s:06d}.png", baseline[i])
                for i, s in enumerate(s_seeds)]
    common = {"mode": "edit", "strength": float("nan"), "steps": describe_window(window, n_steps), "mask": "",
              "n_steps": n_steps, "guidance": guidance, "spec": key}
    rows, grid_images, labels = [], [baseline], [f"seed {s}" for s in s_seeds]
    for edit, fn in zip(edits, fns, strict=True):
        images = to_uint8(edited_generate(model, layer, s_prompts, s_seeds, fn, n_steps, guidance))
        fx = effects(baseline, images, is_demo(model))
        rels = [ctx.store.write_png(f"{folder}/{safe_name(edit.name)}/{i:03d}-seed-{s:06d}.png", images[i])
                for i, s in enumerate(s_seeds)]
        rows += [_edit_row(common, edit, p, s, rel, base, f) for p, s, rel, base, f in
                 zip(s_prompts, s_seeds, rels, base_rel, fx, strict=True)]
        grid_images.append(images)
        labels += [f"{edit.name} d={f.effect:.2f}" for f in fx]
    table = _rows_frame(rows, INTERVENTIONS_SCHEMA)
    grid = write_grid(ctx.store, f"{folder}/grid.png", np.concatenate(grid_images), labels, cols=len(samples))
    shard = ctx.store.write_table_shard("interventions", f"edit-{key}", table, layer=layer, kind="feature")
    return InterventionResult(_with_partition(table, layer, "feature"), grid, shard, {"edits": edits})


def build_edits(ctx: RunContext, layer: str, sae, presets: Sequence[str], n: int, zero: Sequence[int],
                scale: Sequence[int], factor: float) -> list[FeatureEdit]:
    """The FeatureEdits of edit_run: one per preset, a custom zero list, a scaled set."""
    units = ctx.units(layer, "feature") if any(p in ("frequent", "rare") for p in presets) else None
    edits = [FeatureEdit(p, zero=preset_features(units, p, n, sae.cfg.n_latents)) for p in presets]
    if zero:
        edits.append(FeatureEdit("custom", zero=tuple(int(u) for u in zero)))
    if scale:
        edits.append(FeatureEdit(f"scale x{check_finite('factor', factor):g}", scale=tuple(int(u) for u in scale),
                                 factor=factor))
    if not edits:
        raise DifflensError("nothing to do: give a preset, --zero features or --scale features")
    return edits


def _edit_row(common: dict, edit: FeatureEdit, prompt: str, seed: int, image: str, baseline_image: str,
              fx: Effect) -> dict:
    return {**common, "unit": edit.zero[0] if len(edit.zero) == 1 and not edit.scale else -1,
            "method": "scale" if edit.scale else "zero", "prompt": prompt, "seed": seed,
            "scale": edit.factor if edit.scale else 0.0, "features": list(edit.scale or edit.zero),
            "preset": edit.name, "image": image, "baseline_image": baseline_image, "effect": fx.effect,
            "attributes": to_json(fx.attributes), "baseline_attributes": to_json(fx.baseline_attributes),
            "changed_attributes": to_json(fx.changed), "concept": None, "concept_hit": None}


def _windowed(edit: Edit, window: tuple[int, int]) -> Edit:
    """edit at the window's steps, identity elsewhere."""
    def inner(tokens_BTC: torch.Tensor, step: int) -> torch.Tensor:
        return edit(tokens_BTC, step) if window[0] <= step <= window[1] else tokens_BTC

    return inner


def _samples(ctx: RunContext, prompts: Sequence[str] | None, seeds: Sequence[int]) -> list[tuple[str, int]]:
    if prompts is None:
        gens = ctx.store.read_table("generations").sort("gen_id")
        prompts = gens["prompt"].head(1).to_list()
    seeds = [int(s) for s in seeds]
    if not prompts or not seeds:
        raise DifflensError("give at least one prompt and one seed")
    return [(p, s) for p in prompts for s in seeds]


# ---------------------------------------------------------------------------------------------------------- concepts


def _has_concept(attrs: dict[str, str], concept: str) -> bool:
    key, _, value = concept.partition("=")
    return attrs.get(key) == value


def concept_prompts(concept: str, seeds: Sequence[int], seed: int = 0) -> list[str]:
    """One demo prompt per seed that lacks the concept: random attributes, the concept's attribute set to another
    value (cycling through the others)."""
    from backend.demo import shapes

    key, _, value = concept.partition("=")
    if key not in shapes.ATTRIBUTES or value not in shapes.ATTRIBUTES[key]:
        raise DifflensError(f"concept {concept!r} is not a demo attribute value")
    others = [v for v in shapes.ATTRIBUTES[key] if v != value]
    specs = shapes.random_specs(len(seeds), np.random.default_rng(seed))
    out = []
    for i, spec in enumerate(specs):
        attrs = spec.attributes() | {key: others[i % len(others)]}
        out.append(shapes.prompt_for(attrs))
    return out


def best_concept_units(ctx: RunContext, layer: str | None, kind: str, attributes: Sequence[str],
                       tie: float = AUROC_TIE) -> pl.DataFrame:
    """The unit to steer per (layer, concept) of the given attributes: the concepts table's best AUROC, ties (within
    `tie` of the best, e.g. several features at AUROC 1.0) broken by the largest `max` activation in the units
    table: among equally good detectors, the one that fires hardest. Columns layer, concept, unit, auroc, rank."""
    try:
        concepts = ctx.store.read_table("concepts")
    except Exception as exc:  # no files: polars raises on an empty glob
        raise DifflensError(f"{ctx.store.root} has no concepts table; run `python cli.py analyze` on a run whose "
                            "prompts carry attributes (the demo prompts do)") from exc
    rows = concepts.filter((pl.col("kind") == kind)
                           & pl.col("concept").str.split("=").list.first().is_in(list(attributes)))
    if layer is not None:
        rows = rows.filter(pl.col("layer") == layer)
    if rows.is_empty():
        where = f"layer {layer}" if layer else "any layer"
        raise DifflensError(f"the concepts table has no {kind} for {', '.join(attributes)} on {where}")
    maxima = pl.concat([ctx.units(lyr, kind).select("unit", "max").with_columns(layer=pl.lit(lyr))
                        for lyr in rows["layer"].unique().sort()])
    rows = rows.join(maxima, on=["layer", "unit"], how="left").with_columns(pl.col("max").fill_null(0.0))
    top = pl.col("auroc").max().over(["layer", "concept"])
    return (rows.filter(pl.col("auroc") >= top - tie)
            .sort(["layer", "concept", "max", "rank"], descending=[False, False, True, False])
            .unique(["layer", "concept"], keep="first", maintain_order=True)
            .select("layer", "concept", "unit", "auroc", "rank"))


def clean_hit(attrs: dict[str, str], baseline: dict[str, str], concept: str) -> bool:
    """The image took the concept and every other attribute is as in the baseline (a blue shape turned red, and
    nothing else changed)."""
    key = concept.partition("=")[0]
    return _has_concept(attrs, concept) and all(attrs[k] == baseline[k] for k in baseline if k != key)


def concept_steering_report(run_dir: str | Path, layer: str | None = None, kind: Kind = "feature",
                            scale: float = REPORT_SCALE, steps: Steps = "late", mask: str | None = "object",
                            seeds: Sequence[int] = tuple(range(10)), attributes: Sequence[str] = ("colour",),
                            n_steps: int | None = None, guidance: float | None = None,
                            model: DiffusionModel | None = None) -> pl.DataFrame:
    """Per concept, steer its best unit (best_concept_units: top AUROC in `concepts`, ties broken by activation) on
    prompts that lack the concept ("steer a prompt", one prompt per seed) and count the seeds whose image, scored by
    shapes.score_image, takes the concept.

    Defaults (chosen on the demo model, see REPORT_SCALE): the second half of the steps, under each baseline
    image's object mask. Writes `steering_success` (concept, unit, auroc, rank, scale, strength, steps, mask, n_steps,
    guidance, seeds, hits, rate, clean_hits, clean_rate, baseline_hits; partitioned by layer and kind) plus the
    `interventions` rows and images; returns the table. hits: the image takes the concept; clean_hits: and no
    other attribute changed; baseline_hits: unsteered images that already show it (should be 0).
    The demo model only: other models have no attribute scorer.
    """
    ctx = open_run(run_dir, model)
    ctx.store.remove_stale_temporaries()
    if not is_demo(ctx.get_model()):
        raise DifflensError("the concept steering report needs the demo model (its attributes are scored from pixels)")
    best = best_concept_units(ctx, layer, kind, attributes)
    seeds = tuple(int(s) for s in seeds)
    frames = []
    for (lyr,), rows in best.group_by(["layer"], maintain_order=True):
        out = [_concept_row(ctx, lyr, kind, r, scale, steps, mask, seeds, n_steps, guidance)
               for r in rows.iter_rows(named=True)]
        table = _rows_frame(out, SUCCESS_SCHEMA)
        name = f"part-{digest([scale, steps, mask, seeds, list(attributes), n_steps, guidance])}"
        ctx.store.write_table_shard("steering_success", name, table, layer=lyr, kind=kind)
        frames.append(_with_partition(table, lyr, kind))
    return pl.concat(frames)


def _concept_row(ctx: RunContext, layer: str, kind: Kind, best: dict, scale: float, steps: Steps, mask: str | None,
                 seeds: tuple[int, ...], n_steps: int | None, guidance: float | None) -> dict:
    concept = best["concept"]
    spec = SteerSpec(layer=layer, kind=kind, unit=int(best["unit"]), scale=float(scale), steps=parse_steps(steps),
                     mask=mask, mode="prompt", prompt="", seeds=seeds, n_steps=n_steps, guidance=guidance)
    res = steer(ctx, spec, concept=concept, prompts=concept_prompts(concept, seeds))
    after = [json.loads(a) for a in res.rows["attributes"]]
    before = [json.loads(a) for a in res.rows["baseline_attributes"]]
    hits = sum(_has_concept(a, concept) for a in after)
    clean = sum(clean_hit(a, b, concept) for a, b in zip(after, before, strict=True))
    first = res.rows.row(0, named=True)
    return {"concept": concept, "unit": spec.unit, "auroc": float(best["auroc"]), "rank": int(best["rank"]),
            "scale": float(scale),
            "strength": float(res.extra["strength"]), "steps": first["steps"], "mask": first["mask"],
            "n_steps": first["n_steps"], "guidance": first["guidance"], "seeds": len(seeds), "hits": hits,
            "rate": hits / len(seeds), "clean_hits": clean, "clean_rate": clean / len(seeds),
            "baseline_hits": sum(_has_concept(b, concept) for b in before)}
