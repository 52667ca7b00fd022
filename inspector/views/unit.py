"""Unit page: everything recorded about one channel or feature. Deep-linkable:
`unit?run=RUN&layer=LAYER&kind=KIND&unit=N&step=S` (step omitted: all steps), kept in sync with the widgets."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import streamlit as st

from backend.run.schema import is_feature
from inspector import atlas_tiles, charts, overlay, queries, ui

PAGE_SIZE = 8
GRID_COLUMNS = 4
ALL_STEPS = -1
LAYER, KIND, UNIT, STEP = "unit.layer", "unit.kind", "unit.unit", "unit.step"

run = ui.require_run()

parts = ui.run_partitions(run)
if parts.is_empty() or parts["units"].null_count() == parts.height:
    if not parts.is_empty():
        st.info(f"units are not computed yet: run `python cli.py analyze --run {run.arg}`")
    st.stop()

steps_df = pl.DataFrame({"step": [], "timestep": []}, schema={"step": pl.Int32, "timestep": pl.Float64})
with ui.guard():
    steps_df = queries.steps(run)
timestep_of = dict(zip(steps_df["step"].to_list(), steps_df["timestep"].to_list(), strict=True))

# ------------------------------------------------------------------------------------------------ selection state

layers = parts["layer"].unique(maintain_order=True).to_list()
ui.seed_from_url({"layer": (LAYER, str), "kind": (KIND, str), "unit": (UNIT, int), "step": (STEP, int)})
ui.clamp_state(LAYER, layers)
layer_now = st.session_state.get(LAYER, layers[0])
kinds = parts.filter(pl.col("layer") == layer_now)["kind"].to_list()
ui.clamp_state(KIND, kinds)
kind_now = st.session_state.get(KIND, kinds[0])
lo, hi = queries.unit_range(run, layer_now, kind_now)
if UNIT in st.session_state and not lo <= int(st.session_state[UNIT]) <= hi:
    st.warning(f"{kind_now} {st.session_state[UNIT]} does not exist in `{layer_now}` (units {lo}..{hi}); "
               f"showing {lo}")
    st.session_state[UNIT] = lo
step_options = [ALL_STEPS, *sorted(timestep_of)]
ui.clamp_state(STEP, step_options, ALL_STEPS)


def _move(direction: int) -> None:
    layer, kind = st.session_state[LAYER], st.session_state[KIND]
    current = int(st.session_state.get(UNIT, lo))
    target = queries.neighbour(run, layer, kind, current, direction, bool(st.session_state.get("skip_dead", True)))
    if target is not None:
        st.session_state[UNIT] = target
        st.session_state[STEP] = ALL_STEPS


def _random() -> None:
    layer, kind = st.session_state[LAYER], st.session_state[KIND]
    live = queries.live_units(run, layer, kind)
    if len(live):
        st.session_state[UNIT] = int(np.random.default_rng().choice(live))
        st.session_state[STEP] = ALL_STEPS


def _picked(chart_key: str) -> None:
    state = st.session_state.get(chart_key)
    selection = (state.get("selection") if hasattr(state, "get") else None) or {}
    points = selection.get(charts.PICK) or []
    if points and "step" in points[0]:
        st.session_state[STEP] = int(points[0]["step"])


def _step_label(step: int) -> str:
    if step == ALL_STEPS:
        return "all steps"
    t = timestep_of.get(step)
    return f"step {step}" + (f" · t={t:.0f}" if t is not None else "")


c1, c2, c3, c4 = st.columns([4, 2, 2, 3])
layer = c1.selectbox("Layer", layers, key=LAYER)
kind = c2.selectbox("Kind", kinds, key=KIND, format_func=ui.kind_label,
                    help="channel, or the features of one of the layer's SAEs")
unit = int(c3.number_input("Unit", min_value=lo, max_value=max(hi, lo), step=1, key=UNIT))
step = int(c4.selectbox("Step", step_options, key=STEP, format_func=_step_label,
                        help="examples at a step exist for the unit's peaks; click a point of the profile to pick"))
b1, b2, b3, b4, _ = st.columns([1, 1, 1, 2, 3])
b1.button("◀ Prev", on_click=_move, args=(-1,), width="stretch")
b2.button("Next ▶", on_click=_move, args=(1,), width="stretch")
b3.button("Random", on_click=_random, width="stretch", icon=":material/casino:")
b4.toggle("skip dead units", value=True, key="skip_dead")
ui.write_url({"layer": layer, "kind": kind, "unit": unit, "step": step if step != ALL_STEPS else None})

# ------------------------------------------------------------------------------------------------ header

data: dict = {"missing": {}, "errors": {}, "tables": []}
with ui.guard():
    data = queries.unit_page(run, layer, kind, unit)
tables = set(data["tables"])


def section(name: str, what: str = "") -> bool:
    """True when the item loaded; otherwise say why (not computed yet: the command; or the read error)."""
    if data.get(name) is not None:
        return True
    if name in data["errors"]:
        st.error(f"{what or name}: {data['errors'][name]}")
    elif name in data["missing"]:
        st.info(f"{what or name}: not computed yet: run `{data['missing'][name]}`")
    return False


def recorded(name: str, command: str, what: str) -> pl.DataFrame | None:
    """This unit's rows of a per-unit table, or None after saying why there are none (a read error, the table not
    computed yet, or nothing recorded for this unit; the last two name the command that fills it)."""
    rows = data.get(name)
    if name in data["errors"]:
        section(name)
    elif rows is None:
        st.info(f"not computed yet: run `{command}`")
    elif rows.is_empty():
        st.info(f"no {what} recorded for this {kind}: run `{command}`")
    else:
        return rows
    return None


row = data.get("row")
st.title(f"{kind} {unit}")
st.caption(f"`{layer}` · run `{run.label}`")
if row is None:
    if not section("row", "units"):
        st.info(f"no row for {kind} {unit} in the units table")
    st.stop()

concepts = data.get("concepts")
if concepts is None:
    concepts = pl.DataFrame()
m = st.columns([1, 1, 1, 1, 1, 2])
m[0].metric("density", f"{row['density']:.3f}", help="share of (generation, step) pairs in which the unit is active")
m[1].metric("max", ui.format_float(row["max"], 4))
peak_steps = [int(s) for s in (row.get("peak_steps") or [])]
m[2].metric("peak step", str(peak_steps[0]) if peak_steps else "-",
            help="highest peak of the freq profile" + (f"; all peaks: {peak_steps}" if peak_steps else ""))
m[3].metric("active steps", f"{row['first_active']}..{row['last_active']}" if row["first_active"] >= 0 else "-")
flags = [name for name in ("dead", "dense") if row.get(name)]
m[4].metric("flags", ", ".join(flags) or "-")
with m[5]:
    st.caption("best concept", help="the concept this unit separates best (AUROC of its activation; 0.5 = chance); "
                                    "none when it is not among the best units of any concept, or the run has no "
                                    "concepts (its prompts carry no attributes)")
    best = concepts.row(0, named=True) if concepts.height else None
    if best is not None and best.get("concept"):
        st.markdown(f"**`{best['concept']}`**  \nAUROC {best['auroc']:.3f}")
    else:
        st.markdown("none")  # not "-": alone, markdown makes it an empty list item (a stray dot on the page)
if row.get("label"):
    confidence, label_step = row.get("label_confidence"), row.get("label_step")
    st.markdown(f"**label:** `{row['label']}`" + (f" · confidence {confidence:.2f}" if confidence is not None else "")
                + (f" · at step {label_step}" if label_step is not None and label_step >= 0 else ""),
                help="what this unit's top generations' prompts have in common (an attribute value, a word or a "
                     "prompt group over-represented among them, by log-odds), with no ground truth; confidence: 0 = "
                     "no more than chance, 1 = every top generation carries it; at step: the denoising step "
                     "where it scores best")

# ------------------------------------------------------------------------------------------------ activity

prof = data.get("profile")
left, right = st.columns([3, 2])
with left:
    st.subheader("Activity over timesteps")
    with ui.guard("profile"):
        if section("profile", "activity profile"):
            pk = data.get("peaks")
            if pk is None:
                pk = pl.DataFrame({"step": [], "timestep": [], "height": [], "rank": []})
            metric = st.radio("profile", ["freq", "mean", "max"], horizontal=True, key="metric",
                              label_visibility="collapsed")
            chart_key = f"profile-{layer}-{kind}-{unit}"
            charts.show(charts.profile_chart(prof, pk, metric, None if step == ALL_STEPS else step), key=chart_key,
                        on_select=lambda: _picked(chart_key), selection_mode=[charts.PICK])
            if pk.height:
                st.caption("peaks (▼): " + ", ".join(f"{int(r['rank'])}: step {int(r['step'])} "
                                                     f"(t={r['timestep']:.0f}, freq {r['height']:.2f})"
                                                     for r in pk.iter_rows(named=True)))
with right:
    st.subheader("Max activation")
    with ui.guard("max activation"):
        if prof is not None:
            charts.show(charts.activation_chart(prof))

left, right = st.columns([3, 2])
with left:
    st.subheader("Activation histogram")
    with ui.guard("histogram"):
        stat = st.radio("statistic", queries.HIST_STATS, horizontal=True, key="hist_stat",
                        format_func=lambda s: f"spatial {s}", label_visibility="collapsed")
        size = data.get("activity_bytes") or 0
        wanted = ("histograms" in tables or size <= queries.HIST_AUTO_BYTES
                  or st.session_state.get(f"hist-{layer}-{kind}") == unit)
        if not wanted:
            st.caption(f"the histogram scans this layer's recorded activity ({size / 1e6:,.0f} MB)")
            if st.button("Compute histogram", key=f"hist-button-{layer}-{kind}-{unit}"):
                st.session_state[f"hist-{layer}-{kind}"] = unit
                wanted = True
        h = queries.activation_histogram(run, layer, kind, unit, stat) if wanted else None
        if h is None:
            pass
        elif h["rows"] == 0:
            st.info("no recorded activity for this unit")
        else:
            charts.show(charts.histogram_chart(h["hist"], f"spatial {stat} per (generation, step)"))
            note = f"{h['rows']:,} recorded values"
            if is_feature(kind) and h["pairs"]:
                note += f" (active rows only, of {h['pairs']:,} (generation, step) pairs)"
            st.caption(note)
with right:
    st.subheader("Frequency per prompt group")
    with ui.guard("frequencies"):
        if section("frequencies"):
            charts.show(charts.group_frequency_chart(data["frequencies"]))

loc = data.get("localisation")
if loc is not None and loc.get("examples"):
    st.caption(f"localisation: the heat-map centroid falls on the object's position in {loc['hits']} of "
               f"{loc['examples']} top examples ({loc['share']:.0%}; {loc['positions']} positions; rank "
               f"{loc['rank']} of this layer's {kind}s)")
if concepts.height:
    with st.expander(f"Concepts this {kind} detects ({concepts.height})"):
        st.dataframe(concepts, hide_index=True, width="stretch")
classes = data.get("classes")
if classes is not None and classes.height:  # an image-classifier run: the classes this unit tells, best first
    st.subheader(f"Classes this {kind} fires for")
    st.caption("AUROC of its pooled activation for the class's images against the others (auroc_test: on the held-out "
               "half of the images); freq: share of the class's images in which it is active")
    st.dataframe(classes.head(20), hide_index=True, width="stretch")

# ------------------------------------------------------------------------------------------------ examples

st.subheader("Top examples")
with ui.guard("examples"):
    counts = data.get("example_counts")
    if section("example_counts", "examples"):
        shown_step = step
        if step != ALL_STEPS and step not in counts:
            peaks_with = [s for s in counts if s >= 0]
            st.info(f"no examples recorded at step {step}: examples are kept over all steps and at each peak "
                    f"({', '.join(map(str, peaks_with)) or 'none'}); showing all steps")
            shown_step = ALL_STEPS
        total = int(counts.get(shown_step, 0))
        if total == 0:
            st.info("no examples recorded for this unit (a dead unit?)")
        else:
            o1, o2 = st.columns([2, 5])
            show_heat = o1.toggle("heat-map overlay", value=True, key="heat")
            pages = max(1, -(-total // PAGE_SIZE))
            page = 1
            if pages > 1:
                with o2:
                    page = st.pagination(pages, key=f"ex-page-{layer}-{kind}-{unit}-{shown_step}")
            first = (page - 1) * PAGE_SIZE + 1
            ex = queries.examples(run, layer, kind, unit, shown_step, first, first + PAGE_SIZE - 1)
            st.caption(("over all steps (heat-map at each generation's best step)" if shown_step == ALL_STEPS else
                        f"at {_step_label(shown_step)}") + f" · {total} examples")
            cols = st.columns(GRID_COLUMNS)
            bases = ui.thumbs(run, ex["image"].to_list(), 192)
            for i, e in enumerate(ex.iter_rows(named=True)):
                with cols[i % GRID_COLUMNS]:
                    heat = ui.heat_bytes(e.get("heatmap")) if show_heat else None
                    tile = overlay.overlay_jpeg(bases[i], heat, int(e["height"] or 0), int(e["width"] or 0), 192)
                    prompt = e.get("prompt") or f"generation {e['gen_id']}"
                    st.image(tile, caption=f"#{e['rank']} · {ui.format_float(e['activation'], 4)} · "
                                          f"step {e['heatmap_step']} · {prompt}")

# ------------------------------------------------------------------------------------------------ activation range

st.subheader("Examples across the activation range")
with ui.guard("range examples"):
    ranges = recorded("range_examples", f"python cli.py analyze --run {run.arg}", "range examples")
    if ranges is not None:
        st.caption("generations sampled from equal-width bins of this unit's activation over (0, max] (the top bin "
                   "first; activation: the spatial max or mean over the map at the generation's best step): does "
                   "the unit mean the same thing at low activation as at the top?")
        range_bases = ui.thumbs(run, ranges["image"].to_list(), 128)
        for (b,), in_bin in ranges.group_by(["bin"], maintain_order=True):
            first_row = in_bin.row(0, named=True)
            st.markdown(f"bin {b} · activation ({ui.format_float(first_row['lo'], 3)}, "
                        f"{ui.format_float(first_row['hi'], 3)}] · {in_bin.height} shown")
            cols = st.columns(max(GRID_COLUMNS, in_bin.height))
            offset = ranges["bin"].to_list().index(b)
            for i, e in enumerate(in_bin.iter_rows(named=True)):
                with cols[i]:
                    base = range_bases[offset + i]
                    if base is None:
                        st.caption(f"(image missing: generation {e['gen_id']})")
                        continue
                    st.image(overlay.to_jpeg(base), caption=f"{ui.format_float(e['activation'], 4)} · step "
                                                            f"{e['step']} · {e.get('prompt') or e['gen_id']}")

# ------------------------------------------------------------------------------------------------ interventions

with ui.guard("manifest"):
    if queries.manifest(run).get("model_kind") == "classifier":  # images in, no generation to steer or dream
        st.stop()

st.subheader("Steering and interventions")
steer_cmd = f"python cli.py steer --run {run.arg} --layer {layer} --kind {kind} --unit {unit}"
with ui.guard("interventions"):
    iv = recorded("interventions", steer_cmd, "interventions")
    if iv is not None:
        keys = [c for c in ("method", "mode", "spec") if c in iv.columns]
        for _, group in iv.group_by(keys, maintain_order=True):
            first_row = group.row(0, named=True)
            bits = [f"**{first_row.get('method', '?')}**", str(first_row.get("mode") or "")]
            if first_row.get("strength") is not None and first_row["strength"] == first_row["strength"]:
                bits.append(f"strength {ui.format_float(first_row['strength'])}")
            if first_row.get("scale") is not None and first_row["scale"] == first_row["scale"]:
                bits.append(f"scale {ui.format_float(first_row['scale'])}")
            for name in ("preset", "steps", "mask", "prompt", "concept"):
                if first_row.get(name):
                    bits.append(f"{name} {first_row[name]}")
            if first_row.get("unit") == -1 and first_row.get("features") is not None:
                bits.append(f"with {len(first_row['features'])} features")
            st.markdown(" · ".join(b for b in bits if b))
            cols = st.columns(min(8, 2 * group.height))
            for i, r in enumerate(group.head(4).iter_rows(named=True)):
                with cols[2 * i]:
                    ui.show_image(run, r.get("baseline_image"), f"baseline · seed {r.get('seed')}", 128)
                with cols[2 * i + 1]:
                    ui.show_image(run, r.get("image"),
                                  f"{r.get('method')} · Δ {ui.format_float(r.get('effect'))}", 128)
    ok = data.get("steering")
    if ok is not None and ok.height:
        st.caption("concept steering success")
        st.dataframe(ok, hide_index=True, width="stretch")

# ------------------------------------------------------------------------------------------------ dreams

st.subheader("Deep dream")
dream_cmd = f"python cli.py dream --run {run.arg} --layer {layer} --kind {kind} --unit {unit}"
with ui.guard("dreams"):
    dr = recorded("dreams", dream_cmd, "dream")
    if dr is not None:
        targets = sorted(dr["step"].unique().to_list())
        d1, d2 = st.columns([2, 5])
        target = d1.selectbox("target step", targets, format_func=_step_label, key=f"dream-target-{unit}")
        mine = dr.filter(pl.col("step") == target)
        opt_steps = sorted(mine["opt_step"].unique().to_list())
        opt = (d2.select_slider("optimisation step", opt_steps, value=opt_steps[-1], key=f"dream-opt-{unit}")
               if len(opt_steps) > 1 else opt_steps[0])
        snap = mine.filter(pl.col("opt_step") == opt).sort("seed")
        cols = st.columns(max(1, min(6, snap.height)))
        for i, r in enumerate(snap.iter_rows(named=True)):
            with cols[i % len(cols)]:
                ui.show_image(run, r["image"], f"seed {r['seed']} · act {ui.format_float(r['activation'])}", 160)
        terms = []
        for r in mine.iter_rows(named=True):
            terms.append({"opt_step": r["opt_step"], "term": "activation", "value": float(r["activation"])})
            try:
                pen = json.loads(r["penalties"] or "{}")
            except (TypeError, ValueError):
                pen = {}
            for name, value in pen.items():
                if isinstance(value, int | float):
                    terms.append({"opt_step": r["opt_step"], "term": name, "value": float(value)})
        trace = pl.DataFrame(terms).group_by(["opt_step", "term"]).agg(pl.col("value").mean()).sort("opt_step")
        charts.show(charts.dream_loss_chart(trace, opt))
        st.caption("activation and penalty terms (mean over seeds) along the optimisation")

# ------------------------------------------------------------------------------------------------ atlas

with ui.guard("atlas"):
    atlas_tiles.unit_section(run, layer, kind, unit)
