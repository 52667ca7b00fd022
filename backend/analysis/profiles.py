"""Activity profiles: per unit and step, the mean, max and freq (share of generations where the unit is active).

"Active" is: for channels, among the generation's top-k channels at that step (by the pooled activity);
for features, a spatial max code above the threshold (the table stores active features only, so a missing
row is an inactive one and counts as 0 in the mean).

Streaming: DuckDB reads one activity shard at a time and returns its per-(unit, step, group) sums, which are
added into arrays of shape [units, steps, groups]. Memory is bounded by one shard plus those arrays, whatever
the number of generations. A channel shard holds every channel of its generations (as capture writes them),
so the top-k window over (gen_id, step) can run within a shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from backend.analysis.inputs import Partition, RunInputs
from backend.errors import DifflensError
from backend.run.config import AnalysisConfig


@dataclass
class Counts:
    """Sums over generations, per unit U, step S and prompt group G."""

    active_USG: np.ndarray
    """Generations in which the unit is active."""
    sum_USG: np.ndarray
    """Sum of the pooled (spatial mean) activity; inactive sparse rows count as 0."""
    max_US: np.ndarray
    """Max over generations of the spatial max (0 where no row was stored: a feature never active there)."""
    gens_G: np.ndarray
    """Generations per group."""
    rows: int
    """Activity rows read."""


CHANNEL_SQL = """
SELECT a.unit, a.step, gg.g, count(*) FILTER (WHERE a.r <= ?) AS n_active, sum(a.mean) AS s, max(a.max) AS m,
       count(*) AS n
FROM (SELECT unit, step, gen_id, mean, max,
             row_number() OVER (PARTITION BY gen_id, step ORDER BY {pool} DESC, unit) AS r
      FROM read_parquet(?)) a
JOIN gen_groups gg USING (gen_id)
GROUP BY ALL
"""

FEATURE_SQL = """
SELECT a.unit, a.step, gg.g, count(*) FILTER (WHERE a.max > ?) AS n_active, sum(a.mean) AS s, max(a.max) AS m,
       count(*) AS n
FROM read_parquet(?) a JOIN gen_groups gg USING (gen_id)
GROUP BY ALL
"""


def count_activity(con: duckdb.DuckDBPyConnection, inputs: RunInputs, part: Partition, cfg: AnalysisConfig,
                   progress: bool = True) -> Counts:
    """Stream the partition's shards into Counts."""
    u, s, g = part.n_units, inputs.n_steps, len(inputs.groups)
    con.register("gen_groups", inputs.gens.select("gen_id", "g").to_arrow())
    if part.kind == "channel":
        sql, param = CHANNEL_SQL.format(pool=cfg.pool), cfg.top_k_channels
    else:
        sql, param = FEATURE_SQL, cfg.feature_threshold
    active, total, mx = np.zeros(u * s * g, np.int64), np.zeros(u * s * g), np.full(u * s, -np.inf, np.float32)
    rows = 0
    for path in tqdm(part.files, desc=f"profiles {part.name}", unit="shard", disable=not progress, leave=False):
        r = con.execute(sql, [param, path]).fetchnumpy()
        unit, step = r["unit"].astype(np.int64), r["step"].astype(np.int64)
        if len(unit) and (unit.max() >= u or step.max() >= s):
            raise DifflensError(f"{path} has unit {unit.max()} / step {step.max()} beyond the run's {u} units and "
                                f"{s} steps; recapture this run")
        cell = (unit * s + step) * g + r["g"].astype(np.int64)
        np.add.at(active, cell, r["n_active"])
        np.add.at(total, cell, r["s"])
        np.maximum.at(mx, unit * s + step, r["m"].astype(np.float32))
        rows += int(r["n"].sum())
    con.unregister("gen_groups")
    mx[np.isneginf(mx)] = 0.0  # a feature never active at that step
    gens_G = np.bincount(inputs.gens["g"].to_numpy(), minlength=g)
    expected = int(gens_G.sum()) * s * u
    if part.kind == "channel" and rows != expected:
        raise DifflensError(f"{part.name} activity has {rows:,} rows, expected {expected:,} (generations x steps x "
                            "channels); the capture is incomplete: rerun `python cli.py capture`")
    return Counts(active.reshape(u, s, g), total.reshape(u, s, g), mx.reshape(u, s), gens_G, rows)


def profile_arrays(counts: Counts) -> dict[str, np.ndarray]:
    """freq, mean and max, each [U, S], over all generations."""
    n = max(int(counts.gens_G.sum()), 1)
    return {"freq": counts.active_USG.sum(2) / n, "mean": counts.sum_USG.sum(2) / n, "max": counts.max_US}


def profiles_table(counts: Counts) -> pa.Table:
    """Rows (unit, step, mean, max, freq), sorted by (unit, step)."""
    p = profile_arrays(counts)
    u, s = p["freq"].shape
    return pa.table({
        "unit": np.repeat(np.arange(u, dtype=np.int32), s),
        "step": np.tile(np.arange(s, dtype=np.int16), u),
        "mean": p["mean"].ravel().astype(np.float32),
        "max": p["max"].ravel().astype(np.float32),
        "freq": p["freq"].ravel().astype(np.float32),
    })
