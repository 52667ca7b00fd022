"""The inspector on an image-classifier run (run-all on a tiny random ViT and a two-class image folder): the unit
page shows the input images of its top examples with their patch heat-maps and the unit's class table; the Compare
page compares classes."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "inspector" / "app.py"
LAYER = "vit.layers.1"


@pytest.fixture(scope="module")
def vit_runs(vit_dir, image_folder, tmp_path_factory) -> Path:
    from cli import app

    runs = tmp_path_factory.mktemp("vit-inspector") / "runs"
    result = CliRunner().invoke(app, [
        "run-all", "--model", str(vit_dir), "--images", str(image_folder), "--runs-dir", str(runs), "--name", "vit",
        "--layer", LAYER, "--tokens", "patch", "--sae-k", "4", "--sae-expansion", "2", "--sae-total-tokens", "2048",
        "--set", "sae.batch_size=128", "--set", "analysis.examples_top_n=3"])
    assert result.exit_code == 0, result.output
    return runs


def _page(root: Path, monkeypatch, page: str, **params):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DIFFLENS_RUNS", str(root))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params.update(params)
    at.run()
    at.switch_page(f"views/{page}.py")
    at = at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


@pytest.mark.slow
def test_unit_page_shows_top_images_with_heatmaps_and_the_class_table(vit_runs, monkeypatch):
    best = pl.read_parquet(vit_runs / "vit" / "tables" / "class_best" / f"layer={LAYER}" / "kind=feature")
    unit = int(best["unit"][0])
    at = _page(vit_runs, monkeypatch, "unit", run="vit", layer=LAYER, kind="feature", unit=str(unit))
    assert [t.value for t in at.title] == [f"feature {unit}"]
    assert "Classes this feature fires for" in [s.value for s in at.subheader]
    table = next(d.value for d in at.dataframe if "auroc_test" in d.value.columns)
    assert sorted(table["class"].tolist()) == ["blue", "red"] and table["rank"].tolist() == [1, 2]
    captions = [c for img in at.image for c in img.captions]
    assert any(c.startswith("#1") for c in captions)  # the top example: the input image with its heat-map
    assert "Steering and interventions" not in [s.value for s in at.subheader]  # nothing generated to steer


@pytest.mark.slow
def test_compare_page_compares_classes(vit_runs, monkeypatch):
    at = _page(vit_runs, monkeypatch, "compare", run="vit", layer=LAYER, kind="channel", a="red", b="blue")
    assert at.selectbox(key="compare.a").value == "red" and at.selectbox(key="compare.b").value == "blue"
    assert any("its groups are the images' classes" in str(c.value) for c in at.caption)


@pytest.mark.slow
@pytest.mark.parametrize("page", ["overview", "units"])
def test_the_other_pages_open_on_a_classifier_run(vit_runs, monkeypatch, page):
    at = _page(vit_runs, monkeypatch, page, run="vit")
    assert at.title



@pytest.mark.slow
def test_the_lab_classifies_a_runs_image_and_steers_a_unit(vit_runs, monkeypatch):
    """The Lab on a classifier run: one of the run's images classified (the predicted class and a table of class
    probabilities), the layer's top units on it with patch heat-maps, and a unit steered (the probabilities after)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DIFFLENS_RUNS", str(vit_runs))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params.update({"run": "vit"})
    at.run()
    at.switch_page("views/lab.py")
    at = at.run()
    at.button[0].click().run()  # Load model
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    next(b for b in at.button if b.label == "Classify").click().run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert [m.label for m in at.metric] == ["predicted"]
    table = at.dataframe[0].value
    assert list(table.columns) == ["class", "probability"] and 0 < table["probability"].sum() <= 1.0 + 1e-6
    captions = [c for img in at.image for c in img.captions]
    assert sum(c.startswith("channel ") for c in captions) == 8
    at.slider(key="lab.cls_strength").set_value(10.0)
    next(b for b in at.button if b.label == "Steer").click().run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert "predicted, steered" in [m.label for m in at.metric]
    steered = at.dataframe[-1].value
    assert list(steered.columns) == ["class", "before", "after", "change"]
    assert steered["change"].abs().max() > 0  # the unit moved the probabilities


def test_the_labs_classification_is_the_models_own(vit_runs, one_thread):
    """inspector/live on a classifier run: the class probabilities are the softmax of the model's logits for that
    image, the units' maps lie on the patch grid, an empty steer leaves the probabilities as they are and a steered
    unit moves them."""
    import json

    import numpy as np
    import torch

    from inspector import live

    root = vit_runs / "vit"
    config = json.loads((root / "manifest.json").read_text())["config"]
    gens = pl.read_parquet(root / "tables" / "generations" / "*.parquet").sort("gen_id")
    path = str(root / gens["image"][0])
    model = live.load_model(config["model"])
    cap = live.generate(model, LAYER, path, 0, 1, 1.0, tokens="patch")
    with torch.no_grad():
        logits = model.classify(model.pixel_values([path]))[0]
    np.testing.assert_allclose(cap.probs, torch.softmax(logits, -1).numpy(), rtol=1e-5, atol=1e-6)
    assert cap.grid == model.patch_grid and cap.maps.shape[-1] == cap.grid[0] * cap.grid[1]
    unit = int(cap.top[0, 0])
    same = live.steer_classifier_cached(model, None, config["model"], LAYER, path, ())
    np.testing.assert_allclose(same, cap.probs, rtol=1e-5, atol=1e-6)
    moved = live.steer_classifier_cached(model, None, config["model"], LAYER, path, (("channel", unit, 50.0),))
    assert np.abs(moved - cap.probs).max() > 1e-3
