"""The unit atlas (the Atlas page and the unit page's atlas section): every unit's steered prior and deep dreams from
the `atlas` table, joined with `units` (density, peak step, flags) and `concepts` (each unit's best concept).

The grid is filtered, sorted and paged in DuckDB (`atlas_grid`: one page of rows, LIMIT / OFFSET, never the whole
layer in pandas or polars), so a 20,480-feature layer costs what 48 units cost; the page then reads only the visible
page's thumbnails. Sort keys, flags and the shown kinds of picture come from fixed lists (SORTS, FLAGS); every value
travels as a `?` parameter.
"""

from __future__ import annotations

import polars as pl

from inspector.db import Database
from inspector.queries.registry import query
from inspector.runs import InspectorError, safe_path

SORTS = {
    "unit": "u.unit",
    "density": "u.density",
    "peak step": "peak_step",
    "best concept (AUROC)": "b.auroc",
    "max activation": "u.max",
    "dream objective": "d.objective",
}
"""Grid sort keys (label -> SQL expression); ties are broken by unit, nulls last."""
FLAGS = {
    "all": "TRUE",
    "live": "NOT u.dead",
    "dead": "u.dead",
    "dense": "u.dense",
}
"""Grid unit filters by flag (label -> SQL condition on `units`)."""
PAGE_SIZE = 48


@query
def atlas_partitions(db: Database) -> pl.DataFrame:
    """(layer, kind, units) of each partition that has atlas rows (units: how many units have a prior or dream)."""
    db.require("atlas")
    return db.sql("SELECT layer, kind, count(DISTINCT unit) AS units FROM atlas GROUP BY ALL ORDER BY layer, kind",
                  tables=("atlas",))


@query
def atlas_options(db: Database, layer: str, kind: str) -> pl.DataFrame:
    """(what, variant, seed) combinations present in one partition of the atlas, sorted."""
    db.require("atlas")
    return db.sql("SELECT DISTINCT what, variant, CAST(seed AS INTEGER) AS seed FROM atlas WHERE layer = ? AND "
                  "kind = ? ORDER BY what, variant, seed", [layer, kind], tables=("atlas",))


@query
def concept_names(db: Database, layer: str, kind: str) -> list[str]:
    """The concepts of a partition (for the concept filter); none without a concepts table."""
    if not db.has("concepts"):
        return []
    return db.sql("SELECT DISTINCT concept FROM concepts WHERE layer = ? AND kind = ? ORDER BY concept",
                  [layer, kind], tables=("concepts",))["concept"].to_list()


def _chosen(prior: tuple[str, int] | None, dream: tuple[str, int] | None, alias: str = "") -> tuple[str, list]:
    """SQL condition (and its parameters) for the atlas rows of the shown prior (variant, seed) and dream."""
    a = f"{alias}." if alias else ""
    parts, params = [], []
    for what, choice in (("prior", prior), ("dream", dream)):
        if choice is not None:
            parts.append(f"({a}what = '{what}' AND {a}variant = ? AND {a}seed = ?)")
            params += [str(choice[0]), int(choice[1])]
    return "(" + " OR ".join(parts) + ")", params


@query
def atlas_grid(db: Database, layer: str, kind: str, prior: tuple[str, int] | None, dream: tuple[str, int] | None,
               sort: str = "unit", descending: bool = False, flag: str = "all", concept: str | None = None,
               page: int = 1, page_size: int = PAGE_SIZE) -> dict:
    """One page of the atlas grid of a partition: the units with the shown prior (variant, seed) or dream (variant,
    seed) (None: not shown), filtered by flag and by concept (units among that concept's best), sorted by a key of
    SORTS. Returns {"rows": DataFrame(unit, density, max, peak_step, dead, dense, label, concept, auroc, objective,
    prior_image, dream_image, dream_animation), "total": units matching, "page": the page shown (clamped), "pages":
    how many}.

    One query over `units` joined with the partition's units that have the shown pictures (_shown_units, a table
    made once per choice of pictures): filter, sort, count and LIMIT / OFFSET."""
    if sort not in SORTS:
        raise InspectorError(f"unknown sort {sort!r}; use one of {', '.join(SORTS)}")
    if flag not in FLAGS:
        raise InspectorError(f"unknown flag {flag!r}; use one of {', '.join(FLAGS)}")
    if prior is None and dream is None:
        raise InspectorError("show priors, dreams or both")
    db.require("units", "atlas")
    with_concepts = db.has("concepts")
    if concept and not with_concepts:
        raise InspectorError("this run has no concepts table to filter by")
    shown = _shown_units(db, layer, kind, prior, dream)
    ctes, params, joins = [], [], [f'JOIN "{shown}" d USING (unit)']
    if with_concepts:
        ctes.append("best AS (SELECT unit, arg_max(concept, auroc) AS concept, max(auroc) AS auroc FROM concepts "
                    "WHERE layer = ? AND kind = ? GROUP BY unit)")
        params += [layer, kind]
        joins.append("LEFT JOIN best b USING (unit)")
    where = ["u.layer = ? AND u.kind = ?", FLAGS[flag]]
    params += [layer, kind]
    if concept:
        where.append("u.unit IN (SELECT unit FROM concepts WHERE layer = ? AND kind = ? AND concept = ?)")
        params += [layer, kind, concept]
    concept_sql = ("b.concept, b.auroc" if with_concepts else
                   "CAST(NULL AS VARCHAR) AS concept, CAST(NULL AS FLOAT) AS auroc")
    order = "u.unit" if sort == "dream objective" and dream is None else SORTS[sort]
    label_sql = "u.label" if "label" in db.load("units") else "CAST(NULL AS VARCHAR) AS label"
    sql = (f"{'WITH ' + ', '.join(ctes) if ctes else ''} SELECT u.unit, u.density, u.max, u.peak_steps[1] AS "
           f"peak_step, u.dead, u.dense, {label_sql}, {concept_sql}, d.objective, d.prior_image, d.dream_image, "
           "d.dream_animation, count(*) OVER () AS total FROM units u "
           f"{' '.join(joins)} WHERE {' AND '.join(where)} ORDER BY {order} {'DESC' if descending else 'ASC'} "
           "NULLS LAST, u.unit LIMIT ? OFFSET ?")
    tables = ("units", "atlas", "concepts") if with_concepts else ("units", "atlas")
    page = max(1, int(page))
    rows = db.sql(sql, [*params, int(page_size), (page - 1) * int(page_size)], tables=tables)
    if rows.is_empty() and page > 1:  # past the end (the filters changed): the last page
        total = int(db.sql(f"SELECT count(*) FROM ({sql.rsplit(' ORDER BY ', 1)[0]})", params, tables=tables).item())
        page = max(1, -(-total // page_size))
        rows = db.sql(sql, [*params, int(page_size), (page - 1) * int(page_size)], tables=tables)
    total = int(rows["total"][0]) if rows.height else 0
    rows = rows.drop("total").with_columns(pl.col("unit").cast(pl.Int32))
    return {"rows": rows, "total": total, "page": page, "pages": max(1, -(-total // page_size))}


def _shown_units(db: Database, layer: str, kind: str, prior: tuple[str, int] | None,
                 dream: tuple[str, int] | None) -> str:
    """The (cached) table of a partition's units that have the shown prior or dream: unit, objective (the shown
    dream's), prior_image, dream_image, dream_animation (the first target steps' pictures when a dream has one row per
    target step). One pass over the atlas per choice of pictures; every page and sort of the grid starts from it."""
    chosen, chosen_params = _chosen(prior, dream)
    return db.derived("atlas_shown", f"""SELECT CAST(unit AS INTEGER) AS unit,
                             max(objective) FILTER (WHERE what = 'dream') AS objective,
                             arg_min(image, target_steps) FILTER (WHERE what = 'prior') AS prior_image,
                             arg_min(image, target_steps) FILTER (WHERE what = 'dream') AS dream_image,
                             arg_min(animation, target_steps) FILTER (WHERE what = 'dream') AS dream_animation
                      FROM atlas WHERE layer = ? AND kind = ? AND {chosen} GROUP BY unit""",
                      [layer, kind, *chosen_params], tables=("atlas",))


@query
def unit_atlas(db: Database, layer: str, kind: str, unit: int) -> dict:
    """One unit's atlas entries: {"rows": DataFrame(what, variant, seed, image, animation, objective, target_steps)
    sorted by what, variant, seed, target steps (empty without any), "heatmap_animation": the run-relative path of
    its heat-map-over-steps GIF, or None}."""
    db.require("atlas")
    rows = db.sql("SELECT what, variant, CAST(seed AS INTEGER) AS seed, image, animation, objective, target_steps "
                  "FROM atlas WHERE layer = ? AND kind = ? AND unit = ? ORDER BY what DESC, variant, seed, "
                  "target_steps", [layer, kind, unit], tables=("atlas",))
    rel = f"media/atlas/{layer}/{kind}/heatmaps/unit-{int(unit):05d}.gif"
    try:
        gif = rel if safe_path(db.path, rel).is_file() else None
    except InspectorError:
        gif = None
    return {"rows": rows, "heatmap_animation": gif}
