"""The coloured-shapes world of the demo model: attributes, prompts, rendering and the attribute scorer.

Every image holds one shape. Its ground truth is an attribute dict
(colour, shape, size, position, background); the prompt says the same in words, e.g.
"a large red circle on the left, gray background". The scorer reads the attributes back from
pixels by template matching, so generated images can be checked against their prompts.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}

POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Shape centres as fractions of the image side (x, y), and radii as fractions of the side.
POSITION_CENTRES = {
    "left": (0.30, 0.5),
    "right": (0.70, 0.5),
    "top": (0.5, 0.30),
    "bottom": (0.5, 0.70),
    "center": (0.5, 0.5),
}
SIZE_RADII = {"small": 0.17, "large": 0.29}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """One image's ground truth."""

    colour: str
    shape: str
    size: str
    position: str
    background: str

    def attributes(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in ATTRIBUTES}

    def prompt(self) -> str:
        return prompt_for(self.attributes())


def prompt_for(attrs: dict[str, str]) -> str:
    """The prompt sentence for an attribute dict."""
    return (
        f"a {attrs['size']} {attrs['colour']} {attrs['shape']} "
        f"{POSITION_PHRASES[attrs['position']]}, {attrs['background']} background"
    )


def all_specs() -> list[ShapeSpec]:
    """Every combination of attribute values, in a fixed order."""
    return [ShapeSpec(*combo) for combo in itertools.product(*ATTRIBUTES.values())]


def random_specs(n: int, rng: np.random.Generator) -> list[ShapeSpec]:
    """n specs drawn uniformly (with replacement) from every attribute."""
    idx_NA = np.stack([rng.integers(len(v), size=n) for v in ATTRIBUTES.values()], axis=1)
    values = list(ATTRIBUTES.values())
    return [ShapeSpec(*(values[a][i] for a, i in enumerate(row))) for row in idx_NA]


def vocabulary() -> list[str]:
    """Every word any demo prompt can use, sorted."""
    words = set()
    for spec in all_specs():
        words.update(spec.prompt().replace(",", " ,").split())
    return sorted(words)


def coverage_mask(shape: str, size: str, position: str, res: int) -> np.ndarray:
    """Anti-aliased coverage [res, res] in [0, 1] of one shape."""
    return _coverage_mask_cached(shape, size, position, res).copy()


@lru_cache(maxsize=512)
def _coverage_mask_cached(shape: str, size: str, position: str, res: int) -> np.ndarray:
    n = res * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    y_HW, x_HW = np.meshgrid(coords, coords, indexing="ij")
    cx, cy = POSITION_CENTRES[position]
    r = SIZE_RADII[size]
    dx, dy = x_HW - cx, y_HW - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":
        half = r * 0.85
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":
        # upward triangle: apex at top, base at bottom
        top, bottom = cy - r, cy + r * 0.8
        frac = (y_HW - top) / (bottom - top)
        inside = (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * r)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    cov = inside.reshape(res, SUPERSAMPLE, res, SUPERSAMPLE).mean(axis=(1, 3))
    return cov.astype(np.float32)


def render(spec: ShapeSpec, res: int = 16) -> np.ndarray:
    """The image of a spec as uint8 [res, res, 3]."""
    alpha_HW1 = coverage_mask(spec.shape, spec.size, spec.position, res)[..., None]
    fg = np.array(COLOURS[spec.colour], dtype=np.float32)
    bg = np.array(BACKGROUNDS[spec.background], dtype=np.float32)
    img = bg * (1 - alpha_HW1) + fg * alpha_HW1
    return np.round(img).astype(np.uint8)


def render_batch(specs: list[ShapeSpec], res: int = 16) -> np.ndarray:
    """Images of several specs as uint8 [N, res, res, 3]."""
    return np.stack([render(s, res) for s in specs])


# ---------------------------------------------------------------- scorer


def _nearest(palette: dict[str, tuple[int, int, int]], rgb: np.ndarray) -> str:
    names = list(palette)
    cols = np.array([palette[k] for k in names], dtype=np.float32)
    return names[int(np.argmin(((cols - rgb) ** 2).sum(axis=1)))]


@lru_cache(maxsize=8)
def _templates(res: int) -> tuple[list[tuple[str, str, str]], np.ndarray]:
    keys = list(itertools.product(SHAPES, SIZES, POSITIONS))
    masks_KP = np.stack([coverage_mask(*k, res).ravel() for k in keys])
    return keys, masks_KP


def score_image(img_HW3: np.ndarray) -> dict[str, str]:
    """Attributes read back from one uint8 image.

    Background: nearest palette colour to the border median. Foreground: pixels far from the
    background; colour is the nearest palette colour to their mean. Shape, size and position:
    the rendered template with the highest soft (min/max) IoU against the foreground mask.
    """
    img = img_HW3.astype(np.float32)
    res = img.shape[0]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(BACKGROUNDS, bg_rgb)
    bg = np.array(BACKGROUNDS[background], dtype=np.float32)
    dist_HW = np.sqrt(((img - bg) ** 2).sum(-1))
    fg_weight = dist_HW >= 0.5 * dist_HW.max() if dist_HW.max() > 30 else np.zeros_like(dist_HW, bool)
    if fg_weight.sum() == 0:
        return {"colour": "none", "shape": "none", "size": "none", "position": "none", "background": background}
    colour = _nearest(COLOURS, img[fg_weight].mean(axis=0))
    fg_rgb = np.array(COLOURS[colour], dtype=np.float32)
    # soft foreground: projection of each pixel on the bg->fg segment
    seg = fg_rgb - bg
    alpha_HW = np.clip(((img - bg) @ seg) / max(float(seg @ seg), 1e-6), 0, 1)
    keys, masks_KP = _templates(res)
    a_P = alpha_HW.ravel()
    inter = np.minimum(masks_KP, a_P).sum(1)
    union = np.maximum(masks_KP, a_P).sum(1)
    shape, size, position = keys[int(np.argmax(inter / np.maximum(union, 1e-6)))]
    return {"colour": colour, "shape": shape, "size": size, "position": position, "background": background}


def attribute_accuracy(images_NHW3: np.ndarray, attrs: list[dict[str, str]]) -> dict[str, float]:
    """Per-attribute share of images whose scored attribute equals the expected one."""
    scored = [score_image(im) for im in images_NHW3]
    return {
        k: float(np.mean([s[k] == a[k] for s, a in zip(scored, attrs, strict=True)]))
        for k in ATTRIBUTES
    }


def prompt_records(specs: list[ShapeSpec], group_by: str | None = None) -> list[dict]:
    """JSONL-ready records (prompt, group, attributes) for a list of specs."""
    return [
        {"prompt": s.prompt(), "group": getattr(s, group_by) if group_by else "all", "attributes": s.attributes()}
        for s in specs
    ]


def write_jsonl(records: list[dict], path) -> None:
    from backend.fileio import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
