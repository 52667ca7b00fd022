"""Where an intervention acts: spatial masks, and how a mask is laid over a layer's tokens.

This module owns
  - mask specs (`load_mask`): a named region (left, right, top, bottom, center: `region_mask`), a .npy file, an
    image file (nonzero = inside) or an array; [H, W] for every sample, [T] over tokens, or [N, H, W] one per prompt;
  - `object_masks` (demo model): per image, the coverage mask of the shape the attribute scorer finds in it, so
    steering can act on the object and leave the background alone;
  - `mask_tokens` / `token_weights`: an image-space mask as per-token weights of a layer's h x w grid (area-averaged,
    row-major like hooks.to_tokens), repeated over the CFG halves of a batch;
  - `check_mask_nonempty` (an empty mask is a one-line error) and `mask_name` (how a mask is recorded in the
    `interventions` table: its region or file name, "array", or "" for none).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backend.errors import DifflensError

REGIONS = ("left", "right", "top", "bottom", "center")


def region_mask(name: str, res: int = 16) -> np.ndarray:
    """A [res, res] 0/1 mask of a named image region: a half (left/right/top/bottom) or the centre square."""
    if name not in REGIONS:
        raise DifflensError(f"unknown mask region {name!r}; use one of {', '.join(REGIONS)} or a .npy/.png file")
    c = (np.arange(res) + 0.5) / res
    y_HW, x_HW = np.meshgrid(c, c, indexing="ij")
    inside = {"left": x_HW < 0.5, "right": x_HW >= 0.5, "top": y_HW < 0.5, "bottom": y_HW >= 0.5,
              "center": (np.abs(x_HW - 0.5) < 0.25) & (np.abs(y_HW - 0.5) < 0.25)}[name]
    return inside.astype(np.float32)


def load_mask(spec: str | np.ndarray | None, res: int = 16) -> np.ndarray | None:
    """A mask [H, W] in [0, 1] from a region name, a .npy file, an image file (nonzero = inside) or an array."""
    if spec is None:
        return None
    if isinstance(spec, np.ndarray | torch.Tensor):
        mask_HW = np.asarray(spec, dtype=np.float32)
    elif str(spec) in REGIONS:
        mask_HW = region_mask(str(spec), res)
    else:
        path = Path(spec)
        if not path.is_file():
            raise DifflensError(f"mask {spec!r} is neither a region ({', '.join(REGIONS)}) nor a file")
        if path.suffix == ".npy":
            mask_HW = np.load(path).astype(np.float32)
        else:
            from PIL import Image

            mask_HW = (np.asarray(Image.open(path).convert("L"), dtype=np.float32) > 0).astype(np.float32)
    if mask_HW.ndim not in (1, 2, 3) or not np.isfinite(mask_HW).all():
        raise DifflensError(f"a mask must be a finite [H, W] (or [tokens], or [N, H, W]) array; got {mask_HW.shape}")
    for m in (mask_HW if mask_HW.ndim == 3 else [mask_HW]):
        check_mask_nonempty(m)
    return np.clip(mask_HW, 0, 1)


def object_masks(images_NHW3: np.ndarray) -> np.ndarray:
    """Demo model: per image, the coverage mask [N, H, W] of the shape shapes.score_image finds in it (the whole
    image where it finds none), so steering can act on the object and leave the background alone."""
    from backend.demo import shapes

    out = []
    for img in images_NHW3:
        a = shapes.score_image(img)
        res = img.shape[0]
        out.append(np.ones((res, res), np.float32) if a["shape"] == "none"
                   else shapes.coverage_mask(a["shape"], a["size"], a["position"], res))
    return np.stack(out)


def check_mask_nonempty(mask) -> None:
    if float(np.asarray(mask, dtype=np.float32).sum()) <= 0:
        raise DifflensError("the mask is empty (selects no position); give a region or a mask with nonzero pixels")


def mask_tokens(mask_HW: np.ndarray | torch.Tensor, n_tokens: int) -> torch.Tensor:
    """A [H, W] mask as weights [T] over a layer's T = h x w tokens (same aspect ratio; area-averaged, row-major
    like hooks.to_tokens). A [T] mask is returned as is."""
    mask = torch.as_tensor(np.asarray(mask_HW, dtype=np.float32))
    if mask.ndim == 1:
        if len(mask) != n_tokens:
            raise DifflensError(f"a token mask has {len(mask)} entries but the layer has {n_tokens} tokens")
        return mask
    h_img, w_img = mask.shape
    h = max(1, round(math.sqrt(n_tokens * h_img / w_img)))
    w = n_tokens // h
    if h * w != n_tokens:
        raise DifflensError(f"cannot lay a {h_img}x{w_img} mask over {n_tokens} tokens; is this layer a spatial map?")
    out_T = F.adaptive_avg_pool2d(mask[None, None], (h, w)).flatten()
    if float(out_T.sum()) <= 0:
        raise DifflensError(f"the mask covers no token of this layer's {h}x{w} grid; make it larger")
    return out_T


def token_weights(mask: np.ndarray | torch.Tensor, n_tokens: int, batch: int) -> torch.Tensor:
    """Per-token weights [1 or batch, T, 1] of a mask: [T] or [H, W] for every sample, or [N, H, W] one per
    sample (N divides the hooked batch: with CFG on both halves the batch is [uncond; cond], each in prompt
    order, so the masks repeat)."""
    mask = np.asarray(mask, dtype=np.float32)
    if mask.ndim < 3:
        return mask_tokens(mask, n_tokens)[None, :, None]
    if batch % len(mask):
        raise DifflensError(f"{len(mask)} per-sample masks do not fit a batch of {batch}; give one mask per prompt")
    per_NT = torch.stack([mask_tokens(m, n_tokens) for m in mask])
    return per_NT.repeat(batch // len(mask), 1)[:, :, None]


def mask_name(mask) -> str:
    """The mask as recorded in the `interventions` table: a region or file name, "array", or "" (none)."""
    if mask is None:
        return ""
    return str(mask) if isinstance(mask, str | Path) else "array"
