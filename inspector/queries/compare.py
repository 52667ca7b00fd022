"""Reads for the Compare page: each unit's frequency in two prompt groups (`frequencies`) and the ranked
differential units (`comparisons`, written by `python cli.py compare`)."""

from __future__ import annotations

import polars as pl

from inspector.db import Database
from inspector.queries.registry import query


@query
def group_frequencies(db: Database, layer: str, kind: str, group_a: str, group_b: str) -> pl.DataFrame:
    """unit, freq_a, freq_b for every unit of a partition."""
    db.require("frequencies")
    return db.sql('SELECT unit, max(freq) FILTER (WHERE "group" = ?) AS freq_a, max(freq) FILTER (WHERE "group" = ?) '
                  'AS freq_b FROM frequencies WHERE layer = ? AND kind = ? GROUP BY unit ORDER BY unit',
                  [group_a, group_b, layer, kind], tables=("frequencies",))


@query
def comparison_pairs(db: Database) -> pl.DataFrame:
    db.require("comparisons")
    return db.sql("SELECT DISTINCT group_a, group_b FROM comparisons ORDER BY ALL", tables=("comparisons",))


@query
def comparison(db: Database, layer: str, kind: str, group_a: str, group_b: str, limit: int = 100) -> pl.DataFrame:
    """The ranked differential units of A vs B: rank, unit, freq_a, freq_b, ratio, score."""
    db.require("comparisons")
    return db.sql("SELECT CAST(rank AS INTEGER) AS rank, unit, freq_a, freq_b, ratio, score FROM comparisons "
                  "WHERE layer = ? AND kind = ? AND group_a = ? AND group_b = ? ORDER BY rank LIMIT ?",
                  [layer, kind, group_a, group_b, limit], tables=("comparisons",))
