"""Steered priors of many units at once: the atlas' priors, one generation batch for a batch of units.

This module owns
  - `PriorPlan` (one unit's direction, strength and steering window) and `plan_priors`, which makes the plans of a
    batch of units from the run's units table and the `[prior]` settings (PriorConfig: strength = scale x the unit's
    max activation, x its decoder-row norm for a feature; window active / all / late / peaks / a-b);
  - `rowwise_steering_edit`: the edit that adds to each batch row its own strength x direction (row r of the batch
    is (unit r // seeds, seed r % seeds));
  - `steered_priors`: the empty prompt without guidance for every (unit, seed) of a batch in one denoising loop,
    returning the final latents and images.

A unit's prior is the same whether it is generated alone or in a batch (each row has its own seed's noise and its
own edit); tests/interventions/test_atlas.py checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from backend.errors import DifflensError
from backend.interventions.directions import decoder_norm, unit_direction
from backend.interventions.generate import Edit
from backend.interventions.windows import check_finite, parse_steps, rescale_window, step_window
from backend.models.base import DiffusionModel, to_uint8
from backend.models.hooks import edit_activations
from backend.run.config import PriorConfig, check_finite_settings
from backend.run.schema import is_feature

PRIOR_STEPS = ("active", "all", "late", "peaks")
"""PriorConfig.steps words (besides an inclusive window a-b)."""


@dataclass(frozen=True)
class PriorPlan:
    """One unit's steered prior: its direction [C], absolute strength and the steps it is added at."""

    unit: int
    direction_C: torch.Tensor
    strength: float
    steps: tuple[int, ...]

    def schedule(self, n_steps: int) -> list[float]:
        """strength at the plan's steps, 0 elsewhere (steering_edit's strength_by_step)."""
        return [self.strength if s in self.steps else 0.0 for s in range(n_steps)]


def validate_prior(cfg: PriorConfig, n_steps: int | None = None) -> PriorConfig:
    """A one-line DifflensError for a setting out of range (n_steps: the steps the priors are generated with; a
    window a-b is checked against them when given)."""
    check_finite_settings("prior", cfg.to_dict())
    if not cfg.seeds:
        raise DifflensError("prior.seeds is empty; give at least one seed")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise DifflensError(f"prior seeds must be distinct (got {cfg.seeds})")
    if cfg.n_steps < 0 or cfg.peak_radius < 0:
        raise DifflensError(f"prior.n_steps and prior.peak_radius must be >= 0 (got {cfg.n_steps}, {cfg.peak_radius})")
    steps = parse_steps(cfg.steps) if cfg.steps != "peaks" else "peaks"
    if isinstance(steps, tuple) and n_steps is not None:
        step_window(steps, n_steps)
    return cfg


def steered_steps(cfg: PriorConfig, row: dict, n_steps: int, run_steps: int) -> tuple[int, ...]:
    """The steps a unit is steered at (row: its units-table row). A unit that is never active, or without peaks
    for steps = peaks, is steered at every step."""
    every = tuple(range(n_steps))
    if cfg.steps == "peaks":
        peaks = [rescale_window(int(p), int(p), run_steps, n_steps)[0] for p in (row["peak_steps"] or [])]
        near = {s for p in peaks for s in range(p - cfg.peak_radius, p + cfg.peak_radius + 1) if 0 <= s < n_steps}
        return tuple(sorted(near)) or every
    steps = parse_steps(cfg.steps)
    if steps == "active" and int(row["first_active"]) < 0:
        return every
    first, last = step_window(steps, n_steps, (int(row["first_active"]), int(row["last_active"])), run_steps)
    return tuple(range(first, last + 1))


def plan_priors(units: pl.DataFrame, kind: str, unit_ids: list[int], cfg: PriorConfig, n_channels: int, sae,
                n_steps: int, run_steps: int) -> list[PriorPlan]:
    """The plans of unit_ids from the (layer, kind) units table (max, first/last_active, peak_steps)."""
    rows = {int(r["unit"]): r for r in units.filter(pl.col("unit").is_in(unit_ids)).iter_rows(named=True)}
    plans = []
    for unit in unit_ids:
        row = rows.get(unit)
        if row is None:
            raise DifflensError(f"{kind} {unit} has no row in the units table; rerun `python cli.py analyze`")
        direction_C = unit_direction("feature" if is_feature(kind) else "channel", unit, n_channels, sae)
        if cfg.strength is not None:
            strength = check_finite("prior.strength", cfg.strength)
        else:
            ref = float(row["max"]) * (decoder_norm(sae, unit) if is_feature(kind) else 1.0)
            strength = check_finite("prior strength", cfg.scale * ref)
        plans.append(PriorPlan(unit, direction_C, strength, steered_steps(cfg, row, n_steps, run_steps)))
    return plans


def rowwise_steering_edit(directions_BC: torch.Tensor, strengths_BS: np.ndarray) -> Edit:
    """An edit for hooks.edit_activations adding strengths_BS[row, step] x directions_BC[row] to each batch row's
    tokens (rows of strength 0 at a step are left as they are)."""
    strengths = torch.as_tensor(np.asarray(strengths_BS, np.float32))
    cache: dict = {}

    def edit(tokens_BTC: torch.Tensor, step: int) -> torch.Tensor:
        if not 0 <= step < strengths.shape[1] or not bool(strengths[:, step].any()):
            return tokens_BTC
        key = (tokens_BTC.device, tokens_BTC.dtype)
        if key not in cache:
            cache[key] = directions_BC.to(tokens_BTC.device, tokens_BTC.dtype)
        s_B = strengths[:, step].to(tokens_BTC.device, tokens_BTC.dtype)
        return tokens_BTC + (s_B[:, None] * cache[key])[:, None, :]

    return edit


SHARED_PREFIX_SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")
"""Schedulers whose step keeps no per-sample history and draws no noise (DDIM with eta 0, as the demo runs it):
with them a row that is not steered yet is its seed's unsteered trajectory, computed once per seed (below)."""


def shares_prefix(model: DiffusionModel) -> bool:
    scheduler = model.scheduler
    return type(scheduler).__name__ in SHARED_PREFIX_SCHEDULERS and float(getattr(scheduler.config, "eta", 0.0)
                                                                          or 0.0) == 0.0


def _rows(cond, n: int, total: int):
    """The first n rows of a conditioning dict (nested dicts too) whose tensors have batch size total."""
    if isinstance(cond, dict):
        return {k: _rows(v, n, total) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor) and cond.ndim > 0 and cond.shape[0] == total:
        return cond[:n]
    return cond


@torch.no_grad()
def steered_priors(model: DiffusionModel, layer: str, plans: list[PriorPlan], seeds: list[int],
                   n_steps: int) -> tuple[torch.Tensor, np.ndarray]:
    """(final latents [U * S, ...], images uint8 [U * S, H, W, 3]) of every plan x seed, row u * S + s: the empty
    prompt, no guidance, each row steered by its own plan, in one denoising loop.

    Before a row's first steered step it is its seed's unsteered trajectory: with a scheduler that keeps no
    per-sample state (shares_prefix) those steps are computed once per seed and a row joins the batch at its first
    steered step (the same images, fewer denoiser rows: a unit steered over its active steps 8-15 of 20 costs 12
    steps, not 20); with any other scheduler every row runs every step (model.generate)."""
    s = len(seeds)
    directions = torch.stack([p.direction_C for p in plans]).repeat_interleave(s, 0)
    strengths = np.repeat(np.asarray([p.schedule(n_steps) for p in plans], np.float32), s, axis=0)
    row_seeds = [int(seed) for _ in plans for seed in seeds]
    if not shares_prefix(model):
        with edit_activations(model, layer, rowwise_steering_edit(directions, strengths)):
            latents = model.generate([""] * len(row_seeds), row_seeds, n_steps, 1.0, output="latent")
        return latents.float().cpu(), to_uint8(model.decode(latents))
    latents = shared_prefix_loop(model, layer, directions, strengths, [min(p.steps) for p in plans for _ in seeds],
                                 [i % s for i in range(len(row_seeds))], seeds, n_steps)
    return latents.float().cpu(), to_uint8(model.decode(latents))


def shared_prefix_loop(model: DiffusionModel, layer: str, directions_RC: torch.Tensor, strengths_RS: np.ndarray,
                       start_R: list[int], seed_of_R: list[int], seeds: list[int], n_steps: int) -> torch.Tensor:
    """The denoising loop of shares_prefix: the batch at step i is [the seeds' unsteered latents (while a row still
    needs them); the rows whose first steered step is <= i], each row with its own edit."""
    from backend.models.base import deterministic_kernels, seed_generators

    n_rows, s = len(start_R), len(seeds)
    with deterministic_kernels(model.device):
        cond, _ = model.encode_prompts([""] * (s + n_rows), cfg=False)
        timesteps = model.timesteps(n_steps)
        base = model.initial_latents(seed_generators(seeds))
        rows: dict[int, torch.Tensor] = {}
        for i, t in enumerate(timesteps):
            model.step_index = i
            for r in range(n_rows):
                if r not in rows and start_R[r] <= i:
                    rows[r] = base[seed_of_R[r]].clone()
            joined = sorted(rows)
            keep_base = len(joined) < n_rows
            batch = torch.cat(([base] if keep_base else []) + [rows[r][None] for r in joined])
            n_base = s if keep_base else 0
            dirs = torch.cat([torch.zeros(n_base, directions_RC.shape[1]), directions_RC[joined]])
            step_strength = np.zeros((len(batch), max(len(timesteps), strengths_RS.shape[1])), np.float32)
            step_strength[n_base:, :strengths_RS.shape[1]] = strengths_RS[joined]
            with edit_activations(model, layer, rowwise_steering_edit(dirs, step_strength)):
                out = model.step(batch, t, _rows(cond, len(batch), s + n_rows), None, 1.0)
            if keep_base:
                base = out[:s]
            for k, r in enumerate(joined):
                rows[r] = out[n_base + k]
        return torch.stack([rows[r] for r in range(n_rows)])
