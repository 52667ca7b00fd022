"""Animations (Pillow GIFs) of the atlas: a dream's snapshots over its optimisation, and a unit's heat-map over
the denoising steps of an example generation.

This module owns
  - `write_gif`: frames (uint8 [H, W, 3]) as an animated GIF at a run-relative path (atomic, RunStore's rule);
  - `heatmap_frames`: a stack of maps [steps, h, w] as coloured frames, one colour scale over all steps (so a unit
    that fades shows it), upscaled to the generation's image size;
  - `unit_maps_SHW`: a unit's maps at every denoising step of generations replayed under a read hook (a channel's
    map, or an SAE feature's code map), many generations in one batch;
  - `heatmap_animation`: one unit and one generation of a run to media/atlas/<layer>/<kind>/heatmaps/ (what the
    atlas writes for each unit's top example; callable for any example).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from backend.fileio import atomic_write_with
from backend.run.schema import is_feature

if TYPE_CHECKING:
    from backend.run.context import RunContext

MIN_GIF_SIDE = 128
"""Frames smaller than this (the demo's 16 px images, 8x8 maps) are upscaled (nearest) to at least this size."""


RAMP_AT = np.linspace(0.0, 1.0, 5)
RAMP_RGB = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)
"""The heat-map colour ramp (black, purple, red, orange, pale yellow: the `inferno` colour map's anchors),
interpolated linearly between its 5 stops."""


def write_gif(root: Path, rel: str, frames: list[np.ndarray], frame_ms: int) -> str:
    """Write frames as a looping GIF at root/rel (atomically); returns rel."""
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    side = min(images[0].size)
    if side < MIN_GIF_SIDE:
        factor = -(-MIN_GIF_SIDE // side)
        images = [im.resize((im.width * factor, im.height * factor), Image.NEAREST) for im in images]

    def save(path: Path) -> None:
        images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=int(frame_ms), loop=0)

    atomic_write_with(root / rel, save, suffix=".gif")
    return rel


def heatmap_frames(maps_SHW: np.ndarray, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """One RGB frame per map, coloured on one scale over all maps (0 at the minimum, 1 at the maximum; a flat
    stack is all dark), nearest-upscaled to size (h, w) when given."""
    maps = np.asarray(maps_SHW, np.float32)
    lo, hi = float(maps.min()), float(maps.max())
    norm = (maps - lo) / (hi - lo) if hi > lo else np.zeros_like(maps)
    rgb = np.stack([np.interp(norm, RAMP_AT, RAMP_RGB[:, c]) for c in range(3)], -1).round().astype(np.uint8)
    if size is not None and size != maps.shape[1:]:
        fy, fx = -(-size[0] // maps.shape[1]), -(-size[1] // maps.shape[2])
        rgb = rgb.repeat(fy, axis=1).repeat(fx, axis=2)
    return list(rgb)


@torch.no_grad()
def unit_maps_SHW(ctx: RunContext, layer: str, kind: str, units: list[int], gen_ids: list[int],
                  height: int, width: int) -> np.ndarray:
    """Maps [len(units), steps, height, width]: unit units[i]'s map at every denoising step of generation
    gen_ids[i], replayed with the run's prompt, seed, steps and guidance (one batch for all distinct gen_ids), and
    its negative prompt and control image."""
    import polars as pl

    from backend.analysis.examples import generation_conditions
    from backend.models.hooks import read_activations

    gens = ctx.generations().filter(pl.col("gen_id").is_in(gen_ids))
    order = sorted(set(gen_ids))
    by_id = {int(r["gen_id"]): r for r in gens.iter_rows(named=True)}
    model = ctx.model
    sae = ctx.sae(layer, kind) if is_feature(kind) else None
    steps: list[torch.Tensor] = []
    half = "cond" if ctx.half == "both" else ctx.half

    def keep(ev) -> None:
        tokens = ev.tokens.float()
        if sae is not None:
            b, t, c = tokens.shape
            tokens = sae.encode(tokens.reshape(b * t, c).to(sae.W_dec.dtype), dense=True).float().view(b, t, -1)
        steps.append(tokens.cpu())

    with read_activations(model, [layer], keep, read=ctx.read, half=half):  # gens is in gen_id order, as `order`
        model.generate([by_id[g]["prompt"] for g in order], [int(by_id[g]["seed"]) for g in order], ctx.n_steps,
                       ctx.guidance, **generation_conditions(gens))
    tokens_SBTN = torch.stack(steps)
    row = {g: i for i, g in enumerate(order)}
    maps = [tokens_SBTN[:, row[g], :, u].reshape(-1, height, width) for u, g in zip(units, gen_ids, strict=True)]
    return torch.stack(maps).numpy()


def map_size(ctx: RunContext, layer: str) -> tuple[int, int]:
    """(height, width) of the layer's spatial grid (a token sequence of T tokens: the square it was folded from)."""
    import math

    from backend.errors import DifflensError
    from backend.models.layers import layer_probe

    shape = layer_probe(ctx.model, layer).output_shape
    if len(shape) == 3:
        return int(shape[1]), int(shape[2])
    side = math.isqrt(int(shape[0]))
    if side * side != shape[0]:
        raise DifflensError(f"layer {layer!r} has {shape[0]} tokens, not a square grid, so it has no heat-map")
    return side, side


def has_heatmaps(ctx: RunContext, layer: str) -> bool:
    """Whether the layer's tokens form a spatial grid (a text stream, `<block>:text`, does not)."""
    from backend.errors import DifflensError

    try:
        map_size(ctx, layer)
    except DifflensError:
        return False
    return True


def heatmap_gif_path(layer: str, kind: str, unit: int) -> str:
    """Where the atlas keeps a unit's heat-map animation (its top example), relative to the run."""
    return f"media/atlas/{layer}/{kind}/heatmaps/unit-{unit:05d}.gif"


def heatmap_animation(ctx: RunContext, layer: str, kind: str, unit: int, gen_id: int, rel: str | None = None,
                      frame_ms: int = 120) -> str:
    """A GIF of a unit's heat-map over the denoising steps of one generation of the run (default path:
    heatmap_gif_path); returns the run-relative path."""
    height, width = map_size(ctx, layer)
    maps = unit_maps_SHW(ctx, layer, kind, [unit], [gen_id], height, width)[0]
    size = tuple(ctx.model.default_resolution)
    return write_gif(ctx.root, rel or heatmap_gif_path(layer, kind, unit), heatmap_frames(maps, size), frame_ms)
