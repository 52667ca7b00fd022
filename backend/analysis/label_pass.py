"""The labels pass of the analysis stage: one more read of each partition's activity (generation_activity.py)
gives every unit its label and confidence (labels.py, written into `units`), its examples across the activation
range (range_examples.py, the `range_examples` table) and the partition's out-of-sample concept recovery
(out_of_sample.py, the auroc_choose / auroc_oos / oos_split columns of `concept_summary`).

It runs after the concepts part, so it fills in the concept_summary rows that part wrote for the partitions
recomputed (the rows of the others are kept as they are).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
from tqdm.auto import tqdm

from backend.analysis.concepts import concept_labels
from backend.analysis.generation_activity import Chunk, chunks
from backend.analysis.inputs import SHARD, Partition, RunInputs, read_part
from backend.analysis.labels import Candidates, breakeven_labels, candidates, unit_labels
from backend.analysis.out_of_sample import OutOfSample
from backend.analysis.range_examples import range_examples
from backend.run.config import AnalysisConfig


def label_pass(con, inputs: RunInputs, cfg: AnalysisConfig, progress: bool = True) -> dict:
    """Labels, range examples and out-of-sample recovery of inputs.partitions; returns the part's summary."""
    cands = candidates(inputs.gens)
    concepts = concept_labels(inputs.gens, cfg.spatial_attributes)
    gen_ids = inputs.gens["gen_id"].to_numpy()
    out, oos = {}, {}
    bar = tqdm(total=sum(p.n_units for p in inputs.partitions), desc="labels", unit="unit", disable=not progress)
    for part in inputs.partitions:
        labels, confidence, label_steps, ranges = [], [], [], []
        scorer = OutOfSample(inputs.gens, concepts) if concepts is not None else None
        for chunk in chunks(con, inputs, part, cfg):
            got, conf, steps = chunk_labels(chunk, cands, cfg)
            labels += got
            confidence.append(conf)
            label_steps.append(steps)
            ranges.append(range_examples(chunk.best_UN, chunk.step_UN, gen_ids, chunk.lo, cfg.range_bins,
                                         cfg.range_per_bin))
            if scorer is not None:
                scorer.update(chunk.pooled_USN)
            bar.update(chunk.hi - chunk.lo)
        _write_labels(inputs, part, labels, confidence, label_steps)
        table = pa.concat_tables(ranges) if ranges else None
        if table is not None:
            inputs.store.write_table_shard("range_examples", SHARD, table, layer=part.layer, kind=part.kind)
        if scorer is not None:
            oos[(part.layer, part.kind)] = scorer.summary()
        out[part.name] = {"labelled": sum(x is not None for x in labels),
                          "range_examples": 0 if table is None else table.num_rows,
                          **oos.get((part.layer, part.kind), {})}
    bar.close()
    if oos:
        _fill_summary(inputs, oos)
    return {"candidates": len(cands.names), **out}


def chunk_labels(chunk: Chunk, cands: Candidates, cfg: AnalysisConfig) -> tuple[list, np.ndarray, np.ndarray]:
    """(label or None, confidence or NaN, the run step the label scores best at or -1) of the chunk's units by
    cfg.label_method (labels.py). Only "breakeven" over the pooled steps (label_stat "pool") labels at a step;
    the others rank each generation by its activation over all steps, so their step is -1."""
    if cfg.label_method == "breakeven" and cfg.label_stat == "pool":
        return breakeven_labels(chunk.pooled_USN, cands, cfg.label_pseudo_count)  # (its steps are the run's)
    if cfg.label_method == "breakeven":
        labels, confidence, _ = breakeven_labels(chunk.best_UN[:, None, :], cands, cfg.label_pseudo_count)
    else:
        labels, confidence = unit_labels(label_activity_UN(chunk, cfg), cands, cfg.label_top_n,
                                         cfg.label_pseudo_count)
    return labels, confidence, np.full(len(labels), -1)


def label_activity_UN(chunk: Chunk, cfg: AnalysisConfig) -> np.ndarray:
    """[units, generations] the activation that ranks the top_n method's top generations (cfg.label_stat)."""
    return chunk.pooled_USN.max(1) if cfg.label_stat == "pool" else chunk.best_UN


def _write_labels(inputs: RunInputs, part: Partition, labels: list, confidence: list, steps: list) -> None:
    units = read_part(inputs.store, "units", part).sort("unit")
    conf = np.concatenate(confidence) if confidence else np.zeros(0, np.float32)
    step = np.concatenate(steps) if steps else np.zeros(0, np.int16)
    n = units.height
    units = units.with_columns(label=pl.Series(labels[:n], dtype=pl.String),
                               label_confidence=pl.Series(conf[:n], dtype=pl.Float32).fill_nan(None),
                               label_step=pl.Series(step[:n], dtype=pl.Int16))
    inputs.store.write_table_shard("units", SHARD, units.to_arrow(), layer=part.layer, kind=part.kind)


def _fill_summary(inputs: RunInputs, oos: dict) -> None:
    """concept_summary with the out-of-sample columns of the partitions just scored."""
    store = inputs.store
    path = store.root / "tables" / "concept_summary.parquet"
    if not path.is_file():
        return
    rows = pl.read_parquet(path).to_dicts()
    for row in rows:
        row.update(oos.get((row["layer"], row["kind"]), {}))
    store.write_table("concept_summary", store.table_from_rows("concept_summary", rows))
