"""Sweep: the runs of a sweep (`python cli.py sweep`) side by side — SAE FVU, L0, dead share, loss recovered, concept
recovery of the features, steering success, stage times — with a chart of each metric against each swept key, and a
link (or a click on a row) that opens the run."""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st

from inspector import ui
from inspector.queries import sweep as sweeps

TITLES = {"fvu": "FVU", "l0": "L0", "dead_frac": "dead share", "frac_loss_recovered": "loss recovered",
          "mean_best_auroc": "concept recovery (mean best AUROC)", "steering_success": "steering success"}
SWEEP_KEY = "sweep.name"

st.title("Sweep")
root = ui.runs_root()
names = []
with ui.guard("sweeps"):
    names = sweeps.list_sweeps(root)
if not names:
    st.info(f"No sweeps under `{root}/sweeps`. Start one with `python cli.py sweep --config configs/demo.toml "
            "sae.k=8,16,32`.")
    st.stop()

ui.seed_from_url({"sweep": (SWEEP_KEY, str)})
ui.clamp_state(SWEEP_KEY, names)
name = st.selectbox("Sweep", names, key=SWEEP_KEY)
ui.write_url({"sweep": name})

data, table = {}, pl.DataFrame()
with ui.guard():
    data = sweeps.sweep_manifest(root, name)
    table = sweeps.sweep_results(root, name)
if not data:
    st.stop()

grid = ", ".join(f"`{k}` = {', '.join(map(str, v))}" for k, v in data["grid"].items())
statuses = table.unique("run")["status"].value_counts().sort("status") if table.height else pl.DataFrame()
summary = ", ".join(f"{r['count']} {r['status']}" for r in statuses.iter_rows(named=True))
st.caption(f"grid: {grid} · {len(data['runs'])} runs ({summary}) · executor: {data.get('executor') or '-'} · base "
           f"config: `{data.get('config_file') or 'defaults'}`")

params = list(sweeps.param_columns(data).values())
metrics = [m for m in sweeps.METRICS if m in table.columns and table[m].drop_nulls().len()]
times = [c for c in table.columns if c.endswith("_s")]

st.subheader("Runs")
view = table.with_columns(open=pl.lit("./?run=") + pl.col("run"))
event = st.dataframe(
    view, hide_index=True, width="stretch", key=f"sweep-{name}", on_select="rerun", selection_mode="single-row",
    column_config={
        **{m: st.column_config.NumberColumn(TITLES[m], format="%.3f") for m in metrics},
        **{t: st.column_config.NumberColumn(t, format="%.1f") for t in times},
        "open": st.column_config.LinkColumn("run", display_text="open"),
    })
selected = event.selection.rows if event is not None else []
if selected:
    st.switch_page("views/overview.py", query_params={"run": str(view["run"][selected[0]])})

if not metrics or table["layer"].drop_nulls().len() == 0:
    st.info("no results yet: the runs have not trained their SAEs (see the status column)")
    st.stop()

st.subheader("Metrics against the swept keys")
results = table.filter(pl.col("layer").is_not_null())
for param in params:
    others = [p for p in params if p != param]
    frame = results.with_columns(
        series=pl.concat_str([pl.lit(f"{o}=") + pl.col(o).cast(pl.String) for o in others], separator=" ")
        if others else pl.lit(""))
    numeric = frame.schema[param].is_numeric()
    cols = st.columns(min(3, len(metrics)))
    for i, metric in enumerate(metrics):
        chart = alt.Chart(frame.select("run", "layer", "series", param, metric).to_pandas()).mark_line(
            point=True).encode(
            x=alt.X(f"{param}:{'Q' if numeric else 'N'}", title=param,
                    scale=alt.Scale(type="log", base=2) if numeric and frame[param].min() > 0 else alt.Undefined),
            y=alt.Y(f"{metric}:Q", title=TITLES[metric], scale=alt.Scale(zero=False)),
            color=alt.Color("layer:N"),
            strokeDash=alt.StrokeDash("series:N", title=", ".join(others) or None),
            tooltip=["run", "layer", param, alt.Tooltip(f"{metric}:Q", format=".3f")],
        ).properties(height=220, title=f"{TITLES[metric]} vs {param}")
        cols[i % len(cols)].altair_chart(chart, width="stretch")
