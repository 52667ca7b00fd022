"""inspector/tables.py: the run format's catalogue as the inspector reads it (which tables a run has, their layout,
the command that computes a missing one)."""

from __future__ import annotations

import shutil


def test_discover_follows_the_catalogue(tmp_path, runs_dir):
    from backend.run.schema import TABLES
    from inspector.tables import discover

    found = discover(runs_dir / "tiny")
    assert set(found) <= set(TABLES)
    assert {"generations", "steps", "activity", "units", "examples", "histograms", "concept_summary",
            "ablations"} <= set(found)
    for name, source in found.items():
        assert source.hive == TABLES[name].partitioned, name
    assert found["steps"].files == [str(runs_dir / "tiny/tables/steps.parquet")]
    assert not found["generations"].hive and len(found["generations"].files) >= 1  # shards, no partitions

    run = tmp_path / "r"
    shutil.copytree(runs_dir / "tiny", run)
    shutil.copy(run / "tables/steps.parquet", run / "tables/not_a_table.parquet")  # unknown to the catalogue
    (run / "tables/units").rename(run / "tables/.units-old")
    (run / "tables/histograms/layer=mid_block.attentions.0/kind=channel/part-0000000.parquet").rename(
        run / "tables/histograms/layer=mid_block.attentions.0/kind=channel/.part-0000000.parquet")  # half-written
    again = discover(run)
    assert "not_a_table" not in again and "units" not in again and ".units-old" not in again
    assert len(again["histograms"].files) == len(found["histograms"].files) - 1


def test_table_missing_names_the_catalogue_command():
    from backend.run.schema import producer
    from inspector.tables import LAZY_TABLES, TableMissing

    for table, command in (("histograms", "python cli.py analyze --run runs/x"),
                           ("dreams", "python cli.py dream --run runs/x"),
                           ("comparisons", "python cli.py compare GROUP_A GROUP_B --run runs/x")):
        exc = TableMissing(table, "runs/x")
        assert exc.command == producer(table, "runs/x") and exc.command.startswith(command), table
        assert f"`{table}` not computed yet" in str(exc) and exc.command in str(exc)
    assert "activity" in LAZY_TABLES
