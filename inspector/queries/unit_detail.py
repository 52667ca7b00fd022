"""One unit's analysis (the unit page): its concepts and localisation, activity profile and peaks, frequency per
prompt group, activation histogram, and `unit_page`, the bundle of everything the page shows but its examples' rows
and histogram (one cache lookup per page run instead of a dozen)."""

from __future__ import annotations

import os

import numpy as np
import polars as pl

from backend.run.manifest import captured_steps
from backend.run.schema import producer
from inspector.db import Database
from inspector.queries.interventions import unit_dreams, unit_interventions, unit_steering_success
from inspector.queries.registry import query
from inspector.queries.unit_examples import example_counts, range_examples
from inspector.queries.unit_list import unit_row
from inspector.runs import InspectorError, RunError, read_manifest
from inspector.tables import TableMissing

HIST_STATS = ("max", "mean")
HIST_AUTO_BYTES = 64 << 20
"""Partitions of activity up to this size are scanned for a unit's histogram as the page opens when the run has no
`histograms` table; larger ones on request (a full scan of a Stable Diffusion-sized run takes longer than a page
should)."""


@query
def unit_concepts(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    """The concepts for which this unit is among the best: concept, auroc, step, rank (best first; no rows when
    the unit is among the best of no concept)."""
    db.require("concepts")
    return db.sql("SELECT concept, auroc, CAST(step AS INTEGER) AS step, CAST(rank AS INTEGER) AS rank FROM concepts "
                  "WHERE layer = ? AND kind = ? AND unit = ? ORDER BY auroc DESC", [layer, kind, unit],
                  tables=("concepts",))


@query
def unit_localisation(db: Database, layer: str, kind: str, unit: int) -> dict | None:
    """How often the unit's top examples put its heat-map over the object's position: examples, positions, hits,
    share, rank (None when the unit has no row)."""
    db.require("localisation")
    df = db.sql("SELECT * EXCLUDE (layer, kind) FROM localisation WHERE layer = ? AND kind = ? AND unit = ?",
                [layer, kind, unit], tables=("localisation",))
    return df.row(0, named=True) if df.height else None


def _with_timesteps(db: Database, table: str, columns: str, order: str, layer: str, kind: str,
                    unit: int) -> pl.DataFrame:
    """Rows of a per-step table of one unit with each step's timestep (the step itself without a steps table)."""
    db.require(table)
    have_steps = db.has("steps")
    join = "LEFT JOIN steps s ON s.step = p.step" if have_steps else ""
    t = "CAST(s.timestep AS DOUBLE)" if have_steps else "CAST(p.step AS DOUBLE)"
    return db.sql(f"""SELECT CAST(p.step AS INTEGER) AS step, {t} AS timestep, {columns}
                      FROM {table} p {join} WHERE p.layer = ? AND p.kind = ? AND p.unit = ? ORDER BY {order}""",
                  [layer, kind, unit], tables=(table, "steps") if have_steps else (table,))


@query
def profile(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    """step, timestep, mean, max, freq of one unit."""
    return _with_timesteps(db, "profiles", "p.mean, p.max, p.freq", "p.step", layer, kind, unit)


@query
def peaks(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    """step, timestep, height, rank of one unit's peaks (rank 1 = highest)."""
    return _with_timesteps(db, "peaks", "p.height, CAST(p.rank AS INTEGER) AS rank", "p.rank", layer, kind, unit)


@query
def unit_frequencies(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    """group, freq, mean (and generations) of one unit per prompt group."""
    db.require("frequencies")
    return db.sql('SELECT "group", freq, mean FROM frequencies WHERE layer = ? AND kind = ? AND unit = ? '
                  'ORDER BY "group"', [layer, kind, unit], tables=("frequencies",))


@query
def unit_classes(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    """An image-classifier run's classes for one unit, best first: class, auroc, auroc_test (held out), freq,
    mean, images (class_scores)."""
    db.require("class_scores")
    return db.sql('SELECT "class", CAST(rank AS INTEGER) AS rank, auroc, auroc_test, freq, mean, images '
                  "FROM class_scores WHERE layer = ? AND kind = ? AND unit = ? ORDER BY rank",
                  [layer, kind, unit], tables=("class_scores",))


@query
def activity_bytes(db: Database, layer: str, kind: str) -> int:
    """Size on disk of one activity partition (what a histogram scan reads at most)."""
    return int(sum(os.path.getsize(f) for f in db.partition_files("activity", layer, kind)))


def _pairs(db: Database) -> int | None:
    """(generation, step) pairs of the run: generations x the run's step count (captured_steps); None when either
    is unknown."""
    if not db.has("generations"):
        return None
    try:
        n_steps = captured_steps(read_manifest(db.path))
    except RunError:
        return None
    if not n_steps:
        return None
    return int(db.sql("SELECT count(*) FROM generations", tables=("generations",)).item()) * n_steps


@query
def activation_histogram(db: Database, layer: str, kind: str, unit: int, stat: str = "max",
                         bins: int = 30) -> dict:
    """Histogram of one unit's recorded activity (its spatial `max` or `mean` per (generation, step); features
    are stored when active only). Read from the `histograms` table when the run has one (columns layer, kind, unit,
    stat, lo, hi, count), else from the activity partition. Returns {"hist": DataFrame(lo, hi, count), "rows": n,
    "pairs": (generation, step) pairs of the run or None, "source": table name}."""
    if stat not in HIST_STATS:
        raise InspectorError(f"unknown statistic {stat!r}; use one of {', '.join(HIST_STATS)}")
    pairs = _pairs(db)
    if db.has("histograms"):
        hist = db.sql("SELECT CAST(lo AS DOUBLE) AS lo, CAST(hi AS DOUBLE) AS hi, CAST(count AS BIGINT) AS count "
                      "FROM histograms WHERE layer = ? AND kind = ? AND unit = ? AND stat = ? ORDER BY lo",
                      [layer, kind, unit, stat], tables=("histograms",))
        return {"hist": hist, "rows": int(hist["count"].sum()), "pairs": pairs, "source": "histograms"}
    db.require("activity")
    files = db.partition_files("activity", layer, kind)
    values = db.read_files(f'SELECT "{stat}" AS v FROM {{src}} WHERE unit = ?', files, [unit])
    v = values["v"].to_numpy().astype(np.float64) if values.height else np.zeros(0)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        hist = pl.DataFrame({"lo": [], "hi": [], "count": []}, schema={"lo": pl.Float64, "hi": pl.Float64,
                                                                      "count": pl.Int64})
    else:
        lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            hi = lo + 1e-6
        counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
        hist = pl.DataFrame({"lo": edges[:-1], "hi": edges[1:], "count": counts.astype(np.int64)})
    return {"hist": hist, "rows": int(len(v)), "pairs": pairs, "source": "activity"}


@query
def unit_page(db: Database, layer: str, kind: str, unit: int) -> dict:
    """Everything the unit page shows about one unit except its examples' rows and histogram, in one cached
    result (one cache lookup per page run instead of a dozen): row, concepts, profile, peaks, frequencies,
    localisation, example_counts ({step: n}), interventions, steering, dreams, activity_bytes, classes (image-classifier
    runs), tables. An item
    whose table is missing is None with its command in `missing`; one that fails to read is None with its message
    in `errors`."""
    out: dict = {"tables": sorted(db.sources), "missing": {}, "errors": {}}
    items = {
        "row": ("units", unit_row.on, (layer, kind, unit)),
        "concepts": ("concepts", unit_concepts.on, (layer, kind, unit)),
        "profile": ("profiles", profile.on, (layer, kind, unit)),
        "peaks": ("peaks", peaks.on, (layer, kind, unit)),
        "frequencies": ("frequencies", unit_frequencies.on, (layer, kind, unit)),
        "localisation": ("localisation", unit_localisation.on, (layer, kind, unit)),
        "example_counts": ("examples", example_counts.on, (layer, kind, unit)),
        "range_examples": ("range_examples", range_examples.on, (layer, kind, unit)),
        "interventions": ("interventions", unit_interventions.on, (layer, kind, unit)),
        "steering": ("steering_success", unit_steering_success.on, (layer, kind, unit)),
        "dreams": ("dreams", unit_dreams.on, (layer, kind, unit)),
        "activity_bytes": ("activity", activity_bytes.on, (layer, kind)),
    }
    out["classes"] = None  # image-classifier runs only: never "missing" elsewhere
    if db.has("class_scores"):
        items["classes"] = ("class_scores", unit_classes.on, (layer, kind, unit))
    for name, (table, fn, args) in items.items():
        out[name] = None
        if not db.has(table):
            out["missing"][name] = producer(table, db.label)
            continue
        try:
            out[name] = fn(db, *args)
        except TableMissing as exc:
            out["missing"][name] = exc.command
        except InspectorError as exc:
            out["errors"][name] = str(exc)
    return out
