"""Block ablation on the shipped demo model (4 DDIM steps): the hook really skips the block (same images as a model
whose block is replaced by the identity), candidates keep their shape, bad blocks are one-line errors, nothing
stays registered, and ablate_run writes the `ablations` table, images and grid."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from intervention_runs import GUIDANCE, PROMPT, STEPS, make_intervention_run, no_hooks_left, not_a_run, one_line

from backend.errors import DifflensError
from backend.interventions import ablate as ablation
from backend.models.base import to_uint8

BLOCK = "mid_block.attentions.0"  # Transformer2DModel, (64, 4, 4) -> (64, 4, 4)


def test_skip_equals_replacing_the_block_by_the_identity(model, monkeypatch):
    result = ablation.ablate_blocks(model, [BLOCK], [PROMPT, PROMPT], [0, 1], "skip", STEPS, GUIDANCE)
    assert result.calls[BLOCK] == STEPS  # once per denoiser call (the CFG batch is one call)
    mod = model.denoiser.get_submodule(BLOCK)
    inner = []
    handle = mod.transformer_blocks[0].register_forward_hook(lambda *a: inner.append(1))
    monkeypatch.setattr(mod, "forward", lambda hidden_states, *a, **k: (hidden_states,))  # the block is gone
    try:
        skipped = to_uint8(model.generate([PROMPT, PROMPT], [0, 1], STEPS, GUIDANCE))
    finally:
        handle.remove()
    assert not inner  # the patched block really did not run
    assert np.array_equal(result.images[BLOCK], skipped)
    assert not np.array_equal(result.images[BLOCK], result.baseline_NHW3)
    assert result.score(BLOCK) > 0
    assert no_hooks_left(model)


def test_the_next_module_receives_the_blocks_input(model):
    mod = model.denoiser.get_submodule(BLOCK)
    seen = {}

    def keep(name):
        def pre_hook(_m, args):
            seen[name] = args[0].clone()  # returns None: the input is left alone
        return pre_hook

    h_in = mod.register_forward_pre_hook(keep("in"))
    h_out = model.denoiser.get_submodule("mid_block.resnets.1").register_forward_pre_hook(keep("next"))
    try:
        with ablation.ablate_block(model, BLOCK, "skip") as calls:
            model.generate([PROMPT], [0], 1, GUIDANCE)
    finally:
        h_in.remove()
        h_out.remove()
    assert calls == [1] and torch.equal(seen["next"], seen["in"])
    assert no_hooks_left(model)


def test_remove_delta_matches_skip_up_to_rounding(model):
    skip = ablation.ablate_blocks(model, [BLOCK], [PROMPT], [0], "skip", STEPS, GUIDANCE)
    delta = ablation.ablate_blocks(model, [BLOCK], [PROMPT], [0], "remove_delta", STEPS, GUIDANCE)
    diff = np.abs(skip.images[BLOCK].astype(int) - delta.images[BLOCK].astype(int))
    assert diff.max() <= 1


def test_candidates_keep_their_shape(model):
    shapes = ablation.block_shapes(model)
    cands = ablation.candidate_blocks(model)
    assert BLOCK in cands and "down_blocks.1.attentions.0" in cands and "mid_block" in cands
    assert "down_blocks.0" not in cands and "down_blocks.1.resnets.0" not in cands  # downsample / widen
    assert all(shapes[b][0] == shapes[b][1] for b in cands)
    assert no_hooks_left(model)


def test_bad_blocks_are_one_line_errors(model):
    for blocks, match in [(["down_blocks.0"], "changes shape"), (["up_blocks.1.resnets.0"], "changes shape"),
                          (["nope.3"], "unknown layer"), ([], "no blocks")]:
        with pytest.raises(DifflensError) as e:
            ablation.ablate_blocks(model, blocks, [PROMPT], [0], "skip", STEPS, GUIDANCE)
        assert match in one_line(e), match
    with pytest.raises(DifflensError) as e:
        ablation.ablate_blocks(model, [BLOCK], [PROMPT], [0], "zero", STEPS, GUIDANCE)
    assert "unknown ablation mode" in one_line(e)
    with pytest.raises(DifflensError) as e:  # the hook itself refuses a shape change, and unregisters
        with ablation.ablate_block(model, "down_blocks.0", "skip"):
            model.generate([PROMPT], [0], 1, GUIDANCE)
    assert "changes shape" in one_line(e)
    assert no_hooks_left(model)


def test_ablate_run_writes_table_images_and_grid(tmp_path, model):
    store = make_intervention_run(tmp_path / "run", None)
    blocks = [BLOCK, "up_blocks.1.attentions.1"]
    summary, grid = ablation.ablate_run(store.root, blocks=blocks, seeds=[0], model=model)
    assert set(summary["layer"]) == set(blocks) and (summary["effect"] > 0).all()
    assert summary["changed"].is_between(0, 1).all()
    table = store.read_table("ablations")
    assert table.height == 2 * 2  # blocks x (the run's 2 prompts x seed 0)
    assert set(table["layer"]) == set(blocks) and set(table["mode"]) == {"skip"}
    for rel in table["image"].to_list() + table["baseline_image"].to_list():
        assert rel.startswith("media/ablation/") and (store.root / rel).read_bytes()[:4] == b"\x89PNG"
    means = table.group_by("layer").agg(pl.col("effect").mean())
    for layer, effect in means.iter_rows():
        assert effect == pytest.approx(summary.filter(pl.col("layer") == layer)["effect"][0], rel=1e-5)
    assert grid.is_file()
    ablation.ablate_run(store.root, blocks=blocks, seeds=[0], model=model)  # a repeat replaces
    assert store.read_table("ablations").height == 4
    assert no_hooks_left(model)


def test_ablate_run_on_a_directory_that_is_not_a_run_is_open_runs_error(tmp_path, model):
    plain, expected = not_a_run(tmp_path)
    with pytest.raises(DifflensError) as e:
        ablation.ablate_run(plain, blocks=[BLOCK], model=model)
    assert one_line(e) == expected
    assert [p.name for p in plain.iterdir()] == ["notes.txt"]  # nothing written
