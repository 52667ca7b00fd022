"""Causal map: where each concept is caused (`python cli.py causal-map`): a concept x window grid of held-out flip
rates per layer (cells whose collateral rate is at most 20%), the best cell per concept, and every cell of one
concept with its selection and held-out rates."""

from __future__ import annotations

import streamlit as st

from inspector import charts, queries, ui
from inspector.queries import causal_map as cmap

DIRECTIONS, MASKS, CONCEPT = "cmap.directions", "cmap.masks", "cmap.concept"
DIRECTION_HELP = ("channel: the concept's best channel; feature: its best SAE feature; features: its SAE feature "
                  "set; mean: its diff-in-means direction; matched: per step and token position, the concept's "
                  "mean minus each prompt's current value's, among generations of the prompt's layout")

st.title("Causal map")
run = ui.require_run()

options = None
with ui.guard("causal map"):
    try:
        options = cmap.map_options(run)
    except queries.TableMissing:
        st.info(f"not computed yet: run `python cli.py causal-map --run {run.arg}` (demo model; run-all computes a "
                "reduced map)")
if not options:
    st.stop()

st.caption("Each cell steers a concept's direction at a layer and step window on prompts that lack the concept; the "
           "scale is chosen on selection seeds and the rates are measured on held-out seeds. Colour: the best "
           "held-out flip rate among the chosen directions whose collateral rate (another attribute changed) is at "
           "most 20%; the tooltip has the best flip at any collateral.")
c1, c2 = st.columns([3, 1])
directions = c1.multiselect("Directions", options["direction"], default=options["direction"], key=DIRECTIONS,
                            help=DIRECTION_HELP)
masks = c2.multiselect("Masks", options["mask"], default=options["mask"], key=MASKS)
with ui.guard("causal map grid"):
    grid = cmap.map_grid(run, tuple(directions), tuple(masks))
    if grid.is_empty():
        st.info("choose at least one direction and one mask")
    else:
        height = max(160, 22 * grid["concept"].n_unique())
        charts.show(charts.causal_map_chart(grid, height=height))

st.subheader("Best per concept")
with ui.guard("best cells"):
    best = cmap.best_cells(run)
    st.dataframe(best.select("concept", "flip_rate", "collateral_rate", "clean_rate", "layer", "window", "steps",
                             "direction", "unit", "units", "mask", "scale", "seeds"),
                 hide_index=True, width="stretch", column_config={
                     c: st.column_config.NumberColumn(c, format="percent") for c in
                     ("flip_rate", "collateral_rate", "clean_rate")})

st.subheader("One concept")
concepts = best["concept"].to_list() if best is not None else []
ui.seed_from_url({"concept": (CONCEPT, str)})
ui.clamp_state(CONCEPT, concepts)
concept = st.selectbox("Concept", concepts, key=CONCEPT)
if concept:
    ui.write_url({"concept": concept})
    with ui.guard("concept cells"):
        st.dataframe(cmap.concept_cells(run, concept), hide_index=True, width="stretch", column_config={
            c: st.column_config.NumberColumn(c, format="percent") for c in
            ("flip_rate", "collateral_rate", "clean_rate", "selection_flip_rate", "selection_collateral_rate",
             "baseline_rate")})
