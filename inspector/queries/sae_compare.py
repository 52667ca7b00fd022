"""Reads for the SAE comparison page: the layers compared, each SAE's metrics and activation-density histogram, and
the decoder matching of two SAEs (all written by `python cli.py compare-saes`, backend/analysis/sae_compare.py)."""

from __future__ import annotations

import polars as pl

from inspector.db import Database
from inspector.queries.registry import query

MATCH_ORDERS = {"best": "cosine DESC, feature_a", "worst": "cosine ASC, feature_a", "feature": "feature_a"}
"""How the matched pairs table can be sorted (fixed SQL, chosen by key)."""


@query
def compared_layers(db: Database) -> list[str]:
    """Layers with an SAE comparison."""
    db.require("sae_comparison")
    return db.sql("SELECT DISTINCT layer FROM sae_comparison ORDER BY layer", tables=("sae_comparison",))[
        "layer"].to_list()


@query
def sae_comparison(db: Database, layer: str) -> pl.DataFrame:
    """One row per SAE of the layer: sae_id, kind, n_latents, k, architecture, tokens, fvu, l0, dead, dead_frac,
    dense_frac, frac_loss_recovered, splice_samples, concepts, mean_best_auroc."""
    db.require("sae_comparison")
    return db.sql("SELECT sae_id, kind, n_latents, k, architecture, tokens, fvu, l0, dead, dead_frac, dense_frac, "
                  "frac_loss_recovered, splice_samples, concepts, mean_best_auroc FROM sae_comparison WHERE layer = ? "
                  "ORDER BY sae_id != 'default', sae_id", [layer], tables=("sae_comparison",))


@query
def sae_density(db: Database, layer: str) -> pl.DataFrame:
    """The density histograms of the layer's SAEs: sae_id, lo, hi, count."""
    db.require("sae_density")
    return db.sql("SELECT sae_id, CAST(lo AS DOUBLE) AS lo, CAST(hi AS DOUBLE) AS hi, count FROM sae_density "
                  "WHERE layer = ? ORDER BY sae_id, lo", [layer], tables=("sae_density",))


@query
def match_pairs(db: Database, layer: str) -> pl.DataFrame:
    """The ordered SAE pairs matched on a layer: sae_a, sae_b."""
    db.require("sae_matches")
    return db.sql("SELECT DISTINCT sae_a, sae_b FROM sae_matches WHERE layer = ? ORDER BY ALL", [layer],
                  tables=("sae_matches",))


@query
def match_histogram(db: Database, layer: str, sae_a: str, sae_b: str, bins: int = 40) -> pl.DataFrame:
    """Histogram of A's latents' best cosine in B on [min(0, lowest), 1]: lo, hi, count (every bin, empty ones 0)."""
    db.require("sae_matches")
    where = "layer = ? AND sae_a = ? AND sae_b = ?"
    low = db.sql(f"SELECT least(0.0, coalesce(min(cosine), 0.0)) AS low FROM sae_matches WHERE {where}",
                 [layer, sae_a, sae_b], tables=("sae_matches",))["low"][0]
    width = (1.0 - float(low)) / bins
    return db.sql(f"SELECT ? + b * ? AS lo, ? + (b + 1) * ? AS hi, coalesce(n, 0) AS count FROM range(?) t(b) "
                  f"LEFT JOIN (SELECT least(CAST(floor((cosine - ?) / ?) AS BIGINT), ? - 1) AS bin, count(*) AS n "
                  f"FROM sae_matches WHERE {where} GROUP BY bin) ON bin = b ORDER BY b",
                  [low, width, low, width, bins, low, width, bins, layer, sae_a, sae_b], tables=("sae_matches",))


@query
def matches(db: Database, layer: str, sae_a: str, sae_b: str, order: str = "best", limit: int = 500) -> pl.DataFrame:
    """A's latents with their best match in B: feature_a, feature_b, cosine (sorted by MATCH_ORDERS[order])."""
    db.require("sae_matches")
    return db.sql(f"SELECT feature_a, feature_b, CAST(cosine AS DOUBLE) AS cosine FROM sae_matches WHERE layer = ? "
                  f"AND sae_a = ? AND sae_b = ? ORDER BY {MATCH_ORDERS[order]} LIMIT ?",
                  [layer, sae_a, sae_b, limit], tables=("sae_matches",))
