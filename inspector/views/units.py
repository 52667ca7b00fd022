"""Units: a sortable, filterable table of the channels or features of one layer; selecting a row opens its page."""

from __future__ import annotations

import polars as pl
import streamlit as st

from inspector import queries, ui

LAYER, KIND = "units.layer", "units.kind"

st.title("Units")
run = ui.require_run()

parts = ui.run_partitions(run)
if parts.is_empty():
    st.stop()

layers = parts["layer"].unique(maintain_order=True).to_list()
ui.seed_from_url({"layer": (LAYER, str), "kind": (KIND, str)})
ui.clamp_state(LAYER, layers)
c1, c2, c3, c4 = st.columns([3, 2, 2, 2])
layer = c1.selectbox("Layer", layers, key=LAYER)
kinds = parts.filter(pl.col("layer") == layer)["kind"].to_list()
ui.clamp_state(KIND, kinds)
kind = c2.selectbox("Kind", kinds, key=KIND, format_func=ui.kind_label,
                    help="channel, or the features of one of the layer's SAEs")
ui.write_url({"layer": layer, "kind": kind})

table = None
with ui.guard():
    table = queries.units(run, layer, kind)
if table is None:
    st.stop()

hide_dead = c3.toggle("Hide dead units", value=True)
only_dense = c4.toggle("Only dense units", value=False)
f1, f2, f3 = st.columns([3, 2, 2])
concept_filter = f1.text_input("Best concept contains", placeholder="e.g. colour=red")
min_density = f2.number_input("Min density", min_value=0.0, max_value=1.0, value=0.0, step=0.01, format="%.3f")
min_auroc = f3.number_input("Min AUROC", min_value=0.0, max_value=1.0, value=0.0, step=0.05, format="%.2f")

view = table
if hide_dead:
    view = view.filter(~pl.col("dead"))
if only_dense:
    view = view.filter(pl.col("dense"))
if concept_filter:
    view = view.filter(pl.col("concept").fill_null("").str.contains(concept_filter, literal=True))
if min_density > 0:
    view = view.filter(pl.col("density") >= min_density)
if min_auroc > 0:
    view = view.filter(pl.col("auroc").fill_null(0) >= min_auroc)

with ui.guard():
    steps = queries.steps(run)
    view = view.join(steps.rename({"step": "peak_step", "timestep": "peak_timestep"}),
                     on="peak_step", how="left", maintain_order="left")
prefix = ui.unit_url(run, layer, kind, 0).removesuffix("0")  # the unit number goes last
view = view.with_columns(open=pl.lit(prefix) + pl.col("unit").cast(pl.String))
shown = [c for c in ("unit", "density", "max", "peak_step", "peak_timestep", "concept", "auroc", "dead", "dense",
                     "active_steps", "first_active", "last_active", "mean", "label", "label_confidence",
                     "label_step", "open") if c in view.columns]
st.caption(f"{view.height:,} of {table.height:,} {kind}s of `{layer}` (click a column header to sort, a row to "
           "open the unit)")
event = st.dataframe(
    view.select(shown), hide_index=True, width="stretch", height=480, key=f"units-{layer}-{kind}",
    on_select="rerun", selection_mode="single-row",
    column_config={
        "density": st.column_config.ProgressColumn("density", min_value=0.0, max_value=1.0, format="%.3f"),
        "max": st.column_config.NumberColumn("max", format="%.4g"),
        "mean": st.column_config.NumberColumn("mean", format="%.4g"),
        "peak_step": st.column_config.NumberColumn("peak step"),
        "peak_timestep": st.column_config.NumberColumn("peak timestep", format="%.0f"),
        "auroc": st.column_config.NumberColumn("AUROC", format="%.3f"),
        "label_confidence": st.column_config.NumberColumn("label confidence", format="%.2f"),
        "label_step": st.column_config.NumberColumn("label step", help="the step the label scores best at (-1: "
                                                    "a label method that ranks over all steps)"),
        "open": st.column_config.LinkColumn("page", display_text="open"),
    })
selected = event.selection.rows if event is not None else []
if selected:
    unit = int(view["unit"][selected[0]])
    ui.open_unit(run, layer, kind, unit)
