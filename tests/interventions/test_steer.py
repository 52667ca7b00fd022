"""Steering on the shipped demo model (4 DDIM steps): strength 0 leaves the baseline bit for bit, a strength changes
it, only at the chosen steps, on both CFG halves; bad inputs are one-line errors; no hook outlives a call.
steer_run on a hand-made run directory."""

from __future__ import annotations

import json

import numpy as np
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
    not_a_run,
    one_line,
)

from backend.errors import DifflensError
from backend.interventions.directions import unit_direction
from backend.interventions.effects import pixel_effect
from backend.interventions.generate import edited_generate
from backend.interventions.steer import steer_run, steered_generate, steering_edit
from backend.interventions.windows import step_window, strength_schedule
from backend.models.base import to_uint8
from backend.models.hooks import edit_activations, to_tokens


def test_strength_zero_reproduces_the_baseline_exactly(model):
    base = gen(model, seeds=(0, 1), prompts=(PROMPT, PROMPT))
    d = unit_direction("channel", 5, 64)
    out = steered_generate(model, LAYER, [PROMPT] * 2, [0, 1], d, [0.0] * STEPS, n_steps=STEPS,
                              guidance=GUIDANCE)
    assert torch.equal(out, base)
    assert no_hooks_left(model)


def test_nonzero_strength_changes_the_image(model):
    base = gen(model)
    d = unit_direction("channel", 5, 64)
    out = steered_generate(model, LAYER, [PROMPT], [0], d, [20.0] * STEPS, n_steps=STEPS, guidance=GUIDANCE)
    assert not torch.equal(out, base)
    assert pixel_effect(to_uint8(base)[0], to_uint8(out)[0]) > 0.005
    assert no_hooks_left(model)


def test_steering_adds_strength_times_direction_to_both_cfg_halves(model):
    """steered_generate's default: the addition reaches both halves of the [uncond; cond] batch."""
    d = unit_direction("channel", 7, 64)
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
    steered = first_input(lambda: steered_generate(model, LAYER, [PROMPT], [0], d, [3.0] * STEPS,
                                                      n_steps=STEPS, guidance=GUIDANCE))
    assert plain.shape[0] == 2  # [uncond; cond]
    diff = to_tokens(steered - plain)  # [2, 64, 64]
    torch.testing.assert_close(diff, torch.zeros_like(diff) + 3.0 * d, atol=1e-5, rtol=0)


def test_step_window_applies_only_at_the_chosen_steps(model):
    d = unit_direction("channel", 5, 64)
    window = step_window((2, 3), STEPS)
    schedule = strength_schedule(20.0, window, STEPS)
    assert schedule == [0.0, 0.0, 20.0, 20.0]

    def latents(edit):
        out = []
        with edit_activations(model, LAYER, edit):
            gen(model, on_step=lambda i, t, lat: out.append(lat.clone()))
        return out

    plain = latents(lambda tok, step: tok)
    steered = latents(steering_edit(d, schedule))
    assert torch.equal(steered[0], plain[0]) and torch.equal(steered[1], plain[1])
    assert not torch.equal(steered[2], plain[2]) and not torch.equal(steered[3], plain[3])
    calls = []
    edit = steering_edit(d, schedule)
    tok = torch.randn(2, 64, 64)
    for step in range(STEPS + 2):  # steps past the schedule are untouched too
        calls.append(not torch.equal(edit(tok, step), tok))
    assert calls == [False, False, True, True, False, False]


def test_bad_steering_edits_are_one_line_errors():
    cases = [
        (lambda: steering_edit(torch.ones(64), [float("nan")]), "finite"),
        (lambda: steering_edit(torch.ones(64), [float("inf")]), "finite"),
    ]
    for fn, match in cases:
        with pytest.raises(DifflensError) as e:
            fn()
        assert match in one_line(e), match


def test_errors_inside_a_hook_leave_no_hook(model):
    edit = steering_edit(torch.ones(32), [1.0] * STEPS)  # 32 channels, the layer has 64
    with pytest.raises(DifflensError) as e:
        edited_generate(model, LAYER, [PROMPT], [0], edit, STEPS, GUIDANCE)
    assert "channels" in one_line(e)
    with pytest.raises(DifflensError) as e:
        edited_generate(model, LAYER, [PROMPT], [0], steering_edit(torch.ones(64), [1.0], np.ones(10)),
                           STEPS, GUIDANCE)
    assert "tokens" in one_line(e)
    assert no_hooks_left(model)


@pytest.fixture
def run(tmp_path, sae):
    return make_intervention_run(tmp_path / "run", sae)


def test_steer_run_writes_rows_images_and_replaces_on_repeat(run, model):
    res = steer_run(run.root, LAYER, "channel", 10, scale=4.0, steps="active", mode="prior", seeds=[0, 1],
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
    steer_run(run.root, LAYER, "channel", 10, scale=4.0, steps="active", mode="prior", seeds=[0, 1], model=model)
    table = run.read_table("interventions")
    assert table.height == 2 and set(table["layer"]) == {LAYER} and set(table["kind"]) == {"channel"}
    assert no_hooks_left(model)


def test_steer_run_scale_zero_is_the_baseline(run, model):
    res = steer_run(run.root, LAYER, "feature", 17, scale=0.0, steps="all", mode="prompt", prompt=PROMPT,
                       seeds=[3], model=model)
    row = res.rows.row(0, named=True)
    assert row["effect"] == 0.0 and row["changed_attributes"] == "{}"
    assert np.array_equal(res.extra["baseline"], res.extra["steered"])
    assert (run.root / row["image"]).read_bytes() == (run.root / row["baseline_image"]).read_bytes()
    assert row["guidance"] == GUIDANCE and row["prompt"] == PROMPT


def test_steer_run_feature_strength_uses_the_decoder_norm(run, model, sae):
    res = steer_run(run.root, LAYER, "feature", 17, scale=2.0, steps=(0, 1), mask="left", mode="prompt",
                       prompt=PROMPT, seeds=[0], model=model)
    expected = 2.0 * float(np.linspace(0.5, 2.0, N_LATENTS)[17]) * float(sae.W_dec[17].detach().norm())
    np.testing.assert_allclose(res.rows["strength"][0], expected, rtol=1e-5)
    assert res.rows["steps"][0] == "0-1" and res.rows["mask"][0] == "left"


def test_steer_run_bad_inputs(run, model):
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
            steer_run(run.root, seeds=[0], model=model, **kwargs)
        assert match in one_line(e), match
    assert no_hooks_left(model)


def test_steer_run_on_a_directory_that_is_not_a_run_is_open_runs_error(tmp_path, model):
    plain, expected = not_a_run(tmp_path)
    with pytest.raises(DifflensError) as e:
        steer_run(plain, LAYER, "channel", 0, model=model)
    assert one_line(e) == expected
    assert [p.name for p in plain.iterdir()] == ["notes.txt"]  # nothing written


def test_the_steer_command_takes_the_prior_knobs(run, model, monkeypatch, tmp_path):
    """steer's options are the [prior] settings: --window peaks +- --peak-radius, --seeds, and [prior] of a
    --config file (scale), as PriorConfig means them."""
    from typer.testing import CliRunner

    from cli import app

    monkeypatch.setattr("backend.run.context.RunContext.model", property(lambda self: model))
    toml = tmp_path / "run.toml"
    toml.write_text("[prior]\nscale = 2.0\npeak_radius = 0\n")
    base = ["steer", "--run", str(run.root), "--layer", LAYER, "--kind", "channel", "--unit", "10"]
    result = CliRunner().invoke(app, [*base, "--window", "peaks", "--seeds", "0-1", "--config", str(toml)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = run.read_table("interventions")
    assert rows["steps"].to_list() == ["1", "1"] and rows["seed"].to_list() == [0, 1]  # peak step 1, radius 0
    np.testing.assert_allclose(rows["strength"].to_numpy(), 2.0 * float(np.linspace(0.5, 2.0, 64)[10]), rtol=1e-6)
    result = CliRunner().invoke(app, [*base, "--window", "peaks", "--peak-radius", "1", "--seeds", "0"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "at steps 0,1,2" in result.output  # the peak +- 1
    bad = CliRunner().invoke(app, [*base, "--window", "peaks", "--peak-radius", "-1", "--seeds", "0"])
    assert bad.exit_code == 1 and "peak_radius must be >= 0" in bad.output


def test_a_per_step_per_position_direction_adds_its_own_steps_vectors():
    """steering_edit with a [S, T, C] direction (a matched direction): step s adds strength x direction[s] at each
    token, weighted by the mask; steps beyond S or of strength 0 are untouched; another token count is an error."""
    from backend.interventions.masks import token_weights

    torch.manual_seed(0)
    d_STC, tok = torch.randn(3, 16, 8), torch.randn(2, 16, 8)
    mask = np.zeros((4, 4), np.float32)
    mask[:2] = 1.0
    edit = steering_edit(d_STC, [0.5, 0.0, 2.0, 2.0], mask)
    w = token_weights(mask, 16, 2)
    assert torch.allclose(edit(tok, 0), tok + 0.5 * w * d_STC[0])
    assert torch.allclose(edit(tok, 2), tok + 2.0 * w * d_STC[2])
    assert torch.equal(edit(tok, 1), tok) and torch.equal(edit(tok, 3), tok)  # strength 0; beyond S
    assert torch.allclose(steering_edit(d_STC, [1.0])(tok, 0), tok + d_STC[0])
    with pytest.raises(DifflensError) as e:
        steering_edit(d_STC, [1.0])(torch.randn(2, 9, 8), 0)
    assert "token positions" in one_line(e)
    with pytest.raises(DifflensError) as e:
        steering_edit(torch.ones(2, 3), [1.0])
    assert "[S, T, C]" in one_line(e)
