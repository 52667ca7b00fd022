"""Concept steering (demo model): does steering a concept's best unit make images show that concept?

This module owns
  - `best_concept_units`: the unit to steer per (layer, concept), from the `concepts` table (best AUROC, ties broken
    by activation in the `units` table);
  - `concept_prompts` (demo prompts that lack a concept) and `clean_hit` (the image took the concept and nothing
    else changed);
  - `concept_steering_report`, which steers each concept's best unit (backend/interventions/steer.py) and writes the
    `steering_success` table beside the `interventions` rows and images.

Concept steering steers each concept's best feature on prompts that lack the concept, at the late steps (the demo's
colours are settled in the last denoising steps: steering only steps 10-16 of 20 changed nothing) and under each
baseline image's object mask (steering every token also tints the background), and counts the seeds whose scored
image takes the concept (`hits`) and those where nothing else changed (`clean_hits`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from backend.errors import DifflensError
from backend.interventions.directions import Kind
from backend.interventions.effects import has_concept, is_demo
from backend.interventions.media import digest, with_partition
from backend.interventions.steer import SteerSpec, steer
from backend.interventions.windows import Steps, parse_steps
from backend.models.base import DiffusionModel
from backend.run.context import RunContext, as_context

REPORT_SCALE = 6.0
"""Default scale of concept_steering_report (with steps "late" and mask "object"). Chosen on the shipped demo
model, layer up_blocks.1.attentions.1: at 6 the best feature of every colour turned 10/10 calibration seeds (two
different SAEs) and 20/20 held-out seeds of runs/demo to its colour; at 4-5 some colours stayed below 80%, and
above 8 more images lose their other attributes (shape, size) as well."""
AUROC_TIE = 0.002
"""concept_steering_report: features within this AUROC of a concept's best count as tied (see best_concept_units)."""


def concept_prompts(concept: str, seeds: Sequence[int], seed: int = 0) -> list[str]:
    """One demo prompt per seed that lacks the concept: random attributes, the concept's attribute set to another
    value (cycling through the others)."""
    from backend.demo import shapes

    return [shapes.prompt_for(a) for a in concept_prompt_attributes(concept, seeds, seed)]


def concept_prompt_attributes(concept: str, seeds: Sequence[int], seed: int = 0) -> list[dict[str, str]]:
    """The attributes of concept_prompts' prompts (the same draw), one dict per seed."""
    from backend.demo import shapes

    key, _, value = concept.partition("=")
    if key not in shapes.ATTRIBUTES or value not in shapes.ATTRIBUTES[key]:
        raise DifflensError(f"concept {concept!r} is not a demo attribute value")
    others = [v for v in shapes.ATTRIBUTES[key] if v != value]
    specs = shapes.random_specs(len(seeds), np.random.default_rng(seed))
    return [spec.attributes() | {key: others[i % len(others)]} for i, spec in enumerate(specs)]


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
    return has_concept(attrs, concept) and all(attrs[k] == baseline[k] for k in baseline if k != key)


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
    ctx = as_context(run_dir, model=model).require_generator("steer-report")
    ctx.store.remove_stale_temporaries()
    if not is_demo(ctx.model):
        raise DifflensError("the concept steering report needs the demo model (its attributes are scored from pixels)")
    best = best_concept_units(ctx, layer, kind, attributes)
    seeds = tuple(int(s) for s in seeds)
    frames = []
    for (lyr,), rows in best.group_by(["layer"], maintain_order=True):
        out = [_concept_row(ctx, lyr, kind, r, scale, steps, mask, seeds, n_steps, guidance)
               for r in rows.iter_rows(named=True)]
        table = ctx.store.table_from_rows("steering_success", out)
        name = f"part-{digest([scale, steps, mask, seeds, list(attributes), n_steps, guidance])}"
        ctx.store.write_table_shard("steering_success", name, table, layer=lyr, kind=kind)
        frames.append(with_partition(table, lyr, kind))
    return pl.concat(frames)


def _concept_row(ctx: RunContext, layer: str, kind: Kind, best: dict, scale: float, steps: Steps, mask: str | None,
                 seeds: tuple[int, ...], n_steps: int | None, guidance: float | None) -> dict:
    concept = best["concept"]
    spec = SteerSpec(layer=layer, kind=kind, unit=int(best["unit"]), scale=float(scale), steps=parse_steps(steps),
                     mask=mask, mode="prompt", prompt="", seeds=seeds, n_steps=n_steps, guidance=guidance)
    res = steer(ctx, spec, concept=concept, prompts=concept_prompts(concept, seeds))
    after = [json.loads(a) for a in res.rows["attributes"]]
    before = [json.loads(a) for a in res.rows["baseline_attributes"]]
    hits = sum(has_concept(a, concept) for a in after)
    clean = sum(clean_hit(a, b, concept) for a, b in zip(after, before, strict=True))
    first = res.rows.row(0, named=True)
    return {"concept": concept, "unit": spec.unit, "auroc": float(best["auroc"]), "rank": int(best["rank"]),
            "scale": float(scale),
            "strength": float(res.extra["strength"]), "steps": first["steps"], "mask": first["mask"],
            "n_steps": first["n_steps"], "guidance": first["guidance"], "seeds": len(seeds), "hits": hits,
            "rate": hits / len(seeds), "clean_hits": clean, "clean_rate": clean / len(seeds),
            "baseline_hits": sum(has_concept(b, concept) for b in before)}
