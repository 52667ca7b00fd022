"""Generation under an activation edit: the shared machinery of steering and feature edits.

This module owns
  - `Edit`, the callable hooks.edit_activations applies to a layer's output tokens: edit(tokens [B, T, C], step);
  - `edited_generate`: images generated with an edit on a layer's output (None: the plain generation, the baseline
    an edit is compared with), on the CFG half(s) `half` selects (both by default: see backend/interventions/steer.py
    for why one strength then means the same with CFG on or off); no hook outlives the call;
  - `windowed`: an edit limited to an inclusive step window (identity elsewhere);
  - DEFAULT_SEEDS, the seeds run-level steering and edits generate when none are given.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from backend.models.base import DiffusionModel
from backend.models.hooks import Half, edit_activations

Edit = Callable[[torch.Tensor, int], torch.Tensor]
DEFAULT_SEEDS = (0, 1, 2, 3)


def _settings(model: DiffusionModel, n_steps: int | None, guidance: float | None) -> tuple[int, float]:
    return (n_steps or model.default_steps), (model.default_guidance if guidance is None else guidance)


@torch.no_grad()
def edited_generate(model: DiffusionModel, layer: str, prompts: list[str], seeds: list[int], edit: Edit | None,
                    n_steps: int | None = None, guidance: float | None = None, half: Half = "both") -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] with edit applied to layer's output (None: plain generation)."""
    n_steps, guidance = _settings(model, n_steps, guidance)
    if edit is None:
        return model.generate(list(prompts), list(seeds), n_steps, guidance)
    with edit_activations(model, layer, edit, half=half):
        return model.generate(list(prompts), list(seeds), n_steps, guidance)


def windowed(edit: Edit, window: tuple[int, int]) -> Edit:
    """edit at the window's steps, identity elsewhere."""
    def inner(tokens_BTC: torch.Tensor, step: int) -> torch.Tensor:
        return edit(tokens_BTC, step) if window[0] <= step <= window[1] else tokens_BTC

    return inner
