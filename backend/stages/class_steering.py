"""run-all's interventions on an image-classifier run: each class's best unit steered towards its class.

For every captured layer and unit kind the run has analysed (channels, the default SAE's features), the unit with
the best AUROC for each class (backend/interventions/class_steer.py `best_units`) is steered towards that class at
the configured strengths; the rows land in the `class_steering` table and its figures under media/class-steer/.
The stage's summary is the mean flip rate towards the target class per (layer, kind, strength).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from tqdm.auto import tqdm

from backend.interventions.class_steer import class_concepts, open_classifier_run, steer_best_units

STAGE_KINDS = ("channel", "feature")
SCALES = (2.0,)
"""Strengths in multiples of the layer's mean token norm (2x flips most classes of the demo ViT)."""


def run_class_steering(run_dir: str | Path, layers: list[str], scales=SCALES, n_images: int = 64,
                       progress: bool = True) -> dict:
    """Steer each class's best unit of every (layer, kind) towards its class; returns the mean flip rates."""
    parts = [(layer, kind) for layer in layers for kind in STAGE_KINDS
             if class_concepts(Path(run_dir), layer, kind) is not None]
    summary = {}
    run = open_classifier_run(run_dir, n_images) if parts else None  # the model and images, once for every part
    for layer, kind in tqdm(parts, desc="class steering", unit="part", disable=not progress):
        rows = steer_best_units(run, layer, kind, scales=scales)
        # a flip rate is NaN when every image was the target already: nothing left to flip
        means = rows.group_by("scale").agg(pl.col("flip_rate").fill_nan(None).mean()).sort("scale")
        summary[f"{layer}/{kind}"] = {f"{s:g}": None if f is None else round(f, 4) for s, f in means.iter_rows()}
        tqdm.write(f"class steering {layer} {kind}: mean flip rate towards the class " + ", ".join(
            f"{'n/a' if v is None else f'{v:.2f}'} at {k}x" for k, v in summary[f"{layer}/{kind}"].items()))
    return summary
