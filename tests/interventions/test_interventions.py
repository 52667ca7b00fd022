"""Interventions on the shipped demo model (4 DDIM steps): steering and feature splices leave the baseline bit for
bit when they edit nothing, change it when they do, only at the chosen steps and tokens, on both CFG halves;
bad inputs are one-line errors; no hook outlives a call. Run-level functions on a hand-made run directory."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from intervention_runs import (
    GUIDANCE,
    LAYER,
    N_LATENTS,
    OTHER,
    PROMPT,
    STEPS,
    gen,
    make_intervention_run,
    no_hooks_left,
    one_line,
)

from backend.errors import DifflensError
from backend.interventions import steer as iv
from backend.models.base import to_uint8
from backend.models.hooks import edit_activations, from_tokens, to_tokens
from sae.model import SAE, SAEConfig


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """The demo model's batches are tiny: one thread is as fast, and spares cores other jobs share."""


@pytest.fixture(scope="module")
def sae():
    """A random folded SAE with nonzero biases, so a sloppy splice would not be exact."""
    torch.manual_seed(0)
    s = SAE(SAEConfig(d_in=64, n_latents=N_LATENTS, k=8, layer=LAYER)).eval()
    with torch.no_grad():
        s.b_dec.normal_(0, 0.5)
        s.b_enc.normal_(0, 0.1)
    return s








# ------------------------------------------------------------------------------------------------ steering


def test_strength_zero_reproduces_the_baseline_exactly(model):
    base = gen(model, seeds=(0, 1), prompts=(PROMPT, PROMPT))
    d = iv.unit_direction("channel", 5, 64)
    out = iv.steered_generate(model, LAYER, [PROMPT] * 2, [0, 1], d, [0.0] * STEPS, n_steps=STEPS,
                              guidance=GUIDANCE)
    assert torch.equal(out, base)
    assert no_hooks_left(model)


def test_nonzero_strength_changes_the_image(model):
    base = gen(model)
    d = iv.unit_direction("channel", 5, 64)
    out = iv.steered_generate(model, LAYER, [PROMPT], [0], d, [20.0] * STEPS, n_steps=STEPS, guidance=GUIDANCE)
    assert not torch.equal(out, base)
    assert iv.pixel_effect(to_uint8(base)[0], to_uint8(out)[0]) > 0.005
    assert no_hooks_left(model)


def test_steering_adds_strength_times_direction_to_both_cfg_halves(model):
    """steered_generate's default: the addition reaches both halves of the [uncond; cond] batch."""
    d = iv.unit_direction("channel", 7, 64)
    after = model.denoiser.get_submodule("up_blocks.1.upsamplers.0")  # the module LAYER's output feeds

    def first_input(fn):
        seen = []

        def pre_hook(_m, args):
            seen.append(args[0].clone())  # returns None: the input is left alone

        h = after.register_forward_pre_hook(pre_hook)
        try:
            fn()
        finally:
            h.remove()
        return seen[0]  # step 0: the inputs agree, so the outputs differ by the edit alone

    plain = first_input(lambda: gen(model))
    steered = first_input(lambda: iv.steered_generate(model, LAYER, [PROMPT], [0], d, [3.0] * STEPS,
                                                      n_steps=STEPS, guidance=GUIDANCE))
    assert plain.shape[0] == 2  # [uncond; cond]
    diff = to_tokens(steered - plain)  # [2, 64, 64]
    torch.testing.assert_close(diff, torch.zeros_like(diff) + 3.0 * d, atol=1e-5, rtol=0)


def test_step_window_applies_only_at_the_chosen_steps(model):
    d = iv.unit_direction("channel", 5, 64)
    window = iv.step_window((2, 3), STEPS)
    schedule = iv.strength_schedule(20.0, window, STEPS)
    assert schedule == [0.0, 0.0, 20.0, 20.0]

    def latents(edit):
        out = []
        with edit_activations(model, LAYER, edit):
            gen(model, on_step=lambda i, t, lat: out.append(lat.clone()))
        return out

    plain = latents(lambda tok, step: tok)
    steered = latents(iv.steering_edit(d, schedule))
    assert torch.equal(steered[0], plain[0]) and torch.equal(steered[1], plain[1])
    assert not torch.equal(steered[2], plain[2]) and not torch.equal(steered[3], plain[3])
    calls = []
    edit = iv.steering_edit(d, schedule)
    tok = torch.randn(2, 64, 64)
    for step in range(STEPS + 2):  # steps past the schedule are untouched too
        calls.append(not torch.equal(edit(tok, step), tok))
    assert calls == [False, False, True, True, False, False]


def test_windows_rescale_and_active_window():
    assert iv.rescale_window(5, 9, 20, 20) == (5, 9)
    assert iv.rescale_window(10, 19, 20, 4) == (2, 3)
    assert iv.rescale_window(0, 0, 20, 4) == (0, 0)
    assert iv.step_window("active", 4, active=(10, 19), run_steps=20) == (2, 3)
    assert iv.step_window("all", 4) == (0, 3) and iv.step_window("late", 20) == (10, 19)
    assert iv.parse_steps("3-8") == (3, 8) and iv.parse_steps("2:5") == (2, 5) and iv.parse_steps("all") == "all"
    with pytest.raises(DifflensError) as e:
        iv.step_window((3, 9), 4)
    assert "outside" in one_line(e)
    with pytest.raises(DifflensError) as e:
        iv.step_window("active", 4, active=(-1, -1))
    assert "never active" in one_line(e)


def test_mask_limits_the_edit_to_masked_tokens():
    mask_HW = iv.region_mask("left", 16)
    mask_T = iv.mask_tokens(mask_HW, 64)  # the 8x8 grid of LAYER
    assert mask_T.shape == (64,) and mask_T.reshape(8, 8)[:, :4].eq(1).all() and mask_T.reshape(8, 8)[:, 4:].eq(0).all()
    d = iv.unit_direction("channel", 3, 64)
    maps = torch.randn(2, 64, 8, 8)  # a layer output [B, C, H, W]
    edited = from_tokens(iv.steering_edit(d, [2.0], mask_HW)(to_tokens(maps), 0), maps)
    changed = (edited != maps)
    assert changed[:, :, :, 4:].sum() == 0  # right half untouched
    assert changed[:, 3, :, :4].all() and changed.sum() == 2 * 8 * 4  # only channel 3, every left token
    torch.testing.assert_close(edited[:, 3, :, :4] - maps[:, 3, :, :4], torch.full((2, 8, 4), 2.0))


def test_mask_in_a_generation_touches_only_masked_positions(model):
    d = iv.unit_direction("channel", 3, 64)
    mod = model.denoiser.get_submodule(LAYER)
    seen = []
    with edit_activations(model, LAYER, iv.steering_edit(d, [5.0] * STEPS, iv.region_mask("top", 16))):
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
    d = iv.unit_direction("channel", 3, 64)
    masks = np.stack([iv.region_mask("left", 16), iv.region_mask("right", 16)])
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

    diff = (step0(iv.steering_edit(d, [5.0] * STEPS, masks)) - step0(lambda tok, step: tok)).abs()[:, 3]
    assert diff.shape == (4, 8, 8)  # [uncond a, uncond b, cond a, cond b]
    for row, side in ((0, "left"), (1, "right"), (2, "left"), (3, "right")):
        inside, outside = (diff[row, :, :4], diff[row, :, 4:]) if side == "left" else (diff[row, :, 4:],
                                                                                       diff[row, :, :4])
        assert inside.min() > 4.99 and outside.max() == 0, row


def test_object_masks_cover_the_scored_shape():
    from backend.demo import shapes

    spec = shapes.ShapeSpec("red", "square", "small", "left", "gray")
    masks = iv.object_masks(np.stack([shapes.render(spec), np.full((16, 16, 3), 128, np.uint8)]))
    np.testing.assert_array_equal(masks[0], shapes.coverage_mask("square", "small", "left", 16))
    assert masks[1].min() == 1  # no shape found: the whole image


# ------------------------------------------------------------------------------------------------ features


def test_unit_direction_channel_and_feature(sae):
    d = iv.unit_direction("channel", 9, 64)
    assert d.sum() == 1 and d[9] == 1
    f = iv.unit_direction("feature", 11, 64, sae)
    torch.testing.assert_close(f, sae.W_dec[11].detach() / sae.W_dec[11].detach().norm())
    assert abs(float(f.norm()) - 1) < 1e-6


def test_zeroing_nothing_reproduces_the_baseline_exactly(model, sae):
    base = gen(model, seeds=(0, 1), prompts=(PROMPT, PROMPT))
    out = iv.edited_generate(model, LAYER, [PROMPT] * 2, [0, 1], iv.feature_edit(sae), STEPS, GUIDANCE)
    assert torch.equal(out, base)
    assert no_hooks_left(model)


def test_naive_splice_is_not_exact_so_the_exactness_test_can_fail(sae):
    """decode(codes) + (x - decode(codes)) rounds; the edit's delta form does not."""
    x = torch.randn(512, 64) * 3
    with torch.no_grad():
        xh = sae.decode(sae.encode(x))
    assert not torch.equal(xh + (x - xh), x)
    assert torch.equal(iv.feature_edit(sae)(x[None], 0)[0], x)


def test_feature_zero_and_scale_match_the_dense_splice(sae):
    x_NC = torch.randn(300, 64) * 2
    with torch.no_grad():
        dense = sae.encode(x_NC, dense=True)
        recon = sae.decode(sae.encode(x_NC))
    active = dense.gt(0).sum(0).argsort(descending=True)[:6].tolist()
    zero, scale = active[:3], active[3:]
    for factor in (2.5, -1.0):
        got = iv.feature_edit(sae, zero=zero, scale=scale, factor=factor)(x_NC[None], 0)[0]
        edited = dense.clone()
        edited[:, zero] = 0
        edited[:, scale] *= factor
        expected = (edited @ sae.W_dec + sae.b_dec) + (x_NC - recon)  # decode(edited) + error
        torch.testing.assert_close(got, expected.detach(), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(got, x_NC, atol=1e-3)
    everything = iv.feature_edit(sae, zero=range(N_LATENTS))(x_NC[None], 0)[0]
    torch.testing.assert_close(everything, (x_NC - recon + sae.b_dec).detach(), atol=1e-4, rtol=1e-4)


def test_zeroing_features_changes_the_image(model, sae):
    tokens = []
    mod = model.denoiser.get_submodule(LAYER)
    h = mod.register_forward_hook(lambda m, a, out: tokens.append(to_tokens(out[0])))
    try:
        base = gen(model)
    finally:
        h.remove()
    with torch.no_grad():
        dense = sae.encode(tokens[-1].reshape(-1, 64), dense=True)
    busiest = dense.gt(0).sum(0).argsort(descending=True)[:8].tolist()
    out = iv.edited_generate(model, LAYER, [PROMPT], [0], iv.feature_edit(sae, zero=busiest), STEPS, GUIDANCE)
    assert not torch.equal(out, base)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_are_one_line_errors(model, sae):
    cases = [
        (lambda: iv.unit_direction("channel", 64, 64), "unknown channel 64"),
        (lambda: iv.unit_direction("channel", -1, 64), "unknown channel -1"),
        (lambda: iv.unit_direction("feature", N_LATENTS, 64, sae), f"unknown feature {N_LATENTS}"),
        (lambda: iv.unit_direction("feature", 0, 64, None), "needs the layer's SAE"),
        (lambda: iv.unit_direction("neuron", 0, 64), "unknown unit kind"),
        (lambda: iv.steering_edit(torch.ones(64), [float("nan")]), "finite"),
        (lambda: iv.steering_edit(torch.ones(64), [float("inf")]), "finite"),
        (lambda: iv.strength_schedule(float("inf"), (0, 1), 4), "finite"),
        (lambda: iv.feature_edit(sae, scale=[1], factor=float("nan")), "finite"),
        (lambda: iv.feature_edit(sae, zero=[N_LATENTS]), "unknown feature"),
        (lambda: iv.steering_edit(torch.ones(64), [1.0], np.zeros((16, 16))), "mask is empty"),
        (lambda: iv.load_mask(np.zeros((16, 16))), "mask is empty"),
        (lambda: iv.load_mask("upper-left"), "neither a region"),
        (lambda: iv.parse_steps("soon"), "not understood"),
    ]
    for fn, match in cases:
        with pytest.raises(DifflensError) as e:
            fn()
        assert match in one_line(e), match


def test_errors_inside_a_hook_leave_no_hook(model):
    edit = iv.steering_edit(torch.ones(32), [1.0] * STEPS)  # 32 channels, the layer has 64
    with pytest.raises(DifflensError) as e:
        iv.edited_generate(model, LAYER, [PROMPT], [0], edit, STEPS, GUIDANCE)
    assert "channels" in one_line(e)
    with pytest.raises(DifflensError) as e:
        iv.edited_generate(model, LAYER, [PROMPT], [0], iv.steering_edit(torch.ones(64), [1.0], np.ones(10)),
                           STEPS, GUIDANCE)
    assert "tokens" in one_line(e)
    assert no_hooks_left(model)


# ------------------------------------------------------------------------------------------------ run level




@pytest.fixture
def run(tmp_path, sae):
    return make_intervention_run(tmp_path / "run", sae)


def test_steer_run_writes_rows_images_and_replaces_on_repeat(run, model):
    res = iv.steer_run(run.root, LAYER, "channel", 10, scale=4.0, steps="active", mode="prior", seeds=[0, 1],
                       model=model)
    rows = res.rows
    assert rows.height == 2 and set(rows["seed"]) == {0, 1}
    assert rows["steps"].to_list() == ["1-2", "1-2"]  # units first/last active
    expected = 4.0 * float(np.linspace(0.5, 2.0, 64)[10])  # scale x the unit's max
    np.testing.assert_allclose(rows["strength"].to_numpy(), expected, rtol=1e-6)
    assert (rows["effect"] > 0).all() and rows["prompt"].to_list() == ["", ""]
    assert rows["guidance"].to_list() == [1.0, 1.0]  # the steered prior runs without guidance
    for rel in rows["image"].to_list() + rows["baseline_image"].to_list():
        assert rel.startswith("media/steer/") and (run.root / rel).read_bytes()[:4] == b"\x89PNG"
    assert res.grid.is_file()
    changed = [json.loads(c) for c in rows["changed_attributes"]]
    assert all(isinstance(c, dict) for c in changed)
    iv.steer_run(run.root, LAYER, "channel", 10, scale=4.0, steps="active", mode="prior", seeds=[0, 1], model=model)
    table = run.read_table("interventions")
    assert table.height == 2 and set(table["layer"]) == {LAYER} and set(table["kind"]) == {"channel"}
    assert no_hooks_left(model)


def test_steer_run_scale_zero_is_the_baseline(run, model):
    res = iv.steer_run(run.root, LAYER, "feature", 17, scale=0.0, steps="all", mode="prompt", prompt=PROMPT,
                       seeds=[3], model=model)
    row = res.rows.row(0, named=True)
    assert row["effect"] == 0.0 and row["changed_attributes"] == "{}"
    assert np.array_equal(res.extra["baseline"], res.extra["steered"])
    assert (run.root / row["image"]).read_bytes() == (run.root / row["baseline_image"]).read_bytes()
    assert row["guidance"] == GUIDANCE and row["prompt"] == PROMPT


def test_steer_run_feature_strength_uses_the_decoder_norm(run, model, sae):
    res = iv.steer_run(run.root, LAYER, "feature", 17, scale=2.0, steps=(0, 1), mask="left", mode="prompt",
                       prompt=PROMPT, seeds=[0], model=model)
    expected = 2.0 * float(np.linspace(0.5, 2.0, N_LATENTS)[17]) * float(sae.W_dec[17].detach().norm())
    np.testing.assert_allclose(res.rows["strength"][0], expected, rtol=1e-5)
    assert res.rows["steps"][0] == "0-1" and res.rows["mask"][0] == "left"


def test_run_level_bad_inputs(run, model):
    cases = [
        (dict(layer=LAYER, kind="channel", unit=64), "unknown channel 64"),
        (dict(layer=LAYER, kind="feature", unit=N_LATENTS), f"unknown feature {N_LATENTS}"),
        (dict(layer=OTHER, kind="feature", unit=0), "has no SAE"),
        (dict(layer=LAYER, kind="channel", unit=1, scale=float("nan")), "finite"),
        (dict(layer=LAYER, kind="channel", unit=1, strength=float("inf"), steps="all"), "finite"),
        (dict(layer=LAYER, kind="channel", unit=5, steps="all", mask=np.zeros((16, 16))), "mask is empty"),
        (dict(layer=LAYER, kind="channel", unit=1, steps="active"), "never active"),
        (dict(layer=LAYER, kind="channel", unit=5, steps=(2, 9)), "outside"),
        (dict(layer=LAYER, kind="channel", unit=5, mode="prompt"), "needs a prompt"),
        (dict(layer="up_blocks.9", kind="channel", unit=5), "unknown layer"),
    ]
    for kwargs, match in cases:
        with pytest.raises(DifflensError) as e:
            iv.steer_run(run.root, seeds=[0], model=model, **kwargs)
        assert match in one_line(e), match
    for kwargs, match in [(dict(layer=OTHER), "has no SAE"), (dict(layer=LAYER, zero=[N_LATENTS]), "unknown feature"),
                          (dict(layer=LAYER, steps="active"), "no active steps"),
                          (dict(layer=LAYER, presets=("most",)), "unknown preset"),
                          (dict(layer=LAYER, presets=()), "nothing to do"),
                          (dict(layer=LAYER, scale=[1], factor=float("inf")), "finite")]:
        with pytest.raises(DifflensError) as e:
            iv.edit_run(run.root, model=model, **kwargs)
        assert match in one_line(e), match
    assert no_hooks_left(model)


def test_edit_run_presets(run, model, sae):
    res = iv.edit_run(run.root, LAYER, presets=("none", "frequent", "rare", "all"), n=5, scale=[20, 21],
                      factor=-2.0, seeds=[0], model=model)
    rows = res.rows
    assert rows["preset"].to_list() == ["none", "frequent", "rare", "all", "scale x-2"]
    none = rows.filter(pl.col("preset") == "none").row(0, named=True)
    assert none["effect"] == 0.0 and none["features"] == []
    units = run.read_table("units").filter((pl.col("layer") == LAYER) & (pl.col("kind") == "feature"))
    frequent = rows.filter(pl.col("preset") == "frequent")["features"].to_list()[0]
    assert frequent == units.sort("density", descending=True)["unit"].head(5).to_list()
    rare = rows.filter(pl.col("preset") == "rare")["features"].to_list()[0]
    assert rare == units.filter(pl.col("density") > 0).sort("density")["unit"].head(5).to_list()
    assert len(rows.filter(pl.col("preset") == "all")["features"][0]) == N_LATENTS
    assert rows.filter(pl.col("preset") == "all")["effect"][0] > 0
    assert rows.filter(pl.col("method") == "scale")["scale"][0] == -2.0
    for rel in rows["image"].to_list():
        assert rel.startswith("media/edit/") and (run.root / rel).is_file()
    assert res.grid.is_file() and no_hooks_left(model)
    late = iv.edit_run(run.root, LAYER, presets=("all",), steps="late", seeds=[0], model=model).rows
    assert late["steps"].to_list() == ["2-3"] and late["effect"][0] > 0


def test_concept_steering_report_counts_hits(run, model):
    report = iv.concept_steering_report(run.root, LAYER, scale=3.0, seeds=[0, 1], model=model)
    assert report.height == 1  # colour only by default; rank 1 only
    row = report.row(0, named=True)
    assert row["concept"] == "colour=red" and row["unit"] == 17 and row["seeds"] == 2
    assert row["steps"] == "2-3" and row["mask"] == "object"  # the defaults: late steps, on the object
    steered = run.read_table("interventions").filter(pl.col("concept") == "colour=red")
    assert steered.height == 2 and row["hits"] == int(steered["concept_hit"].sum())
    assert row["rate"] == pytest.approx(row["hits"] / 2) and row["clean_hits"] <= row["hits"]
    after = [json.loads(a) for a in steered["attributes"]]
    before = [json.loads(a) for a in steered["baseline_attributes"]]
    assert row["clean_hits"] == sum(iv.clean_hit(a, b, "colour=red") for a, b in zip(after, before, strict=True))
    assert row["baseline_hits"] == sum(b["colour"] == "red" for b in before)
    for prompt in steered["prompt"]:
        assert " red " not in prompt  # steered prompts lack the concept
    assert run.read_table("steering_success").height == 1


def test_concept_prompts_lack_the_concept():
    prompts = iv.concept_prompts("colour=red", range(9))
    assert len(prompts) == 9 and not any(" red " in p for p in prompts)
    assert {p.split()[2] for p in prompts} == {"green", "blue", "yellow"}
