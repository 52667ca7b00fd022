"""The analysis stage end to end on a tiny real run (demo model, 24 generations x 4 steps, a tiny SAE trained
here): every table, heat-maps that match the recorded activity and the token samples, resume, CLI."""

import json
import shutil

import numpy as np
import polars as pl
import pytest
from capture_runs import interrupt_replay_at_second_batch, make_cfg
from typer.testing import CliRunner

from backend.errors import DifflensError
from backend.run.prompts import DEMO_PROMPTS
from backend.run.store import RunStore
from backend.stages.analysis import AnalysisConfig, analyze
from backend.stages.capture import SAEEncoder, capture
from cli import app
from sae.data import ShardReader
from sae.io import save_sae
from sae.train import SAETrainConfig, train

FEATURE_LAYER = "up_blocks.1.attentions.1"
TABLES = ("units", "profiles", "peaks", "examples", "range_examples", "frequencies", "histograms", "comparisons",
          "concepts", "localisation")
SMALL = dict(examples_top_n=3)  # what `python cli.py analyze --examples-top-n 3` runs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    prompts = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    prompts.write_text("\n".join(DEMO_PROMPTS.read_text().splitlines()[::30]) + "\n")  # 12 prompts, 4 colours
    cfg = make_cfg("demo", prompts, tmp_path_factory.mktemp("runs"), steps=4)
    capture(cfg, progress=False)
    store = RunStore(cfg.out_dir)
    reader = ShardReader.from_dir(store.activations_dir(FEATURE_LAYER), 256)
    sae_cfg = SAETrainConfig(expansion=2, k=4, total_tokens=4096, batch_size=256, lr=3e-3, warmup_steps=2,
                             log_every=8)
    save_sae(train(reader, sae_cfg, layer=FEATURE_LAYER, progress=False).sae, store.sae_dir(FEATURE_LAYER))
    capture(cfg, encoders={FEATURE_LAYER: SAEEncoder(store.sae_dir(FEATURE_LAYER))}, progress=False)
    analyze(cfg.out_dir, AnalysisConfig(**SMALL), progress=False)
    return cfg.out_dir


def table(run_dir, name):
    return pl.read_parquet(f"{run_dir}/tables/{name}/**/*.parquet", hive_partitioning=True)


@pytest.mark.slow
def test_every_table_is_written_for_every_layer_and_kind(run_dir):
    expected = {("mid_block.attentions.0", "channel"), ("up_blocks.1.attentions.1", "channel"),
                (FEATURE_LAYER, "feature")}
    for name in TABLES:
        got = set(table(run_dir, name).select("layer", "kind").unique().iter_rows())
        assert got == expected, name
    units = table(run_dir, "units")
    assert units.filter(pl.col("kind") == "feature").height == 128  # expansion 2 x 64, dead ones included
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["analysis"]["status"] == "done"
    summary = pl.read_parquet(run_dir / "tables" / "concept_summary.parquet")
    assert summary.height == 3 and summary["mean_best_auroc"].is_between(0.5, 1.0).all()
    assert (summary["localised_examples"] > 0).all()
    assert summary["best_localisation"].drop_nulls().is_between(0.0, 1.0).all()
    figures = list((run_dir / "media" / "plots").rglob("*.png"))
    assert figures and all(f.read_bytes()[:4] == b"\x89PNG" for f in figures)
    assert len(list((run_dir / "media" / "compare").glob("*.png"))) == 4 * 3  # every ordered pair of colours


@pytest.mark.slow
def test_heatmaps_pool_to_the_recorded_activity(run_dir):
    ex = table(run_dir, "examples")
    act = table(run_dir, "activity")
    joined = ex.join(act, left_on=["layer", "kind", "unit", "gen_id", "heatmap_step"],
                     right_on=["layer", "kind", "unit", "gen_id", "step"])
    assert joined.height == ex.height  # every heat-map step has a recorded row
    maps = [np.asarray(m) for m in joined["heatmap"].to_list()]
    assert all(len(m) == h * w for m, h, w in zip(maps, joined["height"], joined["width"], strict=True))
    np.testing.assert_allclose([m.max() for m in maps], joined["max"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([m.mean() for m in maps], joined["mean"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(joined["activation"], joined["max"], rtol=1e-6)
    shapes = dict(joined.group_by("layer").agg(pl.col("height").first() * pl.col("width").first()).iter_rows())
    assert shapes == {"mid_block.attentions.0": 16, "up_blocks.1.attentions.1": 64}


@pytest.mark.slow
def test_channel_heatmaps_match_the_captured_token_samples(run_dir):
    """The map is laid out like capture's token positions: value at position p == sampled token p's channel."""
    layer = "up_blocks.1.attentions.1"
    d = run_dir / "activations" / layer
    index = pl.concat([pl.read_parquet(p) for p in sorted(d.glob("part-*.parquet"))]).with_row_index("row")
    tokens = np.concatenate([np.load(p) for p in sorted(d.glob("part-*.npy"))])
    ex = table(run_dir, "examples").filter((pl.col("layer") == layer) & (pl.col("kind") == "channel")).head(20)
    checked = 0
    for r in ex.iter_rows(named=True):
        rows = index.filter((pl.col("gen_id") == r["gen_id"]) & (pl.col("step") == r["heatmap_step"]))
        got = np.asarray(r["heatmap"])[rows["position"].to_numpy()]
        np.testing.assert_allclose(got, tokens[rows["row"].to_numpy(), r["unit"]], rtol=2e-3, atol=2e-3)  # fp16
        checked += len(rows)
    assert checked >= 20 * 16


@pytest.mark.slow
def test_rerun_is_a_no_op(run_dir):
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "tables").rglob("*.parquet")}
    summary = analyze(run_dir, AnalysisConfig(**SMALL), progress=False)
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "tables").rglob("*.parquet")} == before
    assert summary["concepts"]["summary"][0]["mean_best_auroc"] > 0.5  # results come back from the manifest


@pytest.mark.slow
def test_changed_setting_recomputes_and_an_interrupted_replay_resumes(run_dir, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    undo = interrupt_replay_at_second_batch(monkeypatch)
    cfg = AnalysisConfig(examples_top_n=2, replay_batch_size=8)
    with pytest.raises(KeyboardInterrupt):
        analyze(copy, cfg, progress=False)
    undo()
    summary = analyze(copy, cfg, progress=False)
    n_gens = summary["examples"]["generations_replayed"]
    assert summary["examples"]["batches"] == -(-n_gens // 8) - 1  # the first batch was not replayed again
    assert not (copy / "_work" / "analysis").exists()
    assert table(copy, "examples")["rank"].max() == 2


@pytest.mark.slow
def test_cli_analyze_compare_plots(run_dir):
    runner = CliRunner()
    result = runner.invoke(app, ["analyze", "--run", str(run_dir), "--examples-top-n", "3"])
    assert result.exit_code == 0, result.output
    assert "mean best AUROC" in result.output and "feature" in result.output
    result = runner.invoke(app, ["compare", "red", "blue", "--run", str(run_dir), "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "log-odds" in result.output and "histogram:" in result.output
    result = runner.invoke(app, ["plots", "--run", str(run_dir), "--units", "2"])
    assert result.exit_code == 0 and "wrote 6 figures" in result.output


def test_not_a_run_is_a_one_line_error(tmp_path):
    with pytest.raises(DifflensError, match="not a run directory"):
        analyze(tmp_path)
    result = CliRunner().invoke(app, ["analyze", "--run", str(tmp_path)])
    assert result.exit_code == 1 and result.output.startswith("error: ")


@pytest.mark.slow
def test_interventions_stage_writes_every_table_and_resumes(run_dir, tmp_path, monkeypatch):
    """run-all's interventions stage on the analysed tiny run: steered priors, edits, concept report, ablation and
    dreams land in their tables with their images; a rerun loads no model and rewrites nothing."""
    from backend import models
    from backend.run.config import InterventionsConfig
    from backend.stages.interventions import run_interventions

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = InterventionsConfig(top_units=1, steer_seeds=[0], edit_features=2, concept_seeds=2, dream_iterations=3,
                              dream_seeds=1)
    summary = run_interventions(copy, cfg, progress=False)
    steered = {k for k in summary["results"] if k.startswith("steer-")}
    assert len(steered) == 3  # one unit for each of the three analysed (layer, kind)
    assert {f"edit-{FEATURE_LAYER}", "concept-report", "ablation"} <= set(summary["results"])
    for name in ("interventions", "ablations", "dreams", "steering_success"):
        rows = table(copy, name)
        assert rows.height > 0, name
    images = table(copy, "interventions")["image"].to_list() + table(copy, "dreams")["image"].to_list()
    assert all((copy / p).read_bytes()[:4] == b"\x89PNG" for p in images)
    assert json.loads((copy / "manifest.json").read_text())["stages"]["interventions"]["status"] == "done"

    def no_model(*_args, **_kwargs):
        raise AssertionError("a finished stage must not load the model again")

    monkeypatch.setattr(models, "load_model", no_model)
    before = {p: p.stat().st_mtime_ns for p in (copy / "tables").rglob("*.parquet")}
    run_interventions(copy, cfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (copy / "tables").rglob("*.parquet")} == before


def test_interventions_need_an_analysed_run(tmp_path):
    from backend.run.config import InterventionsConfig
    from backend.run.config import validate_interventions as validate
    from backend.stages.interventions import run_interventions

    with pytest.raises(DifflensError, match="not a run directory"):
        run_interventions(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {}}))
    with pytest.raises(DifflensError, match="has not been analysed"):
        run_interventions(tmp_path)
    with pytest.raises(DifflensError, match="top_units must be at least 1"):
        validate(InterventionsConfig(top_units=0))
