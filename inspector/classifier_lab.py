"""The Lab on an image-classifier run: classify one of the run's input images with the run's model, see its class
probabilities and the layer's top units on that image with their patch heat-maps, and steer units (each unit's
direction added at every token of the layer's output) to see how the class probabilities move.

Called by the Lab page (inspector/views/lab.py) once the model is loaded; the model work is inspector/live.py's, the
images are the run's own copies (images/, inside the runs directory), read through the query layer.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import streamlit as st

from backend.run.schema import is_feature
from inspector import live, overlay, queries, ui

TOP_CLASSES = 5


def class_table(labels: list[str], probs: np.ndarray, steered: np.ndarray | None = None,
                k: int = TOP_CLASSES) -> pl.DataFrame:
    """The k classes of highest probability (of the steered probabilities when given), with the change."""
    order = np.argsort(-(probs if steered is None else steered), kind="stable")[:k]
    table = pl.DataFrame({"class": [labels[i] for i in order], "probability": probs[order].astype(np.float64)})
    if steered is None:
        return table
    return table.rename({"probability": "before"}).with_columns(
        pl.Series("after", steered[order].astype(np.float64)),
        pl.Series("change", (steered[order] - probs[order]).astype(np.float64)))


def show(run, model, spec: str, layers: list[str], kind_options: list[str], sae_dirs: dict, device: str, dtype: str,
         tokens: str) -> None:
    """The classifier Lab (see the module docstring); kind_options: channel and the kinds of the run's SAEs, whose
    directories sae_dirs gives by (layer, kind)."""
    images = pl.DataFrame()
    with ui.guard("input images"):
        images = queries.input_images(run, 500)
    if not images.height:
        st.info("this run holds no input images: run `python cli.py capture` with `--images`")
        return
    options = {f"{r['gen_id']} · {r['class_label']}": r for r in images.iter_rows(named=True)}
    with st.form("classify"):
        c1, c2 = st.columns([3, 1])
        layer = c1.selectbox("Layer", layers, key="lab.cls_layer")
        kind = c2.selectbox("Kind", kind_options, key="lab.cls_kind", format_func=ui.kind_label)
        choice = st.selectbox("Image (gen_id · class)", list(options), key="lab.cls_image")
        if st.form_submit_button("Classify", type="primary"):
            st.session_state["lab.classified"] = (layer, kind, choice)
    if "lab.classified" not in st.session_state:
        return
    layer, kind, choice = st.session_state["lab.classified"]
    row = options.get(choice)
    if row is None:
        return
    if is_feature(kind) and (layer, kind) not in sae_dirs:
        st.info(f"`{layer}` has no SAE for {ui.kind_label(kind)} in this run; showing channels")
        kind = "channel"
    sae, sae_dir = None, ""
    try:
        path = str(queries.safe_path(run.path, row["image"]))
        with st.spinner("classifying ..."):
            if is_feature(kind):
                sae_dir = str(queries.safe_path(run.path, sae_dirs[(layer, kind)]))
                sae = live.load_sae(sae_dir, device)
            cap = live.capture(model, spec, layer, path, 0, 1, 1.0, "output", kind, sae, sae_dir, device, dtype,
                               (), tokens)
    except Exception as exc:  # noqa: BLE001 - an unreadable image, a layer the model lacks, ...
        ui.show_error(exc, "classifying")
        return
    labels = list(model.labels)
    left, right = st.columns([1, 2])
    with left:
        st.image(overlay.to_jpeg(overlay.thumbnail(cap.image, 256)), caption=f"{choice} (the image's class)")
    with right:
        predicted = labels[int(np.argmax(cap.probs))]
        st.metric("predicted", predicted)
        st.dataframe(class_table(labels, cap.probs), hide_index=True)
    st.subheader("Top units of this image")
    k = int(st.number_input("Top", min_value=1, max_value=live.TOP_KEPT, value=8, key="lab.cls_k"))
    tops = live.top_units(cap, 0, k)
    ui.unit_tiles(run, layer, kind, cap.image, tops, 0)
    _steer(run, model, spec, layer, kind, sae, sae_dir, device, dtype, path, labels, cap, tops)


def _steer(run, model, spec, layer, kind, sae, sae_dir, device, dtype, path, labels, cap, tops) -> None:
    st.subheader("Steer")
    with st.form("cls_steer"):
        c1, c2 = st.columns(2)
        units_text = c1.text_input(f"{kind}s to steer (comma-separated)",
                                   value=", ".join(str(t["unit"]) for t in tops[:1]), key="lab.cls_units")
        strength = c2.slider("Strength (x the unit's largest recorded activation)", -10.0, 10.0, 2.0, 0.25,
                             key="lab.cls_strength")
        go = st.form_submit_button("Steer", type="primary")
    if not go and "lab.cls_steered" not in st.session_state:
        return
    units = ui.parse_units(units_text)
    if units is None:
        return
    items = ui.steer_items(run, layer, kind, units, strength, sae)
    try:
        with st.spinner("steering ..."):
            steered = live.steer_classifier_cached(model, sae, spec, layer, path, tuple(items), sae_dir, device,
                                                   dtype)
        st.session_state["lab.cls_steered"] = True
    except Exception as exc:  # noqa: BLE001 - a unit outside the layer, ...
        ui.show_error(exc, "steering")
        return
    before, after = labels[int(np.argmax(cap.probs))], labels[int(np.argmax(steered))]
    st.metric("predicted, steered", after, delta=None if after == before else f"was {before}", delta_color="off")
    st.caption(f"steered: {', '.join(f'{k} {u} x{s:.3g}' for k, u, s in items)}, added at every token of `{layer}`")
    st.dataframe(class_table(labels, cap.probs, steered), hide_index=True)
