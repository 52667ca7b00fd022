"""Overview: the runs found; for the selected run its model, layers, prompts, stage timings, SAE training curves
and final metrics, and concept recovery (channels vs features per layer)."""

from __future__ import annotations

import polars as pl
import streamlit as st

from inspector import charts, queries, ui

st.title("Overview")

root = ui.runs_root()
with ui.guard("runs"):
    rows = []
    for name in queries.list_runs(root):
        try:
            man = queries.manifest(queries.open_run(root, name))
            stages = queries.stage_table(man)
            done = stages.filter(pl.col("status") == "done")["stage"].to_list()
            rows.append({"run": name, "model": queries.run_model(man), "layers": len(queries.run_layers(man)),
                         "stages done": ", ".join(done), "problem": ""})
        except queries.InspectorError as exc:
            rows.append({"run": name, "model": "?", "layers": 0, "stages done": "", "problem": str(exc)})
    if rows:
        st.dataframe(pl.DataFrame(rows), hide_index=True, width="stretch")

run = ui.require_run()
man = {}
with ui.guard():
    man = queries.manifest(run)

st.header(f"Run `{run.label}`")
with ui.guard():
    if man:
        layers = queries.run_layers(man)
        cols = st.columns(4)
        cols[0].metric("model", queries.run_model(man))
        cols[1].metric("layers", len(layers))
        try:
            counts = queries.generation_counts(run)
            cols[2].metric("prompts", f"{counts['prompts']:,}")
            cols[3].metric("generations", f"{counts['generations']:,}", help=f"{counts['groups']} prompt groups")
        except queries.TableMissing:
            cols[2].metric("prompts", "-")
            cols[3].metric("generations", "-")
        if layers:
            st.caption("hook points: " + ", ".join(f"`{layer}`" for layer in layers))
        if not queries.analysis_done(man):
            st.warning(f"analysis of this run is not finished (status: {queries.analysis_status(man)}); pages show "
                       f"what exists. Run `python cli.py analyze --run {run.arg}`.")

st.subheader("Stages")
with ui.guard("stages"):
    stages = queries.stage_table(man)
    if stages.is_empty():
        st.info("no stage has run yet: run `python cli.py run-all`")
    else:
        left, right = st.columns([1, 2])
        left.dataframe(stages, hide_index=True, width="stretch")
        if stages["seconds"].drop_nulls().len():
            charts.show(charts.stage_chart(stages), where=right)

st.subheader("Units per layer")
with ui.guard("units"):
    parts = queries.partitions(run)
    if parts.is_empty():
        st.info("no activity recorded: run `python cli.py capture`")
    else:
        st.dataframe(parts, hide_index=True, width="stretch")
        st.page_link(ui.UNITS_PAGE, label="Browse units", icon=":material/table_rows:")

st.subheader("SAE training")
with ui.guard("SAE training"):
    curve = queries.sae_training(run)
    charts.show(charts.sae_training_chart(curve), width="content")
with ui.guard("SAE metrics"):
    metrics = queries.sae_metrics(run)
    st.dataframe(metrics, hide_index=True, width="stretch")
with ui.guard("SAEs"):
    sae_list = queries.saes(run)
    if sae_list.height:
        st.caption("the run's SAEs (sae/<layer>/<sae_id>/; units of kind feature, or feature.<sae_id> past a layer's "
                   "default SAE)")
        st.dataframe(sae_list, hide_index=True, width="stretch")

st.subheader("Concept recovery")
with ui.guard("concept recovery"):
    summary = queries.concept_summary(run)
    if summary.is_empty():
        st.info("no concepts: the prompts carry no attributes")
    else:
        left, right = st.columns([2, 3])
        charts.show(charts.concept_summary_chart(summary), where=left)
        right.dataframe(summary, hide_index=True, width="stretch")
        st.caption("mean over concepts of the best unit's AUROC (0.5: no better than chance, 1: perfect)")
        if "auroc_oos" in summary.columns:
            st.caption("out of sample: auroc_oos scores each concept's unit and step chosen on one half of the "
                       "generations (auroc_choose) on the other half (oos_split), beside the in-sample "
                       "mean_best_auroc")

with ui.guard("steering"):
    if "steering_success" in queries.tables(run):
        st.subheader("Concept steering")
        st.dataframe(queries.steering_success(run), hide_index=True, width="stretch")
