"""Block ablation: take one denoiser block out at a time and measure how much the images change.

This module owns
  - `ablate_block`, a forward hook (context manager, removed on exit even on error) that replaces a block's output:
      skip          the block's input (the block contributes nothing; its residual update is gone),
      remove_delta  output - (output - input): the same in real arithmetic, computed from the block's own output
                    (agrees with skip up to float rounding; mirrors hooks' "delta" reading);
    both need the block's input and output shapes to match; otherwise a one-line DifflensError. Only the main
    hidden state is replaced: auxiliary outputs (a down block's skip-connection residuals) pass through as computed.
    The hook applies to the whole batch, both CFG halves: the block is out of the model.
  - `candidate_blocks`: every block backend/models/layers.py lists whose input and output shapes match (from the
    model's one cached probe pass, layers.probe);
  - `ablate_blocks(model, blocks, prompts, seeds, mode)`: baseline and ablated images, per-image effects (pixel
    distance, demo attribute changes via backend/interventions/effects.py) and a per-block effect score;
  - `ablate_run(run_dir, ...)`: the same on a run's model and prompts, writing the `ablations` table
    (tables/ablations/layer=<block>/<mode>-<key>.parquet: seed, prompt, mode, image, baseline_image, effect, ...),
    media/ablation/<key>/ images and a grid PNG (rows: baseline, then one per block).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch

from backend.errors import DifflensError
from backend.interventions.effects import Effect, effects, is_demo
from backend.interventions.generate import run_conditions
from backend.interventions.media import digest, safe_name, to_json, write_grid
from backend.models.base import DiffusionModel, to_uint8
from backend.models.hooks import Stream, module
from backend.models.layers import check_layers, probe
from backend.run.context import RunContext, as_context

AblationMode = Literal["skip", "remove_delta"]
MODES = ("skip", "remove_delta")
DEFAULT_SEEDS = (0,)
DEFAULT_PROMPTS = 4
"""ablate_run's default prompt set: the run's first this many distinct prompts."""

def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise DifflensError(f"unknown ablation mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


def _shape_error(block: str, x_shape, y_shape) -> DifflensError:
    return DifflensError(f"block {block!r} changes shape {tuple(x_shape)} -> {tuple(y_shape)}, so it cannot be "
                         "skipped; pick a block that keeps its shape (python cli.py ablate lists candidates)")


@contextmanager
def ablate_block(model: DiffusionModel, block: str, mode: AblationMode = "skip") -> Iterator[list[int]]:
    """For the `with` block, replace block's output (see the module docstring); yields a one-item call counter."""
    check_mode(mode)
    mod = module(model, block)
    stream = Stream.of(model, block)  # a joint-attention block: its image stream, or its text stream (`:text`)
    calls = [0]

    def hook(_m, args, kwargs, out):
        y = stream.output(out)
        x = stream.input(args, kwargs)
        if x.shape != y.shape:
            raise _shape_error(block, x.shape[1:], y.shape[1:])
        calls[0] += 1
        return stream.replace(out, x if mode == "skip" else y - (y - x))

    handle = mod.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def block_shapes(model: DiffusionModel, blocks: Sequence[str] | None = None) -> dict[str, tuple[tuple, tuple]]:
    """(input shape, output shape) without batch of each block (default: every block backend/models/layers.py lists),
    from the model's one probe pass (layers.probe); blocks whose input is not a tensor are left out."""
    if blocks is None:
        probes = probe(model)
    else:
        check_layers(model, list(blocks))
        everything = probe(model, all_modules=True)
        probes = {b: everything[b] for b in blocks if b in everything}
    return {name: (p.input_shape, p.output_shape) for name, p in probes.items() if p.input_shape is not None}


def candidate_blocks(model: DiffusionModel) -> list[str]:
    """Blocks listed by backend/models/layers.py whose input and output shapes match (so skipping one is defined)."""
    return [name for name, (x, y) in block_shapes(model).items() if x == y]


def check_blocks(model: DiffusionModel, blocks: Sequence[str]) -> None:
    """One-line errors for an unknown block, a block whose input is not a tensor, or one that changes shape."""
    if not blocks:
        raise DifflensError("no blocks to ablate")
    shapes = block_shapes(model, blocks)
    for block in blocks:
        if block not in shapes:
            raise DifflensError(f"block {block!r} has no tensor input and output, so it cannot be skipped")
        x, y = shapes[block]
        if x != y:
            raise _shape_error(block, x, y)


@dataclass
class AblationResult:
    """Images of a fixed sample set with no block ablated (baseline) and with each block ablated."""

    blocks: list[str]
    prompts: list[str]
    seeds: list[int]
    mode: str
    baseline_NHW3: np.ndarray
    images: dict[str, np.ndarray] = field(default_factory=dict)
    effects: dict[str, list[Effect]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    """How often each block's ablation hook ran (every denoiser call of every step)."""

    def score(self, block: str) -> float:
        """A block's effect score: the mean pixel effect over the samples."""
        return float(np.mean([e.effect for e in self.effects[block]]))

    def summary(self) -> pl.DataFrame:
        """One row per block: layer, mode, effect (mean), changed (share of images with a changed attribute;
        null off the demo), sorted by effect, largest first."""
        rows = []
        for b in self.blocks:
            fx = self.effects[b]
            changed = None if fx[0].changed is None else float(np.mean([bool(e.changed) for e in fx]))
            rows.append({"layer": b, "mode": self.mode, "effect": self.score(b), "changed": changed})
        return pl.DataFrame(rows, schema={"layer": pl.String, "mode": pl.String, "effect": pl.Float64,
                                          "changed": pl.Float64}).sort("effect", descending=True)

    def grid_images(self) -> tuple[np.ndarray, list[str]]:
        """Rows: baseline, then one per block; columns: the samples. With captions."""
        images = [self.baseline_NHW3] + [self.images[b] for b in self.blocks]
        labels = [f"baseline seed {s}" for s in self.seeds]
        for b in self.blocks:
            labels += [f"{b} d={e.effect:.2f}" for e in self.effects[b]]
        return np.concatenate(images), labels


@torch.no_grad()
def ablate_blocks(model: DiffusionModel, blocks: Sequence[str], prompts: Sequence[str], seeds: Sequence[int],
                  mode: AblationMode = "skip", n_steps: int | None = None,
                  guidance: float | None = None, conditions: dict | None = None) -> AblationResult:
    """Generate prompts x seeds (one image per pair, same length lists) plainly and with each block ablated;
    conditions: generate()'s negative prompts / control images (generate.run_conditions)."""
    check_mode(mode)
    blocks, prompts, seeds = list(blocks), list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds) or not prompts:
        raise DifflensError(f"give one seed per prompt (got {len(prompts)} prompts, {len(seeds)} seeds)")
    check_blocks(model, blocks)
    n_steps = n_steps or model.default_steps
    guidance = model.default_guidance if guidance is None else guidance
    conditions = conditions or {}
    baseline = to_uint8(model.generate(prompts, seeds, n_steps, guidance, **conditions))
    result = AblationResult(blocks, prompts, seeds, mode, baseline)
    demo = is_demo(model)
    for block in blocks:
        with ablate_block(model, block, mode) as calls:
            images = to_uint8(model.generate(prompts, seeds, n_steps, guidance, **conditions))
        result.images[block] = images
        result.effects[block] = effects(baseline, images, demo)
        result.calls[block] = calls[0]
    return result


def _run_samples(ctx: RunContext, prompts: Sequence[str] | None, seeds: Sequence[int]) -> tuple[list[str], list[int]]:
    if prompts is None:
        prompts = ctx.generations()["prompt"].unique(maintain_order=True).head(DEFAULT_PROMPTS).to_list()
    pairs = [(p, int(s)) for p in prompts for s in seeds]
    if not pairs:
        raise DifflensError("give at least one prompt and one seed")
    return [p for p, _ in pairs], [s for _, s in pairs]


def ablate_run(run_dir: str | Path, blocks: Sequence[str] | None = None, prompts: Sequence[str] | None = None,
               seeds: Sequence[int] = DEFAULT_SEEDS, mode: AblationMode = "skip", n_steps: int | None = None,
               guidance: float | None = None, model: DiffusionModel | None = None) -> tuple[pl.DataFrame, Path]:
    """Ablate each block (default: candidate_blocks) on prompts x seeds (default: the run's first 4 prompts,
    seed 0) with the run's steps and guidance; write `ablations` rows, images and a grid. Returns (per-block
    summary, grid path)."""
    ctx = as_context(run_dir, model=model).require_generator("ablate")
    ctx.store.remove_stale_temporaries()
    model = ctx.model
    blocks = list(blocks) if blocks else candidate_blocks(model)
    s_prompts, s_seeds = _run_samples(ctx, prompts, seeds)
    n_steps = n_steps or ctx.n_steps
    guidance = ctx.guidance if guidance is None else guidance
    conditions = run_conditions(ctx, s_prompts, guidance)  # the run's generations: their negatives, control images
    result = ablate_blocks(model, blocks, s_prompts, s_seeds, check_mode(mode), n_steps, guidance, conditions)
    key = digest([s_prompts, s_seeds, n_steps, guidance] + ([conditions] if conditions else []))
    folder = f"media/ablation/{key}"
    base = [ctx.store.write_png(f"{folder}/baseline/{i:03d}-seed-{s:06d}.png", result.baseline_NHW3[i])
            for i, s in enumerate(s_seeds)]
    for block in blocks:
        rows = []
        for i, (prompt, seed) in enumerate(zip(s_prompts, s_seeds, strict=True)):
            fx = result.effects[block][i]
            image = ctx.store.write_png(f"{folder}/{mode}/{safe_name(block)}/{i:03d}-seed-{seed:06d}.png",
                              result.images[block][i])
            rows.append({"mode": mode, "prompt": prompt, "seed": seed, "n_steps": n_steps, "guidance": guidance,
                         "image": image, "baseline_image": base[i], "effect": fx.effect,
                         "attributes": to_json(fx.attributes), "baseline_attributes": to_json(fx.baseline_attributes),
                         "changed_attributes": to_json(fx.changed), "spec": key})
        table = ctx.store.table_from_rows("ablations", rows)
        ctx.store.write_table_shard("ablations", f"{mode}-{key}", table, layer=block)
    images, labels = result.grid_images()
    grid = write_grid(ctx.store, f"{folder}/{mode}-grid-{digest(blocks)}.png", images, labels, cols=len(s_seeds))
    summary = result.summary()
    ctx.store.update_stage("ablation", status="done", mode=mode, blocks=blocks, grid=ctx.store.relative(grid),
                           scores=json.loads(summary.write_json()))
    return summary, grid
