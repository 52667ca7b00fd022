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


def test_the_lab_says_a_classifier_run_has_no_generation_to_run(vit_runs, monkeypatch):
    at = _page(vit_runs, monkeypatch, "lab", run="vit")
    assert not at.exception and not at.button  # no "Load model"
    assert "image-classifier run" in " ".join(str(i.value) for i in at.info)
