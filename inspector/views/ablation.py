"""Ablation: the block-ablation grid (rows: baseline, then each block taken out; columns: the samples) with each
block's effect score (mean pixel change)."""

from __future__ import annotations

import polars as pl
import streamlit as st

from inspector import charts, queries, ui

st.title("Block ablation")
run = ui.require_run()

rows = None
with ui.guard():
    try:
        rows = queries.ablations(run)
    except queries.TableMissing:
        st.info(f"not computed yet: run `python cli.py ablate --run {run.arg}`")
if rows is None or rows.is_empty():
    if rows is not None:
        st.info(f"no ablation rows: run `python cli.py ablate --run {run.arg}`")
    st.stop()

c1, c2, c3 = st.columns([2, 3, 2])
modes = rows["mode"].unique().sort().to_list() if "mode" in rows.columns else [None]
mode = c1.selectbox("Mode", modes, help="skip: the block's output is its input; remove_delta: output minus its "
                                        "residual update") if len(modes) > 1 else modes[0]
if mode is not None:
    rows = rows.filter(pl.col("mode") == mode)
if "spec" in rows.columns and rows["spec"].n_unique() > 1:
    specs = rows["spec"].unique().sort().to_list()
    spec = c2.selectbox("Sample set", specs, help="one per (prompts, seeds, steps, guidance) the ablation ran with")
    rows = rows.filter(pl.col("spec") == spec)

scores = rows.group_by("layer").agg(pl.col("effect").mean().alias("effect"), pl.len().alias("samples"))
if "changed_attributes" in rows.columns:
    changed = rows.group_by("layer").agg(
        (pl.col("changed_attributes").is_not_null() & (pl.col("changed_attributes") != "{}")).mean().alias("changed"))
    scores = scores.join(changed, on="layer")
scores = scores.sort("effect", descending=True)

st.subheader("Effect per block")
left, right = st.columns([3, 2])
charts.show(charts.effect_chart(scores, height=max(160, 24 * scores.height)), where=left)
right.dataframe(scores, hide_index=True, width="stretch",
                column_config={"effect": st.column_config.NumberColumn("effect", format="%.4f")})

st.subheader("Grid")
n_blocks = scores.height
shown = c3.number_input("Blocks shown", min_value=1, max_value=n_blocks, value=min(n_blocks, 12), step=1)
samples = rows.select("prompt", "seed", "baseline_image").unique(["prompt", "seed"], maintain_order=True)
samples = samples.sort(["prompt", "seed"])
size = 112
header = st.columns([2] + [1] * samples.height)
header[0].markdown("**block**")
for col, s in zip(header[1:], samples.iter_rows(named=True), strict=True):
    col.caption(f"{s['prompt'] or '(empty)'} · seed {s['seed']}")
line = st.columns([2] + [1] * samples.height)
line[0].markdown("baseline")
for col, s in zip(line[1:], samples.iter_rows(named=True), strict=True):
    with col:
        ui.show_image(run, s["baseline_image"], None, size)
for block in scores.head(int(shown)).iter_rows(named=True):
    line = st.columns([2] + [1] * samples.height)
    line[0].markdown(f"`{block['layer']}`  \neffect {block['effect']:.4f}")
    mine = rows.filter(pl.col("layer") == block["layer"])
    for col, s in zip(line[1:], samples.iter_rows(named=True), strict=True):
        cell = mine.filter((pl.col("prompt") == s["prompt"]) & (pl.col("seed") == s["seed"]))
        with col:
            if cell.is_empty():
                st.caption("(no image)")
            else:
                r = cell.row(0, named=True)
                ui.show_image(run, r["image"], f"Δ {r['effect']:.3f}", size)
