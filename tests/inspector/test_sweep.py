"""The Sweep page and its queries (inspector/queries/sweep.py) on a sweep of two hand-made analysed runs
(tests/inspector_runs.py) whose SAE metrics differ, with the sweep.json the sweep command writes."""

from __future__ import annotations

import os

import polars as pl
import pyarrow as pa
import pytest
from inspector_runs import L_MID, build_run

from backend.fileio import atomic_write_json
from backend.run.schema import TABLES
from backend.run.store import RunStore

FVU = {"s-k8": 0.20, "s-k16": 0.10}


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    """runs/ with sweep `s` (sae.k = 8, 16): both runs analysed, the second with another FVU and L0."""
    from backend.sweep.grid import plan_sweep
    from backend.sweep.manifest import new_manifest, sweep_path

    root = tmp_path_factory.mktemp("sweep") / "runs"
    plan = plan_sweep(["sae.k=8,16"], sets={"runs_dir": str(root)}, name="s")
    for run in plan.runs:
        store = RunStore(build_run(root, run.name))
        metrics = store.read_table("sae_metrics").with_columns(fvu=pl.lit(FVU[run.name]),
                                                               l0=pl.lit(float(run.overrides["sae.k"])))
        store.write_table("sae_metrics", metrics.to_arrow())
    steered = RunStore(root / "s-k8")
    rows = [{"concept": f"colour={c}", "unit": 2, "auroc": 1.0, "rank": 1, "scale": 6.0, "strength": 3.0,
             "steps": "late", "mask": "object", "n_steps": 6, "guidance": 1.0, "seeds": 10, "hits": hits,
             "rate": hits / 10, "clean_hits": hits, "clean_rate": hits / 10, "baseline_hits": 0}
            for c, hits in (("red", 10), ("blue", 6))]
    table = pa.Table.from_pylist(rows, TABLES["steering_success"].schema)
    steered.write_table_shard("steering_success", "part-x", table, layer=L_MID, kind="feature")
    data = new_manifest(plan)
    for record in data["runs"]:
        record["status"] = "done"
    atomic_write_json(sweep_path(root, "s"), data)
    return root


def test_sweep_results_put_the_runs_side_by_side(sweep_root):
    from inspector.queries import sweep

    assert sweep.list_sweeps(sweep_root) == ["s"]
    table = sweep.sweep_results(sweep_root, "s")
    assert table.columns[:4] == ["run", "status", "sae_k", "layer"]
    rows = {r["run"]: r for r in table.iter_rows(named=True)}
    assert rows["s-k8"]["sae_k"] == 8 and rows["s-k8"]["fvu"] == pytest.approx(0.20)
    assert rows["s-k16"]["sae_k"] == 16 and rows["s-k16"]["fvu"] == pytest.approx(0.10)
    assert rows["s-k16"]["l0"] == pytest.approx(16.0) and rows["s-k16"]["layer"] == L_MID
    assert 0.5 <= rows["s-k8"]["mean_best_auroc"] <= 1.0  # the features' concept recovery (concept_summary)
    assert rows["s-k8"]["sae_s"] == pytest.approx(3.5) and rows["s-k8"]["total_s"] > 3.5  # manifest stage times
    assert rows["s-k8"]["steering_success"] == pytest.approx(0.8) and rows["s-k16"]["steering_success"] is None
    assert {"dead_frac", "frac_loss_recovered"} <= set(table.columns)


def test_unknown_and_escaping_sweeps_are_refused(sweep_root, tmp_path):
    from inspector.queries import InspectorError, sweep

    with pytest.raises(InspectorError, match="no sweep 'nope'"):
        sweep.sweep_manifest(sweep_root, "nope")
    with pytest.raises(InspectorError):
        sweep.sweep_manifest(sweep_root, "../../etc")
    outside = tmp_path / "elsewhere"
    (outside / "sweep.json").parent.mkdir(parents=True)
    (outside / "sweep.json").write_text("{}")
    link = sweep_root / "sweeps" / "escape"
    os.symlink(outside, link)
    try:
        assert sweep.list_sweeps(sweep_root) == ["s"]  # a sweep that resolves outside the runs directory is skipped
    finally:
        link.unlink()


def test_sweep_page_shows_runs_charts_and_links(sweep_root, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DIFFLENS_RUNS", str(sweep_root))
    at = AppTest.from_file(str(os.path.join(os.path.dirname(__file__), "../../inspector/app.py")), default_timeout=60)
    at.query_params.update({"sweep": "s"})
    at.run()
    at.switch_page("views/sweep.py")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    assert [t.value for t in at.title] == ["Sweep"]
    assert at.selectbox(key="sweep.name").value == "s"
    runs = at.dataframe[0].value
    assert runs["run"].to_list() == ["s-k8", "s-k16"] and runs["open"].to_list() == ["./?run=s-k8", "./?run=s-k16"]
    # one chart per metric against the one swept key: fvu, l0, dead share, loss recovered, concept recovery
    assert len(at.get("vega_lite_chart")) >= 5
    assert "2 runs (2 done)" in at.caption[0].value


def test_sweep_page_without_sweeps_says_how_to_start_one(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DIFFLENS_RUNS", str(tmp_path))
    at = AppTest.from_file(str(os.path.join(os.path.dirname(__file__), "../../inspector/app.py")), default_timeout=60)
    at.run()
    at.switch_page("views/sweep.py")
    at.run()
    assert not at.exception and "python cli.py sweep" in at.info[-1].value
