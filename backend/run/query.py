"""DuckDB over a run directory: one view per table of the run format that the run holds, so SQL can say
`FROM activity`. Table names and layouts come from the catalogue (backend/run/schema.py)."""

from __future__ import annotations

from pathlib import Path

import duckdb

from backend.run.manifest import is_run, not_a_run
from backend.run.schema import TABLES
from backend.run.store import RunStore


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def table_sources(run_dir: str | Path) -> dict[str, str]:
    """Table name -> DuckDB table function reading it, for every catalogue table with files in the run."""
    store = RunStore(run_dir)
    out = {}
    for name, spec in TABLES.items():
        single = store.root / "tables" / f"{name}.parquet"
        directory = store.table_dir(name)
        if spec.layout == "file" or single.is_file():
            if single.is_file():
                out[name] = f"read_parquet({_sql_string(single.as_posix())})"
        elif directory.is_dir() and any(directory.rglob("*.parquet")):
            # partitions written by different difflens versions may differ in columns added since: union by name
            hive = ", hive_partitioning=true, union_by_name=true" if spec.partitioned else ""
            out[name] = f"read_parquet({_sql_string((directory / '**' / '*.parquet').as_posix())}{hive})"
    return out


def connect(run_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view per table of the run."""
    if not is_run(run_dir):
        raise not_a_run(run_dir)
    con = duckdb.connect()
    for name, source in table_sources(run_dir).items():
        con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {source}')
    return con
