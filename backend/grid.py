"""Labelled image grids (PNG) for samples, interventions and ablations."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from backend.fileio import atomic_write_with


def labelled_grid(images_NHW3: np.ndarray, labels: list[str], cols: int = 6, cell: int = 96,
                  wrap: int = 18) -> Image.Image:
    """A grid of images scaled to cell pixels (nearest neighbour), each captioned below."""
    n = len(images_NHW3)
    rows = max(1, -(-n // cols))
    font = ImageFont.load_default()
    lines = [textwrap.wrap(lbl, wrap)[:3] for lbl in labels]
    text_h = 12 * max((len(ls) for ls in lines), default=1) + 4
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, ls) in enumerate(zip(images_NHW3, lines, strict=True)):
        r, c = divmod(i, cols)
        x, y = c * cell, r * (cell + text_h)
        grid.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
        for j, line in enumerate(ls):
            draw.text((x + 2, y + cell + 2 + 12 * j), line, fill="black", font=font)
    return grid


def save_png(image: Image.Image, path: str | Path) -> Path:
    atomic_write_with(path, lambda p: image.save(p, format="PNG"), suffix=".png")
    return Path(path)
