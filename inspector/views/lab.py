"""Lab (live): generate with the run's model, see the top units of that image at a step with heat-maps, and steer
units (strength, step window, a rectangular or a painted mask), original and steered side by side. On an
image-classifier run: classify one of its images, its top units and class probabilities, steer units
(inspector/classifier_lab.py).

Only this page loads a model, and only when asked (the "Load model" button); the model stays loaded for every
session (`st.cache_resource`, one generation at a time: inspector/live.py model_lock), and generations (what the page
shows of them) and steered images are cached on their inputs. The model runs on the run's device when this machine
has it, else on the CPU (a GPU run opened on a CPU-only login node), and the page says which; the device and dtype can
be chosen before loading.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import streamlit as st

from backend.run.schema import is_feature
from inspector import classifier_lab, live, overlay, queries, ui
from inspector.queries import causal_map as cmap

LOADED = "lab.loaded"
GEN = "lab.generation"

st.title("Lab")
run = ui.require_run()
man = {}
with ui.guard():
    man = queries.manifest(run)
config = man.get("config") or {}
spec = str(config.get("model", "demo"))
run_device, run_dtype = str(config.get("device", "cpu")), str(config.get("dtype", "float32"))
layers = queries.run_layers(man)
run_steps = queries.captured_steps(man)
run_guidance = queries.captured_guidance(man)
capture_cfg = config.get("capture") or {}
read = str(capture_cfg.get("read", "output"))
controlnet = str(capture_cfg.get("controlnet") or "")
controlnet_scale = float(capture_cfg.get("controlnet_scale") or 1.0)

classifier = man.get("model_kind") == "classifier"
problem = live.model_problem(spec)
if problem:
    st.info(f"The Lab runs this run's model live, but {problem}. Browse the precomputed results on the other pages.")
    st.stop()
if not layers:
    st.info("this run records no layers: run `python cli.py capture`")
    st.stop()

default_device, device_note = live.lab_device(run_device)
devices = live.device_options(run_device)
d1, d2 = st.columns(2)
device = d1.selectbox("Device", devices, index=devices.index(default_device), key="lab.device",
                      help=f"the run was made on {run_device}; the Lab uses it when this machine has it, else the CPU")
default_dtype, dtype_note = live.lab_dtype(device, run_dtype)
dtype = d2.selectbox("Dtype", live.DTYPES, index=live.DTYPES.index(default_dtype), key="lab.dtype",
                     help=f"the run's is {run_dtype}; half precision on the CPU: bfloat16")
st.caption(f"model `{spec}` (run made on {run_device}, {run_dtype}): the Lab runs it on {device} ({dtype})"
           + (f", through the run's ControlNet `{controlnet}` (scale {controlnet_scale:g})" if controlnet else ""))
for note in (device_note, dtype_note):
    if note:
        st.info(note)
if not st.session_state.get(LOADED):
    st.write("The model is loaded on request and then kept in memory for every session.")
    if st.button("Load model", type="primary", icon=":material/play_arrow:"):
        st.session_state[LOADED] = True
        st.rerun()
    st.stop()

with st.spinner(f"loading {spec} ..."):
    try:
        model = live.load_model(spec, device, dtype, controlnet, controlnet_scale)
    except Exception as exc:  # noqa: BLE001 - shown in the page
        half = live.half_precision_problem(exc, device, dtype)
        if half:
            st.error(f"loading the model: {half}")
        else:
            ui.show_error(exc, "loading the model")
        st.stop()

# ------------------------------------------------------------------------------------------------ generate

sae_rows = pl.DataFrame()
with ui.guard("SAEs"):
    sae_rows = queries.saes(run)
sae_dirs = {(r["layer"], r["kind"]): r["dir"] for r in sae_rows.iter_rows(named=True)} if sae_rows.height else {}
kind_options = ["channel", *dict.fromkeys(kind for _, kind in sae_dirs)]
if classifier:  # images in: classify one of the run's images, its top units, steer them (inspector/classifier_lab.py)
    classifier_lab.show(run, model, spec, layers, kind_options, sae_dirs, device, dtype,
                        str(capture_cfg.get("tokens") or "all"))
    st.stop()
prompts = []
with ui.guard():
    prompts = queries.first_prompts(run, 50)
with st.form("generate"):
    c1, c2 = st.columns([3, 1])
    layer = c1.selectbox("Layer", layers, key="lab.layer")
    kind = c2.selectbox("Kind", kind_options, key="lab.kind", format_func=ui.kind_label,
                        help="features need that SAE of the layer (sae/<layer>/<sae_id>/)")
    prompt = st.text_input("Prompt", value=prompts[0] if prompts else "", key="lab.prompt")
    c3, c4, c5 = st.columns(3)
    seed = int(c3.number_input("Seed", min_value=0, value=0, step=1, key="lab.seed"))
    n_steps = int(c4.number_input("Steps", min_value=1, max_value=200, value=run_steps or model.default_steps,
                                  key="lab.steps"))
    guidance = float(c5.number_input("Guidance", min_value=1.0, max_value=30.0, step=0.25, key="lab.guidance",
                                     value=float(run_guidance if run_guidance is not None else model.default_guidance)))
    if st.form_submit_button("Generate", type="primary"):
        st.session_state[GEN] = (layer, kind, prompt, seed, n_steps, guidance)
if prompts:
    st.caption("prompts of this run, e.g.: " + " · ".join(f"`{p}`" for p in prompts[:3]))

if GEN not in st.session_state:
    st.stop()
layer, kind, prompt, seed, n_steps, guidance = st.session_state[GEN]
if is_feature(kind) and (layer, kind) not in sae_dirs:
    st.info(f"`{layer}` has no SAE for {ui.kind_label(kind)} in this run; showing channels")
    kind = "channel"
sae, sae_dir = None, ""
try:
    conditions = live.conditions(run.path, run.sig, prompt, guidance)
except Exception as exc:  # noqa: BLE001 - e.g. a run whose generations table cannot be read
    ui.show_error(exc, "generating")
    st.stop()
if controlnet and "control_images" not in live.condition_kwargs(conditions):
    st.info("this prompt is not one of the run's and the run has no --control-image for all prompts: it is "
            "generated without the ControlNet")
try:
    with st.spinner("generating ..."):
        if is_feature(kind):
            sae_dir = str(queries.safe_path(run.path, sae_dirs[(layer, kind)]))
            sae = live.load_sae(sae_dir, device)
        cap = live.capture(model, spec, layer, prompt, seed, n_steps, guidance, read, kind, sae, sae_dir, device,
                           dtype, conditions)
except Exception as exc:  # noqa: BLE001 - e.g. a word the demo tokenizer does not know
    half = live.half_precision_problem(exc, device, dtype)
    if half:
        st.error(f"generating: {half}")
    else:
        ui.show_error(exc, "generating")
    st.stop()

st.subheader("Top units of this image")
left, right = st.columns([1, 3])
with left:
    st.image(overlay.to_jpeg(overlay.thumbnail(cap.image, 256)),
             caption=" · ".join(filter(None, [prompt or "(empty prompt)", live.describe_conditions(conditions)])))
with right:
    s1, s2 = st.columns([3, 1])
    step = int(s1.slider("Step", 0, n_steps - 1, value=min(n_steps - 1, n_steps // 2), key="lab.step"))
    k = int(s2.number_input("Top", min_value=1, max_value=live.TOP_KEPT, value=8, key="lab.k"))
    tops = live.top_units(cap, step, k)
    ui.unit_tiles(run, layer, kind, cap.image, tops, step)

# ------------------------------------------------------------------------------------------------ steer

CANVAS_PX = 320


def _painted_mask(cap: live.Capture) -> np.ndarray | None:
    """A canvas over the generated image to paint on (streamlit-drawable-canvas); the strokes as a mask over the
    layer's grid (live.painted_mask), None until something is painted."""
    from PIL import Image
    from streamlit_drawable_canvas import st_canvas

    p1, p2 = st.columns([3, 2])
    with p2:
        brush = st.slider("Brush", 4, 96, 32, 4, key="lab.brush")
        st.caption(f"paint with the mouse where steering should act; the layer's grid is {cap.grid[0]}x{cap.grid[1]} "
                   "cells, each weighted by the share of it painted")
    with p1:
        drawn = st_canvas(stroke_width=brush, stroke_color="rgba(255, 40, 40, 0.6)", drawing_mode="freedraw",
                          background_image=Image.fromarray(overlay.thumbnail(cap.image, CANVAS_PX)),
                          height=CANVAS_PX, width=CANVAS_PX, return_image_data=True, key="lab.canvas")
    alpha = drawn.image_data[..., 3] if drawn is not None and drawn.image_data is not None else None
    return None if alpha is None else live.painted_mask(alpha, cap.grid)


def _describe(mask: np.ndarray) -> str:
    """Where a mask acts: its size, how many cells it covers and their rows and columns."""
    rows, cols = np.nonzero(mask)
    size = f"{mask.shape[0]}x{mask.shape[1]}"
    if not len(rows):
        return f"{size}, empty"
    return (f"{size}, {len(rows)} of {mask.size} cells inside (rows {rows.min()}-{rows.max()}, columns "
            f"{cols.min()}-{cols.max()})")


# ------------------------------------------------------------------------------------------------ steer a direction


def _direction_picker() -> None:
    """Steer along a concept direction instead of units: a diff-in-means direction (or an SAE feature set) of the
    run's generations for a concept or between two prompt groups, measured at the layer over the chosen steps from
    the captured activity, or a concept's matched direction for the prompt (one of the run's), original and steered
    side by side."""
    choices = []
    with ui.guard("directions"):
        choices = cmap.direction_choices(run)
    if not choices:
        st.info("this run's prompts carry no attributes or groups to make a direction from")
        return
    with st.form("steer_direction"):
        d1, d2 = st.columns([3, 2])
        spec = d1.selectbox("Direction", choices, key="lab.direction",
                            help="concept:ATTR=VALUE: the mean activation of the concept's generations minus the "
                                 "others'; groups:A-vs-B: group A's minus group B's")
        method = d2.radio("Made of", ["diff-in-means", "SAE feature set", "matched"], horizontal=True,
                          key="lab.direction_method",
                          help="SAE feature set: the features that best tell the two sets apart (the layer's "
                               f"{ui.kind_label(kind) if is_feature(kind) else 'default SAE'}), decoder rows weighted; "
                               "matched (a concept, with one of the run's prompts): per step and token position, the "
                               "concept's generations minus those with the prompt's value, among generations of the "
                               "prompt's layout, at the run's steps (scale 1 adds the difference itself)")
        scale = st.slider("Scale (x the direction's size: the norm of the difference)", -20.0, 20.0, 4.0, 0.5,
                          key="lab.direction_scale")
        dwindow = st.slider("Step window", 0, n_steps - 1, (n_steps // 2, n_steps - 1), key="lab.direction_window")
        go_direction = st.form_submit_button("Steer along the direction", type="primary")
    if not go_direction and "lab.direction_steered" not in st.session_state:
        return
    prefix = {"diff-in-means": "", "SAE feature set": "features:", "matched": "matched:"}[method]
    full = spec if not prefix else prefix + spec.split(":", 1)[1]
    measured = dwindow if not run_steps or run_steps == n_steps else (
        dwindow[0] * run_steps // n_steps, min(run_steps - 1, dwindow[1] * run_steps // n_steps))
    try:
        with st.spinner("measuring the direction and steering ..."):
            if method == "matched":
                deltas = live.matched_deltas(run.path, run.sig, full, layer, prompt, n_steps)
                image = live.steer_direction_cached(model, full, layer, prompt, seed, n_steps, guidance,
                                                    deltas.tobytes(), float(scale), tuple(dwindow), None, None,
                                                    device, dtype, tuple(deltas.shape), conditions)
                caption = f"{full} x{scale:g} (per step and position) · steps {dwindow[0]}-{dwindow[1]}"
            else:
                vector, size, feats = live.concept_direction(run.path, run.sig, full, layer, tuple(measured),
                                                             kind if is_feature(kind) else "feature")
                image = live.steer_direction_cached(model, spec, layer, prompt, seed, n_steps, guidance,
                                                    vector.astype(np.float32).tobytes(), float(scale) * size,
                                                    tuple(dwindow), None, None, device, dtype, None, conditions)
                what = f" (features {', '.join(map(str, feats))})" if feats else ""
                caption = (f"{full}{what} x{scale:g} (strength {scale * size:.3g}) · steps "
                           f"{dwindow[0]}-{dwindow[1]}")
        st.session_state["lab.direction_steered"] = True
    except Exception as exc:  # noqa: BLE001 - an unknown concept, a layer without activity, ...
        ui.show_error(exc, "steering along the direction")
        return
    a, b = st.columns(2)
    with a:
        st.image(overlay.to_jpeg(overlay.thumbnail(cap.image, 256)), caption="original")
    with b:
        st.image(overlay.to_jpeg(overlay.thumbnail(image, 256)), caption=caption)



st.subheader("Steer along a concept direction")
_direction_picker()

st.subheader("Steer")
painted = None
if st.toggle("Paint the mask", key="lab.paint", help="paint where steering acts, over the image; the strokes become "
             "a mask over the layer's grid (each cell: the share of it painted) and replace the rectangle"):
    painted = _painted_mask(cap)
default_units = ", ".join(str(t["unit"]) for t in tops[:1])
with st.form("steer"):
    c1, c2 = st.columns([2, 2])
    units_text = c1.text_input(f"{kind}s to steer (comma-separated)", value=default_units, key="lab.units")
    strength = c2.slider("Strength (x the unit's largest recorded activation)", -10.0, 10.0, 2.0, 0.25,
                         key="lab.strength")
    window = st.slider("Step window", 0, n_steps - 1, (0, n_steps - 1), key="lab.window")
    use_mask = st.toggle("Spatial mask (rectangle)", key="lab.mask")
    m1, m2 = st.columns(2)
    mx = m1.slider("x (left → right)", 0.0, 1.0, (0.0, 0.5), 0.05, key="lab.mask_x")
    my = m2.slider("y (top → bottom)", 0.0, 1.0, (0.0, 1.0), 0.05, key="lab.mask_y")
    go = st.form_submit_button("Steer", type="primary")

units = ui.parse_units(units_text)
if units is None or (not go and "lab.steered" not in st.session_state):
    st.stop()
items = ui.steer_items(run, layer, kind, units, strength, sae)
res = model.default_resolution
mask = live.rect_mask(res, mx, my) if use_mask else None
mask_source = "rectangle"
if st.session_state.get("lab.paint"):
    if painted is None:
        st.error("the painted mask is empty: paint over the image, or turn off \"Paint the mask\"")
        st.stop()
    mask, mask_source = painted, "painted"
if mask is not None and mask.sum() == 0:
    st.error("the mask rectangle covers no pixel; widen it")
    st.stop()
try:
    with st.spinner("steering ..."):
        steered = live.steer_cached(model, sae, spec, layer, prompt, seed, n_steps, guidance, tuple(items),
                                    tuple(window), None if mask is None else mask.tobytes(),
                                    None if mask is None else mask.shape, sae_dir, device, dtype, conditions)
    st.session_state["lab.steered"] = True
except Exception as exc:  # noqa: BLE001 - e.g. a unit out of range
    ui.show_error(exc, "steering")
    st.stop()
effect = float(np.abs(steered.astype(np.float32) - cap.image.astype(np.float32)).mean() / 255.0)
a, b, c = st.columns(3)
with a:
    st.image(overlay.to_jpeg(overlay.thumbnail(cap.image, 256)), caption="original")
with b:
    st.image(overlay.to_jpeg(overlay.thumbnail(steered, 256)),
             caption=f"steered: {', '.join(f'{k} {u} x{s:.3g}' for k, u, s in items)} · steps {window[0]}-{window[1]}")
with c:
    if mask is not None:
        st.image(overlay.overlay_jpeg(overlay.thumbnail(cap.image, 256), mask.tobytes(), *mask.shape, 256, 0.5),
                 caption=f"mask ({mask_source}): {_describe(mask)}")
st.metric("effect (mean |Δ pixel|)", f"{effect:.4f}")

