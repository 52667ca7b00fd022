"""run-all end to end on an image classifier, through the CLI: a tiny random ViTForImageClassification and a
two-class image folder; capture (patch + CLS tokens) -> a layernorm TopK SAE -> features -> analysis with class
tables -> class steering as the interventions stage, the atlas skipped with one note; the run format's
image-classifier meanings hold."""

import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from backend.run.store import RunStore
from cli import app

SMALL = ["--layer", "vit.layers.1", "--batch-size", "3", "--sae-k", "4", "--sae-expansion", "2",
         "--sae-total-tokens", "4096", "--set", "sae.batch_size=128", "--set", "sae.normalize=layernorm",
         "--set", "analysis.examples_top_n=2", "--set", "analysis.top_k_channels=4"]


@pytest.mark.slow
def test_run_all_on_an_image_classifier(vit_dir, image_folder, tmp_path, one_thread):
    runs = tmp_path / "runs"
    args = ["run-all", "--model", str(vit_dir), "--images", str(image_folder), "--runs-dir", str(runs),
            "--name", "vit", *SMALL]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "the atlas is skipped" in result.output and "mean flip rate towards the class" in result.output
    assert "held-out AUROC" in result.output
    store = RunStore(runs / "vit")
    manifest = store.read_manifest()
    assert manifest["model_kind"] == "classifier" and manifest["tokens"] == "all"
    assert {s for s, r in manifest["stages"].items() if r.get("status") == "done"} == {"capture", "sae", "features",
                                                                                        "analysis"}
    assert manifest["config"]["capture"]["images_per_prompt"] == 1 and manifest["config"]["capture"]["steps"] == 1

    gens = store.read_table("generations").sort("gen_id")
    assert gens.height == 8 and gens["prompt"][0] == "blue/blue-0.png" and gens["group"][0] == "blue"
    assert gens["class_label"].to_list() == ["blue"] * 4 + ["red"] * 4
    assert gens["image_path"][0] == str((image_folder / "blue" / "blue-0.png").resolve())
    assert json.loads(gens["attributes"][0]) == {"class": "blue"}
    assert set(gens["n_steps"]) == {1} and store.read_table("steps")["timestep"].to_list() == [0.0]
    assert (store.root / gens["image"][0]).is_file()

    cfg = json.loads((store.sae_dir("vit.layers.1", "default") / "cfg.json").read_text())
    assert cfg["normalize"] == "layernorm" and cfg["input_mean"] == []
    splice = manifest["stages"]["sae"]["metrics"]["vit.layers.1"]["default"]  # the classes' cross-entropy
    assert splice["splice_samples"] == 8 and splice["loss_clean"] > 0 and np.isfinite(splice["frac_loss_recovered"])

    examples = store.read_table("examples").filter(pl.col("kind") == "feature")
    assert set(examples["height"]) == {4} and set(examples["width"]) == {4}  # the patch grid (CLS not shown)
    assert all(len(h) == 16 for h in examples["heatmap"])
    scores = store.read_table("class_scores")
    assert set(scores["class"]) == {"red", "blue"} and set(scores["kind"]) == {"channel", "feature"}
    one = scores.filter((pl.col("kind") == "channel") & (pl.col("unit") == 0)).sort("rank")
    assert one["rank"].to_list() == [1, 2] and one["auroc"][0] >= one["auroc"][1]
    assert np.isclose(one["auroc"][0] + one["auroc"][1], 1.0)  # two classes: one's AUROC is the other's complement
    best = store.read_table("class_best")
    assert best.height == 4 and set(best["images"]) == {4}
    assert ((best["auroc_test"] >= 0) & (best["auroc_test"] <= 1)).all()
    steering = store.read_table("class_steering")  # each class's best channel and feature steered towards it
    assert set(steering["kind"]) == {"channel", "feature"} and set(steering["target"]) == {"red", "blue"}

    for command in (["steer", "--layer", "vit.layers.1", "--unit", "0"], ["intervene"], ["dream", "--layer",
                                                                                       "vit.layers.1", "--unit", "0"]):
        refused = CliRunner().invoke(app, [*command, "--run", str(store.root)])
        assert refused.exit_code == 1 and "is an image-classifier run" in refused.output, refused.output
        assert len(refused.output.strip().splitlines()) == 1

    again = CliRunner().invoke(app, args)  # a finished run is a no-op
    assert again.exit_code == 0, again.output
    assert "0 batches run" in again.output
