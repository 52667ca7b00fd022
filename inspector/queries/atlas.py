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


def _picture(what: str, alias: str) -> str:
    """One row per unit of one (what, variant, seed): its image (the first target steps' when a dream has one row
    per target step), animation and objective."""
    return (f"{alias} AS (SELECT unit, arg_min(image, target_steps) AS image, arg_min(animation, target_steps) AS "
            f"animation, max(objective) AS objective FROM atlas WHERE layer = ? AND kind = ? AND what = '{what}' AND "
            "variant = ? AND seed = ? GROUP BY unit)")


@query
def atlas_grid(db: Database, layer: str, kind: str, prior: tuple[str, int] | None, dream: tuple[str, int] | None,
               sort: str = "unit", descending: bool = False, flag: str = "all", concept: str | None = None,
               page: int = 1, page_size: int = PAGE_SIZE) -> dict:
    """One page of the atlas grid of a partition: the units with a prior (variant, seed) or a dream (variant,
    seed) (None: not shown), filtered by flag and by concept (units among that concept's best), sorted by a key of
    SORTS. Returns {"rows": DataFrame(unit, density, max, peak_step, dead, dense, concept, auroc, prior_image,
    dream_image, dream_animation, objective), "total": units matching, "page": the page shown (clamped),
    "pages": how many}."""
    if sort not in SORTS:
        raise InspectorError(f"unknown sort {sort!r}; use one of {', '.join(SORTS)}")
    if flag not in FLAGS:
        raise InspectorError(f"unknown flag {flag!r}; use one of {', '.join(FLAGS)}")
    if prior is None and dream is None:
        raise InspectorError("show priors, dreams or both")
    db.require("units", "atlas")
    with_concepts = db.has("concepts")
    ctes, params, joins, shown = [], [], [], []
    if with_concepts:
        ctes.append("best AS (SELECT unit, arg_max(concept, auroc) AS concept, max(auroc) AS auroc FROM concepts "
                    "WHERE layer = ? AND kind = ? GROUP BY unit)")
        params += [layer, kind]
        joins.append("LEFT JOIN best b USING (unit)")
    for what, alias, choice in (("prior", "p", prior), ("dream", "d", dream)):
        if choice is None:
            continue
        ctes.append(_picture(what, alias))
        params += [layer, kind, str(choice[0]), int(choice[1])]
        joins.append(f"LEFT JOIN {alias} USING (unit)")
        shown.append(f"{alias}.image IS NOT NULL")
    concept_sql = ("b.concept, b.auroc" if with_concepts else
                   "CAST(NULL AS VARCHAR) AS concept, CAST(NULL AS FLOAT) AS auroc")
    prior_sql = "p.image AS prior_image" if prior is not None else "CAST(NULL AS VARCHAR) AS prior_image"
    dream_sql = ("d.image AS dream_image, d.animation AS dream_animation, d.objective" if dream is not None else
                 "CAST(NULL AS VARCHAR) AS dream_image, CAST(NULL AS VARCHAR) AS dream_animation, "
                 "CAST(NULL AS FLOAT) AS objective")
    where = [f"u.layer = ? AND u.kind = ? AND ({' OR '.join(shown)})", FLAGS[flag]]
    where_params = [layer, kind]
    if concept:
        if not with_concepts:
            raise InspectorError("this run has no concepts table to filter by")
        where.append("u.unit IN (SELECT unit FROM concepts WHERE layer = ? AND kind = ? AND concept = ?)")
        where_params += [layer, kind, concept]
    order = "u.unit" if sort == "dream objective" and dream is None else SORTS[sort]
    body = (f"WITH {', '.join(ctes)} SELECT u.unit, u.density, u.max, u.peak_steps[1] AS peak_step, u.dead, u.dense, "
            f"{concept_sql}, {prior_sql}, {dream_sql} FROM units u {' '.join(joins)} WHERE {' AND '.join(where)}")
    tables = ("units", "atlas", "concepts") if with_concepts else ("units", "atlas")
    total = int(db.sql(f"SELECT count(*) FROM ({body})", params + where_params, tables=tables).item())
    pages = max(1, -(-total // page_size))
    page = min(max(1, int(page)), pages)
    direction = "DESC" if descending else "ASC"
    rows = db.sql(f"{body} ORDER BY {order} {direction} NULLS LAST, u.unit LIMIT ? OFFSET ?",
                  params + where_params + [int(page_size), (page - 1) * int(page_size)], tables=tables)
    return {"rows": rows, "total": total, "page": page, "pages": pages}


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
