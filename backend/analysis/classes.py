"""Classes: which classes each unit fires for, on an image-classifier run (classes are the generations' `group`,
`class_label`).

Per unit and class (`class_scores`): the class's frequency and mean activity (from the `frequencies` table: the
same "active" as the profiles), and the AUROC of the unit's pooled activation (analysis.pool over the read tokens,
averaged over steps: one step on a classifier run) for "the image is of this class" versus not — on all images,
and separately on two halves of every class (`auroc_select` on the images with an even index within their class,
`auroc_test` on the odd ones). Rows are ranked per unit by AUROC (rank 1: the class the unit tells best).

Per class (`class_best`): the unit with the best AUROC on the selection half, scored on the held-out half
(`auroc_test`): an out-of-sample AUROC of "the best unit for this class", free of the selection's optimism.
AUROC is the Mann-Whitney statistic of backend/analysis/concepts.py (`auroc_PC`).
"""

from __future__ import annotations

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from backend.analysis.concepts import CHUNK_CELLS, auroc_PC
from backend.analysis.inputs import Partition, RunInputs
from backend.run.config import AnalysisConfig

POOLED_SQL = ("SELECT unit, gen_id, avg({pool}) AS v FROM read_parquet(?) WHERE unit >= ? AND unit < ? "
              "GROUP BY unit, gen_id")


def class_labels(gens: pl.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(classes, positive [N, C] bool, select [N] bool: the selection half) of generations sorted by gen_id."""
    classes = sorted(gens["class_label"].unique().to_list())
    label_N = gens["class_label"].to_numpy()
    positive_NC = np.stack([label_N == c for c in classes], axis=1)
    within = gens.with_row_index("i").select(pl.col("i").rank("ordinal").over("class_label"))["i"].to_numpy()
    return classes, positive_NC, (within - 1) % 2 == 0


def has_classes(gens: pl.DataFrame) -> bool:
    """True for an image-classifier run with at least two classes."""
    return "class_label" in gens.columns and gens["class_label"].null_count() == 0 and \
        gens["class_label"].n_unique() >= 2


def unit_aurocs(con: duckdb.DuckDBPyConnection, inputs: RunInputs, part: Partition, positive_NC: np.ndarray,
                select_N: np.ndarray, cfg: AnalysisConfig) -> dict[str, np.ndarray]:
    """AUROC [U, C] per unit and class on all images, the selection half and the test half."""
    gen_ids = inputs.gens["gen_id"].to_numpy()
    n_gens = len(gen_ids)
    out = {name: np.full((part.n_units, positive_NC.shape[1]), 0.5) for name in ("all", "select", "test")}
    chunk = max(1, CHUNK_CELLS // max(n_gens, 1))
    for lo in range(0, part.n_units, chunk):
        hi = min(lo + chunk, part.n_units)
        r = con.execute(POOLED_SQL.format(pool=cfg.pool), [part.files, lo, hi]).fetchnumpy()
        acts_UN = np.zeros((hi - lo, n_gens), np.float32)
        acts_UN[r["unit"] - lo, np.searchsorted(gen_ids, r["gen_id"])] = r["v"]
        out["all"][lo:hi] = auroc_PC(acts_UN, positive_NC)
        out["select"][lo:hi] = auroc_PC(acts_UN[:, select_N], positive_NC[select_N])
        out["test"][lo:hi] = auroc_PC(acts_UN[:, ~select_N], positive_NC[~select_N])
    for name, rows in (("select", select_N), ("test", ~select_N)):  # a class absent from a half (or all of it): NaN
        n_pos = positive_NC[rows].sum(0)
        out[name][:, (n_pos == 0) | (n_pos == rows.sum())] = np.nan
    return out


def class_scores_table(classes: list[str], aurocs: dict[str, np.ndarray], freqs: pl.DataFrame) -> pa.Table:
    """Rows (unit, rank, class, images, freq, mean, auroc, auroc_select, auroc_test), sorted by (unit, rank)."""
    n_units, n_classes = aurocs["all"].shape
    scores = pl.DataFrame({
        "unit": np.repeat(np.arange(n_units, dtype=np.int32), n_classes),
        "class": np.tile(np.array(classes, dtype=object), n_units).tolist(),
        "auroc": aurocs["all"].ravel().astype(np.float32),
        "auroc_select": aurocs["select"].ravel().astype(np.float32),
        "auroc_test": aurocs["test"].ravel().astype(np.float32),
    })
    freqs = freqs.select(pl.col("unit").cast(pl.Int32), pl.col("group").alias("class"), "freq", "mean",
                         pl.col("generations").alias("images"))
    ranked = (scores.join(freqs, on=["unit", "class"], how="left")
              .sort(["unit", "auroc", "class"], descending=[False, True, False])
              .with_columns(rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int16).over("unit")))
    return ranked.select("unit", "rank", "class", "images", "freq", "mean", "auroc", "auroc_select",
                         "auroc_test").to_arrow()


def class_best_table(classes: list[str], positive_NC: np.ndarray, aurocs: dict[str, np.ndarray]) -> pa.Table:
    """Per class: the unit with the best selection-half AUROC and its AUROC on both halves, sorted by class."""
    best_C = aurocs["select"].argmax(0)
    cols = np.arange(len(classes))
    return pa.table({
        "class": pa.array(classes, pa.string()),
        "images": positive_NC.sum(0).astype(np.int32),
        "unit": best_C.astype(np.int32),
        "auroc_select": aurocs["select"][best_C, cols].astype(np.float32),
        "auroc_test": aurocs["test"][best_C, cols].astype(np.float32),
    })
