"""Steering: add strength x a unit's direction to a layer's output while generating, and compare with the baseline.

This module owns
  - `SteerSpec` (one steering experiment on a run) and `steer_run` / `steer`, which run it: baseline and steered
    image per seed, `interventions` rows (method steer), media/steer/ images and a grid;
  - `steering_edit` (the edit handed to hooks.edit_activations: tokens + strength[step] x direction, one vector or
    one per step and token position, optionally weighted per token by a mask) and `steered_generate`;
  - the strength of a run-level steering (`resolve_strength`, `typical_activation`).
Directions come from backend/interventions/directions.py, step windows from windows.py, masks from masks.py.

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
direction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import polars as pl
import torch

from backend.errors import DifflensError
from backend.interventions.directions import Kind, decoder_norm, unit_direction
from backend.interventions.effects import Effect, effects, has_concept, is_demo
from backend.interventions.generate import DEFAULT_SEEDS, Edit, edited_generate, run_conditions
from backend.interventions.masks import check_mask_nonempty, load_mask, mask_name, object_masks, token_weights
from backend.interventions.media import (
    InterventionResult,
    digest,
    safe_name,
    to_json,
    with_partition,
    write_grid,
)
from backend.interventions.windows import (
    Steps,
    check_finite,
    describe_window,
    parse_steps,
    step_window,
    strength_schedule,
)
from backend.models.base import DiffusionModel, to_uint8
from backend.models.hooks import Half
from backend.run.context import RunContext, as_context, check_unit
from backend.run.schema import is_feature
from backend.run.store import RunStore

if TYPE_CHECKING:
    from backend.interventions.concept_directions import Direction

Mode = Literal["prior", "prompt"]

DEFAULT_SCALE = 4.0
"""Default relative steering strength of steer_run (scale x the unit's max activation)."""


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
    """"active" (the unit's first..last active step in the run), "all", "late" (second half), "peaks" (the unit's
    peak steps +- peak_radius, as PriorConfig.steps), or an inclusive (first, last) window."""
    peak_radius: int = 1
    """With steps "peaks": steps on either side of each peak that are steered too."""
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


def steering_edit(direction: torch.Tensor, strength_by_step: Sequence[float],
                  mask_T: np.ndarray | torch.Tensor | None = None) -> Edit:
    """An edit for hooks.edit_activations: tokens [B, T, C] + strength_by_step[step] x direction, weighted per
    token by the mask: [T], a [H, W] mask laid over the layer's grid, or [N, H, W] one per prompt (see
    token_weights). The direction is one vector [C] for every token, or one per step and token position [S, T, C]
    (a matched direction, concept_directions.matched_direction: step s adds direction[s]). Steps beyond the schedule
    (or beyond S) and steps of strength 0 are left untouched (bit for bit)."""
    strengths = [check_finite("strength", s) for s in strength_by_step]
    direction = torch.as_tensor(direction, dtype=torch.float32)
    if direction.ndim not in (1, 3):
        raise DifflensError(f"a steering direction is one vector [C] or one per step and token position [S, T, C]; "
                            f"got shape {tuple(direction.shape)}")
    if not torch.isfinite(direction).all():
        raise DifflensError("the steering direction is not finite")
    if mask_T is not None:
        masks = np.asarray(mask_T, dtype=np.float32)
        for m in (masks if masks.ndim == 3 else [masks]):
            check_mask_nonempty(m)
    per_step = direction.ndim == 3
    cache: dict = {}

    def edit(tokens_BTC: torch.Tensor, step: int) -> torch.Tensor:
        s = strengths[step] if 0 <= step < len(strengths) else 0.0
        if s == 0.0 or (per_step and step >= direction.shape[0]):
            return tokens_BTC
        b, t, c = tokens_BTC.shape
        key = (tokens_BTC.device, tokens_BTC.dtype, b, t)
        if key not in cache:
            if direction.shape[-1] != c:
                raise DifflensError(f"the direction has {direction.shape[-1]} channels but the layer has {c}")
            if per_step and direction.shape[1] != t:
                raise DifflensError(f"the direction has {direction.shape[1]} token positions but the layer has {t} "
                                    "at this resolution; steer at the run's resolution")
            d = direction.to(tokens_BTC.device, tokens_BTC.dtype)
            weights = None if mask_T is None else token_weights(mask_T, t, b).to(d)  # [1|B, T, 1]
            # one vector: its masked product once ([C] or [1|B, T, C]); per step: the weights, applied per step
            cache[key] = (d if weights is None else weights * d, None) if not per_step else (d, weights)
        d, weights = cache[key]
        if per_step:
            d = d[step] if weights is None else weights * d[step]
        return tokens_BTC + s * d

    return edit


def steered_generate(model: DiffusionModel, layer: str, prompts: list[str], seeds: list[int],
                     direction: torch.Tensor, strength_by_step: Sequence[float],
                     mask_T: np.ndarray | torch.Tensor | None = None, n_steps: int | None = None,
                     guidance: float | None = None, half: Half = "both",
                     conditions: dict | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] generated while layer's output gets strength_by_step[step] x direction ([C], or [S, T, C]
    per step and token position: steering_edit) (under mask); conditions: generate()'s negative prompts / control
    images (generate.run_conditions)."""
    return edited_generate(model, layer, prompts, seeds, steering_edit(direction, strength_by_step, mask_T),
                           n_steps, guidance, half, conditions)


def typical_activation(ctx: RunContext, layer: str, kind: str, unit: int) -> tuple[float, tuple[int, int]]:
    """(the unit's max activation, its (first_active, last_active) steps) from the run's units table."""
    units = ctx.units(layer, kind)
    check_unit(kind, unit, units.height, layer)
    row = units.filter(pl.col("unit") == unit).row(0, named=True)
    return float(row["max"]), (int(row["first_active"]), int(row["last_active"]))


def resolve_strength(ctx: RunContext, spec: SteerSpec, sae) -> tuple[float, tuple[int, int] | None]:
    """(absolute strength, the unit's active window or None) for a spec."""
    need_units = spec.strength is None or spec.steps in ("active", "peaks")
    typical, active = typical_activation(ctx, spec.layer, spec.kind, spec.unit) if need_units else (0.0, None)
    if spec.strength is not None:
        return check_finite("strength", spec.strength), active
    scale = check_finite("scale", spec.scale)
    ref = typical * (decoder_norm(sae, spec.unit) if is_feature(spec.kind) else 1.0)
    if ref <= 0 and scale != 0:
        raise DifflensError(f"{spec.kind} {spec.unit} of {spec.layer} never activates in this run (max 0), so a "
                            "relative scale means nothing; give an absolute --strength")
    return check_finite("strength", scale * ref), active


def spec_settings(spec: SteerSpec) -> dict:
    """The settings a steering's digest is made of (peak_radius only with steps "peaks", so steerings made before
    it existed keep their digests)."""
    out = asdict(spec)
    if spec.steps != "peaks":
        out.pop("peak_radius")
    return out


def peak_schedule(ctx: RunContext, spec: SteerSpec, strength: float,
                  n_steps: int) -> tuple[list[float], tuple[int, int], str]:
    """(strength by step, the (first, last) steered step, the steered steps as "3,4,5,9") of steps "peaks": the
    unit's peak steps +- peak_radius, as a prior steers them (priors.steered_steps; every step when it has none)."""
    from backend.interventions.priors import steered_steps
    from backend.run.config import PriorConfig

    if spec.peak_radius < 0:
        raise DifflensError(f"peak_radius must be >= 0 (got {spec.peak_radius})")
    row = ctx.units(spec.layer, spec.kind).filter(pl.col("unit") == spec.unit).row(0, named=True)
    steps = steered_steps(PriorConfig(steps="peaks", peak_radius=spec.peak_radius), row, n_steps, ctx.n_steps)
    schedule = [check_finite("strength", strength) if s in steps else 0.0 for s in range(n_steps)]
    return schedule, (steps[0], steps[-1]), ",".join(map(str, steps))


def steer(ctx: RunContext, spec: SteerSpec, concept: str | None = None,
          prompts: list[str] | None = None, direction: Direction | None = None) -> InterventionResult:
    """Run one SteerSpec on ctx's run: baseline and steered image per seed, rows, grid and table shard. concept /
    prompts: concept_steering_report's target concept (scored into concept_hit) and one prompt per seed.
    direction: steer along a concept direction (concept_directions.py) instead of the spec's unit: its vector, its
    natural size as the scale's reference, rows with unit -1 in the partition of its kind."""
    if spec.mode not in ("prior", "prompt"):
        raise DifflensError(f"unknown steering mode {spec.mode!r}; use prior or prompt")
    if spec.mode == "prompt" and not spec.prompt and prompts is None:
        raise DifflensError("mode prompt needs a prompt (--prompt \"...\")")
    seeds = [int(s) for s in spec.seeds]
    if not seeds:
        raise DifflensError("give at least one seed")
    model = ctx.model
    if direction is not None:
        # a matched direction is added per step and token position
        added = direction.vector_C if direction.deltas_STC is None else direction.deltas_STC
        strength, active = direction_strength(spec, direction)
        spec = replace(spec, kind=direction.kind, unit=-1)
    else:
        n_channels = ctx.n_channels(spec.layer)
        sae = ctx.sae(spec.layer, spec.kind) if is_feature(ctx.check_kind(spec.layer, spec.kind)) else None
        if spec.kind == "channel":
            ctx.check_unit(spec.layer, "channel", spec.unit)
        added = unit_direction(spec.kind, spec.unit, n_channels, sae)
        strength, active = resolve_strength(ctx, spec, sae)
    n_steps = spec.n_steps or ctx.n_steps
    if spec.steps == "peaks":
        schedule, window, described = peak_schedule(ctx, spec, strength, n_steps)
    else:
        window = step_window(spec.steps, n_steps, active, ctx.n_steps)
        schedule, described = strength_schedule(strength, window, n_steps), describe_window(window, n_steps)
    on_object = isinstance(spec.mask, str) and spec.mask == "object"
    if on_object and not is_demo(model):
        raise DifflensError("mask object needs the demo model (its shapes are found by the attribute scorer)")
    mask = None if on_object else load_mask(spec.mask, model.default_resolution[0])
    if spec.mode == "prior":
        prompts, guidance, conditions = [""] * len(seeds), 1.0, {}
    else:  # the run's generation of a prompt: with the negative prompt and control image the run gave it
        prompts = prompts or [spec.prompt] * len(seeds)
        guidance = ctx.guidance if spec.guidance is None else spec.guidance
        conditions = run_conditions(ctx, prompts, guidance)
    baseline = to_uint8(edited_generate(model, spec.layer, prompts, seeds, None, n_steps, guidance,
                                        conditions=conditions))
    if on_object:
        mask = object_masks(baseline)
    steered = to_uint8(steered_generate(model, spec.layer, prompts, seeds, added, schedule, mask, n_steps,
                                        guidance, spec.half, conditions))
    fx = effects(baseline, steered, is_demo(model))
    given = [conditions] if conditions else []  # (digests of generations without conditions as before)
    deltas = ([] if direction is None or direction.deltas_STC is None else
              [hashlib.sha256(direction.deltas_STC.float().numpy().tobytes()).hexdigest()])
    key = digest([spec_settings(spec), prompts, n_steps, guidance, strength]
                 + ([] if direction is None else [direction.name, direction.vector_C.tolist(), *deltas]) + given)
    common = {"unit": spec.unit, "method": "steer", "mode": spec.mode, "strength": strength,
              "scale": spec.scale if spec.strength is None else float("nan"),
              "steps": described, "mask": mask_name(spec.mask), "n_steps": n_steps,
              "guidance": guidance, "concept": concept, "spec": key}
    folder = (f"media/steer/{safe_name(spec.layer)}/{spec.kind}-{spec.unit:05d}/{key}" if direction is None else
              f"media/steer/{safe_name(spec.layer)}/direction-{safe_name(direction.name)}/{key}")
    base_folder = f"media/steer/baseline/{digest([prompts, seeds, n_steps, guidance, *given])}"
    table = ctx.store.table_from_rows(
        "interventions", _steer_rows(ctx.store, common, prompts, seeds, baseline, steered, fx, folder, base_folder))
    what = f"{spec.kind} {spec.unit}" if direction is None else direction.name
    labels = [f"seed {s}" for s in seeds] + [f"{what} x{strength:.3g} d={f.effect:.2f}" for f in fx]
    grid = write_grid(ctx.store, f"{folder}/grid.png", np.concatenate([baseline, steered]), labels, cols=len(seeds))
    shard_name = f"steer-{spec.kind}-{spec.unit:05d}-{key}" if direction is None else f"steer-direction-{key}"
    shard = ctx.store.write_table_shard("interventions", shard_name, table,
                                        layer=spec.layer, kind=spec.kind)
    return InterventionResult(with_partition(table, spec.layer, spec.kind), grid, shard,
                              {"strength": strength, "window": window, "baseline": baseline, "steered": steered})


def direction_strength(spec: SteerSpec, direction: Direction) -> tuple[float, None]:
    """(absolute strength, None) of a steering along a direction: spec.strength, else spec.scale x the direction's
    natural size (diff-in-means: scale 1 moves the average other generation to the concept's average)."""
    if spec.strength is not None:
        return check_finite("strength", spec.strength), None
    return check_finite("strength", check_finite("scale", spec.scale) * direction.norm), None


def _steer_rows(store: RunStore, common: dict, prompts: list[str], seeds: list[int], baseline: np.ndarray,
                steered: np.ndarray, fx: list[Effect], folder: str, base_folder: str) -> list[dict]:
    """One `interventions` row per seed, writing its steered and baseline PNGs."""
    rows = []
    concept = common["concept"]
    for i, (seed, prompt) in enumerate(zip(seeds, prompts, strict=True)):
        hit = None if concept is None or fx[i].attributes is None else has_concept(fx[i].attributes, concept)
        rows.append({**common, "prompt": prompt, "seed": seed,
                     "image": store.write_png(f"{folder}/seed-{seed:06d}.png", steered[i]),
                     "baseline_image": store.write_png(f"{base_folder}/seed-{seed:06d}-{i:03d}.png", baseline[i]),
                     "effect": fx[i].effect, "attributes": to_json(fx[i].attributes),
                     "baseline_attributes": to_json(fx[i].baseline_attributes),
                     "changed_attributes": to_json(fx[i].changed), "concept_hit": hit})
    return rows


def steer_run(run_dir: str | Path, layer: str, kind: Kind, unit: int, scale: float = DEFAULT_SCALE,
              steps: Steps = "active", mask: str | None = None, mode: Mode = "prior", prompt: str | None = None,
              seeds: Sequence[int] = DEFAULT_SEEDS, strength: float | None = None, n_steps: int | None = None,
              guidance: float | None = None, half: Half = "both", peak_radius: int = 1,
              model: DiffusionModel | None = None) -> InterventionResult:
    """Steer a run's unit (see SteerSpec); writes media/steer/... images and a grid, and `interventions` rows."""
    spec = SteerSpec(layer=layer, kind=kind, unit=int(unit), scale=float(scale), strength=strength,
                     steps="peaks" if steps == "peaks" else parse_steps(steps), mask=mask, mode=mode, prompt=prompt,
                     seeds=tuple(int(s) for s in seeds), n_steps=n_steps, guidance=guidance, half=half,
                     peak_radius=int(peak_radius))
    ctx = as_context(run_dir, model=model).require_generator("steer")
    ctx.store.remove_stale_temporaries()
    return steer(ctx, spec)
