"""SAEs: the SAE variants of a layer compared (`python cli.py compare-saes`): their metrics side by side, their
activation-density histograms overlaid, and the decoder matching of two of them (the histogram of best cosines and
the matched pairs, each pair linking to both latents' unit pages)."""

from __future__ import annotations

import polars as pl
import streamlit as st

from inspector import charts, queries, ui
from inspector.queries import sae_compare as saes

LAYER, PAIR, ORDER = "saes.layer", "saes.pair", "saes.order"
ORDERS = {"best": "best match first", "worst": "worst match first", "feature": "by latent of A"}
PAIRS_SHOWN = 500

st.title("Compare SAEs")
run = ui.require_run()

layers: list[str] = []
with ui.guard("SAE comparison"):
    try:
        layers = saes.compared_layers(run)
    except queries.TableMissing:
        st.info(f"no SAE comparison yet: run `python cli.py compare-saes --run {run.arg} --layer LAYER` on a layer "
                "with two or more SAEs")
if not layers:
    st.stop()

ui.seed_from_url({"layer": (LAYER, str), "pair": (PAIR, str)})
ui.clamp_state(LAYER, layers)
layer = st.selectbox("Layer", layers, key=LAYER)

st.subheader("Metrics")
with ui.guard("SAE metrics"):
    metrics = saes.sae_comparison(run, layer)
    st.dataframe(metrics, hide_index=True, width="stretch", column_config={
        "fvu": st.column_config.NumberColumn("FVU", format="%.4f"),
        "l0": st.column_config.NumberColumn("L0", format="%.2f"),
        "dead": st.column_config.NumberColumn("dead", help="latents never active on the sample"),
        "dead_frac": st.column_config.NumberColumn("dead %", format="percent"),
        "dense_frac": st.column_config.NumberColumn("dense %", format="percent"),
        "frac_loss_recovered": st.column_config.NumberColumn("loss recovered", format="percent"),
        "mean_best_auroc": st.column_config.NumberColumn("concept AUROC", format="%.3f")})
    tokens = int(metrics["tokens"].max()) if metrics.height else 0
    st.caption(f"measured on the same {tokens:,} captured token vectors of `{layer}`; loss recovered: the splice "
               "test on the run's first `splice_samples` generations; concept AUROC: mean over concepts of the best "
               "latent's AUROC (`concept_summary`, empty until the run's analysis scored that SAE)")

st.subheader("Activation density")
with ui.guard("density"):
    density = saes.sae_density(run, layer)
    charts.show(charts.sae_density_chart(density))
    dead = ", ".join(f"{r['sae_id']}: {r['dead']}" for r in metrics.iter_rows(named=True))
    st.caption(f"log10 of each latent's firing frequency; dead latents (never active on the sample) are not "
               f"plotted: {dead}")

st.subheader("Decoder matching")
with ui.guard("decoder matching"):
    pairs = saes.match_pairs(run, layer)
    names = [f"{a} -> {b}" for a, b in pairs.iter_rows()]
    if not names:
        st.info("no decoder matching for this layer")
        st.stop()
    ui.clamp_state(PAIR, names)
    pair = st.selectbox("SAE A -> SAE B", names, key=PAIR,
                        help="for each latent of A, the latent of B whose decoder row has the highest cosine")
    ui.write_url({"layer": layer, "pair": pair})
    sae_a, sae_b = pairs.row(names.index(pair))
    kinds = dict(zip(metrics["sae_id"].to_list(), metrics["kind"].to_list(), strict=True))
    kind_a, kind_b = kinds.get(sae_a, "feature"), kinds.get(sae_b, "feature")
    left, right = st.columns([2, 3])
    charts.show(charts.cosine_histogram_chart(saes.match_histogram(run, layer, sae_a, sae_b)), where=left)
    order = right.radio("Order", list(ORDERS), format_func=ORDERS.get, key=ORDER, horizontal=True)
    table = saes.matches(run, layer, sae_a, sae_b, order, PAIRS_SHOWN)
    prefix_a = ui.unit_url(run, layer, kind_a, 0).removesuffix("0")
    prefix_b = ui.unit_url(run, layer, kind_b, 0).removesuffix("0")
    shown = table.with_columns(open_a=pl.lit(prefix_a) + pl.col("feature_a").cast(pl.String),
                               open_b=pl.lit(prefix_b) + pl.col("feature_b").cast(pl.String))
    event = right.dataframe(
        shown, hide_index=True, width="stretch", key=f"matches-{layer}-{sae_a}-{sae_b}-{order}",
        on_select="rerun", selection_mode="single-row",
        column_config={"feature_a": st.column_config.NumberColumn(f"{sae_a} latent"),
                       "feature_b": st.column_config.NumberColumn(f"{sae_b} latent"),
                       "cosine": st.column_config.NumberColumn("cosine", format="%.3f"),
                       "open_a": st.column_config.LinkColumn(f"{sae_a} page", display_text="open"),
                       "open_b": st.column_config.LinkColumn(f"{sae_b} page", display_text="open")})
    right.caption(f"the first {PAIRS_SHOWN} of {sae_a}'s latents; pick a row to open both latents' pages")
    selected = event.selection.rows if event is not None else []
    if selected:
        r = table.row(selected[0], named=True)
        c1, c2 = st.columns(2)
        c1.page_link(ui.UNIT_PAGE, label=f"{sae_a}: {kind_a} {r['feature_a']}",
                     query_params=ui.unit_params(run, layer, kind_a, r["feature_a"]))
        c2.page_link(ui.UNIT_PAGE, label=f"{sae_b}: {kind_b} {r['feature_b']} (cosine {r['cosine']:.3f})",
                     query_params=ui.unit_params(run, layer, kind_b, r["feature_b"]))
