"""Per-generation activity of a partition's units, read in chunks of units: for each chunk the pooled activity
[units, steps, generations] (cfg.pool: what concept recovery scores) and, from the example statistic
(cfg.example_stat, what ranks examples), each generation's activation maximised over steps and the step of that
maximum [units, generations]. Missing rows (inactive features) are 0. Memory is one chunk (CHUNK_CELLS values of
each array); the activity files are sorted by unit, so DuckDB reads little beyond the chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import duckdb
import numpy as np

from backend.analysis.inputs import Partition, RunInputs
from backend.run.config import AnalysisConfig

CHUNK_CELLS = 20_000_000
SQL = "SELECT unit, step, gen_id, {pool} AS v, {stat} AS w FROM read_parquet(?) WHERE unit >= ? AND unit < ?"


@dataclass
class Chunk:
    lo: int
    hi: int
    pooled_USN: np.ndarray
    """[units, steps, generations] pooled activity (cfg.pool), generations in inputs.gens order."""
    best_UN: np.ndarray
    """[units, generations] the example statistic maximised over steps."""
    step_UN: np.ndarray
    """[units, generations] the step of that maximum."""


def chunks(con: duckdb.DuckDBPyConnection, inputs: RunInputs, part: Partition, cfg: AnalysisConfig) -> Iterator[Chunk]:
    """The partition's activity, a chunk of units at a time."""
    gen_ids = inputs.gens["gen_id"].to_numpy()
    n_gens, n_steps = len(gen_ids), inputs.n_steps
    size = max(1, CHUNK_CELLS // max(n_steps * n_gens, 1))
    for lo in range(0, part.n_units, size):
        hi = min(lo + size, part.n_units)
        r = con.execute(SQL.format(pool=cfg.pool, stat=cfg.example_stat), [part.files, lo, hi]).fetchnumpy()
        where = (r["unit"] - lo, r["step"], np.searchsorted(gen_ids, r["gen_id"]))
        pooled_USN = np.zeros((hi - lo, n_steps, n_gens), np.float32)
        pooled_USN[where] = r["v"]
        stat_USN = np.zeros((hi - lo, n_steps, n_gens), np.float32)
        stat_USN[where] = r["w"]
        yield Chunk(lo, hi, pooled_USN, stat_USN.max(1), stat_USN.argmax(1).astype(np.int16))
