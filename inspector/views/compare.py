"""Compare: two prompt groups; units' frequency histograms side by side and the ranked differential units (from
the `comparisons` table), each linking to its unit page."""

from __future__ import annotations

import numpy as np
import polars as pl
import streamlit as st

from inspector import charts, queries, ui

LAYER, KIND, GROUP_A, GROUP_B = "compare.layer", "compare.kind", "compare.a", "compare.b"
BINS = 25

st.title("Compare prompt groups")
run = ui.require_run()
with ui.guard("manifest"):
    if queries.manifest(run).get("model_kind") == "classifier":
        st.caption("an image-classifier run: its groups are the images' classes")

parts, groups = pl.DataFrame(), pl.DataFrame()
with ui.guard():
    parts = queries.partitions(run)
    groups = queries.groups(run)
if parts.is_empty() or groups.is_empty():
    st.info("nothing to compare yet: run `python cli.py run-all`")
    st.stop()
names = groups["group"].to_list()
if len(names) < 2:
    st.info(f"this run has one prompt group ({names[0]!r}); give prompts a `group` to compare groups")
    st.stop()

layers = parts["layer"].unique(maintain_order=True).to_list()
ui.seed_from_url({"layer": (LAYER, str), "kind": (KIND, str), "a": (GROUP_A, str), "b": (GROUP_B, str)})
ui.clamp_state(LAYER, layers)
ui.clamp_state(GROUP_A, names)
ui.clamp_state(GROUP_B, names, names[1])
if GROUP_B not in st.session_state:
    st.session_state[GROUP_B] = names[1]
c1, c2, c3, c4 = st.columns([3, 2, 2, 2])
layer = c1.selectbox("Layer", layers, key=LAYER)
kinds = parts.filter(pl.col("layer") == layer)["kind"].to_list()
ui.clamp_state(KIND, kinds)
kind = c2.selectbox("Kind", kinds, key=KIND, format_func=ui.kind_label,
                    help="channel, or the features of one of the layer's SAEs")
group_a = c3.selectbox("Group A", names, key=GROUP_A)
group_b = c4.selectbox("Group B", names, key=GROUP_B)
ui.write_url({"layer": layer, "kind": kind, "a": group_a, "b": group_b})
if group_a == group_b:
    st.info("pick two different groups")
    st.stop()

st.subheader("Frequency histograms")
with ui.guard("frequencies"):
    freqs = queries.group_frequencies(run, layer, kind, group_a, group_b)
    fa = freqs["freq_a"].fill_null(0).to_numpy()
    fb = freqs["freq_b"].fill_null(0).to_numpy()
    top = float(max(fa.max(initial=0), fb.max(initial=0), 1e-6))
    edges = np.linspace(0, top, BINS + 1)
    hist = pl.concat([pl.DataFrame({"group": [f"{tag}: {g}"] * BINS, "lo": edges[:-1], "hi": edges[1:],
                                    "units": np.histogram(f, edges)[0].astype(np.int64)})
                      for tag, g, f in (("A", group_a, fa), ("B", group_b, fb))])
    charts.show(charts.frequency_histograms(hist), width="content")
    st.caption(f"{len(fa):,} {kind}s of `{layer}`; y is symlog. freq = share of the group's (generation, step) "
               "pairs in which a unit is active")

st.subheader(f"Units that fire more for {group_a!r} than for {group_b!r}")
with ui.guard("comparison"):
    command = f"python cli.py compare {group_a} {group_b} --run {run.arg}"
    try:
        ranked = queries.comparison(run, layer, kind, group_a, group_b, 200)
    except queries.TableMissing:
        ranked = None
        st.info(f"not computed yet: run `{command}`")
    if ranked is not None and ranked.is_empty():
        pairs = queries.comparison_pairs(run)
        known = pairs.filter((pl.col("group_a") == group_a) & (pl.col("group_b") == group_b)).height > 0
        if known:
            st.info(f"no {kind} of `{layer}` passes freq_{group_a} > m x freq_{group_b}")
        else:
            st.info(f"{group_a} vs {group_b} not computed yet: run `{command}`")
    elif ranked is not None:
        prefix = ui.unit_url(run, layer, kind, 0).removesuffix("0")
        table = ranked.with_columns(open=pl.lit(prefix) + pl.col("unit").cast(pl.String))
        event = st.dataframe(
            table, hide_index=True, width="stretch", key=f"cmp-{layer}-{kind}-{group_a}-{group_b}",
            on_select="rerun", selection_mode="single-row",
            column_config={"score": st.column_config.NumberColumn("log-odds", format="%.2f"),
                           "ratio": st.column_config.NumberColumn("ratio", format="%.2f"),
                           "freq_a": st.column_config.NumberColumn(f"freq {group_a}", format="%.3f"),
                           "freq_b": st.column_config.NumberColumn(f"freq {group_b}", format="%.3f"),
                           "open": st.column_config.LinkColumn("page", display_text="open")})
        links = st.columns(min(5, ranked.height))
        for col, r in zip(links, ranked.head(len(links)).iter_rows(named=True), strict=False):
            col.page_link(ui.UNIT_PAGE, label=f"#{r['rank']}: {kind} {r['unit']}",
                          query_params=ui.unit_params(run, layer, kind, r["unit"]))
        selected = event.selection.rows if event is not None else []
        if selected:
            ui.open_unit(run, layer, kind, int(ranked["unit"][selected[0]]))
