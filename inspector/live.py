"""The Lab's live model work: load a run's model (once, `st.cache_resource`), generate while reading a layer, rank
the units of that image at a step, and steer units. Everything heavy (torch, diffusers, the backend's model code)
is imported inside the functions, so importing this module costs nothing until the Lab asks for a model.

Steering uses backend/interventions/steer.py (unit directions, strength schedules, masked steering edits), the same
code `python cli.py steer` runs, so the Lab shows what the batch job would produce.

One loaded model serves every browser session (Streamlit runs each session's script in its own thread). A model is
not safe to share between concurrent generations: hooks are registered on its modules (a read hook fires on every
forward pass, whoever started it; a steering hook edits them all) and it keeps the scheduler's state and the current
step. So every forward pass of a cached model runs under its lock (`model_lock`): one generation at a time per
model, each seeing only its own activations.

A generation keeps what the page shows, not the layer's tokens (float32 tokens of every step are about 0.5 GB per
SDXL generation): per step, every unit's mean and max over the tokens and the maps of the TOP_KEPT most active units,
summarised on the model's device inside the hook (`summarise`).

A prompt is generated with the negative prompt and control image the run generated it with (`conditions`; else the
run's own --negative-prompt / --control-image), through the run's ControlNet if it had one, as the batch
interventions do: the Lab's image of one of the run's prompts and seeds is the captured image.

Device and dtype: the run's device when this machine has it, else the CPU (`lab_device`; a run made on a GPU node
opens on a CPU-only login node); half precision on the CPU is bfloat16 (float16 runs use float32 there: `lab_dtype`).
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from backend.run.schema import is_feature

THREADS_ENV = "DIFFLENS_LAB_THREADS"
"""Torch threads for the Lab's model (default: 1 for the demo model, torch's default otherwise)."""
TOP_KEPT = 32
"""Units per step whose maps a generation keeps (the page's "Top" input goes up to this)."""
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Capture:
    """One generation and, per step of its layer, what the page shows (see `summarise`)."""

    image: np.ndarray
    """uint8 [H, W, 3]."""
    kind: str
    """"channel", or a feature kind: "feature" / "feature.<sae_id>" (the codes of that SAE of the layer)."""
    means: np.ndarray
    """[S, U] float32: every unit's mean over the tokens, per step (S denoiser calls)."""
    maxes: np.ndarray
    """[S, U] float32: every unit's max over the tokens."""
    top: np.ndarray
    """[S, K] int32: the K units of highest mean, best first (ties: lower unit first)."""
    maps: np.ndarray
    """[S, K, T] float16: their maps over the tokens, each divided by its largest |value| (`scales`)."""
    scales: np.ndarray
    """[S, K] float32."""
    grid: tuple[int, int] = (1, 1)
    """(h, w) of the layer's token grid."""
    probs: np.ndarray | None = None
    """An image classifier's class probabilities [classes] (float32); None for a diffusion model."""

    @property
    def nbytes(self) -> int:
        extra = 0 if self.probs is None else self.probs.nbytes
        return extra + sum(a.nbytes for a in (self.image, self.means, self.maxes, self.top, self.maps, self.scales))


# ------------------------------------------------------------------------------------------------ device and dtype


def _torch_device_problem(device: str) -> str | None:
    """Why this machine cannot run on device (None when it can)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"{device!r} is not a torch device"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "this machine has no CUDA GPU" + (" (this torch is a CPU build)" if torch.version.cuda is None
                                                     else "")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"this machine shows {torch.cuda.device_count()} GPU(s)"
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        return "this machine has no MPS"
    elif dev.type not in ("cpu", "cuda", "mps"):
        return f"the Lab cannot generate on {dev.type}"
    return None


def lab_device(run_device: str) -> tuple[str, str | None]:
    """The Lab's default device: the run's when this machine has it, else "cpu"; and a note when it is not the
    run's."""
    if run_device == "cpu":
        return "cpu", None
    problem = _torch_device_problem(run_device)
    if problem is None:
        return run_device, None
    return "cpu", f"this run was made on {run_device}, but {problem}: the Lab runs its model on the CPU"


def device_options(run_device: str) -> list[str]:
    """Devices to offer: the run's (when available), the CPU, every visible GPU, MPS."""
    import torch

    options = [run_device] if _torch_device_problem(run_device) is None else []
    options.append("cpu")
    if torch.cuda.is_available():
        options += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        options.append("mps")
    return list(dict.fromkeys(options))


def lab_dtype(device: str, run_dtype: str) -> tuple[str, str | None]:
    """The Lab's default dtype on device: the run's, except float16 on the CPU, which becomes float32 (CPU float16
    kernels are slow and some are missing; bfloat16 runs there); and a note when it is not the run's."""
    name = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(run_dtype, run_dtype)
    if name not in DTYPES:
        return "float32", f"this run's dtype {run_dtype!r} is unknown: the Lab uses float32"
    if name == "float16" and str(device).split(":")[0] == "cpu":
        return "float32", ("this run is float16, which is slow on the CPU and lacks some kernels there: the Lab "
                           "uses float32 (choose float16 or bfloat16 to try half precision)")
    return name, None


def half_precision_problem(exc: BaseException, device: str, dtype: str) -> str | None:
    """A sentence for an op that has no kernel in this half precision on this device (None for other errors)."""
    text = str(exc)
    if dtype == "float32" or not isinstance(exc, RuntimeError):
        return None
    if "not implemented for" in text and ("Half" in text or "BFloat16" in text):
        return (f"an operation of this model has no {dtype} kernel on {device} ({text.splitlines()[0]}); choose "
                "float32 (or bfloat16) as the dtype above")
    return None


# ------------------------------------------------------------------------------------------------ the model


def model_problem(spec: str) -> str | None:
    """Why this machine cannot load a model spec (None when it looks loadable), without importing torch."""
    from pathlib import Path

    if spec == "demo":
        from inspector.runs import display_path

        repo = Path(__file__).resolve().parents[1]
        if not (repo / "data" / "demo-model" / "model_index.json").is_file():
            return f"the demo model is not in {display_path(repo / 'data' / 'demo-model')}"
        return None
    path = Path(spec).expanduser()
    if not (path / "model_index.json").is_file() and not (path / "config.json").is_file():
        return (f"the model {spec!r} is not a local diffusers pipeline or transformers classifier directory on this "
                "machine (no model_index.json, no config.json)")
    return None


@st.cache_resource(max_entries=2, show_spinner=False)
def load_model(spec: str, device: str = "cpu", dtype: str = "float32", controlnet: str = "",
               controlnet_scale: float = 1.0):
    """The run's model, loaded once per process (shared by every session: use it under model_lock); with the run's
    ControlNet (capture.controlnet) when it generated through one."""
    import torch

    from backend.models import load_model as _load
    from backend.models import parse_dtype

    threads = os.environ.get(THREADS_ENV) or ("1" if spec == "demo" else "")
    if threads:  # the demo model is tiny: more threads only add overhead (and stall on a busy machine)
        torch.set_num_threads(max(1, int(threads)))
    model = _load(spec, device=device, dtype=parse_dtype(dtype))
    if controlnet:
        from backend.models.controlnet import with_controlnet

        model = with_controlnet(model, controlnet, controlnet_scale)
    model_lock(model)
    return model


@st.cache_data(max_entries=64, show_spinner=False)
def conditions(run_path: str, run_sig: str, prompt: str, guidance: float) -> tuple:
    """The negative prompt and control image to generate prompt with, as the run's interventions do
    (backend/interventions/generate.py run_conditions): those the run generated that prompt with, else the run's own
    --negative-prompt / --control-image; none without CFG. A hashable tuple of (generate() argument, values),
    empty when there are none; cached per run signature."""
    from backend.interventions.generate import run_conditions
    from backend.run.context import open_run

    given = run_conditions(open_run(run_path), [prompt], float(guidance))
    return tuple(sorted((name, tuple(values)) for name, values in given.items()))


def condition_kwargs(conditions: tuple) -> dict:
    """generate()'s keyword arguments from `conditions`' tuple."""
    return {name: list(values) for name, values in conditions}


def describe_conditions(conditions: tuple) -> str:
    """What a generation is conditioned on besides its prompt, for a caption ("" when nothing)."""
    given = condition_kwargs(conditions)
    parts = [f"negative prompt “{n}”" for n in given.get("negative_prompts", []) if n]
    parts += [f"control image `{Path(c).name}`" for c in given.get("control_images", []) if c]
    return " · ".join(parts)


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.RLock:
    """The lock of a (cached, shared) model: held for every forward pass, so one session's hooks never see another
    session's generation. Re-entrant: steering holds it and calls the layer probe, which takes it too."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@st.cache_resource(max_entries=4, show_spinner=False)
def load_sae(sae_dir: str, device: str = "cpu"):
    from sae.io import load_sae as _load

    return _load(sae_dir, device=device)


def layer_channels(model, layer: str) -> int:
    from backend.models.layers import layer_channels as _channels

    with model_lock(model):  # the first call per model runs a probe forward pass
        return _channels(model, layer)


# ------------------------------------------------------------------------------------------------ generate


def summarise(tokens_TC, kind: str = "channel", sae=None, keep: int = TOP_KEPT) -> tuple[np.ndarray, ...]:
    """What the page shows of one step, computed where the tokens are: (mean [U], max [U], top [K], maps [K, T]
    float16, scales [K]) of the units (channels, or the SAE's codes of the tokens), K = min(keep, U), top ordered by
    mean, best first."""
    import torch

    with torch.no_grad():
        x = tokens_TC.float()
        t = x.shape[0]
        if is_feature(kind):
            codes = sae.encode(x.to(sae.W_dec.dtype))
            vals, idx = codes.values.float(), codes.indices
            n = int(sae.cfg.n_latents)
            flat_i, flat_v = idx.reshape(-1), vals.reshape(-1)
            mean = torch.zeros(n, device=x.device).index_add_(0, flat_i, flat_v) / t
            # codes are >= 0 and a token without a feature has code 0, as in the dense [T, N] codes
            mx = torch.zeros(n, device=x.device).scatter_reduce_(0, flat_i, flat_v, reduce="amax")
        else:
            mean, mx = x.mean(0), x.amax(0)
        top = torch.sort(mean, descending=True, stable=True).indices[:keep]
        if is_feature(kind):
            slot = torch.full((n,), -1, dtype=torch.long, device=x.device)
            slot[top] = torch.arange(len(top), device=x.device)
            s = slot[idx]
            hit = s >= 0
            rows = torch.arange(t, device=x.device)[:, None].expand_as(idx)
            maps = torch.zeros(t, len(top), device=x.device).index_put_((rows[hit], s[hit]), vals[hit],
                                                                         accumulate=True).T
        else:
            maps = x[:, top].T
        scales = maps.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny)
        maps = (maps / scales[:, None]).half()
        return (mean.cpu().numpy(), mx.cpu().numpy(), top.to(torch.int32).cpu().numpy(), maps.cpu().numpy(),
                scales.cpu().numpy())


def generate(model, layer: str, prompt: str, seed: int, n_steps: int, guidance: float, read: str = "output",
             kind: str = "channel", sae=None, conditions: tuple = (), tokens: str = "") -> Capture:
    """Generate one image under the model's lock, summarising the layer at every step (see `summarise`);
    conditions: `conditions(...)`, the run's negative prompt and control image for the prompt. An image classifier
    classifies the image at path `prompt` and reads the run's token choice `tokens` (cls, patch or all)."""
    import torch

    from backend.models.base import to_uint8
    from backend.models.hooks import read_activations

    steps: dict[int, tuple] = {}
    grid: list[tuple[int, int] | None] = [None]

    def keep(ev) -> None:
        tokens_TC = ev.tokens[0]
        if ev.prefix and ev.spatial is not None:  # a classifier's CLS / register tokens: not on the patch grid
            tokens_TC = tokens_TC[ev.prefix:]
        steps[int(ev.step)] = summarise(tokens_TC, kind, sae)
        grid[0] = ev.spatial

    with model_lock(model), torch.no_grad(), read_activations(model, [layer], keep, read=read, half="cond"):
        if tokens:
            model.tokens = tokens
        images = model.generate([prompt], [int(seed)], int(n_steps), float(guidance), **condition_kwargs(conditions))
        probs = class_probs(model)
    image = to_uint8(images)[0]
    order = sorted(steps)
    parts = [np.stack([steps[i][j] for i in order]) for j in range(5)]
    n_tokens = parts[3].shape[-1] if order else 1
    return Capture(image, kind, *parts, grid=_grid(grid[0], n_tokens), probs=probs)


def class_probs(model) -> np.ndarray | None:
    """An image classifier's class probabilities for its last (one-image) batch; None for a diffusion model."""
    import torch

    logits = getattr(model, "last_logits", None)
    return None if logits is None else torch.softmax(logits[0].float(), -1).cpu().numpy()


@st.cache_data(max_entries=16, show_spinner=False)
def capture(_model, spec: str, layer: str, prompt: str, seed: int, n_steps: int, guidance: float,
            read: str = "output", kind: str = "channel", _sae=None, sae_key: str = "", device: str = "",
            dtype: str = "", conditions: tuple = (), tokens: str = "") -> Capture:
    """`generate`, cached per inputs (the model by spec, device and dtype; the SAE by sae_key, its directory)."""
    return generate(_model, layer, prompt, seed, n_steps, guidance, read, kind, _sae, conditions, tokens)


def _grid(spatial, n_tokens: int) -> tuple[int, int]:
    if spatial is not None:
        return int(spatial[0]), int(spatial[1])
    side = int(np.sqrt(n_tokens))
    return (side, side) if side * side == n_tokens else (1, n_tokens)


def top_units(cap: Capture, step: int, k: int = 8) -> list[dict]:
    """The k units most active (by mean) at a step of a generation: unit, mean, max, and its map [h, w]."""
    h, w = cap.grid
    out = []
    for j, u in enumerate(cap.top[step][:k]):
        column = cap.maps[step, j].astype(np.float32) * cap.scales[step, j]
        heat = column.reshape(h, w) if h * w == column.size else column.reshape(1, -1)
        out.append({"unit": int(u), "mean": float(cap.means[step, u]), "max": float(cap.maxes[step, u]),
                    "heatmap": heat})
    return out


def rect_mask(res: tuple[int, int], x: tuple[float, float], y: tuple[float, float]) -> np.ndarray:
    """A [H, W] 0/1 mask of the rectangle x0..x1, y0..y1 (fractions of the width and height); the Lab's other mask
    is painted (`painted_mask`)."""
    h, w = res
    cx = (np.arange(w) + 0.5) / w
    cy = (np.arange(h) + 0.5) / h
    inside = ((cy >= y[0]) & (cy <= y[1]))[:, None] & ((cx >= x[0]) & (cx <= x[1]))[None, :]
    return inside.astype(np.float32)


def painted_mask(alpha_HW: np.ndarray, grid: tuple[int, int]) -> np.ndarray | None:
    """Painted strokes (a canvas' alpha channel at any size, nonzero = painted) as a [h, w] mask over the layer's
    token grid: each cell the share of its area painted, in [0, 1] (area-averaged, like a rectangle's mask is laid
    over the tokens); None when nothing is painted."""
    from PIL import Image

    painted = (np.asarray(alpha_HW) > 0).astype(np.float32)
    if not painted.any():
        return None
    h, w = grid
    cells = Image.fromarray(painted).resize((int(w), int(h)), Image.Resampling.BOX)
    return np.clip(np.asarray(cells, np.float32), 0.0, 1.0)


def steer(model, layer: str, prompt: str, seed: int, n_steps: int, guidance: float,
          items: list[tuple[str, int, float]], window: tuple[int, int], mask_HW: np.ndarray | None = None,
          sae=None, conditions: tuple = ()) -> np.ndarray:
    """The image generated with each (kind, unit, strength) item's direction added (strength x the unit's unit-norm
    direction) at the steps of window (inclusive), under the mask; uint8 [H, W, 3]."""
    return steered(model, layer, prompt, seed, n_steps, guidance, items, window, mask_HW, sae, conditions)[0]


def steered(model, layer: str, prompt: str, seed: int, n_steps: int, guidance: float,
            items: list[tuple[str, int, float]], window: tuple[int, int], mask_HW: np.ndarray | None = None,
            sae=None, conditions: tuple = ()) -> tuple[np.ndarray, np.ndarray | None]:
    """`steer`'s image and, for an image classifier (prompt: the image's path), its class probabilities steered."""
    import torch

    from backend.interventions.directions import unit_direction
    from backend.interventions.generate import edited_generate
    from backend.interventions.steer import steering_edit
    from backend.interventions.windows import strength_schedule
    from backend.models.base import to_uint8

    with model_lock(model):  # the layer probe and the steered generation (its edit hook acts on every forward pass)
        n_channels = layer_channels(model, layer)
        edits = []
        for kind, unit, strength in items:
            direction = unit_direction(kind, int(unit), n_channels, sae if is_feature(kind) else None)
            edits.append(steering_edit(direction, strength_schedule(float(strength), window, n_steps), mask_HW))

        def edit(tokens, step):
            for e in edits:
                tokens = e(tokens, step)
            return tokens

        with torch.no_grad():
            images = edited_generate(model, layer, [prompt], [int(seed)], edit if edits else None, int(n_steps),
                                     float(guidance), conditions=condition_kwargs(conditions))
            probs = class_probs(model)
    return to_uint8(images)[0], probs


@st.cache_data(max_entries=32, show_spinner=False)
def steer_classifier_cached(_model, _sae, spec: str, layer: str, image_path: str,
                            items: tuple[tuple[str, int, float], ...], sae_key: str = "", device: str = "",
                            dtype: str = "") -> np.ndarray:
    """An image classifier's class probabilities [classes] with the items' directions added at every token of the
    layer's output (`steered`, one step); cached per inputs."""
    return steered(_model, layer, image_path, 0, 1, 1.0, list(items), (0, 0), None, _sae)[1]


@st.cache_data(max_entries=32, show_spinner=False)
def steer_cached(_model, _sae, spec: str, layer: str, prompt: str, seed: int, n_steps: int, guidance: float,
                 items: tuple[tuple[str, int, float], ...], window: tuple[int, int], mask_key: bytes | None,
                 mask_shape: tuple[int, int] | None, sae_key: str = "", device: str = "",
                 dtype: str = "", conditions: tuple = ()) -> np.ndarray:
    """`steer`, cached per inputs (the model by spec, device and dtype; the SAE by sae_key)."""
    mask = None if mask_key is None else np.frombuffer(mask_key, np.float32).reshape(mask_shape).copy()
    return steer(_model, layer, prompt, seed, n_steps, guidance, list(items), window, mask, _sae, conditions)


def strength_unit(kind: str, unit: int, unit_max: float | None, sae=None) -> float:
    """What strength 1.0 (relative) means for a unit: its largest recorded activation (x its decoder-row norm for a
    feature), as backend.interventions.steer does; 1.0 when the run has no units table."""
    ref = float(unit_max) if unit_max else 1.0
    if is_feature(kind) and sae is not None:
        from backend.interventions.directions import decoder_norm

        ref *= decoder_norm(sae, unit)
    return ref


@st.cache_data(max_entries=64, show_spinner=False)
def concept_direction(run_path: str, run_sig: str, spec: str, layer: str, window: tuple[int, int],
                      sae_kind: str = "feature") -> tuple[np.ndarray, float, list[int]]:
    """(unit-norm vector [C], its size, a feature set's features) of a direction spec (`concept:shape=circle`,
    `groups:red-vs-blue`, `features:...`) at a layer, measured over the run's steps `window` from its captured
    activity (backend/interventions/concept_directions.py); cached per run signature."""
    from backend.interventions.concept_directions import concept_direction as measure
    from backend.run.context import open_run

    d = measure(open_run(run_path), spec, layer, tuple(window), sae_kind=sae_kind)
    return d.vector_C.numpy(), float(d.norm), list(d.units)


@st.cache_data(max_entries=16, show_spinner=False)
def matched_deltas(run_path: str, run_sig: str, spec: str, layer: str, prompt: str, n_steps: int) -> np.ndarray:
    """A matched direction's per-step, per-position difference [S, T, C] (float32) for one of the run's prompts
    (concept_directions.matched_direction, from the layer's token shards); cached per run signature."""
    from backend.interventions.concept_directions import check_matched_steps, matched_direction, parse_direction
    from backend.run.context import open_run

    ctx, parsed = open_run(run_path), parse_direction(spec)
    check_matched_steps(parsed, int(n_steps), ctx.n_steps)
    return matched_direction(ctx, parsed, layer, prompt).deltas_STC.numpy().astype(np.float32)


@st.cache_data(max_entries=32, show_spinner=False)
def steer_direction_cached(_model, spec: str, layer: str, prompt: str, seed: int, n_steps: int, guidance: float,
                           vector_key: bytes, strength: float, window: tuple[int, int], mask_key: bytes | None,
                           mask_shape: tuple[int, int] | None, device: str = "", dtype: str = "",
                           vector_shape: tuple[int, ...] | None = None, conditions: tuple = ()) -> np.ndarray:
    """The image generated with strength x a direction (float32 bytes: one vector [C], or of vector_shape [S, T, C]
    for a matched direction's per-step, per-position difference) added at the steps of window, under the mask;
    uint8 [H, W, 3] (cached per inputs; the model by spec, device and dtype)."""
    import torch

    from backend.interventions.generate import edited_generate
    from backend.interventions.steer import steering_edit
    from backend.interventions.windows import strength_schedule
    from backend.models.base import to_uint8

    vector = np.frombuffer(vector_key, np.float32)
    vector = torch.from_numpy((vector if vector_shape is None else vector.reshape(vector_shape)).copy())
    mask = None if mask_key is None else np.frombuffer(mask_key, np.float32).reshape(mask_shape).copy()
    with model_lock(_model), torch.no_grad():
        edit = steering_edit(vector, strength_schedule(float(strength), window, n_steps), mask)
        images = edited_generate(_model, layer, [prompt], [int(seed)], edit, int(n_steps), float(guidance),
                                 conditions=condition_kwargs(conditions))
    return to_uint8(images)[0]
