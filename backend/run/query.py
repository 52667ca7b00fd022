"""DuckDB over a run directory: one view per table, so SQL can say `FROM activity`."""

from __future__ import annotations

from pathlib import Path

import duckdb

from backend.run.store import RunStore


def table_sources(run_dir: str | Path) -> dict[str, str]:
    """Table name -> DuckDB table function reading it."""
    store = RunStore(run_dir)
    tables = store.root / "tables"
    out = {}
    if not tables.is_dir():
        return out
    for entry in sorted(tables.iterdir()):
        if entry.suffix == ".parquet":
            out[entry.stem] = f"read_parquet('{entry.as_posix()}')"
        elif entry.is_dir() and any(entry.rglob("*.parquet")):
            out[entry.name] = f"read_parquet('{(entry / '**' / '*.parquet').as_posix()}', hive_partitioning=true)"
    return out


def connect(run_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view per table of the run."""
    from backend.errors import DifflensError

    if not (Path(run_dir) / "manifest.json").exists():
        raise DifflensError(f"{run_dir} is not a run directory (no manifest.json); run `python cli.py run-all` first")
    con = duckdb.connect()
    for name, source in table_sources(run_dir).items():
        con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {source}')
    return con
