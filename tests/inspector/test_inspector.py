"""The Streamlit inspector's pages on a small hand-made run (no model), through AppTest: every page, deep links,
missing and corrupt runs, and what the app imports. The query layer has its own tests (test_runs.py, test_tables.py,
test_db.py, test_heatmaps.py, test_queries.py, mirroring inspector/).

The run (tests/inspector_runs.py, built once by conftest.py) is written like the batch job writes one: generations,
steps and activity through tests/analysis_runs.py (RunStore), then the analysis tables that need no model computed
by the backend's own functions (profiles, frequencies, peaks and units, histograms, example selection, comparisons,
concepts, localisation); only the examples' heat-maps (which need a replay through the model) and the SAE /
intervention / dream / ablation tables are written by hand, with the backend's schemas.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from analysis_runs import dense_activity, gens_for, make_run
from inspector_runs import GROUPS, L_MID

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "inspector" / "app.py"


@pytest.fixture()
def app(runs_dir, monkeypatch):
    """An AppTest of the inspector on runs_dir (first page: Overview)."""
    return _app(runs_dir, monkeypatch)


def _app(root: Path, monkeypatch, **params):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DIFFLENS_RUNS", str(root))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params.update(params)
    return at


def _ok(at) -> None:
    """No exception, no error message."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def _page(at, page: str):
    at.run()
    at.switch_page(f"views/{page}.py")
    return at.run()


def _captions(at) -> list[str]:
    return [c for img in at.image for c in img.captions]


# ------------------------------------------------------------------------------------------------ imports


def test_inspector_imports_no_model_code():
    """The app starts fast: its modules pull in neither torch nor the backend's model code (only the Lab, lazily)."""
    import subprocess
    import sys

    code = ("import sys; import inspector.queries, inspector.runs, inspector.tables, inspector.db, "
            "inspector.heatmaps, inspector.charts, inspector.ui, inspector.overlay, inspector.live, "
            "inspector.launch; heavy = [m for m in ('torch', 'diffusers', 'transformers', 'backend.models', "
            "'backend.models.hooks', 'sae') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_views_read_through_the_query_layer_only():
    """Pages import the query layer (inspector.queries) and the page helpers, never DuckDB, the database, the
    heat-map cache or the run format's files directly."""
    allowed = {"inspector", "inspector.queries", "inspector.ui", "inspector.charts", "inspector.overlay",
               "inspector.live", "inspector.atlas_tiles", "inspector.classifier_lab"}
    helpers = [APP, ROOT / "inspector" / "ui.py", ROOT / "inspector" / "atlas_tiles.py",
               ROOT / "inspector" / "classifier_lab.py"]
    for path in sorted((ROOT / "inspector" / "views").glob("*.py")) + helpers:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module] if node.module != "inspector" else [f"inspector.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("duckdb", "pyarrow")), (path.name, name)
                if name.startswith("inspector"):
                    assert name in allowed, (path.name, name)


# ------------------------------------------------------------------------------------------------ pages


def test_overview_page(app):
    at = app.run()
    _ok(at)
    assert [t.value for t in at.title] == ["Overview"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["model"] == "demo"
    assert metrics["layers"] == "2"
    assert metrics["prompts"] == "4" and metrics["generations"] == "8"
    assert len(at.get("vega_lite_chart")) >= 3  # stage timings, SAE curves, concept summary
    assert len(at.dataframe) >= 4  # runs, stages, units per layer, SAE metrics, concept summary
    assert at.sidebar.selectbox(key="run").value == "tiny"


def test_units_page_filters_and_links(app):
    at = _page(app, "units")
    _ok(at)
    at.selectbox(key="units.kind").set_value("feature").run()
    _ok(at)
    shown = at.dataframe[0].value
    assert 0 not in shown["unit"].tolist()  # dead feature 0 hidden by default
    assert shown["open"].iloc[0].startswith("unit?run=tiny&layer=mid_block.attentions.0&kind=feature&unit=")
    at.toggle[0].set_value(False).run()
    assert 0 in at.dataframe[0].value["unit"].tolist()
    at.text_input[0].set_value("colour=red").run()
    assert set(at.dataframe[0].value["concept"]) == {"colour=red"}
    assert at.query_params["kind"] == "feature"


def test_units_page_row_opens_unit_page(app):
    at = _page(app, "units")
    key = "units-mid_block.attentions.0-channel"
    at.session_state[key] = {"selection": {"rows": [3], "columns": [], "cells": []}}
    at.run()
    _ok(at)
    assert [t.value for t in at.title] == ["channel 3"]
    assert at.query_params["unit"] == "3"


def test_unit_page_deep_link(app):
    at = app
    at.query_params.update({"run": "tiny", "layer": L_MID, "kind": "feature", "unit": "2", "step": "1"})
    at = _page(at, "unit")
    _ok(at)
    assert [t.value for t in at.title] == ["feature 2"]
    assert at.number_input(key="unit.unit").value == 2
    assert at.selectbox(key="unit.step").value == 1
    metrics = {m.label: m.value for m in at.metric}
    assert "**`colour=red`**" in _texts(at.markdown)  # the best concept
    assert metrics["peak step"] == "1"
    assert "at step 1" in _texts(at.caption)
    assert "localisation: the heat-map centroid falls on the object's position in" in _texts(at.caption)
    captions = _captions(at)
    assert sum(c.startswith("#") for c in captions) == 4  # the 4 examples at the peak, with heat-maps
    assert any(c.startswith("baseline") for c in captions) and any(c.startswith("steer") for c in captions)
    assert any(c.startswith("seed 0 · act") for c in captions)  # dream snapshots
    assert len(at.get("vega_lite_chart")) >= 5  # profile, max, histogram, groups, dream loss
    assert at.query_params["unit"] == "2" and at.query_params["step"] == "1"


def test_unit_page_histogram_from_the_histograms_table(app, monkeypatch):
    """With the `histograms` table (analyze), the histogram shows at once whatever the activity's size."""
    from inspector import queries

    monkeypatch.setattr(queries, "HIST_AUTO_BYTES", 0)
    at = app
    at.query_params.update({"run": "tiny", "layer": L_MID, "kind": "channel", "unit": "1"})
    at = _page(at, "unit")
    _ok(at)
    assert not any(b.label == "Compute histogram" for b in at.button)
    assert "recorded values" in _texts(at.caption)


def test_unit_page_unit_without_a_concept(tmp_path, runs_dir, monkeypatch):
    """A unit that is among the best of no concept, or a run without concepts (a model whose prompts carry no
    attributes), says "none", not a lone "-" (which markdown turns into an empty list item: "best concept ·")."""
    from inspector import queries

    run = queries.open_run(runs_dir, "tiny")
    with_concept = set(pl.read_parquet(runs_dir / f"tiny/tables/concepts/layer={L_MID}/kind=feature")["unit"])
    without = [u for u in queries.live_units.uncached(run, L_MID, "feature") if u not in with_concept]
    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "tiny", root / "tiny")
    shutil.rmtree(root / "tiny/tables/concepts")
    cases = [(root, 2)] + [(runs_dir, int(u)) for u in without[:1]]
    for where, unit in cases:
        at = _app(where, monkeypatch)
        at.query_params.update({"run": "tiny", "layer": L_MID, "kind": "feature", "unit": str(unit)})
        at = _page(at, "unit")
        _ok(at)
        assert [t.value for t in at.title] == [f"feature {unit}"]
        markdown = [str(m.value).strip() for m in at.markdown]
        assert "none" in markdown, (where, unit)
        assert not [m for m in markdown if m in ("-", "*", "+", ".")], markdown
        assert "colour=" not in _texts([m for m in at.markdown if not str(m.value).startswith("**label:**")])


def test_unit_page_prev_next_random(app):
    at = app
    at.query_params.update({"run": "tiny", "layer": L_MID, "kind": "feature", "unit": "2"})
    at = _page(at, "unit")
    next_button = next(b for b in at.button if b.label == "Next ▶")
    next_button.click().run()
    _ok(at)
    assert [t.value for t in at.title] == ["feature 3"]
    assert at.query_params["unit"] == "3"
    next(b for b in at.button if b.label == "◀ Prev").click().run()
    next(b for b in at.button if b.label == "◀ Prev").click().run()
    assert [t.value for t in at.title] == ["feature 1"]
    next(b for b in at.button if b.label == "◀ Prev").click().run()  # 0 is dead: skipped, stays at 1
    assert [t.value for t in at.title] == ["feature 1"]
    for _ in range(3):
        next(b for b in at.button if b.label == "Random").click().run()
        _ok(at)
        assert at.title[0].value != "feature 0"


def test_unit_page_histogram_on_request_for_large_activity(runs_dir_without_histograms, monkeypatch):
    """Without a `histograms` table the page scans the activity: at once when it is small, else on request."""
    from inspector import queries

    monkeypatch.setattr(queries, "HIST_AUTO_BYTES", 0)
    at = _app(runs_dir_without_histograms, monkeypatch)
    at.query_params.update({"run": "tiny", "layer": L_MID, "kind": "channel", "unit": "1"})
    at = _page(at, "unit")
    _ok(at)
    button = next(b for b in at.button if b.label == "Compute histogram")
    charts_before = len(at.get("vega_lite_chart"))
    button.click().run()
    _ok(at)
    assert len(at.get("vega_lite_chart")) == charts_before + 1
    assert "recorded values" in _texts(at.caption)


def test_unit_page_bad_link_and_missing_tables(app):
    at = app
    at.query_params.update({"run": "../../etc", "layer": "nope", "kind": "channel", "unit": "999"})
    at = _page(at, "unit")
    assert not at.exception
    assert at.sidebar.selectbox(key="run").value == "tiny"
    assert [t.value for t in at.title] == ["channel 0"]
    assert "does not exist" in _texts(at.warning)
    infos = _texts(at.info)  # channel 0 has no interventions or dreams in this run
    assert "python cli.py steer --run" in infos and "python cli.py dream --run" in infos


def test_compare_page(app):
    at = app
    at.query_params.update({"layer": L_MID, "kind": "channel", "a": "red", "b": "blue"})
    at = _page(at, "compare")
    _ok(at)
    assert at.selectbox(key="compare.a").value == "red"
    ranked = at.dataframe[0].value
    assert ranked["unit"].tolist()[0] == 3
    links = at.get("page_link")
    assert links and "unit=3" in links[0].proto.query_string
    at.selectbox(key="compare.a").set_value("blue").run()
    at.selectbox(key="compare.b").set_value("blue").run()
    assert "pick two different groups" in _texts(at.info)


def test_ablation_page(app):
    at = _page(app, "ablation")
    _ok(at)
    captions = _captions(at)
    assert sum(c.startswith("Δ") for c in captions) == 4  # 2 blocks x 2 samples
    scores = at.dataframe[0].value
    assert scores["layer"].tolist() == ["mid_block", "up_blocks.1"]  # largest effect first


def test_lab_page_waits_for_a_click(app):
    at = _page(app, "lab")
    _ok(at)
    assert [b.label for b in at.button] == ["Load model"]


def test_lab_page_without_the_model(tmp_path, runs_dir, monkeypatch):
    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "tiny", root / "other")
    manifest = json.loads((root / "other/manifest.json").read_text())
    manifest["config"]["model"] = str(tmp_path / "no-such-model")
    (root / "other/manifest.json").write_text(json.dumps(manifest))
    at = _page(_app(root, monkeypatch), "lab")
    _ok(at)
    assert "not a local diffusers pipeline or transformers classifier directory" in _texts(at.info)
    assert not at.button


# ------------------------------------------------------------------------------------------------ broken runs


def test_no_runs(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    for page in ("overview", "units", "unit", "compare", "ablation", "lab"):
        at = _page(_app(tmp_path / "runs", monkeypatch), page)
        _ok(at)
        assert "No runs found" in _texts(at.info), page


def test_partial_run_shows_commands(tmp_path, monkeypatch):
    """A run with a capture but no analysis: every page explains what to run."""
    root = tmp_path / "runs"
    gens = gens_for(4, GROUPS)
    make_run(root / "partial", gens, 3, {(L_MID, "channel"): dense_activity(np.ones((4, 3, 2), np.float32))})
    for page in ("overview", "units", "unit", "compare", "ablation"):
        at = _page(_app(root, monkeypatch), page)
        _ok(at)
        assert "python cli.py" in _texts(at.info) + _texts(at.warning), page
    at = _page(_app(root, monkeypatch), "overview")
    assert "analyze --run" in _texts(at.warning)


def test_corrupt_run_shows_a_message(tmp_path, runs_dir, monkeypatch):
    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "tiny", root / "bad-table")
    units = root / "bad-table/tables/units/layer=mid_block.attentions.0/kind=channel/part-0000000.parquet"
    tmp = units.with_name(".broken")
    tmp.write_bytes(units.read_bytes()[:100])
    os.replace(tmp, units)  # as a writer would, so the run's signature changes
    for page in ("units", "unit"):
        at = _page(_app(root, monkeypatch), page)
        assert not at.exception, page
        assert "cannot be read" in _texts(at.error), page
    shutil.copytree(runs_dir / "tiny", root / "bad-manifest")
    (root / "bad-manifest/manifest.json").write_text("{ not json")
    at = _app(root, monkeypatch, run="bad-manifest").run()
    assert not at.exception
    assert "manifest" in _texts(at.error)


# ------------------------------------------------------------------------------------------------ the live Lab


@pytest.mark.slow
def test_lab_generates_and_steers_with_the_demo_model(app):
    at = _page(app, "lab")
    at.button[0].click().run(timeout=180)
    _ok(at)
    at.text_input(key="lab.prompt").set_value("a large red circle on the left, gray background")
    next(b for b in at.button if b.label == "Generate").click().run(timeout=120)
    _ok(at)
    captions = _captions(at)
    assert sum(c.startswith("channel ") for c in captions) == 8  # the top units with heat-maps
    at.toggle(key="lab.mask").set_value(True)
    at.slider(key="lab.strength").set_value(8.0)
    next(b for b in at.button if b.label == "Steer").click().run(timeout=120)
    _ok(at)
    captions = _captions(at)
    assert "original" in captions and any(c.startswith("steered:") for c in captions)
    effect = float(next(m.value for m in at.metric if m.label.startswith("effect")))
    assert effect > 0


@pytest.mark.slow
def test_lab_generates_a_controlnet_runs_prompt_with_its_conditions(controlnet_run, monkeypatch):
    """On a run made through a ControlNet with negative prompts, the Lab loads the ControlNet and generates one of
    the run's prompts with its control image and negative prompt (captioned); a prompt the run did not generate is
    generated without the ControlNet, and the page says so."""
    from condition_runs import CN_PROMPTS

    root, _ = controlnet_run
    at = _page(_app(root.parent, monkeypatch, run=root.name), "lab")
    assert "through the run's ControlNet" in _texts(at.caption)
    at.button[0].click().run(timeout=180)
    _ok(at)
    at.text_input(key="lab.prompt").set_value(CN_PROMPTS[1])
    next(b for b in at.button if b.label == "Generate").click().run(timeout=120)
    _ok(at)
    assert any(f"{CN_PROMPTS[1]} · negative prompt “a green house” · control image `b.png`" == c for c in _captions(at))
    at.text_input(key="lab.prompt").set_value("a green bird")
    next(b for b in at.button if b.label == "Generate").click().run(timeout=120)
    assert not at.exception
    assert "generated without the ControlNet" in _texts(at.info)
    assert "a green bird · negative prompt “a green house”" in _captions(at)


# ------------------------------------------------------------------------------------------------ labels, ranges


def test_unit_page_shows_the_label_and_examples_across_the_activation_range(app, runs_dir):
    at = app
    at.query_params.update({"run": "tiny", "layer": L_MID, "kind": "feature", "unit": "2"})
    at = _page(at, "unit")
    _ok(at)
    assert "**label:** `colour=red` · confidence" in _texts(at.markdown)
    step = pl.read_parquet(runs_dir / f"tiny/tables/units/layer={L_MID}/kind=feature").filter(
        pl.col("unit") == 2)["label_step"].item()
    assert f" · at step {step}" in _texts(at.markdown)
    assert "Examples across the activation range" in [s.value for s in at.subheader]
    ranges = pl.read_parquet(runs_dir / f"tiny/tables/range_examples/layer={L_MID}/kind=feature")
    mine = ranges.filter(pl.col("unit") == 2)
    headers = [str(m.value) for m in at.markdown if str(m.value).startswith("bin ")]
    assert len(headers) == mine["bin"].n_unique() and headers[0].startswith(f"bin {mine['bin'].max()} · activation (")
    shown = [c for c in _captions(at) if " · step " in c and not c.startswith("#")]
    assert len(shown) == mine.height


def test_units_page_and_overview_show_labels_and_out_of_sample_recovery(app):
    at = _page(app, "units")
    at.selectbox(key="units.kind").set_value("feature").run()
    _ok(at)
    shown = at.dataframe[0].value
    assert {"label", "label_confidence"} <= set(shown.columns)
    assert shown.loc[shown["unit"] == 2, "label"].item() == "colour=red"
    at.switch_page("views/overview.py")
    at.run()
    _ok(at)
    summary = next(d.value for d in at.dataframe if "auroc_oos" in d.value.columns)
    assert summary["oos_split"].str.startswith("seed parity").all()
    assert "out of sample: auroc_oos" in _texts(at.caption)
