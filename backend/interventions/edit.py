"""Feature edits: zero or scale SAE features of a layer while generating, and compare with the unedited images.

This module owns
  - `feature_edit`, the error-preserving SAE splice handed to hooks.edit_activations, and `FeatureEdit` (one edit:
    features to zero, features to scale by a factor);
  - the presets of `edit_run` (`preset_features`: none, the n most frequent, the n rarest that fire, all) and
    `build_edits`;
  - `edit_run`: each edit next to the unedited image on prompts x seeds of a run, writing `interventions` rows
    (method zero or scale, partition kind=feature), media/edit/ images and a grid.

Zeroing / scaling. With codes = encode(x), the layer receives decode(edited codes) + (x - decode(codes)): the SAE's
reconstruction error is kept, so only the edit changes the output. It is computed as
x + (decode(edited) - decode(codes)) = x + sum_k (edited_k - codes_k) W_dec[k], which equals the splice exactly
in real arithmetic and returns x bit for bit when nothing is edited.

Feature edits are applied to both CFG halves, for the reason steering is (see backend/interventions/steer.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from backend.errors import DifflensError
from backend.interventions.effects import Effect, effects, is_demo
from backend.interventions.generate import DEFAULT_SEEDS, Edit, edited_generate, run_conditions, windowed
from backend.interventions.media import (
    InterventionResult,
    digest,
    safe_name,
    to_json,
    with_partition,
    write_grid,
)
from backend.interventions.windows import Steps, check_finite, describe_window, parse_steps, step_window
from backend.models.base import DiffusionModel, to_uint8
from backend.run.context import RunContext, as_context, check_unit
from backend.run.schema import is_feature

PRESETS = ("none", "frequent", "rare", "all")


@dataclass(frozen=True)
class FeatureEdit:
    """One edit of SAE codes: zero some features, scale others by factor (zero wins when both list one)."""

    name: str
    zero: tuple[int, ...] = ()
    scale: tuple[int, ...] = ()
    factor: float = 1.0


def feature_edit(sae, zero: Sequence[int] = (), scale: Sequence[int] = (), factor: float = 1.0) -> Edit:
    """An edit splicing decode(edited codes) + (x - decode(codes)) into the layer: zero the features in `zero`,
    multiply those in `scale` by factor (negative allowed). Computed as x + sae.decode_change(codes, edited):
    sum_k (edited_k - codes_k) W_dec[k], times the token's scale for per-token normalised SAEs."""
    n = sae.cfg.n_latents
    factor = check_finite("factor", factor)
    zero = sorted({check_unit("feature", u, n) for u in zero})  # (the kind only names the unit in an error)
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
        delta_NC = sae.decode_change(codes, new)
        return tokens_BTC + delta_NC.to(tokens_BTC.device, tokens_BTC.dtype).reshape(b, t, c)

    return edit


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
             model: DiffusionModel | None = None, kind: str = "feature") -> InterventionResult:
    """Zero / scale SAE features of layer and generate each edit next to the unedited image.

    kind names the SAE: feature (the layer's default SAE) or feature.<sae_id>; its rows go to that partition.

    Edits: each preset (none, frequent, rare, all: zero that many / every / no feature), a custom `zero` list, and,
    when `scale` lists features, scaling them by `factor` (negative too). Samples are prompts x seeds (default
    prompts: the run's first prompt). Writes media/edit/... and `interventions` rows (method zero or scale).
    """
    ctx = as_context(run_dir, model=model).require_generator("edit")
    ctx.store.remove_stale_temporaries()
    model = ctx.model
    if not is_feature(ctx.check_kind(layer, kind)):
        raise DifflensError(f"edits change SAE features: kind {kind!r} is not one; use feature or feature.<sae_id>")
    sae = ctx.sae(layer, kind)
    edits = build_edits(ctx, layer, sae, presets, n, zero, scale, factor, kind)
    n_steps = n_steps or ctx.n_steps
    guidance = ctx.guidance if guidance is None else guidance
    steps = parse_steps(steps)
    if steps == "active":
        raise DifflensError("an edit of several features has no active steps; use steps all, late or a window")
    window = step_window(steps, n_steps)
    fns = [windowed(feature_edit(sae, e.zero, e.scale, e.factor), window) for e in edits]  # validates indices
    samples = _samples(ctx, prompts, seeds)
    s_prompts, s_seeds = [p for p, _ in samples], [s for _, s in samples]
    conditions = run_conditions(ctx, s_prompts, guidance)  # the run's generations: their negatives, control images
    baseline = to_uint8(edited_generate(model, layer, s_prompts, s_seeds, None, n_steps, guidance,
                                        conditions=conditions))
    key = digest([layer, [asdict(e) for e in edits], samples, n_steps, guidance, window]
                 + ([] if kind == "feature" else [kind])  # (the default SAE's digests as before)
                 + ([conditions] if conditions else []))
    folder = f"media/edit/{safe_name(layer)}/{key}"
    base_rel = [ctx.store.write_png(f"{folder}/baseline/{i:03d}-seed-{s:06d}.png", baseline[i])
                for i, s in enumerate(s_seeds)]
    common = {"mode": "edit", "strength": float("nan"), "steps": describe_window(window, n_steps), "mask": "",
              "n_steps": n_steps, "guidance": guidance, "spec": key}
    rows, grid_images, labels = [], [baseline], [f"seed {s}" for s in s_seeds]
    for edit, fn in zip(edits, fns, strict=True):
        images = to_uint8(edited_generate(model, layer, s_prompts, s_seeds, fn, n_steps, guidance,
                                          conditions=conditions))
        fx = effects(baseline, images, is_demo(model))
        rels = [ctx.store.write_png(f"{folder}/{safe_name(edit.name)}/{i:03d}-seed-{s:06d}.png", images[i])
                for i, s in enumerate(s_seeds)]
        rows += [_edit_row(common, edit, p, s, rel, base, f) for p, s, rel, base, f in
                 zip(s_prompts, s_seeds, rels, base_rel, fx, strict=True)]
        grid_images.append(images)
        labels += [f"{edit.name} d={f.effect:.2f}" for f in fx]
    table = ctx.store.table_from_rows("interventions", rows)
    grid = write_grid(ctx.store, f"{folder}/grid.png", np.concatenate(grid_images), labels, cols=len(samples))
    shard = ctx.store.write_table_shard("interventions", f"edit-{key}", table, layer=layer, kind=kind)
    return InterventionResult(with_partition(table, layer, kind), grid, shard, {"edits": edits})


def build_edits(ctx: RunContext, layer: str, sae, presets: Sequence[str], n: int, zero: Sequence[int],
                scale: Sequence[int], factor: float, kind: str = "feature") -> list[FeatureEdit]:
    """The FeatureEdits of edit_run: one per preset, a custom zero list, a scaled set."""
    units = ctx.units(layer, kind) if any(p in ("frequent", "rare") for p in presets) else None
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


def _samples(ctx: RunContext, prompts: Sequence[str] | None, seeds: Sequence[int]) -> list[tuple[str, int]]:
    if prompts is None:
        prompts = ctx.generations()["prompt"].head(1).to_list()
    seeds = [int(s) for s in seeds]
    if not prompts or not seeds:
        raise DifflensError("give at least one prompt and one seed")
    return [(p, s) for p in prompts for s in seeds]
