"""Opening a run in the inspector reads no example heat-map; a unit page reads the maps of the examples it shows and
nothing more, and still shows them (counted by the run database's `heatmap_rows_read`, not timed: the timings are
benchmarks/inspector_latency.py's)."""

from __future__ import annotations

import shutil
from pathlib import Path

from inspector_runs import L_MID

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "inspector" / "app.py"


def test_opening_a_run_reads_no_heatmap_and_a_unit_page_reads_its_own(tmp_path, runs_dir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from inspector import queries as q
    from inspector.db import database

    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "tiny", root / "fresh")  # a run no other test opened: its database starts here
    monkeypatch.setenv("DIFFLENS_RUNS", str(root))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params.update({"run": "fresh", "layer": L_MID, "kind": "feature", "unit": "2"})
    at.run()
    for page in ("overview", "units", "atlas", "compare"):
        at.switch_page(f"views/{page}.py")
        at.run()
        assert not at.exception, [e.value for e in at.exception]
    db = database(q.open_run(root, "fresh"))
    assert db.loaded and "heatmap" not in db.columns.get("examples", [])
    assert db.heatmap_rows_read == 0

    at.switch_page("views/unit.py")
    at.run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    shown = [c for img in at.image for c in img.captions if c.startswith("#")]
    assert len(shown) == 4  # the unit's 4 top examples over all steps, each with its heat-map overlay
    assert db.heatmap_rows_read == len(shown)  # exactly their maps were read
    examples = q.examples(q.open_run(root, "fresh"), L_MID, "feature", 2, -1, 1, 8)
    assert examples["heatmap"].null_count() == 0 and all(len(m) == 16 for m in examples["heatmap"].to_list())
    at.toggle(key="heat").set_value(False).run()  # cached: toggling the overlay reads nothing again
    assert db.heatmap_rows_read == len(shown)
