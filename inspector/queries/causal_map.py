"""Reads for the Causal map page: the `causal_map` table (`python cli.py causal-map`, backend/interventions/
causal_map.py) as a concept x layer x window grid of held-out flip rates, and per concept its best cell."""

from __future__ import annotations

import polars as pl

from inspector.db import Database
from inspector.queries.registry import query

MAX_COLLATERAL = 0.2 + 1e-6
"""A cell counts as a clean success when its collateral rate is at most 20% (the issue's goal; the rates are float32,
so 0.2 is compared with a margin)."""


@query
def map_options(db: Database) -> dict[str, list[str]]:
    """The layers, windows, directions and masks the map holds (each sorted as the map computed them)."""
    db.require("causal_map")
    out = {}
    for col in ("layer", "window", "direction", "mask"):
        out[col] = db.sql(f'SELECT DISTINCT "{col}" FROM causal_map ORDER BY "{col}"',
                          tables=("causal_map",))[col].to_list()
    return out


@query
def map_grid(db: Database, directions: tuple[str, ...], masks: tuple[str, ...]) -> pl.DataFrame:
    """Per (concept, layer, window): the best held-out flip rate over the chosen directions and masks among cells
    with collateral <= MAX_COLLATERAL (flip_rate; NaN when none qualifies), the best flip rate regardless
    (any_flip), that cell's collateral rate, and which direction, mask and scale got it."""
    db.require("causal_map")
    if not directions or not masks:
        return pl.DataFrame()
    dirs = ", ".join("?" for _ in directions)
    ms = ", ".join("?" for _ in masks)
    return db.sql(
        f"""SELECT concept, attribute, layer, "window",
                   max(CASE WHEN collateral_rate <= ? THEN flip_rate END) AS flip_rate,
                   max(flip_rate) AS any_flip,
                   arg_max(collateral_rate, flip_rate - collateral_rate) AS collateral_rate,
                   arg_max(direction, flip_rate - collateral_rate) AS direction,
                   arg_max(mask, flip_rate - collateral_rate) AS mask,
                   arg_max(scale, flip_rate - collateral_rate) AS scale
            FROM causal_map WHERE direction IN ({dirs}) AND mask IN ({ms})
            GROUP BY ALL ORDER BY attribute, concept, layer, "window" """,
        [MAX_COLLATERAL, *directions, *masks], tables=("causal_map",))


@query
def best_cells(db: Database) -> pl.DataFrame:
    """Per concept, its best cell: the highest held-out flip rate among cells with collateral <= MAX_COLLATERAL
    (none: the highest flip rate), with layer, window, steps, direction, unit(s), mask, scale and rates."""
    db.require("causal_map")
    return db.sql(
        """SELECT * EXCLUDE (ok, r) FROM (
               SELECT *, collateral_rate <= ? AS ok,
                      row_number() OVER (PARTITION BY concept ORDER BY collateral_rate <= ? DESC, flip_rate DESC,
                                         collateral_rate, layer) AS r
               FROM causal_map) WHERE r = 1 ORDER BY attribute, concept""",
        [MAX_COLLATERAL, MAX_COLLATERAL], tables=("causal_map",))


@query
def concept_cells(db: Database, concept: str) -> pl.DataFrame:
    """Every cell of one concept, best held-out flip rate first."""
    db.require("causal_map")
    return db.sql("""SELECT layer, "window", steps, direction, kind, unit, units, mask, scale, strength, auroc,
                            selection_flip_rate, selection_collateral_rate, flip_rate, collateral_rate, clean_rate,
                            seeds, baseline_rate
                     FROM causal_map WHERE concept = ? ORDER BY flip_rate DESC, collateral_rate, layer""",
                  [concept], tables=("causal_map",))


@query
def direction_choices(db: Database, max_groups: int = 8) -> list[str]:
    """Direction specs the Lab offers for this run: concept:ATTR=VALUE for every attribute value of its prompts, and
    groups:A-vs-B for every ordered pair of its first max_groups prompt groups (backend/interventions/
    concept_directions.py parses them)."""
    import json

    db.require("generations")
    texts = db.sql("SELECT DISTINCT attributes FROM generations", tables=("generations",))["attributes"].to_list()
    values = sorted({(k, str(v)) for t in texts for k, v in json.loads(t or "{}").items()})
    groups = db.sql('SELECT DISTINCT "group" FROM generations ORDER BY "group"', tables=("generations",))[
        "group"].to_list()[:max_groups]
    return ([f"concept:{k}={v}" for k, v in values]
            + [f"groups:{a}-vs-{b}" for a in groups for b in groups if a != b])
