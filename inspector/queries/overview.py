"""Reads about a run as a whole (the Overview page, the selectors of the other pages, the Lab): its tables,
generations and prompt groups, steps, (layer, kind) partitions, SAE training and concept recovery."""

from __future__ import annotations

import json

import polars as pl

from backend.run.schema import feature_kind, run_saes
from inspector.db import Database
from inspector.queries.registry import query

KINDS = ("channel", "feature")
"""The kinds of every run; a layer's other SAEs add feature.<sae_id> (`saes`)."""


@query
def tables(db: Database) -> list[str]:
    """Names of the tables the run has."""
    return sorted(db.sources)


@query
def generation_counts(db: Database) -> dict:
    db.require("generations")
    row = db.sql('SELECT count(*) AS generations, count(DISTINCT prompt) AS prompts, count(DISTINCT "group") AS '
                 'groups FROM generations', tables=("generations",)).row(0, named=True)
    return {k: int(v) for k, v in row.items()}


@query
def groups(db: Database) -> pl.DataFrame:
    """Prompt groups: group, generations, prompts."""
    db.require("generations")
    return db.sql('SELECT "group", count(*) AS generations, count(DISTINCT prompt) AS prompts FROM generations '
                  'GROUP BY ALL ORDER BY "group"', tables=("generations",))


@query
def first_prompts(db: Database, n: int = 20) -> list[str]:
    db.require("generations")
    return db.sql("SELECT prompt FROM generations GROUP BY prompt ORDER BY min(gen_id) LIMIT ?", [n],
                  tables=("generations",))["prompt"].to_list()


@query
def input_images(db: Database, n: int = 200) -> pl.DataFrame:
    """An image-classifier run's first n input images as the run keeps them: gen_id, image (run path), class_label."""
    db.require("generations")
    return db.sql("SELECT CAST(gen_id AS INTEGER) AS gen_id, image, class_label FROM generations ORDER BY gen_id "
                  "LIMIT ?", [n], tables=("generations",))


@query
def steps(db: Database) -> pl.DataFrame:
    """step, timestep."""
    db.require("steps")
    return db.sql("SELECT CAST(step AS INTEGER) AS step, CAST(timestep AS DOUBLE) AS timestep FROM steps ORDER BY "
                  "step", tables=("steps",))


@query
def partitions(db: Database) -> pl.DataFrame:
    """(layer, kind, units, dead, dense) per analysed partition; from the activity layout (units = null) when
    the run has not been analysed."""
    if db.has("units"):
        return db.sql("SELECT layer, kind, count(*) AS units, count(*) FILTER (WHERE dead) AS dead, "
                      "count(*) FILTER (WHERE dense) AS dense FROM units GROUP BY ALL ORDER BY layer, kind",
                      tables=("units",))
    rows = []
    if db.has("activity"):
        for layer in db.partition_values("activity", "layer"):
            for kind in db.partition_values("activity", "kind"):
                if db.has_partition("activity", layer, kind):
                    rows.append({"layer": layer, "kind": kind})
    return pl.DataFrame(rows, schema={"layer": pl.String, "kind": pl.String}).with_columns(
        units=pl.lit(None, pl.Int64), dead=pl.lit(None, pl.Int64), dense=pl.lit(None, pl.Int64))


@query
def saes(db: Database) -> pl.DataFrame:
    """The run's SAEs (sae/<layer>/<sae_id>/): layer, sae_id, kind (feature, feature.<sae_id>), d_in, n_latents,
    k, architecture, source (the checkpoint an imported SAE came from, with its format; null: trained here), dir
    (its run-relative directory)."""
    rows = []
    for layer, sae_id in run_saes(db.path):
        rel = f"sae/{layer}" if _legacy(db, layer, sae_id) else f"sae/{layer}/{sae_id}"
        cfg_path = db.path / rel / "cfg.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            cfg = {}
        source = f"{cfg['source']} ({cfg.get('source_format')})" if cfg.get("source") else None
        rows.append({"layer": layer, "sae_id": sae_id, "kind": feature_kind(sae_id), "d_in": cfg.get("d_in"),
                     "n_latents": cfg.get("n_latents"), "k": cfg.get("k"), "architecture": cfg.get("architecture"),
                     "source": source, "dir": rel})
    return pl.DataFrame(rows, schema={"layer": pl.String, "sae_id": pl.String, "kind": pl.String, "d_in": pl.Int64,
                                      "n_latents": pl.Int64, "k": pl.Int64, "architecture": pl.String,
                                      "source": pl.String, "dir": pl.String})


def _legacy(db: Database, layer: str, sae_id: str) -> bool:
    """A format-2 run's default SAE lives in sae/<layer>/ itself."""
    return sae_id == "default" and (db.path / "sae" / layer / "cfg.json").is_file()


@query
def sae_training(db: Database) -> pl.DataFrame:
    db.require("sae_training")
    return db.sql("SELECT layer, kind, step, tokens, fvu, l0, dead_frac, lr FROM sae_training ORDER BY layer, kind, "
                  "step", tables=("sae_training",))


@query
def sae_metrics(db: Database) -> pl.DataFrame:
    db.require("sae_metrics")
    return db.sql("SELECT * FROM sae_metrics ORDER BY layer", tables=("sae_metrics",))


@query
def concept_summary(db: Database) -> pl.DataFrame:
    db.require("concept_summary")
    return db.sql("SELECT * FROM concept_summary ORDER BY layer, kind", tables=("concept_summary",))
