"""The Lab's live model work: load a run's model (once, `st.cache_resource`), generate while reading a layer, rank
the units of that image at a step, and steer units. Everything heavy (torch, diffusers, the backend's model code)
is imported inside the functions, so importing this module costs nothing until the Lab asks for a model.

Steering uses backend/interventions/steer.py (unit directions, strength schedules, masked steering edits), the same
code `python cli.py steer` runs, so the Lab shows what the batch job would produce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import streamlit as st

THREADS_ENV = "DIFFLENS_LAB_THREADS"
"""Torch threads for the Lab's model (default: 1 for the demo model, torch's default otherwise)."""


@dataclass
class Capture:
    """One generation and its layer's tokens at every step."""

    image: np.ndarray
    """uint8 [H, W, 3]."""
    tokens: dict[int, np.ndarray] = field(default_factory=dict)
    """step -> [T, C] float32 (the conditional half)."""
    grid: tuple[int, int] = (1, 1)
    """(h, w) of the layer's token grid."""


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
    if not (path / "model_index.json").is_file():
        return f"the model {spec!r} is not a local diffusers directory on this machine (no model_index.json)"
    return None


@st.cache_resource(max_entries=2, show_spinner=False)
def load_model(spec: str, device: str = "cpu", dtype: str = "float32"):
    """The run's model, loaded once per process (shared by every session)."""
    import torch

    from backend.models import load_model as _load
    from backend.models import parse_dtype

    threads = os.environ.get(THREADS_ENV) or ("1" if spec == "demo" else "")
    if threads:  # the demo model is tiny: more threads only add overhead (and stall on a busy machine)
        torch.set_num_threads(max(1, int(threads)))
    model = _load(spec, device=device, dtype=parse_dtype(dtype))
    return model


@st.cache_resource(max_entries=4, show_spinner=False)
def load_sae(sae_dir: str, device: str = "cpu"):
    from sae.io import load_sae as _load

    return _load(sae_dir, device=device)


def layer_channels(model, layer: str) -> int:
    from backend.models.layers import layer_channels as _channels

    return _channels(model, layer)


@st.cache_data(max_entries=24, show_spinner=False)
def capture(_model, spec: str, layer: str, prompt: str, seed: int, n_steps: int, guidance: float,
            read: str = "output") -> Capture:
    """Generate one image and keep the layer's tokens at every step (cached per inputs)."""
    import torch

    from backend.models.base import to_uint8
    from backend.models.hooks import read_activations

    kept: dict[int, np.ndarray] = {}
    grid: list[tuple[int, int] | None] = [None]

    def keep(ev) -> None:
        kept[int(ev.step)] = ev.tokens[0].detach().float().cpu().numpy()
        grid[0] = ev.spatial

    with torch.no_grad(), read_activations(_model, [layer], keep, read=read, half="cond"):
        images = _model.generate([prompt], [int(seed)], int(n_steps), float(guidance))
    image = to_uint8(images)[0]
    n_tokens = next(iter(kept.values())).shape[0] if kept else 1
    return Capture(image, kept, _grid(grid[0], n_tokens))


def _grid(spatial, n_tokens: int) -> tuple[int, int]:
    if spatial is not None:
        return int(spatial[0]), int(spatial[1])
    side = int(np.sqrt(n_tokens))
    return (side, side) if side * side == n_tokens else (1, n_tokens)


def unit_maps(tokens_TC: np.ndarray, kind: str, sae=None) -> np.ndarray:
    """[T, U] activations of every unit at every token: channels as they are, features as SAE codes."""
    if kind == "channel":
        return tokens_TC
    import torch

    with torch.no_grad():
        x = torch.as_tensor(tokens_TC).to(sae.W_dec.device, sae.W_dec.dtype)
        return sae.encode(x, dense=True).float().cpu().numpy()


def top_units(cap: Capture, step: int, kind: str, sae=None, k: int = 8, by: str = "mean") -> list[dict]:
    """The k units most active at a step of a captured generation: unit, mean, max, and its map [h, w]."""
    maps_TU = unit_maps(cap.tokens[step], kind, sae)
    score = maps_TU.mean(0) if by == "mean" else maps_TU.max(0)
    order = np.argsort(-score, kind="stable")[:k]
    h, w = cap.grid
    out = []
    for u in order:
        column = maps_TU[:, u]
        heat = column.reshape(h, w) if h * w == column.size else column.reshape(1, -1)
        out.append({"unit": int(u), "mean": float(maps_TU[:, u].mean()), "max": float(maps_TU[:, u].max()),
                    "heatmap": heat.astype(np.float32)})
    return out


def rect_mask(res: tuple[int, int], x: tuple[float, float], y: tuple[float, float]) -> np.ndarray:
    """A [H, W] 0/1 mask of the rectangle x0..x1, y0..y1 (fractions of the width and height)."""
    h, w = res
    cx = (np.arange(w) + 0.5) / w
    cy = (np.arange(h) + 0.5) / h
    inside = ((cy >= y[0]) & (cy <= y[1]))[:, None] & ((cx >= x[0]) & (cx <= x[1]))[None, :]
    return inside.astype(np.float32)


def steer(model, layer: str, prompt: str, seed: int, n_steps: int, guidance: float,
          items: list[tuple[str, int, float]], window: tuple[int, int], mask_HW: np.ndarray | None = None,
          sae=None) -> np.ndarray:
    """The image generated with each (kind, unit, strength) item's direction added (strength x the unit's unit-norm
    direction) at the steps of window (inclusive), under the mask; uint8 [H, W, 3]."""
    import torch

    from backend.interventions.directions import unit_direction
    from backend.interventions.generate import edited_generate
    from backend.interventions.steer import steering_edit
    from backend.interventions.windows import strength_schedule
    from backend.models.base import to_uint8

    n_channels = layer_channels(model, layer)
    edits = []
    for kind, unit, strength in items:
        direction = unit_direction(kind, int(unit), n_channels, sae if kind == "feature" else None)
        edits.append(steering_edit(direction, strength_schedule(float(strength), window, n_steps), mask_HW))

    def edit(tokens, step):
        for e in edits:
            tokens = e(tokens, step)
        return tokens

    with torch.no_grad():
        images = edited_generate(model, layer, [prompt], [int(seed)], edit if edits else None, int(n_steps),
                                 float(guidance))
    return to_uint8(images)[0]


@st.cache_data(max_entries=32, show_spinner=False)
def steer_cached(_model, _sae, spec: str, layer: str, prompt: str, seed: int, n_steps: int, guidance: float,
                 items: tuple[tuple[str, int, float], ...], window: tuple[int, int], mask_key: bytes | None,
                 mask_shape: tuple[int, int] | None) -> np.ndarray:
    mask = None if mask_key is None else np.frombuffer(mask_key, np.float32).reshape(mask_shape).copy()
    return steer(_model, layer, prompt, seed, n_steps, guidance, list(items), window, mask, _sae)


def strength_unit(kind: str, unit: int, unit_max: float | None, sae=None) -> float:
    """What strength 1.0 (relative) means for a unit: its largest recorded activation (x its decoder-row norm for a
    feature), as backend.interventions.steer does; 1.0 when the run has no units table."""
    ref = float(unit_max) if unit_max else 1.0
    if kind == "feature" and sae is not None:
        from backend.interventions.directions import decoder_norm

        ref *= decoder_norm(sae, unit)
    return ref
