"""The units of a (layer, kind) partition and moving between them (the Units page's table; the unit page's range,
row, Prev / Next and Random): the `units` table, with each unit's best concept from `concepts`."""

from __future__ import annotations

import numpy as np
import polars as pl

from inspector.db import Database
from inspector.queries.registry import query

UNIT_COLUMNS = ("u.unit, u.density, u.mean, u.max, u.peak_steps, u.first_active, u.last_active, u.dead, u.dense, "
                "u.label")


@query
def units(db: Database, layer: str, kind: str) -> pl.DataFrame:
    """Every unit of a partition with its best concept (by AUROC; null when it has none) and its top peak step."""
    db.require("units")
    cols = db.load("units")
    extra = ", u.active_steps" if "active_steps" in cols else ""
    extra += label_confidence_sql(cols)
    if db.has("concepts"):
        sql = f"""
            WITH best AS (SELECT unit, arg_max(concept, auroc) AS concept, max(auroc) AS auroc FROM concepts
                          WHERE layer = ? AND kind = ? GROUP BY unit)
            SELECT {UNIT_COLUMNS}{extra}, u.peak_steps[1] AS peak_step, b.concept, b.auroc
            FROM units u LEFT JOIN best b USING (unit) WHERE u.layer = ? AND u.kind = ? ORDER BY u.unit"""
        return db.sql(sql, [layer, kind, layer, kind], tables=("units", "concepts"))
    sql = f"""SELECT {UNIT_COLUMNS}{extra}, u.peak_steps[1] AS peak_step, CAST(NULL AS VARCHAR) AS concept,
              CAST(NULL AS FLOAT) AS auroc FROM units u WHERE u.layer = ? AND u.kind = ? ORDER BY u.unit"""
    return db.sql(sql, [layer, kind], tables=("units",))


def label_confidence_sql(cols) -> str:
    """The select-list tail giving label_confidence and label_step (null for a run analysed before labels had
    them)."""
    confidence = "u.label_confidence" if "label_confidence" in cols else "CAST(NULL AS FLOAT) AS label_confidence"
    step = "u.label_step" if "label_step" in cols else "CAST(NULL AS SMALLINT) AS label_step"
    return f", {confidence}, {step}"


@query
def unit_range(db: Database, layer: str, kind: str) -> tuple[int, int]:
    """(first, last) unit index of a partition; (0, -1) when it has no units."""
    db.require("units")
    lo, hi = db.sql("SELECT min(unit) AS lo, max(unit) AS hi FROM units WHERE layer = ? AND kind = ?",
                    [layer, kind], tables=("units",)).row(0)
    return (0, -1) if lo is None else (int(lo), int(hi))


@query
def unit_row(db: Database, layer: str, kind: str, unit: int) -> dict | None:
    """One unit's row of `units` (None when the unit does not exist)."""
    db.require("units")
    extra = label_confidence_sql(db.load("units"))
    df = db.sql(f"SELECT {UNIT_COLUMNS}{extra} FROM units u WHERE u.layer = ? AND u.kind = ? AND u.unit = ?",
                [layer, kind, unit], tables=("units",))
    return df.row(0, named=True) if df.height else None


@query
def neighbour(db: Database, layer: str, kind: str, unit: int, direction: int, skip_dead: bool) -> int | None:
    """The next (direction 1) or previous (-1) unit, optionally skipping dead ones; None at the end."""
    db.require("units")
    dead = " AND NOT dead" if skip_dead else ""
    if direction > 0:
        sql = f"SELECT min(unit) FROM units WHERE layer = ? AND kind = ? AND unit > ?{dead}"
    else:
        sql = f"SELECT max(unit) FROM units WHERE layer = ? AND kind = ? AND unit < ?{dead}"
    value = db.sql(sql, [layer, kind, unit], tables=("units",)).item()
    return None if value is None else int(value)


@query
def live_units(db: Database, layer: str, kind: str) -> np.ndarray:
    """Indices of the partition's units that are not dead (for "random")."""
    db.require("units")
    return db.sql("SELECT unit FROM units WHERE layer = ? AND kind = ? AND NOT dead ORDER BY unit", [layer, kind],
                  tables=("units",))["unit"].to_numpy()
