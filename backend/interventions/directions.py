"""Unit directions: the vector along which a unit is steered, in the layer's raw activation space.

This module owns
  - `unit_direction`: the unit-norm direction [C] of a channel (its one-hot vector) or of an SAE feature (its
    decoder row as the folded SAE applies it, divided by its norm);
  - `decoder_norm`: the norm of a feature's decoder row, which turns a feature's code value into activation units
    (a feature adds code x decoder row, so its typical activation along its direction is code x ||row||).
"""

from __future__ import annotations

import torch

from backend.errors import DifflensError
from backend.run.context import check_kind, check_unit

Kind = str
"""channel, feature (the layer's default SAE) or feature.<sae_id> (another SAE of the layer)."""


def unit_direction(kind: Kind, unit: int, n_channels: int, sae=None) -> torch.Tensor:
    """The unit-norm direction [C] of a unit: a channel's one-hot vector, or a feature's decoder row (folded SAE,
    i.e. in raw activation space) divided by its norm."""
    check_kind(kind)
    if kind == "channel":
        check_unit(kind, unit, n_channels)
        direction_C = torch.zeros(n_channels)
        direction_C[unit] = 1.0
        return direction_C
    if sae is None:
        raise DifflensError("a feature intervention needs the layer's SAE; train one with `python cli.py train-sae`")
    check_unit(kind, unit, sae.cfg.n_latents)
    if sae.cfg.d_in != n_channels:
        raise DifflensError(f"the SAE takes {sae.cfg.d_in} channels but the layer has {n_channels}")
    row_C = sae.W_dec[unit].detach().float().cpu()
    norm = float(row_C.norm())
    if norm == 0:
        raise DifflensError(f"feature {unit} has a zero decoder row, so it has no direction")
    return row_C / norm


def decoder_norm(sae, unit: int) -> float:
    """||W_dec[unit]|| of the folded SAE: a code value of the feature times this is its size in activation units."""
    return float(sae.W_dec[unit].detach().float().norm())
