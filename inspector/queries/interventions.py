"""Reads of the interventions stage's tables: steering and SAE edits (`interventions`), concept steering
(`steering_success`), deep dreams (`dreams`) and block ablation (`ablations`; the Ablation page)."""

from __future__ import annotations

import polars as pl

from inspector.db import Database
from inspector.queries.registry import query


@query
def unit_interventions(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    """The interventions recorded for this unit: steering it, and SAE edits that zero or scale it (alone, or among
    several features: rows with unit -1 list them in `features`)."""
    db.require("interventions")
    cols = db.load("interventions")
    order = ", ".join(c for c in ("method", "mode", "scale", "spec", "seed") if c in cols) or "unit"
    if "features" in cols:
        return db.sql(f"SELECT * FROM interventions WHERE layer = ? AND kind = ? AND (unit = ? OR "
                      f"list_contains(features, ?)) ORDER BY {order}", [layer, kind, unit, unit],
                      tables=("interventions",))
    return db.sql(f"SELECT * FROM interventions WHERE layer = ? AND kind = ? AND unit = ? ORDER BY {order}",
                  [layer, kind, unit], tables=("interventions",))


@query
def unit_steering_success(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    db.require("steering_success")
    return db.sql("SELECT * FROM steering_success WHERE layer = ? AND kind = ? AND unit = ? ORDER BY concept",
                  [layer, kind, unit], tables=("steering_success",))


@query
def steering_success(db: Database) -> pl.DataFrame:
    db.require("steering_success")
    return db.sql("SELECT * FROM steering_success ORDER BY layer, kind, concept", tables=("steering_success",))


@query
def unit_dreams(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    """The deep-dream snapshots of one unit: step, seed, opt_step, activation, penalties (JSON), image."""
    db.require("dreams")
    return db.sql("SELECT CAST(step AS INTEGER) AS step, seed, opt_step, activation, penalties, image FROM dreams "
                  "WHERE layer = ? AND kind = ? AND unit = ? ORDER BY step, seed, opt_step", [layer, kind, unit],
                  tables=("dreams",))


@query
def ablations(db: Database) -> pl.DataFrame:
    """Every ablation row: layer (the block), mode, prompt, seed, image, baseline_image, effect, ..."""
    db.require("ablations")
    return db.sql("SELECT * FROM ablations ORDER BY layer, mode, prompt, seed", tables=("ablations",))
