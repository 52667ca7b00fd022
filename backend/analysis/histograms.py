"""Activation histograms: per unit, how its recorded activity (spatial max and spatial mean per (generation,
step)) is distributed, precomputed so the inspector only reads them.

Two streaming passes over a partition's activity shards, one shard at a time (memory: one shard plus
[units, bins] arrays, whatever the number of generations): the range [lo, hi] of each unit and statistic, then
counts in `bins` equal-width bins over that range. Features are stored when active only, so their histograms
count active (generation, step) pairs.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from backend.analysis.inputs import Partition

STATS = ("max", "mean")

RANGE_SQL = 'SELECT unit, min("{stat}") AS lo, max("{stat}") AS hi FROM read_parquet(?) GROUP BY unit'
BIN_SQL = """
SELECT a.unit, least(CAST(floor((a."{stat}" - r.lo) / r.width) AS INTEGER), ? - 1) AS bin, count(*) AS n
FROM read_parquet(?) a JOIN hist_ranges r USING (unit) GROUP BY ALL
"""


def unit_ranges(con: duckdb.DuckDBPyConnection, files: list[str], stat: str, n_units: int) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """(lo [U], hi [U]) of a statistic over every shard; units without rows get lo = +inf."""
    lo, hi = np.full(n_units, np.inf), np.full(n_units, -np.inf)
    for path in files:
        r = con.execute(RANGE_SQL.format(stat=stat), [path]).fetchnumpy()
        unit = r["unit"].astype(np.int64)
        np.minimum.at(lo, unit, r["lo"].astype(np.float64))
        np.maximum.at(hi, unit, r["hi"].astype(np.float64))
    return lo, hi


def histograms_table(con: duckdb.DuckDBPyConnection, part: Partition, bins: int) -> pa.Table:
    """Rows (unit, stat, lo, hi, count): `bins` bins per unit and statistic (empty bins included; units that never
    have a row are left out), sorted by (unit, stat, lo)."""
    out = []
    for stat in STATS:
        lo_U, hi_U = unit_ranges(con, part.files, stat, part.n_units)
        seen = np.flatnonzero(np.isfinite(lo_U))
        width_U = np.where(hi_U > lo_U, hi_U - lo_U, 1e-6) / bins
        ranges = pa.table({"unit": seen.astype(np.int32), "lo": lo_U[seen], "width": width_U[seen]})
        con.register("hist_ranges", ranges)
        count_UB = np.zeros((part.n_units, bins), np.int64)
        for path in part.files:
            r = con.execute(BIN_SQL.format(stat=stat), [bins, path]).fetchnumpy()
            np.add.at(count_UB, (r["unit"].astype(np.int64), r["bin"].astype(np.int64)), r["n"])
        con.unregister("hist_ranges")
        edges_UB = lo_U[seen, None] + width_U[seen, None] * np.arange(bins)[None]
        out.append(pa.table({
            "unit": np.repeat(seen, bins).astype(np.int32),
            "stat": pa.array([stat] * (len(seen) * bins), pa.string()),
            "lo": edges_UB.ravel().astype(np.float32),
            "hi": (edges_UB + width_U[seen, None]).ravel().astype(np.float32),
            "count": count_UB[seen].ravel(),
        }))
    return pa.concat_tables(out).sort_by([("unit", "ascending"), ("stat", "ascending"), ("lo", "ascending")])
