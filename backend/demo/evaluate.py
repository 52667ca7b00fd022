"""Sampling and scoring the demo model: labelled grids and per-attribute accuracy against the prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from backend.demo import shapes
from backend.fileio import atomic_write_json
from backend.grid import labelled_grid, save_png
from backend.models.base import DiffusionModel, to_uint8


def generate_uint8(model: DiffusionModel, prompts: list[str], seeds: list[int], steps: int | None,
                   guidance: float | None, batch_size: int = 64, desc: str = "generate") -> np.ndarray:
    """uint8 images [N, H, W, 3], generated in batches with a progress bar."""
    out = []
    with tqdm(total=len(prompts), desc=desc, unit="img") as bar:
        for i in range(0, len(prompts), batch_size):
            imgs = model.generate(prompts[i:i + batch_size], seeds[i:i + batch_size], steps, guidance)
            out.append(to_uint8(imgs))
            bar.update(len(imgs))
    return np.concatenate(out)


def grid_specs(n: int, seed: int = 0) -> list[shapes.ShapeSpec]:
    """n specs that cycle through every colour, shape and position, in a random but fixed order."""
    rng = np.random.default_rng(seed)
    specs = shapes.all_specs()
    return [specs[i] for i in rng.permutation(len(specs))[:n]]


def sample_grid(model: DiffusionModel, out: str | Path, n: int = 24, cols: int = 6, seed: int = 0,
                steps: int | None = None, guidance: float | None = None) -> Path:
    """Write a labelled grid of n demo samples to out (PNG)."""
    specs = grid_specs(n, seed)
    prompts = [s.prompt() for s in specs]
    imgs = generate_uint8(model, prompts, [seed + i for i in range(n)], steps, guidance, desc="sample")
    return save_png(labelled_grid(imgs, prompts, cols=cols), out)


def evaluate(model: DiffusionModel, n: int = 360, seed: int = 1000, steps: int | None = None,
             guidance: float | None = None, out: str | Path | None = None) -> dict:
    """Per-attribute accuracy of the attribute scorer on n generated images (all 360 combinations by default)."""
    specs = grid_specs(n, seed)
    imgs = generate_uint8(model, [s.prompt() for s in specs], [seed + i for i in range(n)], steps, guidance,
                          desc="evaluate")
    acc = shapes.attribute_accuracy(imgs, [s.attributes() for s in specs])
    report = {"n_images": n, "steps": steps or model.default_steps,
              "guidance": model.default_guidance if guidance is None else guidance, "accuracy": acc}
    if out is not None:
        atomic_write_json(out, report)
    return report
