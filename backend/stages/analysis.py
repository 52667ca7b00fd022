"""The analysis stage: from recorded activity to profiles, peaks, top examples, frequencies, comparisons,
concept recovery and figures (the analysis tables of docs/run-format.md, per (layer, kind) as hive partitions).

`analyze(run_dir, cfg)` runs every part in order, each per activity partition (layer, kind):
  1. profiles + frequencies   streaming pass over the activity shards (profiles.py, frequencies.py)
     + histograms             per-unit activation histograms, two streaming aggregations (histograms.py)
  2. units + peaks            find_peaks on each profile, dead/dense flags (peaks.py)
  3. examples                 top generations per unit, heat-maps by replay (examples.py)
  4. comparisons              every ordered pair of prompt groups, when there are few (compare.py)
  5. concepts                 AUROC per attribute value, heat-map localisation of position (concepts.py)
                              -> concepts, localisation, concept_summary
     classes                  image-classifier runs: classes per unit, best unit per class out of sample
                              (classes.py) -> class_scores, class_best
  6. labels                   unit labels, examples across the activation range, out-of-sample concept
                              recovery (label_pass.py) -> units.label, range_examples, concept_summary
  7. plots                    profile figures of top units (plots.py)
Each finished part leaves a marker under _done/analysis/, so a rerun resumes after the last finished part; the
stage key (docs/run-format.md) covers the inputs (activity and generations files) and the config. When it changes,
only the partitions whose own key changed are recomputed (`partition_keys`: the partition's activity files, the
generations and the config), so adding an SAE's activity analyses that SAE and leaves the other partitions' tables
as they are; the one-file table concept_summary keeps their rows.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time

import numpy as np
import polars as pl

from backend.analysis.inputs import SHARD, Partition, RunInputs, connect, fingerprint, load_inputs, read_part
from backend.errors import DifflensError
from backend.run.config import AnalysisConfig, validate_analysis
from backend.run.schema import tables_of_stage
from backend.run.store import RunStore, stage_key

__all__ = ["AnalysisConfig", "analyze"]

STAGE = "analysis"


RESOURCE_KEYS = ("device", "duckdb_memory_limit", "duckdb_threads", "replay_batch_size", "replay_batches")
"""Analysis settings that change where and how fast it runs, not its results: outside the stage key."""


def results_config(cfg: AnalysisConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in RESOURCE_KEYS}


def analyze(run, cfg: AnalysisConfig | None = None, progress: bool = True) -> dict:
    """Run (or resume) every analysis part on a run (directory or RunContext); returns a summary (also stored in
    the manifest). The settings are recorded as the run's [analysis] config."""
    from backend.analysis.examples import REPLAY_STAGE

    cfg = validate_analysis(cfg or AnalysisConfig())
    t0 = time.time()
    inputs = load_inputs(run)
    store = inputs.store
    before = inputs.ctx.stage(STAGE)
    inputs.ctx.record_config(STAGE, cfg.to_dict())
    key = stage_key({"inputs": fingerprint(inputs), "config": results_config(cfg)})
    part_keys = {p.name: partition_key(inputs, p, cfg) for p in inputs.partitions}
    todo = _todo(store, before, key, part_keys)
    everything = set(todo) == set(part_keys) or not before.get("partition_keys")
    clear = _outputs(store, before, todo, part_keys, everything)
    if store.begin_stage(STAGE, key, clear=clear, started=t0, config=cfg.to_dict(), pending=inputs.pending,
                         partitions=[p.name for p in inputs.partitions], partition_keys=part_keys, todo=todo):
        store.clear_stage_markers(REPLAY_STAGE)
    kept_results = {} if everything else before.get("results") or {}
    inputs.partitions = [p for p in inputs.partitions if p.name in todo]
    con = connect(cfg)
    steps = [("profiles", _profiles_part), ("examples", _examples_part), ("comparisons", _comparisons_part),
             ("concepts", _concepts_part), ("classes", _classes_part), ("labels", _labels_part),
             ("plots", _plots_part)]
    results: dict = {}
    for name, part_fn in steps:
        if store.batch_done(STAGE, name):
            results[name] = (store.read_manifest()["stages"][STAGE].get("results") or {}).get(name)
            continue
        new = part_fn(con, inputs, cfg, progress) if inputs.partitions else {}
        results[name] = _merged(kept_results.get(name), new)
        store.mark_batch_done(STAGE, name)
        store.update_stage(STAGE, results=results)
    seconds = round(time.time() - t0, 3)
    store.update_stage(STAGE, status="done", finished=time.time(), seconds=seconds, results=results)
    return {"out_dir": str(store.root), "partitions": list(part_keys), "analysed": todo, "pending": inputs.pending,
            "seconds": seconds, **results}


def partition_key(inputs: RunInputs, part: Partition, cfg: AnalysisConfig) -> str:
    """The key of one partition's analysis: its activity files, the generations files, the config."""
    return stage_key({"inputs": fingerprint(inputs, [part]), "config": results_config(cfg)})


def _todo(store: RunStore, before: dict, key: str, part_keys: dict[str, str]) -> list[str]:
    """The partitions this analysis (re)computes: when resuming (same key), the ones it set out to; else those
    whose partition key changed or whose tables are missing."""
    if before.get("key") == key and before.get("todo") is not None:
        return [n for n in before["todo"] if n in part_keys]
    old = before.get("partition_keys") or {}
    return [n for n, k in part_keys.items()
            if old.get(n) != k or not (store.partition_dir("units", *n.split("/", 1)) / f"{SHARD}.parquet").is_file()]


def _outputs(store: RunStore, before: dict, todo: list[str], part_keys: dict, everything: bool) -> list[str]:
    """What a changed key clears: every output, or those of the partitions recomputed and of the ones gone."""
    if everything:
        tables = tables_of_stage(STAGE)
        return [f"tables/{t}" for t in tables] + [f"tables/{t}.parquet" for t in tables] + ["_work/analysis",
                                                                                          "media/plots"]
    gone = set(before.get("partition_keys") or {}) - set(part_keys)
    return ["_work/analysis"] + _partition_outputs(store, [*todo, *sorted(gone)])


def _partition_outputs(store: RunStore, names: list[str]) -> list[str]:
    """Run-relative files and directories of the analysis of these partitions (layer/kind)."""
    out = []
    for name in names:
        layer, kind = name.split("/", 1)
        for table in tables_of_stage(STAGE):
            if store.table_dir(table).is_dir():
                out.append(store.relative(store.partition_dir(table, layer, kind)))
        out += [store.relative(p) for p in (store.root / "media" / "plots" / layer).glob(f"{kind}-*.png")]
    return out


def _merged(old, new):
    """A part's summary: the new one over the previous analysis' (partitions not recomputed keep their entry)."""
    if isinstance(old, dict) and isinstance(new, dict) and "skipped" not in new:
        return {**old, **new}
    return new


def _write_part(store: RunStore, table: str, part: Partition, data) -> None:
    store.write_table_shard(table, SHARD, data, layer=part.layer, kind=part.kind)


def _profiles_part(con, inputs: RunInputs, cfg: AnalysisConfig, progress: bool) -> dict:
    from backend.analysis.frequencies import frequencies_table
    from backend.analysis.histograms import histograms_table
    from backend.analysis.peaks import peaks_and_units
    from backend.analysis.profiles import count_activity, profile_arrays, profiles_table

    out = {}
    for part in inputs.partitions:
        counts = count_activity(con, inputs, part, cfg, progress)
        _write_part(inputs.store, "profiles", part, profiles_table(counts))
        _write_part(inputs.store, "frequencies", part, frequencies_table(counts, inputs.groups))
        _write_part(inputs.store, "histograms", part, histograms_table(con, part, cfg.histogram_bins))
        peaks, units = peaks_and_units(profile_arrays(counts), inputs.timesteps, cfg)
        _write_part(inputs.store, "peaks", part, peaks)
        _write_part(inputs.store, "units", part, units)
        dead, dense = units["dead"].to_numpy(), units["dense"].to_numpy()
        out[part.name] = {"rows": counts.rows, "units": part.n_units, "dead": int(dead.sum()),
                          "dense": int(dense.sum()), "peaks": peaks.num_rows}
    return out


def _examples_part(con, inputs: RunInputs, cfg: AnalysisConfig, progress: bool) -> dict:
    from backend.analysis.examples import REPLAY_STAGE, examples_with_heatmaps, replay_heatmaps, select_examples

    chosen = {part.name: select_examples(con, part, read_part(inputs.store, "peaks", part), cfg)
              for part in inputs.partitions}
    requests = pl.concat([
        chosen[p.name].select("unit", "gen_id", "heatmap_step", "activation")
        .with_columns(layer=pl.lit(p.layer), kind=pl.lit(p.kind)) for p in inputs.partitions
    ]).unique(["layer", "kind", "unit", "gen_id", "heatmap_step"], keep="first", maintain_order=True)
    batches = replay_heatmaps(inputs, requests, cfg, progress)
    out = {"generations_replayed": requests["gen_id"].n_unique(), "batches": batches}
    for part in inputs.partitions:
        _write_part(inputs.store, "examples", part, examples_with_heatmaps(inputs.store, part, chosen[part.name]))
        out[part.name] = len(chosen[part.name])
    shutil.rmtree(inputs.store.root / "_work" / "analysis", ignore_errors=True)
    inputs.store.clear_stage_markers(REPLAY_STAGE)
    return out


def _comparisons_part(con, inputs: RunInputs, cfg: AnalysisConfig, progress: bool) -> dict:
    from backend.analysis.compare import check_same_seeds, compare_groups, write_comparison

    groups = inputs.groups
    if not 2 <= len(groups) <= cfg.compare_all_pairs_max_groups:
        return {"skipped": f"{len(groups)} prompt groups (pairs are written for 2..{cfg.compare_all_pairs_max_groups};"
                           " use `python cli.py compare A B`)"}
    freqs = inputs.store.read_table("frequencies")
    out = {}
    for a, b in itertools.permutations(groups, 2):
        try:
            check_same_seeds(inputs.gens, a, b)
        except DifflensError as exc:
            out[f"{a} vs {b}"] = f"skipped: {exc}"
            continue
        ranked = compare_groups(freqs, a, b, inputs.n_steps, cfg)
        png = write_comparison(inputs.store, freqs, ranked, a, b, only={(p.layer, p.kind) for p in inputs.partitions})
        out[f"{a} vs {b}"] = {"units": len(ranked), "histogram": inputs.store.relative(png)}
    return out


def _concepts_part(con, inputs: RunInputs, cfg: AnalysisConfig, progress: bool) -> dict:

    from backend.analysis.concepts import (
        best_auroc,
        concept_labels,
        concepts_table,
        pooled_localisation,
        unit_localisation,
    )
    from backend.demo import shapes

    labels = concept_labels(inputs.gens, cfg.spatial_attributes)
    if labels is None:
        return {"skipped": "prompts carry no attributes"}
    attrs = [json.loads(a) for a in inputs.gens["attributes"].to_list()]
    positions = {a.get(p) for a in attrs for p in cfg.spatial_attributes}
    spatial = next(iter(cfg.spatial_attributes), None)
    can_localise = spatial is not None and positions <= set(shapes.POSITION_CENTRES)
    rows = []
    for part in inputs.partitions:
        best_UC, step_UC = best_auroc(con, inputs, part, labels, cfg)
        table = concepts_table(labels.names, best_UC, step_UC, cfg.concepts_top_n)
        _write_part(inputs.store, "concepts", part, table)
        row = {"layer": part.layer, "kind": part.kind, "concepts": len(labels.names),
               "mean_best_auroc": float(best_UC.max(0).mean()), "localisation": None, "localised_examples": 0,
               "best_localisation": None, "best_localising_unit": None}
        if can_localise:
            examples = read_part(inputs.store, "examples", part)
            per_unit = unit_localisation(examples, inputs.gens, spatial, shapes.POSITION_CENTRES)
            _write_part(inputs.store, "localisation", part, per_unit.to_arrow())
            prefix = f"{cfg.localise_attribute}="
            best_units = [int(best_UC[:, c].argmax()) for c, n in enumerate(labels.names) if n.startswith(prefix)]
            if best_units:
                hits, total = pooled_localisation(per_unit, best_units)
                row["localisation"] = hits / total if total else None
                row["localised_examples"] = total
            full = per_unit.filter((pl.col("examples") >= cfg.examples_top_n)
                                   & (pl.col("positions") >= cfg.localise_min_positions))
            if full.height:
                row["best_localisation"] = float(full["share"][0])
                row["best_localising_unit"] = int(full["unit"][0])
        rows.append(row)
    rows = _kept_summary_rows(inputs, {(r["layer"], r["kind"]) for r in rows}) + rows
    rows.sort(key=lambda r: (r["layer"], r["kind"]))
    inputs.store.write_table("concept_summary", inputs.store.table_from_rows("concept_summary", rows))
    return {"summary": rows}


def _classes_part(con, inputs: RunInputs, cfg: AnalysisConfig, progress: bool) -> dict:
    """Image-classifier runs: per unit its classes ranked (class_scores), per class its best unit chosen on half the
    images and scored on the other half (class_best)."""
    from backend.analysis.classes import class_best_table, class_labels, class_scores_table, has_classes, unit_aurocs

    if not has_classes(inputs.gens):
        return {"skipped": "not an image-classifier run with two or more classes"}
    classes, positive_NC, select_N = class_labels(inputs.gens)
    out = {}
    for part in inputs.partitions:
        aurocs = unit_aurocs(con, inputs, part, positive_NC, select_N, cfg)
        _write_part(inputs.store, "class_scores", part,
                    class_scores_table(classes, aurocs, read_part(inputs.store, "frequencies", part)))
        best = class_best_table(classes, positive_NC, aurocs)
        _write_part(inputs.store, "class_best", part, best)
        test = best["auroc_test"].to_numpy()
        out[part.name] = {"classes": len(classes), "mean_best_auroc_test": float(np.nanmean(test)),
                          "min_best_auroc_test": float(np.nanmin(test))}
    return out


def _kept_summary_rows(inputs: RunInputs, computed: set[tuple[str, str]]) -> list[dict]:
    """concept_summary rows of the partitions this analysis did not recompute (and the run still has)."""
    path = inputs.store.root / "tables" / "concept_summary.parquet"
    if not path.is_file():
        return []
    have = {tuple(n.split("/", 1)) for n in inputs.store.read_manifest()["stages"][STAGE].get("partitions") or []}
    return [r for r in pl.read_parquet(path).to_dicts() if (r["layer"], r["kind"]) in have - computed]


def _labels_part(con, inputs: RunInputs, cfg: AnalysisConfig, progress: bool) -> dict:
    from backend.analysis.label_pass import label_pass

    return label_pass(con, inputs, cfg, progress)


def _plots_part(con, inputs: RunInputs, cfg: AnalysisConfig, progress: bool) -> dict:
    from backend.analysis.plots import write_run_plots

    paths = write_run_plots(inputs.ctx, cfg, partitions=inputs.partitions)
    return {"figures": len(paths), "dir": "media/plots"}
