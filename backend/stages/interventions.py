"""The interventions stage of run-all: steering, feature edits, concept steering, block ablation and deep dream
applied to the top units of each analysed (layer, kind), each part a call into its own module:

    steered priors   interventions.steer_run   (top units of every layer and kind)
    feature edits    interventions.edit_run    (presets none / frequent / rare / all, every layer with an SAE)
    concept report   interventions.concept_steering_report (demo prompts with attributes only)
    block ablation   ablation.ablate_run       (every block whose input and output shapes match)
    deep dream       dream.dream_run           (top units of every layer and kind)

"Top units" are chosen as the analysis figures choose them (analysis.plots.top_units): each concept's best unit
first, then the highest-peaked units that are neither dead nor dense. Every finished part leaves a marker under
_done/interventions/, so an interrupted stage resumes with the next part; a changed config redoes them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from tqdm.auto import tqdm

from backend.errors import DifflensError
from backend.run.store import RunStore

STAGE = "interventions"


@dataclass
class InterventionsConfig:
    """What run-all's interventions stage does (the `[interventions]` section of a run config)."""

    enabled: bool = True
    """Run the stage at all."""
    top_units: int = 2
    """Units per (layer, kind) that get a steered prior and a deep dream."""
    steer_scale: float = 4.0
    """Steering strength as a multiple of the unit's max activation (units table)."""
    steer_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Seeds of the steered priors (and of the feature edits)."""
    edit_features: int = 8
    """Features zeroed by the `frequent` and `rare` edit presets."""
    concept_report: bool = True
    """On prompts with attributes (the demo), steer each colour's best feature and count hits."""
    concept_seeds: int = 10
    """Seeds per concept of the concept-steering report."""
    ablation: bool = True
    """Skip every candidate block in turn on the run's first prompts."""
    dream: bool = True
    """Deep-dream the top units."""
    dream_steps: int = 100
    """Optimisation steps per dream."""
    dream_seeds: int = 4
    """Dreams per unit (seeds 0..n-1)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(cfg: InterventionsConfig) -> InterventionsConfig:
    for name in ("top_units", "edit_features", "concept_seeds", "dream_steps", "dream_seeds"):
        if getattr(cfg, name) < 1:
            raise DifflensError(f"interventions.{name} must be at least 1 (got {getattr(cfg, name)})")
    if not cfg.steer_seeds:
        raise DifflensError("interventions.steer_seeds is empty; give at least one seed")
    return cfg


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


def planned_parts(store: RunStore, cfg: InterventionsConfig, has_attributes: bool) -> list[tuple[str, dict]]:
    """(marker name, call) for every part of the stage, in order."""
    parts: list[tuple[str, dict]] = []
    partitions = analysed_partitions(store)
    top = {(layer, kind): chosen_units(store, layer, kind, cfg.top_units) for layer, kind in partitions}
    for (layer, kind), units in top.items():
        for unit in units:
            parts.append((f"steer-{layer}-{kind}-{unit}", {"do": "steer", "layer": layer, "kind": kind, "unit": unit}))
    for layer in sorted({layer for layer, kind in partitions if kind == "feature"}):
        parts.append((f"edit-{layer}", {"do": "edit", "layer": layer}))
    if cfg.concept_report and has_attributes and any(kind == "feature" for _, kind in partitions):
        parts.append(("concept-report", {"do": "concepts"}))
    if cfg.ablation:
        parts.append(("ablation", {"do": "ablate"}))
    if cfg.dream:
        for (layer, kind), units in top.items():
            for unit in units:
                parts.append((f"dream-{layer}-{kind}-{unit}",
                              {"do": "dream", "layer": layer, "kind": kind, "unit": unit}))
    return parts


def run_interventions(run_dir: str | Path, cfg: InterventionsConfig | None = None, progress: bool = True) -> dict:
    """Run (or resume) every part of the stage on an analysed run; returns a summary (also in the manifest)."""
    cfg = validate(cfg or InterventionsConfig())
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    if manifest is None:
        raise DifflensError(f"{run_dir} is not a run directory (no manifest.json); run `python cli.py run-all` first")
    if manifest.get("stages", {}).get("analysis", {}).get("status") != "done":
        raise DifflensError(f"{run_dir} has not been analysed; run `python cli.py analyze --run {run_dir}` first")
    if not cfg.enabled:
        return {"skipped": "interventions.enabled = false"}
    key = hashlib.sha256(json.dumps([cfg.to_dict(), manifest["stages"]["analysis"].get("key")],
                                    sort_keys=True).encode()).hexdigest()[:16]
    if manifest.get("stages", {}).get(STAGE, {}).get("key") != key:
        store.clear_stage_markers(STAGE)
    t0 = time.time()
    store.update_stage(STAGE, status="running", key=key, started=t0, config=cfg.to_dict())
    gens = pl.read_parquet(store.table_glob("generations"))
    has_attributes = any(a not in ("", "{}") for a in gens["attributes"].to_list())
    parts = planned_parts(store, cfg, has_attributes)
    results: dict = dict(manifest.get("stages", {}).get(STAGE, {}).get("results") or {})
    model = None
    with tqdm(total=len(parts), desc="interventions", unit="part", disable=not progress) as bar:
        for name, call in parts:
            if store.batch_done(STAGE, name):
                bar.update(1)
                continue
            if model is None:
                model = _load_run_model(manifest)
            bar.set_postfix_str(name[:40])
            results[name] = _run_part(store.root, call, cfg, model)
            store.mark_batch_done(STAGE, name)
            store.update_stage(STAGE, results=results)
            bar.update(1)
    seconds = round(time.time() - t0, 3)
    store.update_stage(STAGE, status="done", finished=time.time(), seconds=seconds, results=results)
    return {"parts": len(parts), "seconds": seconds, "results": results}


def _load_run_model(manifest: dict):
    from backend.models import load_model, parse_dtype

    config = manifest["config"]
    return load_model(config["model"], device=config.get("device", "cpu"),
                      dtype=parse_dtype(config.get("dtype", "float32")))


def _run_part(run_dir: Path, call: dict, cfg: InterventionsConfig, model) -> dict:
    """One part; returns what the summary keeps of it."""
    from backend.interventions import ablate as ablation
    from backend.interventions import concepts as concept_report
    from backend.interventions import dream
    from backend.interventions import edit as feature_edits
    from backend.interventions import steer as interventions

    do = call["do"]
    if do == "steer":
        steps = steer_steps(RunStore(run_dir), call["layer"], call["kind"], call["unit"])
        res = interventions.steer_run(run_dir, call["layer"], call["kind"], call["unit"], scale=cfg.steer_scale,
                                      steps=steps, seeds=cfg.steer_seeds, model=model)
        return {"grid": RunStore(run_dir).relative(Path(res.grid)), "mean_effect": float(res.rows["effect"].mean())}
    if do == "edit":
        res = feature_edits.edit_run(run_dir, call["layer"], n=cfg.edit_features, seeds=cfg.steer_seeds, model=model)
        effects = res.rows.group_by("preset", maintain_order=True).agg(pl.col("effect").mean())
        return {"grid": RunStore(run_dir).relative(Path(res.grid)),
                "mean_effect": {p: round(float(e), 4) for p, e in effects.iter_rows()}}
    if do == "concepts":
        table = concept_report.concept_steering_report(run_dir, seeds=range(cfg.concept_seeds), model=model)
        return {r["concept"] + " @ " + r["layer"]: f"{r['hits']}/{r['seeds']}" for r in table.iter_rows(named=True)}
    if do == "ablate":
        summary, grid = ablation.ablate_run(run_dir, model=model)
        return {"grid": RunStore(run_dir).relative(Path(grid)), "blocks": summary.height}
    if do == "dream":
        dcfg = dream.default_config(call["kind"])
        dcfg.opt_steps = cfg.dream_steps
        s = dream.dream_run(run_dir, call["layer"], call["kind"], call["unit"], dcfg,
                            seeds=list(range(cfg.dream_seeds)), progress=False, model=model)
        return {"activation": [round(s["activation_start"], 4), round(s["activation_end"], 4)],
                "target_steps": s["target_steps"]}
    raise ValueError(f"unknown part {do!r}")
