"""Concept recovery: how well single units pick out the ground-truth attributes prompts carry.

For each value of each non-spatial attribute (a concept, e.g. "colour=red"), every unit's prompt-level
activation at every step (the spatially pooled activity, averaged over the prompt's generations) scores
"has this value" versus not by AUROC; a unit's AUROC for a concept is its best over steps. AUROC is the
Mann-Whitney statistic on ranks (ties get average ranks), vectorised over units, steps and concepts:

    AUROC = (sum of positive ranks - P (P + 1) / 2) / (P N)

A unit that fires *less* for a concept scores below 0.5: only units that signal presence count.
Spatial attributes (position) are scored by heat-map localisation instead. A unit's localisation is the share
of its top examples (step -1) whose heat-map centroid (weights: the map above its own mean) is nearer the
centre of the prompt's position than any other position centre. Two summaries per (layer, kind):
  - `localisation`: pooled over the best unit of each value of cfg.localise_attribute (shape) — do the units
    that say *what* the object is also say *where* it is?
  - `best_localisation`: the best-localising unit among those whose top examples show the object in at least
    cfg.localise_min_positions different positions (so a unit that only fires for "on the left" cannot win by
    firing on the left) — does any unit follow the object around? The `localisation` table ranks every unit.

Activity is read in chunks of units (the files are sorted by unit, so DuckDB skips the rest); memory is one
chunk of [units, steps, generations].
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
from scipy.sparse import csr_matrix
from scipy.stats import rankdata

from backend.analysis.inputs import Partition, RunInputs
from backend.run.config import AnalysisConfig

CHUNK_CELLS = 20_000_000
CHUNK_SQL = "SELECT unit, step, gen_id, {pool} AS v FROM read_parquet(?) WHERE unit >= ? AND unit < ?"


@dataclass
class ConceptLabels:
    names: list[str]
    """Concept names "attribute=value"."""
    positive_PC: np.ndarray
    """[prompts, concepts] bool: prompt p has concept c."""
    prompt_of_N: np.ndarray
    """[generations] prompt index of each generation (in inputs.gens order)."""


def concept_labels(gens: pl.DataFrame, spatial: list[str]) -> ConceptLabels | None:
    """Concepts of the non-spatial attributes with at least two values; None when prompts carry none."""
    prompts = gens.unique("p", keep="first").sort("p")
    attrs = [json.loads(a) if a else {} for a in prompts["attributes"].to_list()]
    keys = sorted({k for a in attrs for k in a} - set(spatial))
    names, columns = [], []
    for key in keys:
        values = [str(a.get(key)) if key in a else None for a in attrs]
        distinct = sorted({v for v in values if v is not None})
        if len(distinct) < 2:
            continue
        for value in distinct:
            names.append(f"{key}={value}")
            columns.append(np.array([v == value for v in values]))
    if not names:
        return None
    return ConceptLabels(names, np.stack(columns, axis=1), gens["p"].to_numpy())


def auroc_PC(scores_XP: np.ndarray, positive_PC: np.ndarray) -> np.ndarray:
    """AUROC [X, C] of each row of scores [X, P] for each label column [P, C] (rank form, ties averaged)."""
    ranks_XP = rankdata(scores_XP, axis=1)
    n_pos = positive_PC.sum(0).astype(np.float64)
    n_neg = positive_PC.shape[0] - n_pos
    pos_sum_XC = ranks_XP @ positive_PC.astype(np.float64)
    return (pos_sum_XC - n_pos * (n_pos + 1) / 2) / np.maximum(n_pos * n_neg, 1)


def best_auroc(con: duckdb.DuckDBPyConnection, inputs: RunInputs, part: Partition, labels: ConceptLabels,
               cfg: AnalysisConfig) -> tuple[np.ndarray, np.ndarray]:
    """(best AUROC [U, C], its step [U, C]) over steps, per unit and concept."""
    gen_ids = inputs.gens["gen_id"].to_numpy()
    n_gens, n_steps, n_prompts = len(gen_ids), inputs.n_steps, labels.positive_PC.shape[0]
    per_prompt = np.bincount(labels.prompt_of_N, minlength=n_prompts)
    average_PN = csr_matrix((1.0 / per_prompt[labels.prompt_of_N], (labels.prompt_of_N, np.arange(n_gens))),
                            shape=(n_prompts, n_gens), dtype=np.float32)
    chunk = max(1, CHUNK_CELLS // max(n_steps * n_gens, 1))
    best = np.zeros((part.n_units, len(labels.names)))
    best_step = np.zeros((part.n_units, len(labels.names)), np.int16)
    for lo in range(0, part.n_units, chunk):
        hi = min(lo + chunk, part.n_units)
        r = con.execute(CHUNK_SQL.format(pool=cfg.pool), [part.files, lo, hi]).fetchnumpy()
        acts_USN = np.zeros((hi - lo, n_steps, n_gens), np.float32)
        acts_USN[r["unit"] - lo, r["step"], np.searchsorted(gen_ids, r["gen_id"])] = r["v"]
        prompt_XP = (average_PN @ acts_USN.reshape(-1, n_gens).T).T
        auc_USC = auroc_PC(prompt_XP, labels.positive_PC).reshape(hi - lo, n_steps, -1)
        best[lo:hi] = auc_USC.max(1)
        best_step[lo:hi] = auc_USC.argmax(1)
    return best, best_step


def concepts_table(names: list[str], best_UC: np.ndarray, step_UC: np.ndarray, top_n: int) -> pa.Table:
    """The top_n units per concept: concept, unit, auroc, step (the best step), rank."""
    n = min(top_n, best_UC.shape[0])
    order_CU = np.argsort(-best_UC, axis=0, kind="stable")[:n].T
    concept = np.repeat(np.array(names, dtype=object), n)
    unit = order_CU.ravel()
    col = np.repeat(np.arange(len(names)), n)
    return pa.table({
        "concept": pa.array(concept, pa.string()),
        "unit": unit.astype(np.int32),
        "auroc": best_UC[unit, col].astype(np.float32),
        "step": step_UC[unit, col].astype(np.int16),
        "rank": np.tile(np.arange(1, n + 1, dtype=np.int16), len(names)),
    })


def heatmap_centroid(map_HW: np.ndarray) -> tuple[float, float] | None:
    """(x, y) as fractions of the image side, weighted by the map above its mean; None for a flat map."""
    w = np.clip(map_HW - map_HW.mean(), 0, None)
    total = float(w.sum())
    if total <= 0:
        return None
    h, wd = map_HW.shape
    y = (np.arange(h) + 0.5) / h
    x = (np.arange(wd) + 0.5) / wd
    return float((w.sum(0) * x).sum() / total), float((w.sum(1) * y).sum() / total)


def nearest_region(xy: tuple[float, float], centres: dict[str, tuple[float, float]]) -> str:
    names = list(centres)
    d = [(xy[0] - centres[n][0]) ** 2 + (xy[1] - centres[n][1]) ** 2 for n in names]
    return names[int(np.argmin(d))]


def unit_localisation(examples: pl.DataFrame, gens: pl.DataFrame, position_attr: str,
                      centres: dict[str, tuple[float, float]]) -> pl.DataFrame:
    """Per unit: examples (step -1 rows with a positioned prompt), positions (distinct prompt positions among
    them), hits (centroid in the prompt's region), share = hits / examples, rank (by share, then examples)."""
    rows = (examples.filter(pl.col("step") == -1)
            .join(gens.select("gen_id", "attributes"), on="gen_id")
            .select("unit", "heatmap", "height", "width", "attributes"))
    units, hits, targets = [], [], []
    for unit, heatmap, h, w, attrs in rows.iter_rows():
        target = json.loads(attrs).get(position_attr)
        if target not in centres:
            continue
        xy = heatmap_centroid(np.asarray(heatmap, np.float32).reshape(h, w))
        units.append(unit)
        hits.append(xy is not None and nearest_region(xy, centres) == target)
        targets.append(target)
    per = (pl.DataFrame({"unit": units, "hit": hits, "target": targets},
                        schema={"unit": pl.Int32, "hit": pl.Int32, "target": pl.String})
           .group_by("unit").agg(examples=pl.len().cast(pl.Int32), positions=pl.col("target").n_unique().cast(pl.Int32),
                                 hits=pl.col("hit").sum()))
    return (per.with_columns(share=pl.col("hits") / pl.col("examples"))
            .sort(["share", "examples", "unit"], descending=[True, True, False])
            .with_columns(rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int32)))


def pooled_localisation(per_unit: pl.DataFrame, units: list[int]) -> tuple[int, int]:
    """(hits, examples) of units pooled, from a unit_localisation table."""
    mine = per_unit.filter(pl.col("unit").is_in(units))
    return int(mine["hits"].sum()), int(mine["examples"].sum())


def localisation(examples: pl.DataFrame, gens: pl.DataFrame, units: list[int], position_attr: str,
                 centres: dict[str, tuple[float, float]]) -> tuple[int, int]:
    """(hits, total) over the step -1 examples of units whose prompt has a known position: centroid region ==
    the prompt's position."""
    return pooled_localisation(unit_localisation(examples, gens, position_attr, centres), units)
