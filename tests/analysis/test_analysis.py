"""Analysis computations against small hand-made tables: profiles, frequencies, peaks, units, example selection,
comparisons, AUROC and localisation (no model: runs are written by tests/analysis_runs.py)."""

import json

import numpy as np
import polars as pl
import pytest
from analysis_runs import dense_activity, gens_for, make_run, sparse_activity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from backend.analysis.compare import check_same_seeds, compare_groups, compare_run, log_odds_ratio
from backend.analysis.concepts import (
    auroc_PC,
    concept_labels,
    heatmap_centroid,
    localisation,
    nearest_region,
    unit_localisation,
)
from backend.analysis.examples import select_examples
from backend.analysis.frequencies import frequencies_table
from backend.analysis.inputs import connect, load_inputs
from backend.analysis.peaks import min_distance_steps, peaks_and_units, unit_peaks
from backend.analysis.profiles import count_activity, profile_arrays, profiles_table
from backend.demo.shapes import POSITION_CENTRES
from backend.errors import DifflensError
from backend.stages.analysis import AnalysisConfig
from cli import app

L = "blk"


def counts_for(run_dir, kind="channel", **cfg):
    inputs = load_inputs(run_dir)
    part = next(p for p in inputs.partitions if p.kind == kind)
    con = connect(AnalysisConfig())
    return inputs, part, count_activity(con, inputs, part, AnalysisConfig(**cfg), progress=False)


# ---------------------------------------------------------------- profiles and frequencies


def brute_channel_profiles(mean_NSU, max_NSU, k, group_N, n_groups):
    n, s, u = mean_NSU.shape
    active = np.zeros((n, s, u), bool)
    for g in range(n):
        for t in range(s):
            order = sorted(range(u), key=lambda c: (-mean_NSU[g, t, c], c))  # ties: lower unit first
            active[g, t, order[:k]] = True
    freq = active.mean(0).T
    groups = [(active[group_N == gi].sum((0, 1)) / max((group_N == gi).sum() * s, 1)) for gi in range(n_groups)]
    return freq, mean_NSU.mean(0).T, max_NSU.max(0).T, np.stack(groups, 1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 6), s=st.integers(1, 4), u=st.integers(2, 6), k=st.integers(1, 3),
       shard=st.integers(1, 4), seed=st.integers(0, 10_000), ties=st.booleans())
def test_channel_profiles_match_brute_force(tmp_path_factory, n, s, u, k, shard, seed, ties):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(n, s, u)).astype(np.float32)
    if ties:
        mean = np.round(mean).astype(np.float32)  # many equal values: the unit order breaks ties
    mx = mean + rng.random((n, s, u)).astype(np.float32)
    gens = gens_for(n, ["a", "b"])
    run = make_run(tmp_path_factory.mktemp("r"), gens, s, {(L, "channel"): dense_activity(mean, mx)}, shard)
    inputs, _, counts = counts_for(run.root, top_k_channels=k)
    group_N = np.array([inputs.groups.index(g["group"]) for g in gens])
    freq, mean_p, max_p, freq_g = brute_channel_profiles(mean, mx, min(k, u), group_N, len(inputs.groups))
    p = profile_arrays(counts)
    np.testing.assert_allclose(p["freq"], freq, atol=1e-6)
    np.testing.assert_allclose(p["mean"], mean_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p["max"], max_p, rtol=1e-6)
    table = pl.from_arrow(frequencies_table(counts, inputs.groups))
    got = table.sort("unit", "group")["freq"].to_numpy().reshape(u, len(inputs.groups))
    np.testing.assert_allclose(got, freq_g, atol=1e-6)
    rows = pl.from_arrow(profiles_table(counts))
    assert rows.height == u * s and rows["unit"].is_sorted()


def test_feature_profiles_count_missing_rows_as_inactive_zeros(tmp_path):
    #            gen 0        gen 1        gen 2        gen 3
    max_NSU = np.array([[[2, 0, 0]], [[1, 3, 0]], [[0, 0, 0]], [[4, 0, 0]]], np.float32)  # [4 gens, 1 step, 3]
    mean_NSU = max_NSU / 2
    run = make_run(tmp_path, gens_for(4, ["a"]), 1, {(L, "feature"): sparse_activity(mean_NSU, max_NSU)},
                   n_latents={L: 5})
    _, part, counts = counts_for(run.root, kind="feature")
    assert part.n_units == 5  # the SAE's width, although units 2..4 never fire
    p = profile_arrays(counts)
    np.testing.assert_allclose(p["freq"][:, 0], [3 / 4, 1 / 4, 0, 0, 0])
    np.testing.assert_allclose(p["mean"][:, 0], [(1 + 0.5 + 2) / 4, 1.5 / 4, 0, 0, 0])
    np.testing.assert_allclose(p["max"][:, 0], [4, 3, 0, 0, 0])
    _, units = peaks_and_units(p, np.array([999.0]), AnalysisConfig(dense_density=0.7))
    units = pl.from_arrow(units)
    assert units["dead"].to_list() == [False, False, True, True, True]
    assert units["dense"].to_list() == [True, False, False, False, False]


def test_histograms_match_numpy_per_unit_and_stat(tmp_path):
    from backend.analysis.histograms import histograms_table
    from backend.analysis.inputs import connect, load_inputs

    rng = np.random.default_rng(3)
    max_NSU = np.where(rng.random((6, 3, 4)) < 0.5, rng.exponential(2.0, (6, 3, 4)), 0).astype(np.float32)
    max_NSU[:, :, 3] = 0  # unit 3 never fires: no histogram rows
    max_NSU[0, 0, 2], max_NSU[1:, :, 2] = 1.5, 0  # unit 2 fires once: all in the first bin
    mean_NSU = (max_NSU / 3).astype(np.float32)
    run = make_run(tmp_path, gens_for(6, ["a"]), 3, {(L, "feature"): sparse_activity(mean_NSU, max_NSU)},
                   shard_gens=4, n_latents={L: 4})
    inputs = load_inputs(run.root)
    got = pl.from_arrow(histograms_table(connect(AnalysisConfig()), inputs.partitions[0], bins=5))
    assert sorted(got["unit"].unique().to_list()) == [0, 1, 2]
    for unit in (0, 1, 2):
        for stat, arr in (("max", max_NSU), ("mean", mean_NSU)):
            v = arr[:, :, unit][max_NSU[:, :, unit] > 0].astype(np.float64)
            rows = got.filter((pl.col("unit") == unit) & (pl.col("stat") == stat)).sort("lo")
            assert rows.height == 5 and rows["count"].sum() == len(v)
            if v.max() > v.min():
                expected, edges = np.histogram(v, bins=5, range=(v.min(), v.max()))
                np.testing.assert_array_equal(rows["count"].to_numpy(), expected)
                np.testing.assert_allclose(rows["lo"].to_numpy(), edges[:-1], rtol=1e-5)
            else:
                assert rows["count"].to_list() == [1, 0, 0, 0, 0]


def test_incomplete_channel_activity_is_a_one_line_error(tmp_path):
    rows = dense_activity(np.ones((2, 2, 3), np.float32))
    keep = ~((rows["gen_id"] == 1) & (rows["unit"] == 2))
    run = make_run(tmp_path, gens_for(2, ["a"]), 2, {(L, "channel"): {k: v[keep] for k, v in rows.items()}})
    with pytest.raises(DifflensError, match="capture is incomplete"):
        counts_for(run.root)


# ---------------------------------------------------------------- peaks and units


def test_unit_peaks_height_separation_ends_and_top_n():
    profile = np.array([0.9, 0.2, 0.5, 0.4, 0.6, 0.1, 0.05, 0.3])
    steps, heights = unit_peaks(profile, min_height=0.0, distance=1, top_n=10)
    assert steps.tolist() == [0, 4, 2, 7]  # the first and last steps count as peaks
    np.testing.assert_allclose(heights, [0.9, 0.6, 0.5, 0.3])
    assert unit_peaks(profile, 0.55, 1, 10)[0].tolist() == [0, 4]
    assert unit_peaks(profile, 0.0, 3, 10)[0].tolist() == [0, 4, 7]  # 2 is within 3 steps of 0 and 4
    assert unit_peaks(profile, 0.0, 1, 2)[0].tolist() == [0, 4]
    assert unit_peaks(np.zeros(5), 0.1, 1, 3)[0].tolist() == []


def test_min_separation_is_given_in_timesteps():
    ts = np.linspace(999, 0, 21)  # spacing ~50
    assert min_distance_steps(ts, 100.0) == 3  # ceil(100 / 49.95)
    assert min_distance_steps(ts, 0.0) == 1
    assert min_distance_steps(np.array([500.0]), 100.0) == 1


def test_units_table_active_steps_and_flags():
    freq = np.array([[0.0, 0.1, 0.6, 0.1], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.9]])
    profiles = {"freq": freq, "mean": freq * 2, "max": freq * 3}
    cfg = AnalysisConfig(active_freq=0.05, peak_min_height=0.05, peak_min_separation=0, dense_density=0.9)
    peaks, units = peaks_and_units(profiles, np.array([3.0, 2.0, 1.0, 0.0]), cfg)
    units, peaks = pl.from_arrow(units), pl.from_arrow(peaks)
    assert units["first_active"].to_list() == [1, -1, 0]
    assert units["last_active"].to_list() == [3, -1, 3]
    assert units["active_steps"].to_list() == [3, 0, 4]
    np.testing.assert_allclose(units["density"], freq.mean(1), rtol=1e-6)
    assert units["dead"].to_list() == [False, True, False] and units["dense"].to_list() == [False, False, True]
    assert units["peak_steps"].to_list()[0] == [2]
    assert peaks.filter(pl.col("unit") == 0)["step"].to_list() == [2]
    assert peaks.filter(pl.col("unit") == 1).height == 0


# ---------------------------------------------------------------- top examples


def test_example_selection_ranks_over_all_steps_and_at_peaks(tmp_path):
    rng = np.random.default_rng(3)
    n, s, u = 7, 3, 2
    mx = rng.random((n, s, u)).astype(np.float32)
    run = make_run(tmp_path, gens_for(n, ["a"]), s, {(L, "channel"): dense_activity(mx - 1, mx)}, shard_gens=3)
    inputs = load_inputs(run.root)
    peaks = pl.DataFrame({"unit": [0, 1], "step": [2, 0]})
    got = select_examples(connect(AnalysisConfig()), inputs.partitions[0], peaks, AnalysisConfig(examples_top_n=3))
    for unit in range(u):
        best = mx[:, :, unit].max(1)
        order = np.argsort(-best, kind="stable")[:3]
        rows = got.filter((pl.col("unit") == unit) & (pl.col("step") == -1)).sort("rank")
        assert rows["gen_id"].to_list() == order.tolist()
        assert rows["heatmap_step"].to_list() == mx[order, :, unit].argmax(1).tolist()
        np.testing.assert_allclose(rows["activation"], best[order])
        step = peaks.filter(pl.col("unit") == unit)["step"][0]
        at = got.filter((pl.col("unit") == unit) & (pl.col("step") == step)).sort("rank")
        assert at["gen_id"].to_list() == np.argsort(-mx[:, step, unit], kind="stable")[:3].tolist()
        assert (at["heatmap_step"] == step).all()
    assert set(got["step"].unique().to_list()) == {-1, 0, 2}  # no rows at steps that are no peak


# ---------------------------------------------------------------- comparisons


def test_log_odds_ratio_by_hand():
    # A: 3 of 10 active, B: 1 of 10, pseudo-count 0.5
    expected = np.log(3.5 / 7.5) - np.log(1.5 / 9.5)
    assert log_odds_ratio(np.array([0.3]), 10, np.array([0.1]), 10, 0.5)[0] == pytest.approx(expected)
    assert np.isfinite(log_odds_ratio(np.array([1.0]), 10, np.array([0.0]), 10, 0.5)).all()


def test_compare_ranks_filters_and_reports_ratio():
    freqs = pl.DataFrame({
        "layer": [L] * 6, "kind": ["channel"] * 6, "unit": [0, 0, 1, 1, 2, 2],
        "group": ["a", "b"] * 3, "freq": [0.5, 0.1, 0.3, 0.0, 0.2, 0.15], "generations": [4] * 6,
    })
    out = compare_groups(freqs, "a", "b", n_steps=5, cfg=AnalysisConfig(compare_multiplier=2.0))
    # 4 generations x 5 steps = 20 pairs per group; unit 2 (0.2 <= 2 * 0.15) is filtered out
    n = 4 * 5
    score_0 = np.log(10.5 / 10.5) - np.log(2.5 / 18.5)  # 10 vs 2 active
    score_1 = np.log(6.5 / (n - 6 + 0.5)) - np.log(0.5 / (n + 0.5))  # 6 vs 0 active
    assert score_1 > score_0
    assert out["unit"].to_list() == [1, 0] and out["rank"].to_list() == [1, 2]
    assert out["score"].to_list() == pytest.approx([score_1, score_0])
    assert out["ratio"].to_list() == [np.inf, pytest.approx(5.0)]


def test_compare_refuses_groups_with_different_seeds_and_unknown_groups():
    gens = pl.DataFrame({"gen_id": [0, 1, 2, 3], "prompt": ["p", "p", "q", "q"], "seed": [0, 1, 0, 2],
                         "group": ["a", "a", "b", "b"]})
    with pytest.raises(DifflensError, match="same seeds"):
        check_same_seeds(gens, "a", "b")
    with pytest.raises(DifflensError, match="unknown prompt group 'c'.*a, b"):
        check_same_seeds(gens, "a", "c")
    check_same_seeds(gens.with_columns(seed=pl.Series([0, 1, 0, 1])), "a", "b")


# ---------------------------------------------------------------- concept recovery


def brute_auroc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(4, 12), st.booleans())
def test_rank_auroc_equals_pairwise_definition(seed, n, ties):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(3, n))
    if ties:
        scores = np.round(scores)
    labels = rng.random((n, 2)) < 0.5
    labels[0], labels[1] = [True, False], [False, True]  # both classes present in each column
    got = auroc_PC(scores, labels)
    for x in range(3):
        for c in range(2):
            assert got[x, c] == pytest.approx(brute_auroc(scores[x], labels[:, c]))


def attrs_of(p):
    return {"colour": ["red", "blue"][p % 2], "shape": ["circle", "square"][(p // 2) % 2],
            "position": ["left", "right"][(p // 4) % 2]}


def test_concepts_find_the_planted_unit_and_skip_spatial_attributes(tmp_path):
    from backend.analysis.concepts import best_auroc, concepts_table

    n_prompts, seeds, s, u = 8, 2, 3, 4
    gens = gens_for(n_prompts * seeds, ["all"], seeds_per_prompt=seeds, attributes=attrs_of)
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(len(gens), s, u)).astype(np.float32) * 0.1
    red = np.array([attrs_of(g["gen_id"] // seeds)["colour"] == "red" for g in gens])
    mean[red, 1, 2] += 5.0  # unit 2 signals red at step 1 only
    run = make_run(tmp_path, gens, s, {(L, "channel"): dense_activity(mean)})
    inputs = load_inputs(run.root)
    labels = concept_labels(inputs.gens, ["position"])
    assert labels.names == ["colour=blue", "colour=red", "shape=circle", "shape=square"]
    best, step = best_auroc(connect(AnalysisConfig()), inputs, inputs.partitions[0], labels, AnalysisConfig())
    red_c = labels.names.index("colour=red")
    assert best[2, red_c] == 1.0 and step[2, red_c] == 1
    table = pl.from_arrow(concepts_table(labels.names, best, step, top_n=2))
    assert table.filter((pl.col("concept") == "colour=red") & (pl.col("rank") == 1))["unit"].to_list() == [2]
    assert table.height == 4 * 2


def test_heatmap_centroid_and_region():
    m = np.zeros((4, 4), np.float32)
    m[1:3, 0] = 1.0  # left column, middle rows
    x, y = heatmap_centroid(m)
    assert (x, y) == pytest.approx((0.125, 0.5))
    assert nearest_region((x, y), POSITION_CENTRES) == "left"
    assert heatmap_centroid(np.ones((3, 3))) is None
    assert nearest_region((0.5, 0.85), POSITION_CENTRES) == "bottom"


def test_localisation_counts_examples_whose_centroid_is_in_the_prompt_region():
    left, right = np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32)
    left[:, 0], right[:, 3] = 1, 1
    gens = pl.DataFrame({"gen_id": [0, 1, 2], "attributes": [json.dumps({"position": p})
                                                              for p in ("left", "right", "left")]})
    examples = pl.DataFrame({"unit": [7, 7, 7, 7], "step": [-1, -1, -1, 3], "gen_id": [0, 1, 2, 2],
                             "heatmap": [left.ravel().tolist(), right.ravel().tolist(), right.ravel().tolist(),
                                         left.ravel().tolist()], "height": [4] * 4, "width": [4] * 4})
    assert localisation(examples, gens, [7], "position", POSITION_CENTRES) == (2, 3)


def test_unit_localisation_ranks_units_and_counts_positions():
    left, right = np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32)
    left[:, 0], right[:, 3] = 1, 1
    pos = ("left", "right", "left", "right")
    gens = pl.DataFrame({"gen_id": [0, 1, 2, 3], "attributes": [json.dumps({"position": p}) for p in pos]})
    maps = {"left": left.ravel().tolist(), "right": right.ravel().tolist()}
    # unit 3 follows the object (4/4 over 2 positions); unit 5 always lights the left (2/4); unit 9 has one
    # left example (1/1, 1 position); the step-3 row of unit 5 does not count
    rows = [(3, -1, g, maps[pos[g]]) for g in range(4)] + [(5, -1, g, maps["left"]) for g in range(4)]
    rows += [(9, -1, 0, maps["left"]), (5, 3, 1, maps["right"])]
    examples = pl.DataFrame({"unit": [r[0] for r in rows], "step": [r[1] for r in rows],
                             "gen_id": [r[2] for r in rows], "heatmap": [r[3] for r in rows],
                             "height": [4] * len(rows), "width": [4] * len(rows)})
    got = unit_localisation(examples, gens, "position", POSITION_CENTRES)
    assert got.select("unit", "examples", "positions", "hits", "rank").rows() == [
        (3, 4, 2, 4, 1), (9, 1, 1, 1, 2), (5, 4, 2, 2, 3)]
    assert got["share"].to_list() == [1.0, 1.0, 0.5]


# ---------------------------------------------------------------- the compare command on a hand-made run


def analysed_run(tmp_path, seeds_per_prompt=2):
    from backend.stages.analysis import _profiles_part

    n = 8
    gens = gens_for(n, ["red", "blue"], seeds_per_prompt=seeds_per_prompt)
    mean = np.zeros((n, 2, 3), np.float32)
    for g in gens:
        mean[g["gen_id"], :, 0 if g["group"] == "red" else 1] = 1.0
    run = make_run(tmp_path, gens, 2, {(L, "channel"): dense_activity(mean)})
    cfg = AnalysisConfig(top_k_channels=1)
    inputs = load_inputs(run.root)
    _profiles_part(connect(cfg), inputs, cfg, False)
    return run, inputs, cfg


def test_compare_command_prints_ranked_units_and_writes_rows_and_png(tmp_path):
    run, inputs, cfg = analysed_run(tmp_path)
    ranked, png = compare_run(run.root, "red", "blue", cfg)
    assert ranked["unit"].to_list() == [0] and ranked["freq_a"][0] == 1.0 and ranked["freq_b"][0] == 0.0
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    rows = pl.read_parquet(run.root / "tables" / "comparisons" / "**" / "*.parquet", hive_partitioning=True)
    assert rows["unit"].to_list() == [0] and rows["layer"].to_list() == [L]
    result = CliRunner().invoke(app, ["compare", "red", "blue", "--run", str(run.root)])
    assert result.exit_code == 0, result.output
    assert "unit" in result.output and "log-odds" in result.output and "histogram" in result.output
    bad = CliRunner().invoke(app, ["compare", "red", "green", "--run", str(run.root)])
    assert bad.exit_code == 1 and "unknown prompt group 'green'" in bad.output


def test_compare_before_analyze_is_a_one_line_error(tmp_path):
    run = make_run(tmp_path, gens_for(2, ["a", "b"]), 1, {(L, "channel"): dense_activity(np.ones((2, 1, 2)))})
    result = CliRunner().invoke(app, ["compare", "a", "b", "--run", str(run.root)])
    assert result.exit_code == 1 and "analyze" in result.output and "Traceback" not in result.output
