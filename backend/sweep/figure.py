"""The figure of a sweep: each run's SAE FVU and its features' concept recovery (concept_summary, where the prompts
carry attributes) against the first numeric swept key, one line per layer and value of the other swept keys:
`sweeps/<name>/metrics.png` (PNG; backend/analysis/draw.py, no matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from PIL import ImageDraw

from backend.analysis.draw import INK, PALETTE, Axes, canvas, font
from backend.grid import save_png
from backend.run.schema import is_feature
from backend.run.store import RunStore
from backend.sweep.grid import SweepPlan

PANELS = (("fvu", "SAE FVU (lower is better)"), ("mean_best_auroc", "concept recovery: mean best AUROC of features"))


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def sweep_metrics(plan: SweepPlan) -> pl.DataFrame:
    """One row per (run, layer) of the runs that trained SAEs: the swept keys, fvu, mean_best_auroc (best over the
    layer's feature kinds; null without concept recovery)."""
    rows = []
    for run in plan.runs:
        store = RunStore(plan.config(run).out_dir)
        if not (store.root / "tables" / "sae_metrics.parquet").is_file():
            continue
        metrics = store.read_table("sae_metrics")
        concepts = (store.read_table("concept_summary") if (store.root / "tables" / "concept_summary.parquet").is_file()
                    else pl.DataFrame({"layer": [], "kind": [], "mean_best_auroc": []}))
        for m in metrics.iter_rows(named=True):
            mine = [c["mean_best_auroc"] for c in concepts.iter_rows(named=True)
                    if c["layer"] == m["layer"] and is_feature(c["kind"])]
            rows.append({"run": run.name, **{k: str(v) for k, v in run.overrides.items()}, "layer": m["layer"],
                         "x": None, "fvu": m["fvu"], "mean_best_auroc": max(mine) if mine else None})
    return pl.DataFrame(rows, infer_schema_length=None)


def figure_key(plan: SweepPlan) -> str | None:
    """The swept key on the figure's x axis: the first whose values are all numbers."""
    return next((k for k, values in plan.grid.items() if all(_is_number(v) for v in values)), None)


def write_sweep_figure(plan: SweepPlan, path: Path) -> Path | None:
    """Draw the figure to path; None (nothing written) when no key is numeric or no run has SAE metrics."""
    key = figure_key(plan)
    table = sweep_metrics(plan)
    if key is None or table.is_empty():
        return None
    table = table.with_columns(x=pl.col(key).cast(pl.Float64))
    others = [k for k in plan.grid if k != key]
    table = table.with_columns(series=pl.concat_str([pl.col("layer"), *[pl.lit(f" {o}=") + pl.col(o) for o in others]]))
    panels = [(col, title) for col, title in PANELS if table[col].drop_nulls().len()]
    img = canvas(940, 50 + 270 * len(panels))
    xs = sorted(set(table["x"].to_list()))
    series = table["series"].unique(maintain_order=True).to_list()
    for i, (column, title) in enumerate(panels):
        values = table[column].drop_nulls().to_numpy()
        lo, hi = float(values.min()), float(values.max())
        pad = max((hi - lo) * 0.1, 0.01)
        ax = Axes(img, (80, 60 + 270 * i, 640, 240 + 270 * i), (min(xs), max(xs)), (max(lo - pad, 0.0), hi + pad))
        ax.frame(title=title, xlabel=key, ylabel=column)
        draw = ImageDraw.Draw(img)
        for j, name in enumerate(series):
            colour = PALETTE[j % len(PALETTE)]
            rows = table.filter(pl.col("series") == name).sort("x")
            x, y = rows["x"].to_numpy(), rows[column].to_numpy().astype(float)
            ax.line(x, y, colour)
            ax.points(x[np.isfinite(y)], y[np.isfinite(y)], colour, r=3,
                      labels=[f"{v:.3f}" for v in y[np.isfinite(y)]])
            draw.line([(660, 70 + 270 * i + 18 * j), (680, 70 + 270 * i + 18 * j)], fill=colour, width=3)
            draw.text((686, 70 + 270 * i + 18 * j), name, fill=INK, font=font(11), anchor="lm")
    return save_png(img, path)
