"""The interventions stage of run-all: steering, feature edits, concept steering, block ablation and deep dream
applied to the top units of each analysed (layer, kind), each part a call into its own module:

    steered priors   steer.steer_run             (top units of every layer and kind)
    feature edits    edit.edit_run               (presets none / frequent / rare / all, every layer with an SAE)
    concept report   concepts.concept_steering_report (the demo model on prompts with attributes only)
    block ablation   ablate.ablate_run           (every block whose input and output shapes match)
    deep dream       dream.dream_run             (top units of every layer and kind)

The run is opened once (backend/run/context.py open_run) and its model, loaded once with the run's device and
dtype, is handed to every part. Every part runs on every model family except the demo-only ones, which are skipped
with a note (the stage's `notes` in the manifest, the part's result, and printed): the concept-steering report
(and its object masks) needs the demo's pixel attribute scorer, and off the demo the steered priors, edits and
ablations record pixel effects only (no scored attributes).

"Top units" are chosen as the analysis figures choose them (analysis.plots.top_units): each concept's best unit
first, then the highest-peaked units that are neither dead nor dense. Every finished part leaves a marker under
_done/interventions/, so an interrupted stage resumes with the next part; a changed config redoes them all.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
from tqdm.auto import tqdm

from backend.run.config import InterventionsConfig, validate_interventions
from backend.run.schema import is_feature
from backend.run.store import RunStore, stage_key

if TYPE_CHECKING:
    from backend.run.context import RunContext

STAGE = "interventions"
NOT_DEMO = {
    "concept-report": "the concept-steering report needs the demo model (it scores colours from pixels with the "
                      "demo's attribute scorer and steers under its object masks)",
    "attributes": "attributes are not scored off the demo model (the pixel attribute scorer knows the demo's shapes "
                  "only): steered priors, feature edits and ablations record pixel effects",
}
"""Why each demo-only part is skipped on another model (the stage's notes)."""
NO_ATTRIBUTES = ("the concept-steering report needs prompts with attributes (a .jsonl prompt file with "
                 "\"attributes\", as data/prompts/demo.jsonl)")


def chosen_units(store: RunStore, layer: str, kind: str, n: int) -> list[int]:
    """The top n units of an analysed (layer, kind): concept units first, then the highest peaks."""
    from backend.analysis.plots import top_units

    def part(table: str) -> pl.DataFrame | None:
        path = store.partition_dir(table, layer, kind) / "part-0000000.parquet"
        return pl.read_parquet(path) if path.is_file() else None

    units, peaks, concepts = part("units"), part("peaks"), part("concepts")
    if units is None or peaks is None:
        return []
    concept_units = [] if concepts is None else (
        concepts.filter(pl.col("rank") == 1).sort("auroc", descending=True)["unit"].to_list())
    return top_units(units, peaks, concept_units, n)


def steer_steps(store: RunStore, layer: str, kind: str, unit: int) -> str:
    """"active" (the unit's active steps), or "all" for a unit that is never active by the analysis' measure
    (a channel that never makes its step's top-k can still be a concept's best unit)."""
    path = store.partition_dir("units", layer, kind) / "part-0000000.parquet"
    row = pl.read_parquet(path).filter(pl.col("unit") == unit)
    return "active" if row.height and int(row["first_active"][0]) >= 0 else "all"


def analysed_partitions(store: RunStore) -> list[tuple[str, str]]:
    manifest = store.read_manifest() or {}
    names = manifest.get("stages", {}).get("analysis", {}).get("partitions") or []
    return [tuple(name.split("/", 1)) for name in names]


def planned_parts(store: RunStore, cfg: InterventionsConfig) -> list[tuple[str, dict]]:
    """(marker name, call) for every part of the stage, in order. The concept report is planned whenever it is
    enabled and a layer has features; on a run it cannot serve (not the demo, no attributes) it is a skip with a
    note."""
    parts: list[tuple[str, dict]] = []
    partitions = [(layer, kind) for layer, kind in analysed_partitions(store)
                  if cfg.sae_variants or kind in ("channel", "feature")]
    top = {(layer, kind): chosen_units(store, layer, kind, cfg.top_units) for layer, kind in partitions}
    for (layer, kind), units in top.items():
        for unit in units:
            parts.append((f"steer-{layer}-{kind}-{unit}", {"do": "steer", "layer": layer, "kind": kind, "unit": unit}))
    for layer, kind in sorted((layer, kind) for layer, kind in partitions if is_feature(kind)):
        name = f"edit-{layer}" if kind == "feature" else f"edit-{layer}-{kind}"  # the default SAE's as before
        parts.append((name, {"do": "edit", "layer": layer, "kind": kind}))
    if cfg.concept_report and any(is_feature(kind) for _, kind in partitions):
        parts.append(("concept-report", {"do": "concepts"}))
    if cfg.ablation:
        parts.append(("ablation", {"do": "ablate"}))
    if cfg.dream:
        for (layer, kind), units in top.items():
            for unit in units:
                parts.append((f"dream-{layer}-{kind}-{unit}",
                              {"do": "dream", "layer": layer, "kind": kind, "unit": unit}))
    return parts


def has_attributes(store: RunStore) -> bool:
    """The run's prompts carry attributes (a .jsonl prompt file with "attributes", as the demo's)."""
    gens = pl.read_parquet(store.table_glob("generations"))
    return any(a not in ("", "{}") for a in gens["attributes"].to_list())


def run_interventions(run: str | Path | RunContext, cfg: InterventionsConfig | None = None, progress: bool = True,
                      model=None) -> dict:
    """Run (or resume) every part of the stage on an analysed run (a directory or an open RunContext; `model`: the
    run's model already loaded); returns a summary (also in the manifest): parts, seconds, results per part and
    notes (what was skipped and why)."""
    from backend.interventions.effects import is_demo
    from backend.run.context import as_context

    cfg = validate_interventions(cfg or InterventionsConfig())
    ctx = as_context(run, model=model).require("analysis").require_generator("intervene")
    if not cfg.enabled:
        return {"skipped": "interventions.enabled = false"}
    store = ctx.store
    ctx.record_config(STAGE, cfg.to_dict())
    key = stage_key({"config": cfg.to_dict(), "analysis": ctx.stage("analysis").get("key")})
    before = ctx.stage(STAGE)
    t0 = time.time()
    # a changed key redoes every part; its tables and media are replaced shard by shard (the same shard names),
    # and the standalone commands (steer, edit, dream, ablate) write there too, so nothing is deleted up front
    if store.begin_stage(STAGE, key, started=t0, config=cfg.to_dict()):
        before = {}
    parts = planned_parts(store, cfg)
    results: dict = dict(before.get("results") or {})
    notes: list[str] = list(before.get("notes") or [])

    def note(text: str) -> None:
        if text not in notes:
            notes.append(text)
            if progress:
                tqdm.write(f"note: {text}")

    with tqdm(total=len(parts), desc="interventions", unit="part", disable=not progress) as bar:
        for name, call in parts:
            if store.batch_done(STAGE, name):
                bar.update(1)
                continue
            bar.set_postfix_str(name[:40])
            demo = is_demo(ctx.model)  # the run's model: loaded once, here, only when a part is left to do
            if not demo and call["do"] in ("steer", "edit", "ablate"):
                note(NOT_DEMO["attributes"])
            results[name] = _run_part(ctx, call, cfg, demo)
            if "skipped" in results[name]:
                note(f"{name} skipped: {results[name]['skipped']}")
            store.mark_batch_done(STAGE, name)
            store.update_stage(STAGE, results=results, notes=notes)
            bar.update(1)
    seconds = round(time.time() - t0, 3)
    store.update_stage(STAGE, status="done", finished=time.time(), seconds=seconds, results=results, notes=notes)
    return {"parts": len(parts), "seconds": seconds, "results": results, "notes": notes}


def _run_part(ctx: RunContext, call: dict, cfg: InterventionsConfig, demo: bool) -> dict:
    """One part on the run's model; returns what the summary keeps of it ({"skipped": why} for a demo-only part
    this run cannot serve)."""
    from backend.interventions import ablate as ablation
    from backend.interventions import concepts as concept_report
    from backend.interventions import dream
    from backend.interventions import edit as feature_edits
    from backend.interventions import steer as interventions

    do, model, store = call["do"], ctx.model, ctx.store
    if do == "steer":
        steps = steer_steps(store, call["layer"], call["kind"], call["unit"])
        res = interventions.steer_run(ctx, call["layer"], call["kind"], call["unit"], scale=cfg.steer_scale,
                                      steps=steps, seeds=cfg.steer_seeds, model=model)
        return {"grid": store.relative(Path(res.grid)), "mean_effect": float(res.rows["effect"].mean())}
    if do == "edit":
        res = feature_edits.edit_run(ctx, call["layer"], n=cfg.edit_features, seeds=cfg.steer_seeds,
                                     model=model, kind=call.get("kind", "feature"))
        effects = res.rows.group_by("preset", maintain_order=True).agg(pl.col("effect").mean())
        return {"grid": store.relative(Path(res.grid)),
                "mean_effect": {p: round(float(e), 4) for p, e in effects.iter_rows()}}
    if do == "concepts":
        if not demo:
            return {"skipped": NOT_DEMO["concept-report"]}
        if not has_attributes(store):
            return {"skipped": NO_ATTRIBUTES}
        table = concept_report.concept_steering_report(ctx, seeds=range(cfg.concept_seeds), model=model)
        return {r["concept"] + " @ " + r["layer"]: f"{r['hits']}/{r['seeds']}" for r in table.iter_rows(named=True)}
    if do == "ablate":
        summary, grid = ablation.ablate_run(ctx, model=model)
        return {"grid": store.relative(Path(grid)), "blocks": summary.height}
    if do == "dream":
        dcfg = dream.default_config(call["kind"])  # the latent scale: the model's (dream.latent_scale)
        dcfg.opt_steps = cfg.dream_iterations
        s = dream.dream_run(ctx, call["layer"], call["kind"], call["unit"], dcfg,
                            seeds=list(range(cfg.dream_seeds)), progress=False)
        return {"activation": [round(s["activation_start"], 4), round(s["activation_end"], 4)],
                "target_steps": s["target_steps"]}
    raise ValueError(f"unknown part {do!r}")
