"""A unit's top examples (the unit page's grid): rows of `examples` joined to their generations, with the heat-maps
of just those rows read from the partition's files (`Database.heatmaps`, inspector/heatmaps.py)."""

from __future__ import annotations

import polars as pl

from inspector.db import Database
from inspector.queries.registry import query


@query
def example_steps(db: Database, layer: str, kind: str, unit: int) -> list[int]:
    """The steps the unit has examples for (-1: over all steps)."""
    db.require("examples")
    return db.sql("SELECT DISTINCT CAST(step AS INTEGER) AS step FROM examples WHERE layer = ? AND kind = ? AND "
                  "unit = ? ORDER BY step", [layer, kind, unit], tables=("examples",))["step"].to_list()


@query
def example_counts(db: Database, layer: str, kind: str, unit: int) -> dict[int, int]:
    """{step: number of examples} of one unit (step -1: over all steps)."""
    db.require("examples")
    return dict(db.sql("SELECT CAST(step AS INTEGER) AS step, count(*) AS n FROM examples WHERE layer = ? AND "
                       "kind = ? AND unit = ? GROUP BY step ORDER BY step", [layer, kind, unit],
                       tables=("examples",)).iter_rows())


@query
def example_count(db: Database, layer: str, kind: str, unit: int, step: int) -> int:
    db.require("examples")
    return int(db.sql("SELECT count(*) FROM examples WHERE layer = ? AND kind = ? AND unit = ? AND step = ?",
                      [layer, kind, unit, step], tables=("examples",)).item())


@query
def examples(db: Database, layer: str, kind: str, unit: int, step: int, first_rank: int = 1,
             last_rank: int = 1 << 30) -> pl.DataFrame:
    """One unit's top examples at a step (-1: over all steps) with ranks in [first_rank, last_rank]: rank, gen_id,
    activation, heatmap_step, height, width, prompt, seed, group, image, and `heatmap`: the map for display
    (row-major list of height x width floats in [0, 1]: clipped at 0, divided by its maximum, 8-bit precision)."""
    db.require("examples")
    have_gens = db.has("generations")
    gens = ", g.prompt, g.seed, g.\"group\", g.image" if have_gens else ""
    join = "LEFT JOIN generations g USING (gen_id)" if have_gens else ""
    rows = db.sql(f"""SELECT CAST(e.rank AS INTEGER) AS rank, e.gen_id, e.activation,
                             CAST(e.heatmap_step AS INTEGER) AS heatmap_step, e.height, e.width{gens}
                      FROM examples e {join}
                      WHERE e.layer = ? AND e.kind = ? AND e.unit = ? AND e.step = ? AND e.rank BETWEEN ? AND ?
                      ORDER BY e.rank""", [layer, kind, unit, step, first_rank, last_rank],
                  tables=("examples", "generations") if have_gens else ("examples",))
    if not have_gens:
        rows = rows.with_columns(prompt=pl.lit(None, pl.String), seed=pl.lit(None, pl.Int64),
                                 group=pl.lit(None, pl.String), image=pl.lit(None, pl.String))
    if rows.is_empty():
        return rows.with_columns(heatmap=pl.lit(None, pl.List(pl.Float32)))
    by_rank = db.heatmaps(layer, kind, unit, step, first_rank, last_rank)
    maps = [by_rank.get(r) for r in rows["rank"].to_list()]
    return rows.with_columns(heatmap=pl.Series("heatmap", [None if m is None else m.tolist() for m in maps],
                                               dtype=pl.List(pl.Float32)))


@query
def range_examples(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    """One unit's examples across its activation range (`range_examples`): bin, lo, hi, gen_id, step, activation,
    prompt, image; top bin first, each bin by activation descending."""
    db.require("range_examples")
    have_gens = db.has("generations")
    gens = ", g.prompt, g.image" if have_gens else ", CAST(NULL AS VARCHAR) AS prompt, CAST(NULL AS VARCHAR) AS image"
    join = "LEFT JOIN generations g USING (gen_id)" if have_gens else ""
    return db.sql(f"""SELECT CAST(r.bin AS INTEGER) AS bin, r.lo, r.hi, r.gen_id, CAST(r.step AS INTEGER) AS step,
                             r.activation{gens}
                      FROM range_examples r {join} WHERE r.layer = ? AND r.kind = ? AND r.unit = ?
                      ORDER BY r.bin DESC, r.activation DESC, r.gen_id""", [layer, kind, unit],
                  tables=("range_examples", "generations") if have_gens else ("range_examples",))
