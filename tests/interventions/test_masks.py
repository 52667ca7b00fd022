"""Masks on the shipped demo model (4 DDIM steps): a steering edit under a mask touches only the masked tokens, per
sample and on both CFG halves; object masks follow the scored shape; empty or unknown masks are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from intervention_runs import LAYER, PROMPT, STEPS, gen, one_line

from backend.errors import DifflensError
from backend.interventions.directions import unit_direction
from backend.interventions.masks import load_mask, mask_tokens, object_masks, region_mask
from backend.interventions.steer import steering_edit
from backend.models.hooks import edit_activations, from_tokens, to_tokens


def test_mask_limits_the_edit_to_masked_tokens():
    mask_HW = region_mask("left", 16)
    mask_T = mask_tokens(mask_HW, 64)  # the 8x8 grid of LAYER
    assert mask_T.shape == (64,) and mask_T.reshape(8, 8)[:, :4].eq(1).all() and mask_T.reshape(8, 8)[:, 4:].eq(0).all()
    d = unit_direction("channel", 3, 64)
    maps = torch.randn(2, 64, 8, 8)  # a layer output [B, C, H, W]
    edited = from_tokens(steering_edit(d, [2.0], mask_HW)(to_tokens(maps), 0), maps)
    changed = (edited != maps)
    assert changed[:, :, :, 4:].sum() == 0  # right half untouched
    assert changed[:, 3, :, :4].all() and changed.sum() == 2 * 8 * 4  # only channel 3, every left token
    torch.testing.assert_close(edited[:, 3, :, :4] - maps[:, 3, :, :4], torch.full((2, 8, 4), 2.0))


def test_mask_in_a_generation_touches_only_masked_positions(model):
    d = unit_direction("channel", 3, 64)
    mod = model.denoiser.get_submodule(LAYER)
    seen = []
    with edit_activations(model, LAYER, steering_edit(d, [5.0] * STEPS, region_mask("top", 16))):
        h = mod.register_forward_hook(lambda m, a, out: seen.append(out[0].clone()))
        try:
            gen(model)
        finally:
            h.remove()
    plain = []
    h = mod.register_forward_hook(lambda m, a, out: plain.append(out[0].clone()))
    try:
        gen(model)
    finally:
        h.remove()
    diff = (seen[0] - plain[0]).abs()  # step 0: same input
    assert diff[:, :, 4:, :].max() == 0 and diff[:, 3, :4, :].min() > 4.99


def test_per_sample_masks_follow_the_prompts_on_both_cfg_halves(model):
    d = unit_direction("channel", 3, 64)
    masks = np.stack([region_mask("left", 16), region_mask("right", 16)])
    mod = model.denoiser.get_submodule(LAYER)

    def step0(edit):
        seen = []
        with edit_activations(model, LAYER, edit):
            h = mod.register_forward_hook(lambda m, a, out: seen.append(out[0].clone()))
            try:
                gen(model, prompts=(PROMPT, PROMPT), seeds=(0, 1))
            finally:
                h.remove()
        return seen[0]

    diff = (step0(steering_edit(d, [5.0] * STEPS, masks)) - step0(lambda tok, step: tok)).abs()[:, 3]
    assert diff.shape == (4, 8, 8)  # [uncond a, uncond b, cond a, cond b]
    for row, side in ((0, "left"), (1, "right"), (2, "left"), (3, "right")):
        inside, outside = (diff[row, :, :4], diff[row, :, 4:]) if side == "left" else (diff[row, :, 4:],
                                                                                       diff[row, :, :4])
        assert inside.min() > 4.99 and outside.max() == 0, row


def test_object_masks_cover_the_scored_shape():
    from backend.demo import shapes

    spec = shapes.ShapeSpec("red", "square", "small", "left", "gray")
    masks = object_masks(np.stack([shapes.render(spec), np.full((16, 16, 3), 128, np.uint8)]))
    np.testing.assert_array_equal(masks[0], shapes.coverage_mask("square", "small", "left", 16))
    assert masks[1].min() == 1  # no shape found: the whole image


def test_bad_masks_are_one_line_errors():
    cases = [
        (lambda: steering_edit(torch.ones(64), [1.0], np.zeros((16, 16))), "mask is empty"),
        (lambda: load_mask(np.zeros((16, 16))), "mask is empty"),
        (lambda: load_mask("upper-left"), "neither a region"),
    ]
    for fn, match in cases:
        with pytest.raises(DifflensError) as e:
            fn()
        assert match in one_line(e), match
