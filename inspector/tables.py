"""A run's tables as the inspector reads them: which of them a run has, how each is loaded, and what computes one
that is missing.

The names, the layout (hive-partitioned by layer / kind or by layer, a directory of shards, or one file) and the
command that computes each table come from the run format's catalogue, backend/run/schema.py (`TABLES`,
`TableSpec.partitioned` / `.partitions`, `producer`); a table the catalogue does not know is not shown. What is
particular to the inspector is here:
  - LAZY_TABLES are never loaded into memory: a query reads one partition's files (activity: a row per unit,
    generation and step, far too big to hold);
  - HEAVY_COLUMNS are left out when a table is loaded (examples' heat-maps: read per unit page for the rows it
    shows, inspector/heatmaps.py; opening a run reads none);
  - SORT_KEYS order the loaded tables, so that a one-unit lookup prunes by DuckDB's zone maps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from backend.run.schema import TABLES, producer
from inspector.runs import InspectorError

PARTITION_KEYS = ("layer", "kind")
"""The hive keys a partitioned table may have (TableSpec.partitions), in path order."""
LAZY_TABLES = frozenset({"activity"})
"""Never loaded: read from one partition's files per query."""
HEAVY_COLUMNS = {"examples": ("heatmap",)}
"""Loaded without these columns; they are read from the partition's files for the rows a page shows."""
SORT_KEYS = ("layer", "kind", "unit", "step", "rank", "group", "gen_id", "opt_step", "seed")
"""Row order of the loaded tables (the columns a table has, in this order)."""

assert LAZY_TABLES <= {name for name, spec in TABLES.items() if spec.partitioned}, "lazy tables are read by partition"
assert set(HEAVY_COLUMNS) <= set(TABLES)
assert all(set(spec.partitions) <= set(PARTITION_KEYS) for spec in TABLES.values())


class TableMissing(InspectorError):
    """A table the run does not have (yet); `command` computes it."""

    def __init__(self, table: str, run_arg: str = "RUN", detail: str = ""):
        self.table = table
        self.command = producer(table, run_arg)
        super().__init__(f"`{table}` not computed yet{detail}: run `{self.command}`")


@dataclass
class Source:
    """A table's Parquet files; hive: partitioned (layer=[/kind=] directories give those columns)."""

    table: str
    files: list[str]
    hive: bool


def discover(run_path: str | os.PathLike) -> dict[str, Source]:
    """Table name -> its Parquet files, for each table of the catalogue the run has: tables/<name>.parquet, or every
    file under tables/<name>/ (hive partitions when the catalogue says it is partitioned, else shards). Hidden
    files, which writers rename into place, are skipped."""
    tables = Path(run_path) / "tables"
    out: dict[str, Source] = {}
    if not tables.is_dir():
        return out
    for name, spec in TABLES.items():
        single = tables / f"{name}.parquet"
        folder = tables / name
        if single.is_file() and not spec.partitioned:
            out[name] = Source(name, [str(single)], False)
        elif folder.is_dir():
            files = sorted(str(p) for p in folder.rglob("*.parquet") if not p.name.startswith("."))
            if files:
                out[name] = Source(name, files, spec.partitioned)
    return out
