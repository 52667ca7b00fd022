"""The SAE stage of a run: training per layer, the splice test, skipping finished layers, export, errors."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from capture_runs import make_cfg
from run_snapshots import tree_digest

from backend.errors import DifflensError
from backend.models import load_model
from backend.models.splice import splice_test
from backend.run.config import SAEStageConfig
from backend.stages.capture import capture
from backend.stages.sae import export_saes, train_saes
from cli import app

LAYER = "up_blocks.1.attentions.1"


def small_sae_cfg(**kw) -> SAEStageConfig:
    base = dict(expansion=2, k=8, total_tokens=20_000, batch_size=512, lr=3e-3, warmup_steps=5, log_every=10,
                splice_samples=6)
    return SAEStageConfig(**(base | kw))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from backend.run.prompts import DEMO_PROMPTS

    prompts = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    prompts.write_text("\n".join(DEMO_PROMPTS.read_text().splitlines()[::30]) + "\n")
    cfg = make_cfg("demo", prompts, tmp_path_factory.mktemp("runs"), steps=4)
    capture(cfg, progress=False)
    return cfg


@pytest.fixture(scope="module")
def trained(demo_run):
    return train_saes(demo_run.out_dir, small_sae_cfg(), progress=False)


def test_splice_test_is_exact_for_identity_and_zero():
    model = load_model("demo")
    prompts = ["a small red circle in the center, gray background", "a large blue square on the left, black background"]
    ident = splice_test(model, LAYER, lambda x: x, prompts, [0, 1], 4, 1.5)
    # equal up to float reassociation (the spliced tensor has another memory layout)
    assert ident.loss_spliced == pytest.approx(ident.loss_clean, rel=1e-5) and ident.loss_clean < ident.loss_zero
    assert ident.fraction_recovered == pytest.approx(1.0, abs=1e-4)
    zero = splice_test(model, LAYER, torch.zeros_like, prompts, [0, 1], 4, 1.5)
    assert zero.loss_spliced == pytest.approx(zero.loss_zero, rel=1e-5)
    assert zero.fraction_recovered == pytest.approx(0.0, abs=1e-4)


def test_stage_trains_every_layer_and_records_metrics(demo_run, trained):
    assert set(trained) == set(demo_run.capture.layers)
    for layer, m in trained.items():
        assert 0 <= m["fvu"] < 0.5, (layer, m)
        assert m["l0"] <= 8
        assert m["loss_clean"] < m["loss_spliced"] < m["loss_zero"]
        assert 0 < m["frac_loss_recovered"] < 1
        saved = json.loads((demo_run.out_dir / "sae" / layer / "default" / "cfg.json").read_text())
        assert saved["metrics"]["frac_loss_recovered"] == m["frac_loss_recovered"]
    metrics = pl.read_parquet(demo_run.out_dir / "tables" / "sae_metrics.parquet")
    assert sorted(metrics["layer"]) == sorted(trained)
    curve = pl.read_parquet(demo_run.out_dir / "tables" / "sae_training" / "**" / "*.parquet", hive_partitioning=True)
    assert set(curve["layer"]) == set(trained) and curve["fvu"].is_finite().all()


def test_rerun_keeps_finished_saes_and_changed_settings_need_overwrite(demo_run, trained):
    weights = demo_run.out_dir / "sae" / LAYER / "default" / "sae.safetensors"
    before = weights.read_bytes()
    again = train_saes(demo_run.out_dir, small_sae_cfg(), progress=False)
    assert again == trained and weights.read_bytes() == before
    untouched = tree_digest(demo_run.out_dir)
    with pytest.raises(DifflensError, match=r"other settings \(k 8 -> 4\).*--overwrite") as err:
        train_saes(demo_run.out_dir, small_sae_cfg(k=4, layers=[LAYER], splice_samples=0), progress=False)
    assert "\n" not in str(err.value)
    assert tree_digest(demo_run.out_dir) == untouched  # refused: not one byte changed
    changed = train_saes(demo_run.out_dir, small_sae_cfg(k=4, layers=[LAYER], splice_samples=0), overwrite=True,
                         progress=False)
    assert changed[LAYER]["l0"] <= 4 and weights.read_bytes() != before
    assert not (demo_run.out_dir / "_work" / "sae" / LAYER).exists()  # trained aside, then swapped in
    train_saes(demo_run.out_dir, small_sae_cfg(), overwrite=True, progress=False)  # restore for the other tests


def test_out_of_range_settings_are_refused_before_anything_is_written(demo_run, trained):
    from typer.testing import CliRunner

    untouched = tree_digest(demo_run.out_dir)
    r = CliRunner().invoke(app, ["train-sae", "--run", str(demo_run.out_dir), "--k", "100000"])
    assert r.exit_code == 1 and "sae.k = 100000 is out of range" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["train-sae", "--run", str(demo_run.out_dir), "--architecture", "gated"])
    assert r.exit_code == 1 and "sae.architecture" in r.output
    assert tree_digest(demo_run.out_dir) == untouched


def test_export_sae_cli_writes_a_saelens_directory(demo_run, trained, tmp_path):
    from sae_lens import SAE as SAELensSAE
    from typer.testing import CliRunner

    from sae.io import load_sae

    r = CliRunner().invoke(app, ["export-sae", "--run", str(demo_run.out_dir), "--layer", LAYER,
                                 "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    theirs = SAELensSAE.load_from_disk(str(tmp_path / LAYER), device="cpu")
    ours = load_sae(demo_run.out_dir / "sae" / LAYER / "default")
    x = torch.from_numpy(np.load(sorted((demo_run.out_dir / "activations" / LAYER).glob("*.npy"))[0])[:64]).float()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


def test_features_pass_records_sparse_feature_activity(demo_run, trained):
    from backend.stages.capture import SAEEncoder

    encoders = {LAYER: SAEEncoder(demo_run.out_dir / "sae" / LAYER / "default")}
    capture(demo_run, encoders=encoders, progress=False)
    feats = pl.read_parquet(demo_run.out_dir / "tables" / "activity" / f"layer={LAYER}" / "kind=feature" / "*.parquet")
    assert len(feats) and (feats["max"] > 0).all()
    assert feats["unit"].max() < 2 * 64  # expansion 2 x 64 channels


def test_errors_are_one_line(demo_run, tmp_path):
    with pytest.raises(DifflensError, match="no activations for down_blocks.0"):
        train_saes(demo_run.out_dir, small_sae_cfg(layers=["down_blocks.0"]), progress=False)
    with pytest.raises(DifflensError, match="not a run directory"):
        train_saes(tmp_path, small_sae_cfg(), progress=False)
    with pytest.raises(DifflensError, match="unknown export format"):
        export_saes(demo_run.out_dir, None, "onnx")


def test_train_sae_without_options_uses_the_run_settings(demo_run, trained):
    """`train-sae --run R` on a run whose SAEs were trained with k = 8 keeps them (it used to retrain with the CLI's
    default k and replace them)."""
    from typer.testing import CliRunner

    untouched = {p: p.read_bytes() for p in (demo_run.out_dir / "sae").rglob("sae.safetensors")}
    r = CliRunner().invoke(app, ["train-sae", "--run", str(demo_run.out_dir)])
    assert r.exit_code == 0, r.output
    assert {p: p.read_bytes() for p in (demo_run.out_dir / "sae").rglob("sae.safetensors")} == untouched
    saved = json.loads((demo_run.out_dir / "manifest.json").read_text())["config"]["sae"]
    assert saved["k"] == 8


def test_replacing_the_default_sae_of_a_format_2_layer_keeps_its_other_saes(tmp_path):
    """A format-2 layer keeps its SAE in sae/<layer>/ itself (an export beside it); a new default SAE moves it
    aside file by file and lands in sae/<layer>/default/, and an SAE added to the layer since stays."""
    from intervention_runs import random_sae

    from backend.run.store import RunStore
    from backend.stages.sae import swap_in, work_dir
    from sae.io import save_sae

    store = RunStore(tmp_path / "run")
    legacy = store.root / "sae" / LAYER
    save_sae(random_sae(), legacy)
    (legacy / "saelens").mkdir()
    (legacy / "saelens" / "cfg.json").write_text("{}")
    save_sae(random_sae(), legacy / "k4")
    k4 = (legacy / "k4" / "sae.safetensors").read_bytes()
    assert store.saes() == [(LAYER, "default"), (LAYER, "k4")] and store.sae_dir(LAYER) == legacy
    save_sae(random_sae(), work_dir(store, LAYER))
    swap_in(store, LAYER)
    assert store.saes() == [(LAYER, "default"), (LAYER, "k4")] and store.sae_dir(LAYER) == legacy / "default"
    assert sorted(p.name for p in legacy.iterdir()) == ["default", "k4"]
    assert (legacy / "k4" / "sae.safetensors").read_bytes() == k4
