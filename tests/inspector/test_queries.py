"""inspector/queries/: the reads the pages make return what the backend wrote (the run of tests/inspector_runs.py is
built by the backend's own analysis functions), histograms come from the `histograms` table or the activity, the
step count is the manifest's, and the unit page's bundle says which tables are missing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
from inspector_runs import L_MID, L_UP, N_FEATURES, N_GENS, N_STEPS


def test_queries_return_what_the_backend_wrote(runs_dir):
    from inspector import queries as q

    run = q.open_run(runs_dir, "tiny")
    store_units = pl.read_parquet(runs_dir / "tiny/tables/units/layer=mid_block.attentions.0/kind=feature")
    units = q.units.uncached(run, L_MID, "feature")
    assert units["unit"].to_list() == store_units["unit"].to_list()
    assert np.allclose(units["density"].to_numpy(), store_units["density"].to_numpy())
    assert units.filter(pl.col("unit") == 0)["dead"].item() is True
    assert units.filter(pl.col("unit") == 2)["concept"].item() == "colour=red"

    prof = q.profile.uncached(run, L_MID, "channel", 1)
    raw = pl.read_parquet(runs_dir / "tiny/tables/profiles/layer=mid_block.attentions.0/kind=channel")
    raw = raw.filter(pl.col("unit") == 1).sort("step")
    assert prof["step"].to_list() == list(range(N_STEPS))
    assert np.allclose(prof["freq"].to_numpy(), raw["freq"].to_numpy())
    assert prof["timestep"].to_list()[0] == pytest.approx(999.0)
    assert q.peaks.uncached(run, L_MID, "channel", 1)["step"].to_list()[0] == 2  # channel 1's highest peak

    ex = q.examples.uncached(run, L_MID, "feature", 2, -1)
    raw_ex = pl.read_parquet(runs_dir / "tiny/tables/examples/layer=mid_block.attentions.0/kind=feature")
    raw_ex = raw_ex.filter((pl.col("unit") == 2) & (pl.col("step") == -1)).sort("rank")
    assert ex["gen_id"].to_list() == raw_ex["gen_id"].to_list()
    for shown, raw in zip(ex["heatmap"].to_list(), raw_ex["heatmap"].to_list(), strict=True):
        raw = np.clip(np.asarray(raw), 0, None)  # served for display: clipped at 0, scaled by the max, 8 bits
        assert np.allclose(shown, raw / raw.max(), atol=1 / 255)
    assert set(ex["group"].to_list()) == {"red"}  # feature 2 fires for red prompts only
    assert q.examples.uncached(run, L_MID, "feature", 2, -1, 2, 3)["rank"].to_list() == [2, 3]

    hist = q.activation_histogram.uncached(run, L_MID, "feature", 2)
    codes = pl.read_parquet(runs_dir / "tiny/tables/activity/layer=mid_block.attentions.0/kind=feature")
    assert hist["rows"] == codes.filter(pl.col("unit") == 2).height
    assert int(hist["hist"]["count"].sum()) == hist["rows"]
    assert hist["pairs"] == N_GENS * N_STEPS

    cmp = q.comparison.uncached(run, L_MID, "channel", "red", "blue")
    assert cmp["unit"].to_list()[0] == 3  # channel 3 fires for red
    freqs = q.unit_frequencies.uncached(run, L_MID, "channel", 3)
    assert dict(zip(freqs["group"], freqs["freq"], strict=True))["red"] == pytest.approx(1.0)
    assert q.neighbour.uncached(run, L_MID, "feature", 2, -1, True) == 1
    assert q.neighbour.uncached(run, L_MID, "feature", 1, -1, True) is None  # 0 is dead
    assert q.neighbour.uncached(run, L_MID, "feature", 1, -1, False) == 0
    assert 0 not in q.live_units.uncached(run, L_MID, "feature")
    assert q.unit_dreams.uncached(run, L_MID, "feature", 2).height == 6
    assert q.ablations.uncached(run)["layer"].n_unique() == 2


def test_histograms_table_and_activity_scan_agree(runs_dir, runs_dir_without_histograms):
    """The `histograms` table (analyze) and the scan of the activity (runs without it) count the same values."""
    from inspector import queries as q

    table = q.open_run(runs_dir, "tiny")
    scan = q.open_run(runs_dir_without_histograms, "tiny")
    assert "histograms" in q.tables.uncached(table) and "histograms" not in q.tables.uncached(scan)
    for layer, kind, unit in ((L_MID, "feature", 2), (L_MID, "channel", 1), (L_UP, "channel", 3)):
        for stat in q.HIST_STATS:
            a = q.activation_histogram.uncached(table, layer, kind, unit, stat)
            b = q.activation_histogram.uncached(scan, layer, kind, unit, stat)
            assert (a["source"], b["source"]) == ("histograms", "activity")
            assert a["rows"] == b["rows"] > 0 and a["pairs"] == b["pairs"] == N_GENS * N_STEPS
            assert a["hist"]["lo"].min() == pytest.approx(b["hist"]["lo"].min(), rel=1e-5)
            assert a["hist"]["hi"].max() == pytest.approx(b["hist"]["hi"].max(), rel=1e-5)
    dead = q.activation_histogram.uncached(table, L_MID, "feature", 0)  # never active: no rows, no bins
    assert dead["rows"] == 0 and dead["hist"].is_empty()


def test_the_step_count_is_the_manifests(tmp_path, runs_dir):
    """One step count (backend.run.manifest.captured_steps): as captured, else as configured."""
    from backend.run.manifest import captured_guidance, captured_steps
    from inspector import queries as q

    assert q.captured_steps is captured_steps and q.captured_guidance is captured_guidance
    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "tiny", root / "r")
    path = root / "r/manifest.json"
    man = json.loads(path.read_text())
    assert q.captured_steps(man) == N_STEPS and q.captured_guidance(man) == 1.0
    del man["stages"]["capture"]["n_steps"]
    man["config"]["capture"] = {"steps": 4}
    path.write_text(json.dumps(man))
    run = q.open_run(root, "r")
    assert q.captured_steps(q.manifest(run)) == 4
    assert q.activation_histogram.uncached(run, L_MID, "feature", 2)["pairs"] == N_GENS * 4
    man["config"]["capture"] = {}
    path.write_text(json.dumps(man))
    assert q.activation_histogram.uncached(q.open_run(root, "r"), L_MID, "feature", 2)["pairs"] is None


def test_manifest_views(runs_dir):
    from inspector import queries as q

    man = q.manifest(q.open_run(runs_dir, "tiny"))
    assert q.run_layers(man) == [L_MID, L_UP] and q.run_model(man) == "demo"
    assert q.analysis_done(man) and q.analysis_status(man) == "done"
    stages = q.stage_table(man)
    assert {"capture", "sae", "analysis"} <= set(stages["stage"]) and stages["seconds"].null_count() < stages.height
    assert not q.analysis_done({}) and q.analysis_status({}) == "not run" and q.run_layers({}) == []


def test_unit_page_bundle_names_missing_tables(tmp_path, runs_dir):
    from backend.run.schema import producer
    from inspector import queries as q

    run = q.open_run(runs_dir, "tiny")
    data = q.unit_page.uncached(run, L_MID, "feature", 2)
    assert data["row"]["unit"] == 2 and data["concepts"]["concept"].to_list()[0] == "colour=red"
    assert data["example_counts"][-1] == 4 and data["dreams"].height == 6
    assert data["missing"] == {"steering": producer("steering_success", run.arg)}
    assert not data["errors"]

    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "tiny", root / "r")
    shutil.rmtree(root / "r/tables/concepts")  # a run whose prompts carry no attributes
    bare = q.open_run(root, "r")
    data = q.unit_page.uncached(bare, L_MID, "feature", 2)
    assert data["concepts"] is None and data["missing"]["concepts"] == producer("concepts", bare.arg)
    assert "analyze --run" in data["missing"]["concepts"]
    assert q.units.uncached(bare, L_MID, "feature")["concept"].null_count() == N_FEATURES


def test_the_runs_saes_and_their_kinds(tmp_path, runs_dir):
    """The Overview's list of SAEs (a format-2 layer's sae/<layer>/ is its default SAE), a second SAE's activity as a
    kind of its own before analysis, and the picker's labels."""
    from inspector import queries as q
    from inspector.ui import kind_label

    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "tiny", root / "r")
    run_dir = root / "r"
    for rel, cfg in [(f"sae/{L_MID}/default", {"d_in": 4, "n_latents": 16, "k": 2}),
                     (f"sae/{L_MID}/k8", {"d_in": 4, "n_latents": 32, "k": 8, "source": "/ckpt", "source_format": "x"}),
                     (f"sae/{L_UP}", {"d_in": 4, "n_latents": 8, "k": 1})]:
        (run_dir / rel).mkdir(parents=True, exist_ok=True)
        (run_dir / rel / "cfg.json").write_text(json.dumps(cfg))
    saes = q.saes.uncached(q.open_run(root, "r"))
    assert saes.select("layer", "kind", "n_latents", "dir").rows() == [
        (L_MID, "feature", 16, f"sae/{L_MID}/default"), (L_MID, "feature.k8", 32, f"sae/{L_MID}/k8"),
        (L_UP, "feature", 8, f"sae/{L_UP}")]
    assert saes["source"].to_list() == [None, "/ckpt (x)", None]
    shutil.rmtree(run_dir / "tables" / "units")  # not analysed: the kinds come from the activity layout
    extra = run_dir / "tables" / "activity" / f"layer={L_MID}" / "kind=feature.k8"
    shutil.copytree(run_dir / "tables" / "activity" / f"layer={L_MID}" / "kind=feature", extra)
    parts = q.partitions.uncached(q.open_run(root, "r"))
    assert (L_MID, "feature.k8") in parts.select("layer", "kind").rows()
    assert [kind_label(k) for k in ("channel", "feature", "feature.k8")] == [
        "channel", "feature (SAE default)", "feature.k8 (SAE k8)"]


def test_range_examples_and_labels_as_the_backend_wrote_them(runs_dir):
    from inspector import queries as q
    from inspector.queries.unit_examples import range_examples

    run = q.open_run(runs_dir, "tiny")
    got = range_examples.uncached(run, L_MID, "channel", 3)
    raw = pl.read_parquet(runs_dir / f"tiny/tables/range_examples/layer={L_MID}/kind=channel").filter(
        pl.col("unit") == 3)
    assert sorted(got["gen_id"].to_list()) == sorted(raw["gen_id"].to_list()) and got.height
    assert got["bin"].to_list() == sorted(got["bin"].to_list(), reverse=True)  # top bin first
    assert got["image"].str.starts_with("images/").all()
    row = q.unit_row.uncached(run, L_MID, "channel", 3)
    assert row["label"] == "colour=red" and 0 < row["label_confidence"] <= 1
    units = pl.read_parquet(runs_dir / f"tiny/tables/units/layer={L_MID}/kind=channel")
    assert row["label_step"] == units.filter(pl.col("unit") == 3)["label_step"].item() >= 0  # labelled at a step
    assert q.unit_page.uncached(run, L_MID, "channel", 3)["range_examples"].height == got.height


def test_a_run_analysed_before_label_confidence_and_label_step_reads_them_as_null(tmp_path, runs_dir):
    import inspector.queries as q

    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "tiny", root / "old")
    for path in (root / "old" / "tables" / "units").rglob("*.parquet"):
        pl.read_parquet(path).drop("label_confidence", "label_step").write_parquet(path)
    run = q.open_run(root, "old")
    row = q.unit_row.uncached(run, L_MID, "channel", 3)
    assert row["label"] == "colour=red" and row["label_confidence"] is None and row["label_step"] is None
    units = q.units.uncached(run, L_MID, "channel")
    assert units["label_step"].is_null().all() and units.height
