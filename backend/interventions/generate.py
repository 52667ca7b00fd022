"""Generation under an activation edit: the shared machinery of steering and feature edits.

This module owns
  - `Edit`, the callable hooks.edit_activations applies to a layer's output tokens: edit(tokens [B, T, C], step);
  - `edited_generate`: images generated with an edit on a layer's output (None: the plain generation, the baseline
    an edit is compared with), on the CFG half(s) `half` selects (both by default: see backend/interventions/steer.py
    for why one strength then means the same with CFG on or off); no hook outlives the call;
  - `windowed`: an edit limited to an inclusive step window (identity elsewhere);
  - `run_conditions`: the negative prompts and control images a run generated given prompts with, so an
    intervention regenerates the run's generation (not the same prompt without them);
  - DEFAULT_SEEDS, the seeds run-level steering and edits generate when none are given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from backend.errors import DifflensError
from backend.models.base import CONDITION_COLUMNS, DiffusionModel, condition_arguments
from backend.models.hooks import Half, edit_activations

if TYPE_CHECKING:
    from backend.run.context import RunContext

Edit = Callable[[torch.Tensor, int], torch.Tensor]
DEFAULT_SEEDS = (0, 1, 2, 3)


def _settings(model: DiffusionModel, n_steps: int | None, guidance: float | None) -> tuple[int, float]:
    return (n_steps or model.default_steps), (model.default_guidance if guidance is None else guidance)


@torch.no_grad()
def edited_generate(model: DiffusionModel, layer: str, prompts: list[str], seeds: list[int], edit: Edit | None,
                    n_steps: int | None = None, guidance: float | None = None, half: Half = "both",
                    conditions: dict | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] with edit applied to layer's output (None: plain generation); conditions:
    generate()'s negative_prompts / control_images (run_conditions)."""
    n_steps, guidance = _settings(model, n_steps, guidance)
    if edit is None:
        return model.generate(list(prompts), list(seeds), n_steps, guidance, **(conditions or {}))
    with edit_activations(model, layer, edit, half=half):
        return model.generate(list(prompts), list(seeds), n_steps, guidance, **(conditions or {}))


def run_conditions(ctx: RunContext, prompts: Sequence[str], guidance: float) -> dict:
    """generate() keyword arguments (negative_prompts, control_images; none when there are none) that give each
    prompt the negative prompt and control image ctx's run generated it with: those of the run's first generation
    of that prompt text; a prompt the run did not generate gets the run's own --negative-prompt / --control-image,
    if any. Without CFG (guidance <= 1) a negative prompt does nothing, so none is given. A ControlNet run's
    prompt without a control image among prompts with one is a one-line error."""
    rows = ctx.generations()
    columns = [c for c in CONDITION_COLUMNS if c in rows.columns]  # (older runs lack them)
    first = {row["prompt"]: row for row in rows.select(["prompt", *columns])
             .unique(subset="prompt", keep="first", maintain_order=True).iter_rows(named=True)}
    c = ctx.config.capture
    run_wide = {"negative_prompt": c.negative_prompt or None, "control_image": c.control_image or None}
    negatives = [first[p].get("negative_prompt") if p in first else run_wide["negative_prompt"] for p in prompts]
    controls = [first[p].get("control_image") if p in first else run_wide["control_image"] for p in prompts]
    missing = next((p for p, im in zip(prompts, controls, strict=True) if not im), None) if any(controls) else None
    if missing is not None:
        raise DifflensError(f"prompt {missing!r} has no control image in {ctx.root} (the run did not generate it "
                            "and has no --control-image for all prompts); steer, edit or ablate the prompts "
                            "the run generated (its generations table)")
    return condition_arguments(negative_prompt=negatives if guidance > 1 else [], control_image=controls)


def windowed(edit: Edit, window: tuple[int, int]) -> Edit:
    """edit at the window's steps, identity elsewhere."""
    def inner(tokens_BTC: torch.Tensor, step: int) -> torch.Tensor:
        return edit(tokens_BTC, step) if window[0] <= step <= window[1] else tokens_BTC

    return inner
