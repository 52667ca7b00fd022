"""The causal map on a small captured demo run: batched steering equals one-at-a-time steering, scales are chosen on
selection seeds and rates reported on held-out ones, chunks resume after a kill, bad settings are one-line errors."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from causal_runs import STEPS, make_causal_run
from intervention_runs import LAYER, OTHER, one_line
from typer.testing import CliRunner

from backend.errors import DifflensError
from backend.interventions import causal_map as cm
from backend.interventions import concept_directions as cd
from backend.interventions.steer import steered_generate
from backend.models.base import to_uint8
from backend.run.config import CausalMapConfig
from backend.run.context import open_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, model):
    return make_causal_run(tmp_path_factory.mktemp("causal"), model)


def small(**kw) -> CausalMapConfig:
    """A map of the colours at LAYER: diff-in-means and the best channel, late, under the object mask."""
    base = {"layers": [LAYER], "attributes": ["colour"], "directions": ["mean", "channel"], "windows": ["late"],
            "masks": ["object"], "scales": [2.0, 20.0], "selection_seeds": [1000, 1001],
            "heldout_seeds": [2000, 2001, 2002, 2003], "reduced": False, "batch_size": 16}
    return CausalMapConfig(**(base | kw))


def test_map_windows_cover_the_trajectory():
    assert cm.map_windows(20) == {"early": (0, 6), "middle": (7, 13), "late": (10, 19), "all": (0, 19)}
    assert cm.map_windows(10)["late"] == (5, 9)


PROMPTS = ["a small red square at the top, black background", "a large blue circle on the left, gray background"]


def two_steered_rows(model, seed: int, start: int, strengths: tuple[float, float]):
    """(baseline, random unit directions [2, C], strength schedules [2, S] from `start`, masks: the first row's
    object, everything for the second) for PROMPTS with seeds 3 and 4."""
    base = cm.baseline(model, PROMPTS, [3, 4], STEPS, 1.5)
    torch.manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(2, 64), dim=1)
    schedule = np.zeros((2, STEPS), np.float32)
    schedule[:, start:] = np.asarray(strengths, np.float32)[:, None]
    return base, dirs, schedule, np.stack([base.masks[0], np.ones_like(base.masks[1])])


def test_a_batch_of_rows_equals_each_row_steered_alone(run, model):
    """Rows with their own direction, strength and mask, joining at the window's first step from the baseline
    trajectory, give the images of steer's one-at-a-time generation."""
    prompts = PROMPTS
    base, dirs, strengths, masks = two_steered_rows(model, 0, 5, (30.0, -20.0))
    batched = cm.steered_batch(model, LAYER, base, [0, 1], dirs, strengths, [5, 5], masks, STEPS, 1.5)
    for r in range(2):
        alone = to_uint8(steered_generate(model, LAYER, [prompts[r]], [3 + r], dirs[r], strengths[r].tolist(),
                                          masks[r], STEPS, 1.5))[0]
        assert np.abs(batched[r].astype(int) - alone.astype(int)).max() <= 1
    assert np.abs(batched.astype(int) - base.images.astype(int)).max() > 10  # the steering did something


def test_the_map_chooses_scales_on_selection_seeds_and_reports_held_out_rates(run, model):
    table = cm.causal_map(run.root, small(), progress=False, model=model)
    assert table.height == 4 * 2  # 4 colours x (mean, channel) x late x object
    assert set(table["concept"]) == {"colour=red", "colour=green", "colour=blue", "colour=yellow"}
    assert (table["seeds"] == 4).all() and (table["selection_seeds"] == 2).all()
    assert set(table["scale"]) <= {2.0, 20.0} and (table["steps"] == "5-9").all()
    assert (table["clean_rate"] <= table["flip_rate"] + 1e-6).all()
    assert (table.filter(pl.col("direction") == "mean")["unit"] == -1).all()
    assert (table.filter(pl.col("direction") == "channel")["unit"] >= 0).all()
    # failable: the colour directions flip colour on held-out seeds (scale 2 flips none, see the direction test)
    mean = table.filter(pl.col("direction") == "mean")
    assert mean["flip_rate"].mean() >= 0.75, mean.select("concept", "scale", "flip_rate", "collateral_rate")
    assert (mean["scale"] == 20.0).all()
    assert cm.best_per_concept(table).height == 4


def test_best_per_concept_prefers_low_collateral_then_high_flip():
    table = pl.DataFrame({"concept": ["a", "a", "a", "b", "b"], "flip_rate": [1.0, 0.8, 0.6, 0.5, 0.9],
                          "collateral_rate": [0.5, 0.2, 0.0, 0.3, 0.4], "layer": ["x", "y", "z", "x", "y"]})
    best = cm.best_per_concept(table).sort("concept")
    assert best["layer"].to_list() == ["y", "y"]  # a: 80% at collateral 20% beats 100% at 50%; b: none qualifies
    stored = table.with_columns(pl.col("collateral_rate").cast(pl.Float32))  # as the table stores rates
    assert cm.best_per_concept(stored).sort("concept")["layer"].to_list() == ["y", "y"]  # float32 0.2 is <= 20%


def test_the_map_resumes_at_its_first_unfinished_chunk(tmp_path, model, monkeypatch):
    store = make_causal_run(tmp_path / "resume", model)
    cfg = small(directions=["mean"], attributes=["colour"], heldout_seeds=[2000], selection_seeds=[1000],
                scales=[20.0])
    real, calls = cm.map_chunk, []

    def fail_second(ctx, cfg, layer, concept, *args):
        calls.append(concept)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(ctx, cfg, layer, concept, *args)

    monkeypatch.setattr(cm, "map_chunk", fail_second)
    with pytest.raises(KeyboardInterrupt):
        cm.causal_map(store.root, cfg, progress=False, model=model)
    monkeypatch.setattr(cm, "map_chunk", lambda ctx, cfg, layer, concept, *a: calls.append(concept) or real(
        ctx, cfg, layer, concept, *a))
    table = cm.causal_map(store.root, cfg, progress=False, model=model)
    assert calls == ["colour=red", "colour=green", "colour=green", "colour=blue", "colour=yellow"]
    assert table.height == 4
    calls.clear()
    assert cm.causal_map(store.root, cfg, progress=False, model=model).height == 4 and calls == []
    # other settings redo the chunks they cover and keep the others
    cm.causal_map(store.root, small(directions=["mean"], attributes=["colour"], heldout_seeds=[2000],
                                     selection_seeds=[1000], scales=[2.0]), progress=False, model=model)
    assert calls == ["colour=red", "colour=green", "colour=blue", "colour=yellow"]
    assert set(store.read_table("causal_map")["scale"]) == {2.0}


def test_bad_settings_are_one_line_errors_that_write_nothing(run, model):
    ctx = open_run(run.root, model=model)
    cases = [
        (small(heldout_seeds=[1000, 2000]), "held-out seeds [1000] were also used"),
        (small(heldout_seeds=[0, 2000]), "held-out seeds [0] were also used"),  # a seed of the run's generations
        (small(windows=["12-14"]), "window '12-14'"),
        (small(layers=[OTHER]), f"{OTHER} has no captured activity"),
        (small(attributes=["mood"]), "unknown attribute 'mood'"),
        (small(directions=["units"]), "unknown value 'units'"),
        (small(scales=[float("nan")]), "finite numbers > 0"),
        (small(matched_scales=[0.0]), "causal_map.matched_scales must be finite numbers > 0"),
    ]
    before = sorted(p.relative_to(run.root) for p in run.root.rglob("*"))
    for cfg, expected in cases:
        with pytest.raises(DifflensError) as e:
            cm.causal_map(ctx, cfg, progress=False)
        assert expected in one_line(e)
    assert sorted(p.relative_to(run.root) for p in run.root.rglob("*")) == before


def test_reduced_map_keeps_the_last_layer_and_fewer_cells(run, model):
    ctx = open_run(run.root, model=model)
    cfg = cm.effective(ctx, CausalMapConfig())
    assert cfg.layers == [LAYER] and cfg.directions == ["mean"] and len(cfg.heldout_seeds) == 8
    assert cm.effective(ctx, CausalMapConfig(reduced=False)).windows == ["early", "middle", "late", "all", "peaks"]


def test_cli_causal_map_prints_the_best_cell_per_concept(run):
    from cli import app

    out = CliRunner().invoke(app, ["causal-map", "--run", str(run.root), "--layers", LAYER, "--attributes", "colour",
                                   "--directions", "mean", "--windows", "late", "--masks", "object", "--strengths",
                                   "20", "--selection-seeds", "1000", "--seeds", "2000-2001"])
    assert out.exit_code == 0, out.output
    assert "colour=red" in out.output and "mean" in out.output and "tables/causal_map" in out.output
    bad = CliRunner().invoke(app, ["causal-map", "--run", str(run.root), "--seeds", "1000-1001",
                                   "--selection-seeds", "1000"])
    assert bad.exit_code != 0 and "were also used" in bad.output and "Traceback" not in bad.output


def test_region_masks_steer_the_object_its_background_or_everything():
    obj = np.zeros((4, 4), np.float32)
    obj[1:3, 1:3] = 1.0
    ones = np.ones((4, 4), np.float32)
    assert (cm.region_mask(obj, "object", ones) == obj).all()
    assert (cm.region_mask(obj, "background", ones) == 1 - obj).all()
    assert (cm.region_mask(obj, "none", ones) == ones).all()
    assert (cm.region_mask(ones, "background", ones) == ones).all()  # a shape over everything: no empty mask


def test_spatial_rows_equal_vector_rows_when_every_position_gets_the_same_vector(run, model):
    """rowwise_spatial_edit with a [S, T, C] delta that is strength x direction at every position steers exactly as
    rowwise_masked_edit does."""
    base, dirs, strengths, masks = two_steered_rows(model, 1, 4, (25.0, -15.0))
    deltas = torch.as_tensor(strengths)[:, :, None, None] * dirs[:, None, None, :].expand(2, 1, 64, 64)
    vector = cm.steered_batch(model, LAYER, base, [0, 1], dirs, strengths, [4, 4], masks, STEPS, 1.5)
    spatial = cm.steered_batch(model, LAYER, base, [0, 1], torch.zeros(2, 64), strengths, [4, 4], masks, STEPS,
                               1.5, deltas_RSTC=deltas)
    assert np.abs(vector.astype(int) - spatial.astype(int)).max() <= 1
    assert np.abs(vector.astype(int) - base.images.astype(int)).max() > 10


def test_a_matched_map_steers_each_prompt_by_its_own_layouts_difference(run, model):
    ctx = open_run(run.root, model=model)
    cfg = small(directions=["matched"], attributes=["colour"], matched_scales=[1.0, 3.0], scales=[99.0])
    table = cm.causal_map(ctx, cfg, progress=False)
    assert table.height == 4 and (table["direction"] == "matched").all() and (table["unit"] == -1).all()
    assert set(table["scale"]) <= {1.0, 3.0} and (table["strength"] == table["scale"]).all()
    cells = cm.plan_cells(ctx, LAYER, "colour=red", ["matched"], {"late": (5, 9)}, ["none"], 8)
    select, _ = cm.concept_baselines(ctx.model, "colour=red", cfg, STEPS, 1.5, {})
    strengths = np.zeros((2, STEPS), np.float32)
    strengths[:, 5:] = 2.0
    deltas = cm.spatial_deltas(cells * 2, [0, 1], strengths, select)
    for r in range(2):  # each row: its own prompt's difference, strength 2 on the window, nothing before it
        diff, _ = cd.matched_difference(cells[0].means, "colour=red", select.prompt_attributes[r])
        assert select.prompt_attributes[r]["colour"] != "red"
        assert torch.allclose(deltas[r, 5:], 2 * diff[5:]) and (deltas[r, :5] == 0).all()
    assert not torch.allclose(deltas[0], deltas[1])  # two prompts, two layouts or colours: two differences
