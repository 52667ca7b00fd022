"""The analysis stage's labels pass (backend/analysis/label_pass.py) on a hand-made run: units get labels, the
range examples and the out-of-sample columns of concept_summary are written, for plain prompts too."""

import json

import numpy as np
import polars as pl
import pytest
from analysis_runs import dense_activity, gens_for, make_run, sparse_activity

from backend.analysis.inputs import connect, load_inputs
from backend.analysis.out_of_sample import SEED_SPLIT
from backend.stages.analysis import AnalysisConfig, _concepts_part, _labels_part, _profiles_part

L = "blk"


def attrs(p):
    return {"colour": ["red", "blue"][p % 2], "size": ["small", "large"][(p // 2) % 2]}


def analysed(tmp_path, gens, channels, features, method="breakeven", stat="pool"):
    run = make_run(tmp_path, gens, 3, {(L, "channel"): dense_activity(channels),
                                       (L, "feature"): sparse_activity(features * 0.5, features)},
                   n_latents={L: features.shape[2]})
    cfg = AnalysisConfig(top_k_channels=1, label_method=method, label_stat=stat, label_top_n=4, range_bins=3,
                         range_per_bin=2)
    inputs = load_inputs(run.root)
    con = connect(cfg)
    _profiles_part(con, inputs, cfg, False)
    _concepts_part(con, inputs, cfg, False)
    return run, _labels_part(con, inputs, cfg, False)


def read(run, table):
    return pl.read_parquet(run.root / "tables" / table / "**" / "*.parquet", hive_partitioning=True)


@pytest.mark.parametrize(("method", "stat"), [("breakeven", "pool"), ("breakeven", "example"), ("top_n", "pool")])
def test_labels_ranges_and_out_of_sample_recovery_are_written(tmp_path, method, stat):
    n_prompts, seeds = 8, 2
    gens = gens_for(n_prompts * seeds, ["red", "blue"], seeds_per_prompt=seeds, attributes=attrs)
    rng = np.random.default_rng(0)
    red = np.array([attrs(g["gen_id"] // seeds)["colour"] == "red" for g in gens])
    large = np.array([attrs(g["gen_id"] // seeds)["size"] == "large" for g in gens])
    channels = rng.random((len(gens), 3, 3)).astype(np.float32)
    channels[red, :, 1] += 3.0
    features = np.zeros((len(gens), 3, 4), np.float32)
    features[large, 2, 3] = 1.0 + rng.random(large.sum())  # feature 3: large objects, step 2
    features[:, :, 0] = 0.0  # feature 0: dead
    run, summary = analysed(tmp_path, gens, channels, features, method, stat)
    units = read(run, "units")
    label = {(k, u): x for k, u, x in units.select("kind", "unit", "label").iter_rows()}
    assert label[("channel", 1)] == "colour=red"
    assert label[("feature", 3)] == "size=large"
    assert label[("feature", 0)] is None
    conf = units.filter((pl.col("kind") == "feature") & (pl.col("unit") == 3))["label_confidence"].item()
    assert 0.5 < conf <= 1.0
    step = {(k, u): s for k, u, s in units.select("kind", "unit", "label_step").iter_rows()}
    if (method, stat) == ("breakeven", "pool"):  # labelled at a step: feature 3 is large objects at step 2 only
        assert step[("feature", 3)] == 2 and 0 <= step[("channel", 1)] <= 2
    else:  # the method ranks generations over all steps: no step
        assert step[("feature", 3)] == -1 and step[("channel", 1)] == -1
    assert step[("feature", 0)] == -1  # no label
    ranges = read(run, "range_examples")
    mine = ranges.filter((pl.col("kind") == "feature") & (pl.col("unit") == 3))
    assert set(mine["bin"].to_list()) <= {1, 2, 3} and mine["bin"].max() == 3
    assert set(mine["gen_id"].to_list()) <= {g["gen_id"] for g, is_large in zip(gens, large, strict=True)
                                             if is_large}
    assert 0 not in ranges.filter(pl.col("kind") == "feature")["unit"].to_list()
    concept_summary = pl.read_parquet(run.root / "tables" / "concept_summary.parquet")
    assert concept_summary["oos_split"].to_list() == [SEED_SPLIT, SEED_SPLIT]
    assert concept_summary["auroc_oos"].is_between(0.0, 1.0).all()
    assert summary[f"{L}/feature"]["labelled"] >= 1


def test_plain_prompts_are_labelled_by_their_words(tmp_path):
    words = ["cat", "dog", "ship", "tree"]
    gens = gens_for(16, ["all"], seeds_per_prompt=2)
    for g in gens:
        g["prompt"] = f"a photo of a {words[(g['gen_id'] // 2) % 4]} at noon, number {g['gen_id'] // 2}"
    ship = np.array(["ship" in g["prompt"] for g in gens])
    channels = np.random.default_rng(1).random((16, 3, 3)).astype(np.float32)
    channels[ship, :, 2] += 4.0
    features = np.zeros((16, 3, 2), np.float32)
    features[ship, 0, 1] = 2.0
    run, summary = analysed(tmp_path, gens, channels, features)
    units = read(run, "units")
    label = {(k, u): x for k, u, x in units.select("kind", "unit", "label").iter_rows()}
    assert label[("channel", 2)] == "ship" and label[("feature", 1)] == "ship"
    assert json.loads(json.dumps(summary))["candidates"] > 4  # words, not stop-words
    assert not (run.root / "tables" / "concept_summary.parquet").is_file()  # no attributes: no concepts
