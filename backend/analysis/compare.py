"""Prompt-group comparisons: which units fire more for group A's prompts than for group B's.

Score: the log-odds ratio of being active, A versus B, with a pseudo-count c added to active and inactive
counts (so zero counts stay finite and small counts are shrunk towards 0):

    score = log((n_a + c) / (N_a - n_a + c)) - log((n_b + c) / (N_b - n_b + c))

where n is the number of active (generation, step) pairs and N all pairs of the group. The plain ratio
freq_a / freq_b is reported too, and only units with freq_a > m * freq_b are kept (m = cfg.compare_multiplier).
Both groups must have been generated with the same seeds, so seed-driven effects cancel; otherwise the
comparison is refused.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import polars as pl

from backend.errors import DifflensError
from backend.run.config import AnalysisConfig


def check_same_seeds(gens: pl.DataFrame, group_a: str, group_b: str) -> None:
    """Every prompt of both groups must use the same set of seeds."""
    known = sorted(gens["group"].unique().to_list())
    for g in (group_a, group_b):
        if g not in known:
            raise DifflensError(f"unknown prompt group {g!r}; this run's groups: {', '.join(known)}")
    if group_a == group_b:
        raise DifflensError(f"compare needs two different groups (got {group_a!r} twice)")
    per_prompt = (gens.filter(pl.col("group").is_in([group_a, group_b]))
                  .group_by("group", "prompt").agg(pl.col("seed").unique().sort().alias("seeds")))
    seed_sets = {tuple(s) for s in per_prompt["seeds"].to_list()}
    if len(seed_sets) > 1:
        shown = "; ".join(str(list(s)) for s in sorted(seed_sets)[:3])
        raise DifflensError(f"groups {group_a!r} and {group_b!r} were not generated with the same seeds ({shown}); "
                            "capture both with the same --seed and --images-per-prompt for a fair comparison")


def log_odds_ratio(freq_a: np.ndarray, n_a: float, freq_b: np.ndarray, n_b: float, pseudo: float) -> np.ndarray:
    """Log-odds ratio of being active (A vs B) with counts freq * n and a pseudo-count."""
    act_a, act_b = freq_a * n_a, freq_b * n_b
    return (np.log(act_a + pseudo) - np.log(n_a - act_a + pseudo)
            - np.log(act_b + pseudo) + np.log(n_b - act_b + pseudo))


def compare_groups(freqs: pl.DataFrame, group_a: str, group_b: str, n_steps: int,
                   cfg: AnalysisConfig) -> pl.DataFrame:
    """Ranked differential units from a frequencies table (layer, kind, unit, group, freq, generations):
    group_a, group_b, layer, kind, unit, freq_a, freq_b, ratio, score, rank (rank 1 = highest score per
    layer and kind); only units passing freq_a > m * freq_b."""
    keys = ["layer", "kind", "unit"]
    a = freqs.filter(pl.col("group") == group_a).select(*keys, freq_a="freq", gens_a="generations")
    b = freqs.filter(pl.col("group") == group_b).select(*keys, freq_b="freq", gens_b="generations")
    both = a.join(b, on=keys)
    fa, fb = both["freq_a"].to_numpy().astype(np.float64), both["freq_b"].to_numpy().astype(np.float64)
    n_a, n_b = both["gens_a"].to_numpy() * n_steps, both["gens_b"].to_numpy() * n_steps
    score = log_odds_ratio(fa, n_a, fb, n_b, cfg.compare_pseudo_count)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(fb > 0, fa / np.where(fb > 0, fb, 1), np.where(fa > 0, np.inf, np.nan))
    out = both.with_columns(score=pl.Series(score, dtype=pl.Float64), ratio=pl.Series(ratio, dtype=pl.Float64))
    out = (out.filter(pl.col("freq_a") > cfg.compare_multiplier * pl.col("freq_b"))
           .sort(["layer", "kind", "score", "unit"], descending=[False, False, True, False])
           .with_columns(rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over(["layer", "kind"])))
    return out.select(pl.lit(group_a).alias("group_a"), pl.lit(group_b).alias("group_b"), *keys,
                      "freq_a", "freq_b", "ratio", "score", "rank")


def pair_name(group_a: str, group_b: str) -> str:
    """A deterministic, filesystem-safe name for an ordered pair of groups."""
    safe = lambda s: re.sub(r"[^A-Za-z0-9_-]+", "_", s)[:40]
    digest = hashlib.sha1(f"{group_a}\0{group_b}".encode()).hexdigest()[:8]
    return f"{safe(group_a)}-vs-{safe(group_b)}-{digest}"


def write_comparison(store, freqs: pl.DataFrame, ranked: pl.DataFrame, group_a: str, group_b: str,
                     top_n: int = 5, only: set[tuple[str, str]] | None = None) -> Path:
    """Write the comparisons rows (one shard per layer/kind and pair; only the (layer, kind)s in `only` when
    given: the others' shards are left as they are) and the histogram PNG of every layer/kind; returns its
    path."""
    from backend.analysis.plots import frequency_histogram

    name = pair_name(group_a, group_b)
    panels = []
    for (layer, kind), part in freqs.group_by(["layer", "kind"], maintain_order=True):
        rows = ranked.filter((pl.col("layer") == layer) & (pl.col("kind") == kind))
        if only is None or (layer, kind) in only:
            store.write_table_shard("comparisons", name, rows.drop("layer", "kind").to_arrow(), layer=layer,
                                    kind=kind)
        fa = part.filter(pl.col("group") == group_a).sort("unit")["freq"].to_numpy()
        fb = part.filter(pl.col("group") == group_b).sort("unit")["freq"].to_numpy()
        marked = list(zip(rows["unit"].head(top_n).to_list(), rows["freq_a"].head(top_n).to_list(), strict=True))
        panels.append((f"{layer} / {kind}", fa, fb, marked))
    rel = Path("media") / "compare" / f"{name}.png"
    store.write_png(rel, frequency_histogram(panels, group_a, group_b))
    return store.root / rel


def compare_run(run, group_a: str, group_b: str, cfg: AnalysisConfig | None = None) -> tuple[pl.DataFrame, Path]:
    """Rank units of an analysed run (directory or RunContext) by group A vs B; writes the comparisons rows and the
    histogram PNG."""
    from backend.run.config import validate_analysis
    from backend.run.context import as_context

    cfg = validate_analysis(cfg or AnalysisConfig())
    ctx = as_context(run, require="capture")
    store = ctx.store
    if not store.table_dir("frequencies").is_dir():
        raise DifflensError(f"{store.root} has no frequencies table; run `python cli.py analyze --run {store.root}` "
                            "first")
    gens = ctx.generations()
    check_same_seeds(gens, group_a, group_b)
    n_steps = ctx.n_steps
    freqs = store.read_table("frequencies")
    ranked = compare_groups(freqs, group_a, group_b, n_steps, cfg)
    return ranked, write_comparison(store, freqs, ranked, group_a, group_b)
