"""The DuckDB sandbox over one run, and its cache: one read-only database per (run, signature).

Each run's connection is sandboxed to that run's directory (`allowed_directories`, external access off,
configuration locked) and uses 2 threads. Tables (found by inspector/tables.py from the run format's catalogue) are
loaded on first use into in-memory tables sorted by SORT_KEYS, so a one-unit lookup prunes by zone maps; heavy
columns are left out (examples' heat-maps: `Database.heatmaps` reads the rows a page shows, decoding only the row
groups that hold its unit: inspector/unit_rows.py, inspector/heatmaps.py) and lazy tables are never loaded
(`partition_files` + `read_files` read one partition's files). Opening a run reads no heat-map; `heatmap_rows_read`
counts the heat-map rows read since. Values always travel as `?` parameters; table and column names come from the
catalogue and fixed lists, and hive partitions named in a URL are checked against the partitions that exist before
they become paths.

`database(run)` is the cached database of a run (`st.cache_resource`: shared by every session, dropped when the
run's signature changes). Only the query layer (inspector/queries/) uses this module.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import streamlit as st

from backend.run.schema import TABLES
from inspector.heatmaps import maps_by_rank
from inspector.runs import InspectorError, Run, RunError, display_path, first_line, safe_path
from inspector.tables import HEAVY_COLUMNS, LAZY_TABLES, PARTITION_KEYS, SORT_KEYS, Source, TableMissing, discover
from inspector.unit_rows import read_unit

THREADS = 2


class Database:
    """One run's read-only DuckDB database; tables are loaded on first use (see the module docstring)."""

    def __init__(self, run_path: str | os.PathLike, label: str = ""):
        self.path = Path(run_path).resolve()
        self.label = label or display_path(self.path)
        self.sources = discover(self.path)
        self.con = duckdb.connect(config={"threads": THREADS})
        self.con.execute("SET parquet_metadata_cache = true")
        self.con.execute("SET allowed_directories = ?", [[str(self.path) + os.sep]])
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")
        self.loaded: set[str] = set()
        self.columns: dict[str, list[str]] = {}
        self.derived_tables: set[str] = set()
        self.heatmap_rows_read = 0
        """Heat-map rows read from the examples' files so far (none at open: they are read per unit page)."""
        self.lock = threading.Lock()
        _OPEN.add(self)

    def has(self, table: str) -> bool:
        return table in self.sources

    def require(self, *tables: str) -> None:
        for table in tables:
            if table not in self.sources:
                raise TableMissing(table, self.label)

    def _reader(self, source: Source) -> str:
        opts = ", hive_partitioning = true, hive_types_autocast = false, union_by_name = true" if source.hive else ""
        return f"read_parquet(?{opts})"

    def load(self, table: str) -> list[str]:
        """Load a table into memory (once); returns its columns. Lazy tables are refused."""
        self.require(table)
        if table in LAZY_TABLES:
            raise InspectorError(f"`{table}` is read one partition at a time, never loaded whole")
        if table in self.loaded:
            return self.columns[table]
        with self.lock:
            if table in self.loaded:
                return self.columns[table]
            source = self.sources[table]
            reader = self._reader(source)
            cur = self.con.cursor()
            try:
                cols = [r[0] for r in cur.execute(f"DESCRIBE SELECT * FROM {reader}", [source.files]).fetchall()]
                heavy = [c for c in HEAVY_COLUMNS.get(table, ()) if c in cols]
                keep = [c for c in cols if c not in heavy]
                order = [c for c in SORT_KEYS if c in keep]
                select = ", ".join(f'"{c}"' for c in keep)
                order_by = f" ORDER BY {', '.join(chr(34) + c + chr(34) for c in order)}" if order else ""
                cur.execute(f'CREATE TABLE "{table}" AS SELECT {select} FROM {reader}{order_by}', [source.files])
            except duckdb.Error as exc:
                raise RunError(f"table `{table}` of run {self.label} cannot be read (a corrupt or partially "
                               f"written file?): {first_line(exc)}") from exc
            finally:
                cur.close()
            self.columns[table] = keep
            self.loaded.add(table)
            return keep

    def sql(self, query: str, params: list | None = None, tables: tuple[str, ...] = ()) -> pl.DataFrame:
        """Run a query over the given tables (loaded first) with `?` parameters."""
        for table in tables:
            self.load(table)
        cur = self.con.cursor()
        try:
            return cur.sql(query, params=params or None).pl()
        except duckdb.Error as exc:
            raise RunError(f"run {self.label}: a query failed ({first_line(exc)})") from exc
        finally:
            cur.close()

    def derived(self, prefix: str, query: str, params: list, tables: tuple[str, ...] = ()) -> str:
        """The name of an in-memory table holding query's result (with `?` parameters), created on first use and kept
        for the database's life: a result many queries start from (the Atlas grid's units of one choice of
        pictures). Its name is prefix + a digest of the query and parameters."""
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps([query, params], default=str).encode()).hexdigest()[:16]
        name = f"{prefix}_{digest}"
        if name in self.derived_tables:
            return name
        for table in tables:
            self.load(table)
        with self.lock:
            if name not in self.derived_tables:
                cur = self.con.cursor()
                try:
                    cur.execute(f'CREATE TABLE "{name}" AS {query}', params)
                except duckdb.Error as exc:
                    raise RunError(f"run {self.label}: a query failed ({first_line(exc)})") from exc
                finally:
                    cur.close()
                self.derived_tables.add(name)
        return name

    def heatmaps(self, layer: str, kind: str, unit: int, step: int, first_rank: int,
                 last_rank: int) -> dict[int, np.ndarray | None]:
        """{rank: display map} of one unit's examples at a step with ranks in [first_rank, last_rank], read from the
        partition's files: only the row groups holding the unit are decoded (inspector/unit_rows.py;
        inspector/heatmaps.py)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        files = self.partition_files("examples", layer, kind)
        try:
            parts = [read_unit(f, int(unit), ["step", "rank", "heatmap"]) for f in files]
        except (OSError, pa.ArrowException) as exc:
            raise RunError(f"the examples of {layer}/{kind} in run {self.label} cannot be read (a corrupt or "
                           f"partially written file?): {first_line(exc)}") from exc
        if not parts:
            return {}
        rows = pa.concat_tables(parts, promote_options="permissive")
        keep = pc.and_(pc.equal(rows["step"], int(step)),
                       pc.and_(pc.greater_equal(rows["rank"], int(first_rank)),
                               pc.less_equal(rows["rank"], int(last_rank))))
        rows = rows.filter(keep)
        with self.lock:
            self.heatmap_rows_read += rows.num_rows
        return maps_by_rank(rows)

    def partition_files(self, table: str, layer: str, kind: str | None = None) -> list[str]:
        """The Parquet files of one (layer, kind) partition of a partitioned table (of one layer, kind None); layer
        and kind must name a partition that exists (they come from URLs, so they are checked, never trusted)."""
        self.require(table)
        keys = TABLES[table].partitions
        if "layer" not in keys or (kind is not None and "kind" not in keys):
            raise InspectorError(f"`{table}` is not partitioned by {'layer and kind' if kind is not None else 'layer'}")
        base = self.path / "tables" / table
        if layer not in self.partition_values(table, "layer"):
            raise InspectorError(f"run {self.label} has no layer {layer!r} in `{table}`")
        part = safe_path(base, f"layer={layer}")
        if kind is not None:
            part = safe_path(part, f"kind={kind}")
            if not part.is_dir():
                raise TableMissing(table, self.label, f" for {layer}/{kind}")
        prefix = str(part) + os.sep
        return [f for f in self.sources[table].files if f.startswith(prefix)]

    def partition_values(self, table: str, key: str) -> list[str]:
        """The values of a hive key (layer or kind) that appear in a table's file paths."""
        if key not in PARTITION_KEYS:
            raise InspectorError(f"{key!r} is not a partition key ({', '.join(PARTITION_KEYS)})")
        source = self.sources.get(table)
        if source is None or not source.hive:
            return []
        base = self.path / "tables" / table
        found = set()
        for f in source.files:
            for part in Path(f).relative_to(base).parts[:-1]:
                k, _, v = part.partition("=")
                if k == key:
                    found.add(v)
        return sorted(found)

    def has_partition(self, table: str, layer: str, kind: str) -> bool:
        """Whether a partitioned table has files for (layer, kind) (names as found on disk, not from a URL)."""
        return (self.path / "tables" / table / f"layer={layer}" / f"kind={kind}").is_dir()

    def read_files(self, query: str, files: list[str], params: list | None = None) -> pl.DataFrame:
        """query with `{src}` standing for read_parquet of the given files (already checked paths)."""
        if not files:
            return pl.DataFrame()
        cur = self.con.cursor()
        try:
            return cur.sql(query.format(src="read_parquet(?)"), params=[files, *(params or [])]).pl()
        except duckdb.Error as exc:
            raise RunError(f"run {self.label}: reading {Path(files[0]).parent.name} failed (a corrupt or "
                           f"partially written file?): {first_line(exc)}") from exc
        finally:
            cur.close()


# ------------------------------------------------------------------------------------------------------ the cache


@st.cache_resource(max_entries=6, show_spinner=False)
def cached_database(path: str, sig: str, label: str) -> Database:
    """The database of the run at path with signature sig (shared by every session)."""
    return Database(path, label)


def database(run: Run) -> Database:
    return cached_database(run.path, run.sig, run.arg)


def _close_all() -> None:
    """At exit: close every connection and drop the cached databases (DuckDB objects still alive when the
    interpreter tears its modules down make nanobind print leak warnings)."""
    for db in list(_OPEN):
        try:
            db.con.close()
        except Exception:  # noqa: BLE001 - interpreter exit: nothing to report to
            pass
    try:
        cached_database.clear()
    except Exception:  # noqa: BLE001
        pass
    _OPEN.clear()


_OPEN: weakref.WeakSet = weakref.WeakSet()
atexit.register(_close_all)
