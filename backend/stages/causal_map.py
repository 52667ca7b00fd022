"""The causal_map stage of run-all: the causal map (backend/interventions/causal_map.py) of a demo run, reduced or
full as `[causal_map] reduced` says, after the interventions stage (it runs when both `[interventions]` and
`[causal_map]` are enabled). Off the demo model, or on prompts without attributes, it is skipped with a note: the
flips are read from pixels by the demo's attribute scorer."""

from __future__ import annotations

from backend.run.config import CausalMapConfig

NOT_DEMO = "the causal map needs the demo model (flips are read from pixels by its attribute scorer)"


def run_causal_map(ctx, cfg: CausalMapConfig, progress: bool = True) -> dict:
    """Compute (or resume) the map on an open run; returns a summary: rows, the best held-out flip rate per concept,
    or {"skipped": why}."""
    from backend.interventions.causal_map import best_per_concept, causal_map
    from backend.interventions.effects import is_demo
    from backend.stages.interventions import NO_ATTRIBUTES, has_attributes

    if not cfg.enabled:
        return {"skipped": "causal_map.enabled = false"}
    if not is_demo(ctx.model):
        return {"skipped": NOT_DEMO}
    if not has_attributes(ctx.store):
        return {"skipped": NO_ATTRIBUTES.replace("concept-steering report", "causal map")}
    table = causal_map(ctx, cfg, progress=progress)
    best = best_per_concept(table)
    return {"cells": table.height, "reduced": cfg.reduced, "layers": table["layer"].unique().sort().to_list(),
            "best": {r["concept"]: f"{r['flip_rate']:.0%} flip, {r['collateral_rate']:.0%} collateral "
                                   f"({r['direction']} @ {r['layer']} {r['window']})"
                     for r in best.sort("concept").iter_rows(named=True)}}
