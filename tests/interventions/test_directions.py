"""Unit directions: a channel's one-hot vector, a feature's unit-norm decoder row; bad units are one-line errors."""

from __future__ import annotations

import pytest
import torch
from intervention_runs import N_LATENTS, one_line

from backend.errors import DifflensError
from backend.interventions.directions import unit_direction


def test_unit_direction_channel_and_feature(sae):
    d = unit_direction("channel", 9, 64)
    assert d.sum() == 1 and d[9] == 1
    f = unit_direction("feature", 11, 64, sae)
    torch.testing.assert_close(f, sae.W_dec[11].detach() / sae.W_dec[11].detach().norm())
    assert abs(float(f.norm()) - 1) < 1e-6


def test_bad_directions_are_one_line_errors(sae):
    cases = [
        (lambda: unit_direction("channel", 64, 64), "unknown channel 64"),
        (lambda: unit_direction("channel", -1, 64), "unknown channel -1"),
        (lambda: unit_direction("feature", N_LATENTS, 64, sae), f"unknown feature {N_LATENTS}"),
        (lambda: unit_direction("feature", 0, 64, None), "needs the layer's SAE"),
        (lambda: unit_direction("neuron", 0, 64), "unknown unit kind"),
    ]
    for fn, match in cases:
        with pytest.raises(DifflensError) as e:
            fn()
        assert match in one_line(e), match
