"""Activation histograms: per unit, how its recorded activity (spatial max and spatial mean per (generation,
step)) is distributed, precomputed so the inspector only reads them.

Two streaming DuckDB aggregations over a partition's activity files: the range [lo, hi] of each unit and
statistic, then counts in `bins` equal-width bins over that range. Memory is bounded by the groups (units x
bins), whatever the number of generations. Features are stored when active only, so their histograms count
active (generation, step) pairs.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from backend.analysis.inputs import Partition

STATS = ("max", "mean")

HIST_SQL = """
WITH rng AS (
    SELECT unit, min("{stat}") AS lo, greatest(max("{stat}"), min("{stat}") + 1e-6) AS hi
    FROM read_parquet(?) GROUP BY unit),
binned AS (
    SELECT a.unit, least(CAST(floor((a."{stat}" - r.lo) / (r.hi - r.lo) * ?) AS INTEGER), ? - 1) AS bin
    FROM read_parquet(?) a JOIN rng r USING (unit))
SELECT b.unit, b.bin, count(*) AS n, r.lo, r.hi FROM binned b JOIN rng r USING (unit) GROUP BY ALL
"""


def histograms_table(con: duckdb.DuckDBPyConnection, part: Partition, bins: int) -> pa.Table:
    """Rows (unit, stat, lo, hi, count): `bins` bins per unit and statistic (empty bins included), sorted by
    (unit, stat, lo)."""
    units, stats, los, his, counts = [], [], [], [], []
    for stat in STATS:
        r = con.execute(HIST_SQL.format(stat=stat), [part.files, bins, bins, part.files]).fetchnumpy()
        if not len(r["unit"]):
            continue
        unit_ids, first = np.unique(r["unit"], return_index=True)
        lo_U, hi_U = r["lo"][first].astype(np.float64), r["hi"][first].astype(np.float64)
        count_UB = np.zeros((len(unit_ids), bins), np.int64)
        count_UB[np.searchsorted(unit_ids, r["unit"]), r["bin"]] = r["n"]
        width_U = (hi_U - lo_U) / bins
        edges_UB = lo_U[:, None] + width_U[:, None] * np.arange(bins)[None]
        units.append(np.repeat(unit_ids, bins))
        stats += [stat] * (len(unit_ids) * bins)
        los.append(edges_UB.ravel())
        his.append((edges_UB + width_U[:, None]).ravel())
        counts.append(count_UB.ravel())
    if not units:
        return pa.table({"unit": pa.array([], pa.int32()), "stat": pa.array([], pa.string()),
                         "lo": pa.array([], pa.float32()), "hi": pa.array([], pa.float32()),
                         "count": pa.array([], pa.int64())})
    table = pa.table({"unit": np.concatenate(units).astype(np.int32), "stat": pa.array(stats, pa.string()),
                      "lo": np.concatenate(los).astype(np.float32), "hi": np.concatenate(his).astype(np.float32),
                      "count": np.concatenate(counts)})
    return table.sort_by([("unit", "ascending"), ("stat", "ascending"), ("lo", "ascending")])
