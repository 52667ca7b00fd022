"""The Streamlit inspector on a small hand-made run (no model): every page through AppTest, deep links, missing
and corrupt runs, path safety and the query module.

The run is written like the batch job writes one: generations, steps and activity through tests/analysis_runs.py
(RunStore), then the analysis tables that need no model computed by the backend's own functions (profiles,
frequencies, peaks and units, example selection, comparisons, concepts, localisation); only the examples'
heat-maps (which need a replay through the model) and the SAE / intervention / dream / ablation tables are written
by hand, with the backend's schemas.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from analysis_runs import dense_activity, gens_for, make_run
from inspector_runs import GROUPS, L_MID, N_GENS, N_STEPS, build_run

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "inspector" / "app.py"


# ------------------------------------------------------------------------------------------------ the hand-made run










# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inspector") / "runs"
    build_run(root, "tiny")
    return root


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


# ------------------------------------------------------------------------------------------------ paths and runs


def test_safe_path_refuses_escapes(tmp_path):
    from inspector.queries import UnsafePath, safe_path

    root = tmp_path / "runs"
    (root / "a" / "images").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("no")
    assert safe_path(root, "a/images") == (root / "a" / "images").resolve()
    assert safe_path(root, ".") == root.resolve()
    assert safe_path(root, "a/../a/images") == (root / "a" / "images").resolve()
    for bad in ("..", "../secret.txt", "a/../../secret.txt", str(tmp_path / "secret.txt"), "a/\x00x"):
        with pytest.raises(UnsafePath):
            safe_path(root, bad)
    (root / "a" / "out").symlink_to(tmp_path)  # a symlink inside that points outside
    with pytest.raises(UnsafePath):
        safe_path(root, "a/out/secret.txt")
    (root / "a" / "in").symlink_to(root / "a" / "images")  # one that stays inside is fine
    assert safe_path(root, "a/in") == (root / "a" / "images").resolve()


def test_list_runs_and_open_run(tmp_path, runs_dir):
    from inspector import queries

    root = tmp_path / "runs"
    root.mkdir()
    assert queries.list_runs(root) == []
    assert queries.list_runs(tmp_path / "nope") == []
    (root / "not-a-run").mkdir()
    (root / "outside").symlink_to(runs_dir / "tiny")  # a run, but outside this runs directory
    (root / "r1").mkdir()
    (root / "r1" / "manifest.json").write_text("{}")
    assert queries.list_runs(root) == ["r1"]
    assert queries.list_runs(runs_dir / "tiny") == ["."]  # --runs pointing at a run
    with pytest.raises(queries.RunError):
        queries.open_run(root, "not-a-run")
    with pytest.raises(queries.UnsafePath):
        queries.open_run(root, "../x")
    with pytest.raises(queries.UnsafePath):
        queries.open_run(root, "outside")


def test_runs_argument(monkeypatch, tmp_path):
    from inspector.queries import parse_runs_arg, runs_root

    assert parse_runs_arg(["--runs", "x/y"]) == "x/y"
    assert parse_runs_arg(["-x", "--other", "1"]) is None
    assert parse_runs_arg(["--run", "x"]) is None  # no abbreviations
    monkeypatch.setenv("DIFFLENS_RUNS", str(tmp_path))
    assert runs_root([]) == tmp_path.resolve()
    assert runs_root(["--runs", str(tmp_path / "a")]) == (tmp_path / "a").resolve()


def test_launch_command_and_tunnel_hint(tmp_path):
    from inspector import launch

    cmd = launch.streamlit_command(tmp_path, 8600)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("inspector/app.py")
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[-3:] == ["--", "--runs", str(tmp_path.resolve())]
    assert launch.tunnel_command(8600, host="gpu1.example.org", user="ann", env={}) == \
        "ssh -N -L 8600:127.0.0.1:8600 ann@gpu1.example.org"
    slurm = {"SLURMD_NODENAME": "node17", "DIFFLENS_LOGIN_HOST": "login.example.org", "USER": "ann"}
    assert launch.tunnel_command(8600, env=slurm) == "ssh -N -L 8600:127.0.0.1:8600 -J ann@login.example.org ann@node17"
    assert "ssh -N -L 8600" in launch.banner(tmp_path, 8600, "127.0.0.1", env={"USER": "ann"})
    assert "warning" in launch.banner(tmp_path, 8600, "0.0.0.0")
    assert launch.serve(tmp_path / "missing") == 2


def test_inspector_imports_no_model_code():
    """The app starts fast: its modules pull in neither torch nor the backend's model code (only the Lab, lazily)."""
    import subprocess
    import sys

    code = ("import sys; import inspector.queries, inspector.charts, inspector.ui, inspector.overlay, inspector.live, "
            "inspector.launch; heavy = [m for m in ('torch', 'diffusers', 'transformers', 'backend.models', "
            "'backend.models.hooks', 'sae') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------------------------------ queries


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


def test_examples_without_the_heatmap_cache(runs_dir, monkeypatch):
    """Partitions too big for the in-memory heat-map cache are read from their file per request, same result."""
    from inspector import queries as q

    db = q.Database(runs_dir / "tiny")
    cached = q._QUERIES["examples"](db, L_MID, "feature", 2, -1)
    monkeypatch.setattr(q, "HEATMAP_CACHE_MB", 0)
    direct = q._QUERIES["examples"](q.Database(runs_dir / "tiny"), L_MID, "feature", 2, -1)
    assert direct["rank"].to_list() == cached["rank"].to_list()
    for a, b in zip(direct["heatmap"].to_list(), cached["heatmap"].to_list(), strict=True):
        assert np.allclose(a, b)


def test_queries_are_parameterised_and_sandboxed(runs_dir):
    import duckdb

    from inspector import queries as q

    run = q.open_run(runs_dir, "tiny")
    assert q.units.uncached(run, "x' OR 1=1 --", "channel").is_empty()
    assert q.profile.uncached(run, L_MID, "channel' OR '1'='1", 1).is_empty()
    with pytest.raises(q.InspectorError):  # a layer that is not a partition never becomes a path
        q.activation_histogram.uncached(run, "../../etc", "channel", 0)
    with pytest.raises(q.InspectorError):
        q.activation_histogram.uncached(run, L_MID, "channel", 0, "max\" FROM x; --")
    db = q.database(run)
    cur = db.con.cursor()
    with pytest.raises(duckdb.Error):  # DuckDB itself cannot read outside the run
        cur.execute("SELECT * FROM read_text('/etc/hostname')").fetchall()
    with pytest.raises(duckdb.Error):
        cur.execute("SET enable_external_access = true")


def test_signature_picks_up_new_tables(tmp_path):
    from inspector import queries as q

    root = tmp_path / "runs"
    build_run(root, "r", optional=False)
    first = q.open_run(root, "r")
    assert "ablations" not in q.tables.uncached(first)
    time.sleep(0.01)
    from backend.run.store import RunStore

    store = RunStore(root / "r")
    store.write_parquet(store.table_dir("ablations") / "layer=mid_block" / "skip-k.parquet",
                        pa.table({"mode": ["skip"], "prompt": ["p"], "seed": [0], "image": ["x.png"],
                                  "baseline_image": ["y.png"], "effect": [0.5]}))
    second = q.open_run(root, "r")
    assert second.sig != first.sig
    assert q.ablations.uncached(second)["effect"].to_list() == [0.5]


def test_chart_templates_are_valid_vega_lite():
    """Run time skips Altair's validation (charts.py); every template is checked against the schema here."""
    import altair as alt
    import jsonschema
    from altair.vegalite.v6.schema.core import load_schema

    from inspector import charts

    schema = load_schema()
    params = {"profile_template": ("freq", 260), "histogram_template": ("activation", 200)}
    assert len(charts.TEMPLATES) >= 10
    for name, build in charts.TEMPLATES.items():
        with alt.utils.schemapi.debug_mode(True):
            chart = build(*params.get(name, (200,)))
            spec = chart.to_dict(validate=True)
        jsonschema.validate(spec, schema)
    prof = pl.DataFrame({"step": [0, 1], "timestep": [999.0, 0.0], "freq": [0.1, 0.5], "mean": [1.0, float("nan")],
                         "max": [2.0, 3.0]})
    pk = pl.DataFrame({"step": [1], "timestep": [0.0], "height": [0.5], "rank": [1]})
    spec = charts.profile_chart(prof, pk, "freq", 1)
    assert set(spec["datasets"]) == {"profile", "peaks", "selected"}
    assert all(isinstance(v, bytes) for v in spec["datasets"].values())
    assert spec["layer"][0]["encoding"]["x"]["scale"]["reverse"] is True  # x = timestep, reversed
    assert spec["params"][0]["name"] == charts.PICK or any(p.get("name") == charts.PICK
                                                          for layer in spec["layer"] for p in layer.get("params", []))


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


def test_unit_page_histogram_on_request_for_large_activity(app, monkeypatch):
    from inspector import queries

    monkeypatch.setattr(queries, "HIST_AUTO_BYTES", 0)
    at = app
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
    assert "not a local diffusers directory" in _texts(at.info)
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
