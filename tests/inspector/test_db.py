"""inspector/db.py: the DuckDB sandbox over a run (parameters, no reads outside the run, locked settings, lazy
tables, checked partitions) and its cache (a new signature, a new database)."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest
from inspector_runs import L_MID, build_run


def test_queries_are_parameterised_and_sandboxed(runs_dir, runs_dir_without_histograms):
    import duckdb

    from inspector import queries as q

    run = q.open_run(runs_dir, "tiny")
    assert q.units.uncached(run, "x' OR 1=1 --", "channel").is_empty()
    assert q.profile.uncached(run, L_MID, "channel' OR '1'='1", 1).is_empty()
    with pytest.raises(q.InspectorError):  # a layer that is not a partition never becomes a path
        q.activity_bytes.uncached(run, "../../etc", "channel")
    scan = q.open_run(runs_dir_without_histograms, "tiny")  # histograms scanned from the activity's files
    with pytest.raises(q.InspectorError):
        q.activation_histogram.uncached(scan, "../../etc", "channel", 0)
    with pytest.raises(q.InspectorError):
        q.activation_histogram.uncached(run, L_MID, "channel", 0, "max\" FROM x; --")
    from inspector.db import database

    db = database(run)
    cur = db.con.cursor()
    with pytest.raises(duckdb.Error):  # DuckDB itself cannot read outside the run
        cur.execute("SELECT * FROM read_text('/etc/hostname')").fetchall()
    with pytest.raises(duckdb.Error):
        cur.execute("SET enable_external_access = true")


def test_partitions_are_checked_and_lazy_tables_never_loaded(runs_dir):
    from inspector.db import Database
    from inspector.runs import InspectorError
    from inspector.tables import TableMissing

    db = Database(runs_dir / "tiny")
    with pytest.raises(InspectorError):
        db.partition_files("activity", "../../etc", "channel")
    with pytest.raises(InspectorError):
        db.partition_files("activity", L_MID, "../../../etc")
    with pytest.raises(TableMissing):  # a kind the layer does not have: not computed
        db.partition_files("activity", "up_blocks.1.attentions.1", "feature")
    with pytest.raises(InspectorError):  # not a partitioned table
        db.partition_files("steps", L_MID, "channel")
    files = db.partition_files("activity", L_MID, "feature")
    assert files and all(f"/layer={L_MID}/kind=feature/" in f for f in files)
    assert db.partition_values("ablations", "layer") == ["mid_block", "up_blocks.1"]  # partitioned by layer only
    assert len(db.partition_files("ablations", "mid_block")) == 1
    with pytest.raises(InspectorError):
        db.load("activity")
    assert "activity" not in db.loaded
    assert "heatmap" not in db.load("examples")  # heavy columns stay in the files


def test_signature_picks_up_new_tables(tmp_path):
    from inspector import queries as q

    root = tmp_path / "runs"
    build_run(root, "r", optional=False, histograms=False)
    first = q.open_run(root, "r")
    assert "ablations" not in q.tables.uncached(first)
    time.sleep(0.01)
    from backend.run.schema import TABLES
    from backend.run.store import RunStore

    store = RunStore(root / "r")
    row = {"mode": "skip", "prompt": "p", "seed": 0, "n_steps": 3, "guidance": 1.0, "image": "x.png",
           "baseline_image": "y.png", "effect": 0.5, "spec": "k"}
    store.write_parquet(store.table_dir("ablations") / "layer=mid_block" / "skip-k.parquet",
                        pa.Table.from_pylist([row], schema=TABLES["ablations"].schema))
    second = q.open_run(root, "r")
    assert second.sig != first.sig
    assert q.ablations.uncached(second)["effect"].to_list() == [0.5]


def test_a_derived_table_is_made_once_per_query_and_parameters(runs_dir):
    from inspector.db import Database
    from inspector.runs import RunError

    db = Database(runs_dir / "tiny")
    query = "SELECT unit, max(max) AS top FROM units WHERE layer = ? AND kind = ? GROUP BY unit"
    name = db.derived("t", query, [L_MID, "channel"], tables=("units",))
    assert db.derived("t", query, [L_MID, "channel"], tables=("units",)) == name and len(db.derived_tables) == 1
    other = db.derived("t", query, [L_MID, "feature"], tables=("units",))
    assert other != name and len(db.derived_tables) == 2
    want = db.sql(query + " ORDER BY unit", [L_MID, "channel"], tables=("units",))
    assert db.sql(f'SELECT * FROM "{name}" ORDER BY unit').equals(want) and want.height > 0
    with pytest.raises(RunError, match="a query failed"):
        db.derived("t", "SELECT nope FROM units", [], tables=("units",))
