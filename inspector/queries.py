"""Every read the inspector makes of a run directory: DuckDB over the run's Parquet, read-only, parameterised, cached.

Runs live under one runs directory (`--runs DIR`, else $DIFFLENS_RUNS, else `runs`). A run is a subdirectory with a
`manifest.json` (or the runs directory itself, when it is a run). Nothing here writes anything, and no path leaves
the runs directory: every path is resolved (symlinks included) and checked by `safe_path`, and each run's DuckDB
connection is sandboxed to that run's directory (`allowed_directories`, external access off, configuration locked).

Caching. A run is identified by its resolved path and a *signature* (modification times of its manifest and of
every directory and single-file table under tables/; writers rename files into place, which changes their
directory's time), so a finished stage is picked up on the next page run and stale results are never served.
  - one DuckDB database per (run, signature) (`st.cache_resource`): small and medium tables (units, profiles,
    peaks, frequencies, comparisons, concepts, generations, ...) are loaded on first use into in-memory tables
    sorted by (layer, kind, unit, step), so a one-unit lookup prunes by zone maps; `examples` is loaded without
    its heat-map column; `activity` is never loaded (a histogram reads one partition's files);
  - heat-maps: the batch job writes each examples partition as one Parquet row group, so reading one unit's maps
    means decoding the whole column (~0.5 s at Stable Diffusion scale). The first request therefore loads every
    map of the partition into memory, 8 bits a cell in display form (`HeatCache`; ~150 MB for 20,480 features);
    big partitions load in a background thread while requests read their rows from the file;
  - query results (`st.cache_data`) keyed by (query, run path, signature, arguments); the unit page asks for one
    bundle (`unit_page`) so that a page run does one cache lookup, not a dozen.
Values always travel as `?` parameters; table and column names come from fixed lists in this module.

Errors are `InspectorError`s with a message fit for the page: `TableMissing` (with the command that computes the
table), `RunError` (not a run, a corrupt manifest or Parquet file) and `UnsafePath`.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import hashlib
import json
import os
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import streamlit as st

RUNS_ENV = "DIFFLENS_RUNS"
DEFAULT_RUNS = "runs"
MANIFEST = "manifest.json"

PARTITIONED = ("layer", "kind")
SORT_KEYS = ("layer", "kind", "unit", "step", "rank", "group", "gen_id", "opt_step", "seed")
LAZY_TABLES = ("activity",)
"""Never loaded: read from one partition's files per query."""
HEAVY_COLUMNS = {"examples": ("heatmap",)}
"""Loaded without these columns; they are read from the partition's files for the rows a page shows."""

ANALYSIS_TABLES = ("units", "profiles", "peaks", "examples", "frequencies", "comparisons", "concepts",
                   "localisation", "concept_summary")


def producer(table: str, run_arg: str = "RUN") -> str:
    """The command that computes a table (run_arg: the run directory as given to --run)."""
    if table in ("generations", "steps", "activity"):
        return "python cli.py run-all"
    if table in ("sae_training", "sae_metrics"):
        return f"python cli.py train-sae --run {run_arg}"
    if table == "comparisons":
        return f"python cli.py compare GROUP_A GROUP_B --run {run_arg}"
    if table in ANALYSIS_TABLES:
        return f"python cli.py analyze --run {run_arg}"
    if table == "interventions":
        return f"python cli.py steer --run {run_arg} --layer LAYER --kind KIND --unit UNIT"
    if table == "steering_success":
        return f"python cli.py steer-report --run {run_arg}"
    if table == "dreams":
        return f"python cli.py dream --run {run_arg} --layer LAYER --kind KIND --unit UNIT"
    if table == "ablations":
        return f"python cli.py ablate --run {run_arg}"
    return "python cli.py run-all"


@functools.lru_cache(maxsize=256)
def _display_path(path: str, cwd: str) -> str:
    try:
        return Path(path).relative_to(cwd).as_posix()
    except ValueError:
        return path


def display_path(path: str | os.PathLike) -> str:
    """A path as a user would type it here: relative to the working directory when inside it."""
    return _display_path(str(path), os.getcwd())


# ------------------------------------------------------------------------------------------------------ errors


class InspectorError(Exception):
    """A problem the page shows as a message, never as a traceback."""


class UnsafePath(InspectorError):
    """A path that would leave the runs directory."""


class RunError(InspectorError):
    """A missing, partial or corrupt run."""


class TableMissing(InspectorError):
    def __init__(self, table: str, run_arg: str = "RUN", detail: str = ""):
        self.table = table
        self.command = producer(table, run_arg)
        super().__init__(f"`{table}` not computed yet{detail}: run `{self.command}`")


# ------------------------------------------------------------------------------------------------------ paths


def parse_runs_arg(argv: list[str] | None = None) -> str | None:
    """`--runs DIR` from the script's arguments (`streamlit run inspector/app.py -- --runs DIR`)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--runs")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args.runs


def runs_root(argv: list[str] | None = None) -> Path:
    """The runs directory, resolved: --runs, else $DIFFLENS_RUNS, else ./runs."""
    chosen = parse_runs_arg(argv) or os.environ.get(RUNS_ENV) or DEFAULT_RUNS
    return Path(chosen).expanduser().resolve()


def safe_path(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """root / relative, resolved (symlinks followed); UnsafePath unless it stays inside root (root itself is fine).

    Absolute paths, `..` components that climb out and symlinks that point outside are all refused."""
    text = os.fspath(relative)
    if "\x00" in text:
        raise UnsafePath("refused a path containing a NUL byte")
    base = Path(root).resolve()
    if Path(text).is_absolute():
        raise UnsafePath(f"refused an absolute path {text!r}: paths are relative to the runs directory")
    target = (base / text).resolve()
    if target != base and not target.is_relative_to(base):
        raise UnsafePath(f"refused {text!r}: it resolves outside {base}")
    return target


# ------------------------------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class Run:
    """A run opened for reading: its place under the runs root and the signature its caches are keyed by."""

    root: str
    name: str
    """Relative to root ("." when the runs directory is itself a run)."""
    path: str
    sig: str

    @property
    def label(self) -> str:
        return Path(self.path).name if self.name in (".", "") else self.name

    @property
    def arg(self) -> str:
        """The run directory as a --run argument."""
        return display_path(self.path)


def list_runs(root: str | os.PathLike) -> list[str]:
    """Names (relative to root) of the runs under root: subdirectories with a manifest.json, sorted; ["."] when
    root itself is a run. Entries that resolve outside root (symlinks) are skipped."""
    base = Path(root).resolve()
    if not base.is_dir():
        return []
    if (base / MANIFEST).is_file():
        return ["."]
    out = []
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            path = safe_path(base, entry.name)
        except UnsafePath:
            continue
        if (path / MANIFEST).is_file():
            out.append(entry.name)
    return out


def signature(run_path: str | os.PathLike) -> str:
    """Changes whenever the manifest or a table of the run changes (see the module docstring)."""
    path = Path(run_path)
    h = hashlib.blake2b(digest_size=10)
    for item in (path / MANIFEST,):
        try:
            s = item.stat()
            h.update(f"{item.name}:{s.st_mtime_ns}:{s.st_size};".encode())
        except OSError:
            h.update(b"no-manifest;")
    tables = path / "tables"
    if tables.is_dir():
        for dirpath, dirnames, filenames in os.walk(tables):
            dirnames.sort()
            h.update(f"{dirpath}:{os.stat(dirpath).st_mtime_ns};".encode())
            if dirpath == str(tables):
                for name in sorted(filenames):
                    if name.endswith(".parquet"):
                        s = os.stat(os.path.join(dirpath, name))
                        h.update(f"{name}:{s.st_mtime_ns}:{s.st_size};".encode())
    return h.hexdigest()


def open_run(root: str | os.PathLike, name: str) -> Run:
    """A Run for name under root; RunError when it is not a run directory, UnsafePath when it leaves root."""
    base = Path(root).resolve()
    path = safe_path(base, name)
    if not (path / MANIFEST).is_file():
        raise RunError(f"`{name}` is not a run directory under {base} (no manifest.json): run "
                       "`python cli.py run-all` to make one")
    return Run(str(base), name, str(path), signature(path))


def manifest(run: Run) -> dict:
    """The run's manifest.json (RunError when it is not valid JSON, e.g. half-written by hand)."""
    return _manifest(run.path, run.sig)


@st.cache_data(max_entries=64, show_spinner=False)
def _manifest(path: str, sig: str) -> dict:
    try:
        data = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"the manifest of {Path(path).name} cannot be read ({type(exc).__name__}: {exc}); the run "
                       "is corrupt or still being written") from exc
    if not isinstance(data, dict):
        raise RunError(f"the manifest of {Path(path).name} is not a JSON object; the run is corrupt")
    return data


def run_file(run: Run, relative: str) -> Path:
    """A file of the run by its run-relative path (as stored in tables), checked to stay inside the run."""
    path = safe_path(run.path, relative)
    if not path.is_file():
        raise RunError(f"{relative} is missing from run {run.label}")
    return path


@st.cache_data(max_entries=2048, show_spinner=False)
def _read_bytes(path: str, mtime_ns: int) -> bytes:
    return Path(path).read_bytes()


def read_run_file(run: Run, relative: str) -> bytes:
    """The bytes of a run file (images), cached by path and modification time."""
    path = run_file(run, relative)
    return _read_bytes(str(path), path.stat().st_mtime_ns)


# ------------------------------------------------------------------------------------------------------ database


HEATMAP_CACHE_MB = int(os.environ.get("DIFFLENS_HEATMAP_CACHE_MB", "1024"))
"""Memory the heat-maps of one (layer, kind) may take in the inspector's cache (one byte a cell); larger
partitions are read from their Parquet file per request instead."""
HEATMAP_SYNC_BYTES = 32 << 20
"""Partitions up to this many cells are loaded when first asked for; bigger ones in a background thread, while
pages read the rows they need from the file (slower) until it is done."""


def _heat_key(unit, step, rank) -> np.ndarray:
    """One int64 per (unit, step >= -1, rank): unit in the high bits, then step + 1 and rank (12 bits each)."""
    unit, step, rank = (np.asarray(x, np.int64) for x in (unit, step, rank))
    return (unit << 24) | ((step + 1) << 12) | rank


def display_maps(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat heat-map values (maps of the given lengths, concatenated) as uint8: each map clipped at 0 and scaled by
    its own maximum to 0..255 (what the overlay draws; a map that never fires is all 0)."""
    values = np.nan_to_num(np.asarray(values, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    np.clip(values, 0, None, out=values)
    out = np.zeros(len(values), np.uint8)
    if len(lengths) and (lengths == lengths[0]).all() and lengths[0] > 0:
        maps = values.reshape(len(lengths), int(lengths[0]))
        top = maps.max(axis=1, keepdims=True)
        scaled = np.divide(maps, top, out=np.zeros_like(maps), where=top > 0)
        out[:] = np.rint(scaled * 255).astype(np.uint8).ravel()
        return out
    start = 0
    for n in lengths:
        m = values[start:start + n]
        top = float(m.max()) if n else 0.0
        if top > 0:
            out[start:start + n] = np.rint(m / top * 255).astype(np.uint8)
        start += n
    return out


@dataclass
class HeatCache:
    """Every heat-map of one examples partition in display form (uint8, see display_maps), found by (unit, step,
    rank) through a sorted key array."""

    keys: np.ndarray
    rows: np.ndarray
    offsets: np.ndarray
    values: np.ndarray

    def get(self, unit: int, step: int, rank: int) -> np.ndarray | None:
        key = int(_heat_key(unit, step, rank))
        i = int(np.searchsorted(self.keys, key))
        if i >= len(self.keys) or self.keys[i] != key:
            return None
        row = self.rows[i]
        return self.values[self.offsets[row]:self.offsets[row + 1]].astype(np.float32) / 255.0

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.rows.nbytes + self.offsets.nbytes + self.values.nbytes)


@dataclass
class Source:
    table: str
    files: list[str]
    hive: bool


def discover(run_path: Path) -> dict[str, Source]:
    """Table name -> its Parquet files: tables/<name>.parquet, or every file under tables/<name>/ (hive)."""
    tables = run_path / "tables"
    out: dict[str, Source] = {}
    if not tables.is_dir():
        return out
    for entry in sorted(tables.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".parquet":
            out[entry.stem] = Source(entry.stem, [str(entry)], False)
        elif entry.is_dir():
            files = sorted(str(p) for p in entry.rglob("*.parquet") if not p.name.startswith("."))
            if files:
                out[entry.name] = Source(entry.name, files, True)
    return out


class Database:
    """One run's read-only DuckDB database; tables are loaded on first use (see the module docstring)."""

    def __init__(self, run_path: str | os.PathLike, label: str = ""):
        self.path = Path(run_path).resolve()
        self.label = label or display_path(self.path)
        self.sources = discover(self.path)
        self.con = duckdb.connect(config={"threads": 2})
        self.con.execute("SET parquet_metadata_cache = true")
        self.con.execute("SET allowed_directories = ?", [[str(self.path) + os.sep]])
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")
        self.loaded: set[str] = set()
        self.columns: dict[str, list[str]] = {}
        self.heat: dict[tuple[str, str], HeatCache | None] = {}
        self.loading: dict[tuple[str, str], threading.Thread] = {}
        self.lock = threading.Lock()
        self.heat_lock = threading.Lock()
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
        """Load a table into memory (once); returns its columns."""
        self.require(table)
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
                               f"written file?): {_first_line(exc)}") from exc
            finally:
                cur.close()
            self.columns[table] = keep
            self.loaded.add(table)
            return keep

    def sql(self, query: str, params: list | None = None, tables: tuple[str, ...] = ()) -> pl.DataFrame:
        for table in tables:
            self.load(table)
        cur = self.con.cursor()
        try:
            return cur.sql(query, params=params or None).pl()
        except duckdb.Error as exc:
            raise RunError(f"run {self.label}: a query failed ({_first_line(exc)})") from exc
        finally:
            cur.close()

    def heatmaps(self, layer: str, kind: str, wait: bool = True) -> HeatCache | None:
        """The heat-maps of one examples partition, loaded into memory on first use (one scan of its file: the
        batch job writes it as a single Parquet row group, which no reader can read part of). None when they would
        take more than HEATMAP_CACHE_MB, or (wait=False) while a big partition is still loading in the background;
        the caller then reads the rows it needs from the file."""
        key = (layer, kind)
        if key in self.heat:
            return self.heat[key]
        files = self.partition_files("examples", layer, kind)
        n, cells = self.sql("SELECT count(*) AS n, coalesce(max(CAST(height AS BIGINT) * width), 0) AS cells "
                            "FROM examples WHERE layer = ? AND kind = ?", [layer, kind], tables=("examples",)).row(0)
        size = int(n) * int(cells)
        if size > HEATMAP_CACHE_MB << 20:
            self.heat[key] = None
            return None
        if wait or size <= HEATMAP_SYNC_BYTES:
            return self._load_heat(key, files)
        with self.lock:
            if key not in self.loading:
                self.loading[key] = threading.Thread(target=self._load_heat, args=(key, files), daemon=True,
                                                     name=f"heatmaps {layer}/{kind}")
                self.loading[key].start()
        return self.heat.get(key)

    def _load_heat(self, key: tuple[str, str], files: list[str]) -> HeatCache | None:
        with self.heat_lock:
            if key in self.heat:
                return self.heat[key]
            import pyarrow.compute as pc

            cur = self.con.cursor()
            try:
                table = cur.sql("SELECT unit, step, rank, heatmap FROM read_parquet(?)",
                                params=[files]).to_arrow_table()
            except duckdb.Error as exc:
                raise RunError(f"the examples of {key[0]}/{key[1]} in run {self.label} cannot be read (a corrupt "
                               f"or partially written file?): {_first_line(exc)}") from exc
            finally:
                cur.close()
            heat = table["heatmap"]
            lengths = pc.fill_null(pc.list_value_length(heat), 0).to_numpy().astype(np.int64)
            values = display_maps(pc.list_flatten(heat).to_numpy(zero_copy_only=False), lengths)
            keys = _heat_key(table["unit"].to_numpy(), table["step"].to_numpy(), table["rank"].to_numpy())
            order = np.argsort(keys, kind="stable")
            cache = HeatCache(keys[order], order.astype(np.int64), np.concatenate([[0], np.cumsum(lengths)]), values)
            self.heat[key] = cache
            return cache

    def partition_files(self, table: str, layer: str, kind: str | None = None) -> list[str]:
        """The Parquet files of one (layer, kind) partition of a hive table; layer and kind must name a partition
        that exists (they come from URLs, so they are checked, never trusted)."""
        self.require(table)
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
        base = self.path / "tables" / table
        found = set()
        for f in self.sources.get(table, Source(table, [], True)).files:
            for part in Path(f).relative_to(base).parts[:-1]:
                k, _, v = part.partition("=")
                if k == key:
                    found.add(v)
        return sorted(found)

    def read_files(self, query: str, files: list[str], params: list | None = None) -> pl.DataFrame:
        """query with `{src}` standing for read_parquet of the given files (already checked paths)."""
        if not files:
            return pl.DataFrame()
        cur = self.con.cursor()
        try:
            return cur.sql(query.format(src="read_parquet(?)"), params=[files, *(params or [])]).pl()
        except duckdb.Error as exc:
            raise RunError(f"run {self.label}: reading {Path(files[0]).parent.name} failed (a corrupt or "
                           f"partially written file?): {_first_line(exc)}") from exc
        finally:
            cur.close()


def _close_all() -> None:
    """At exit: close every connection and drop the cached databases (DuckDB objects still alive when the
    interpreter tears its modules down make nanobind print leak warnings)."""
    for db in list(_OPEN):
        try:
            db.con.close()
        except Exception:  # noqa: BLE001 - interpreter exit: nothing to report to
            pass
    try:
        _database.clear()
    except Exception:  # noqa: BLE001
        pass
    _OPEN.clear()


_OPEN: weakref.WeakSet = weakref.WeakSet()
atexit.register(_close_all)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@st.cache_resource(max_entries=6, show_spinner=False)
def _database(path: str, sig: str, label: str) -> Database:
    return Database(path, label)


def database(run: Run) -> Database:
    return _database(run.path, run.sig, run.arg)


# ------------------------------------------------------------------------------------------------------ queries

_QUERIES: dict[str, Callable] = {}


@st.cache_data(max_entries=4096, show_spinner=False)
def _cached(name: str, path: str, sig: str, label: str, args: tuple):
    return _QUERIES[name](_database(path, sig, label), *args)


def query(fn: Callable) -> Callable:
    """Register fn(db, *args) as a query: the returned function takes (run, *args) and caches on
    (name, run path, signature, args); `.uncached(run, *args)` runs the SQL every time (benchmarks)."""
    _QUERIES[fn.__name__] = fn

    def call(run: Run, *args):
        return _cached(fn.__name__, run.path, run.sig, run.arg, tuple(args))

    call.uncached = lambda run, *args: fn(database(run), *args)
    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


@query
def tables(db: Database) -> list[str]:
    """Names of the tables the run has."""
    return sorted(db.sources)


@query
def generation_counts(db: Database) -> dict:
    db.require("generations")
    row = db.sql('SELECT count(*) AS generations, count(DISTINCT prompt) AS prompts, count(DISTINCT "group") AS '
                 'groups FROM generations', tables=("generations",)).row(0, named=True)
    return {k: int(v) for k, v in row.items()}


@query
def groups(db: Database) -> pl.DataFrame:
    """Prompt groups: group, generations, prompts."""
    db.require("generations")
    return db.sql('SELECT "group", count(*) AS generations, count(DISTINCT prompt) AS prompts FROM generations '
                  'GROUP BY ALL ORDER BY "group"', tables=("generations",))


@query
def steps(db: Database) -> pl.DataFrame:
    """step, timestep."""
    db.require("steps")
    return db.sql("SELECT CAST(step AS INTEGER) AS step, CAST(timestep AS DOUBLE) AS timestep FROM steps ORDER BY "
                  "step", tables=("steps",))


@query
def partitions(db: Database) -> pl.DataFrame:
    """(layer, kind, units, dead, dense) per analysed partition; from the activity layout (units = null) when
    the run has not been analysed."""
    if db.has("units"):
        return db.sql("SELECT layer, kind, count(*) AS units, count(*) FILTER (WHERE dead) AS dead, "
                      "count(*) FILTER (WHERE dense) AS dense FROM units GROUP BY ALL ORDER BY layer, kind",
                      tables=("units",))
    rows = []
    if db.has("activity"):
        for layer in db.partition_values("activity", "layer"):
            for kind in ("channel", "feature"):
                if (db.path / "tables" / "activity" / f"layer={layer}" / f"kind={kind}").is_dir():
                    rows.append({"layer": layer, "kind": kind})
    return pl.DataFrame(rows, schema={"layer": pl.String, "kind": pl.String}).with_columns(
        units=pl.lit(None, pl.Int64), dead=pl.lit(None, pl.Int64), dense=pl.lit(None, pl.Int64))


UNIT_COLUMNS = ("u.unit, u.density, u.mean, u.max, u.peak_steps, u.first_active, u.last_active, u.dead, u.dense, "
                "u.label")


@query
def units(db: Database, layer: str, kind: str) -> pl.DataFrame:
    """Every unit of a partition with its best concept (by AUROC) and its top peak step."""
    db.require("units")
    cols = db.load("units")
    extra = ", u.active_steps" if "active_steps" in cols else ""
    if db.has("concepts"):
        sql = f"""
            WITH best AS (SELECT unit, arg_max(concept, auroc) AS concept, max(auroc) AS auroc FROM concepts
                          WHERE layer = ? AND kind = ? GROUP BY unit)
            SELECT {UNIT_COLUMNS}{extra}, u.peak_steps[1] AS peak_step, b.concept, b.auroc
            FROM units u LEFT JOIN best b USING (unit) WHERE u.layer = ? AND u.kind = ? ORDER BY u.unit"""
        return db.sql(sql, [layer, kind, layer, kind], tables=("units", "concepts"))
    sql = f"""SELECT {UNIT_COLUMNS}{extra}, u.peak_steps[1] AS peak_step, CAST(NULL AS VARCHAR) AS concept,
              CAST(NULL AS FLOAT) AS auroc FROM units u WHERE u.layer = ? AND u.kind = ? ORDER BY u.unit"""
    return db.sql(sql, [layer, kind], tables=("units",))


@query
def unit_range(db: Database, layer: str, kind: str) -> tuple[int, int]:
    """(first, last) unit index of a partition; (0, -1) when it has no units."""
    db.require("units")
    lo, hi = db.sql("SELECT min(unit) AS lo, max(unit) AS hi FROM units WHERE layer = ? AND kind = ?",
                    [layer, kind], tables=("units",)).row(0)
    return (0, -1) if lo is None else (int(lo), int(hi))


@query
def unit_row(db: Database, layer: str, kind: str, unit: int) -> dict | None:
    """One unit's row of `units` (None when the unit does not exist)."""
    db.require("units")
    df = db.sql(f"SELECT {UNIT_COLUMNS} FROM units u WHERE u.layer = ? AND u.kind = ? AND u.unit = ?",
                [layer, kind, unit], tables=("units",))
    return df.row(0, named=True) if df.height else None


@query
def neighbour(db: Database, layer: str, kind: str, unit: int, direction: int, skip_dead: bool) -> int | None:
    """The next (direction 1) or previous (-1) unit, optionally skipping dead ones; None at the end."""
    db.require("units")
    dead = " AND NOT dead" if skip_dead else ""
    if direction > 0:
        sql = f"SELECT min(unit) FROM units WHERE layer = ? AND kind = ? AND unit > ?{dead}"
    else:
        sql = f"SELECT max(unit) FROM units WHERE layer = ? AND kind = ? AND unit < ?{dead}"
    value = db.sql(sql, [layer, kind, unit], tables=("units",)).item()
    return None if value is None else int(value)


@query
def live_units(db: Database, layer: str, kind: str) -> np.ndarray:
    """Indices of the partition's units that are not dead (for "random")."""
    db.require("units")
    return db.sql("SELECT unit FROM units WHERE layer = ? AND kind = ? AND NOT dead ORDER BY unit", [layer, kind],
                  tables=("units",))["unit"].to_numpy()


@query
def profile(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    """step, timestep, mean, max, freq of one unit."""
    db.require("profiles")
    join = "LEFT JOIN steps s ON s.step = p.step" if db.has("steps") else ""
    t = "CAST(s.timestep AS DOUBLE)" if db.has("steps") else "CAST(p.step AS DOUBLE)"
    return db.sql(f"""SELECT CAST(p.step AS INTEGER) AS step, {t} AS timestep, p.mean, p.max, p.freq
                      FROM profiles p {join} WHERE p.layer = ? AND p.kind = ? AND p.unit = ? ORDER BY p.step""",
                  [layer, kind, unit], tables=("profiles", "steps") if db.has("steps") else ("profiles",))


@query
def peaks(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    """step, timestep, height, rank of one unit's peaks (rank 1 = highest)."""
    db.require("peaks")
    join = "LEFT JOIN steps s ON s.step = p.step" if db.has("steps") else ""
    t = "CAST(s.timestep AS DOUBLE)" if db.has("steps") else "CAST(p.step AS DOUBLE)"
    return db.sql(f"""SELECT CAST(p.step AS INTEGER) AS step, {t} AS timestep, p.height, CAST(p.rank AS INTEGER)
                      AS rank FROM peaks p {join} WHERE p.layer = ? AND p.kind = ? AND p.unit = ? ORDER BY p.rank""",
                  [layer, kind, unit], tables=("peaks", "steps") if db.has("steps") else ("peaks",))


@query
def example_steps(db: Database, layer: str, kind: str, unit: int) -> list[int]:
    """The steps the unit has examples for (-1: over all steps)."""
    db.require("examples")
    return db.sql("SELECT DISTINCT CAST(step AS INTEGER) AS step FROM examples WHERE layer = ? AND kind = ? AND "
                  "unit = ? ORDER BY step", [layer, kind, unit], tables=("examples",))["step"].to_list()


@query
def examples(db: Database, layer: str, kind: str, unit: int, step: int, first_rank: int = 1,
             last_rank: int = 1 << 30) -> pl.DataFrame:
    """One unit's top examples at a step (-1: over all steps) with ranks in [first_rank, last_rank]: rank, gen_id,
    activation, heatmap_step, height, width, prompt, seed, group, image, and `heatmap`: the map for display
    (row-major list of height x width floats in [0, 1]: clipped at 0, divided by its maximum, 8-bit precision)."""
    db.require("examples")
    have_gens = db.has("generations")
    gens = ", g.prompt, g.seed, g.\"group\", g.image" if have_gens else ""
    join = "LEFT JOIN generations g USING (gen_id)" if have_gens else ""
    rows = db.sql(f"""SELECT CAST(e.rank AS INTEGER) AS rank, e.gen_id, e.activation,
                             CAST(e.heatmap_step AS INTEGER) AS heatmap_step, e.height, e.width{gens}
                      FROM examples e {join}
                      WHERE e.layer = ? AND e.kind = ? AND e.unit = ? AND e.step = ? AND e.rank BETWEEN ? AND ?
                      ORDER BY e.rank""", [layer, kind, unit, step, first_rank, last_rank],
                  tables=("examples", "generations") if have_gens else ("examples",))
    if not have_gens:
        rows = rows.with_columns(prompt=pl.lit(None, pl.String), seed=pl.lit(None, pl.Int64),
                                 group=pl.lit(None, pl.String), image=pl.lit(None, pl.String))
    if rows.is_empty():
        return rows.with_columns(heatmap=pl.lit(None, pl.List(pl.Float32)))
    cache = db.heatmaps(layer, kind, wait=False)
    if cache is not None:
        maps = [cache.get(unit, step, r) for r in rows["rank"].to_list()]
    else:
        files = db.partition_files("examples", layer, kind)
        found = db.read_files("SELECT CAST(rank AS INTEGER) AS rank, heatmap FROM {src} WHERE unit = ? AND step = ? "
                              "AND rank BETWEEN ? AND ?", files, [unit, step, first_rank, last_rank])
        by_rank = dict(zip(found["rank"].to_list(), found["heatmap"].to_list(), strict=True)) if found.height else {}
        maps = []
        for r in rows["rank"].to_list():
            raw = by_rank.get(r)
            maps.append(None if raw is None else
                        display_maps(np.asarray(raw, np.float32), np.array([len(raw)])).astype(np.float32) / 255.0)
    return rows.with_columns(heatmap=pl.Series("heatmap", [None if m is None else m.tolist() for m in maps],
                                               dtype=pl.List(pl.Float32)))


@query
def example_count(db: Database, layer: str, kind: str, unit: int, step: int) -> int:
    db.require("examples")
    return int(db.sql("SELECT count(*) FROM examples WHERE layer = ? AND kind = ? AND unit = ? AND step = ?",
                      [layer, kind, unit, step], tables=("examples",)).item())


HIST_STATS = ("max", "mean")
HIST_AUTO_BYTES = 64 << 20
"""Partitions of activity up to this size are scanned for a unit's histogram as the page opens; larger ones on
request (a full scan of a Stable Diffusion-sized run takes longer than a page should)."""


@query
def activity_bytes(db: Database, layer: str, kind: str) -> int:
    """Size on disk of one activity partition (what a histogram scan reads at most)."""
    return int(sum(os.path.getsize(f) for f in db.partition_files("activity", layer, kind)))


@query
def activation_histogram(db: Database, layer: str, kind: str, unit: int, stat: str = "max",
                         bins: int = 30) -> dict:
    """Histogram of one unit's recorded activity (its spatial `max` or `mean` per (generation, step); features
    are stored when active only). Read from the `histograms` table when the run has one (columns layer, kind, unit,
    stat, lo, hi, count), else from the activity partition. Returns {"hist": DataFrame(lo, hi, count), "rows": n,
    "pairs": (generation, step) pairs of the run or None, "source": table name}."""
    if stat not in HIST_STATS:
        raise InspectorError(f"unknown statistic {stat!r}; use one of {', '.join(HIST_STATS)}")
    pairs = None
    if db.has("generations") and db.has("steps"):
        n_gen = db.sql("SELECT count(*) FROM generations", tables=("generations",)).item()
        n_steps = db.sql("SELECT count(*) FROM steps", tables=("steps",)).item()
        pairs = int(n_gen) * int(n_steps)
    if db.has("histograms"):
        hist = db.sql("SELECT CAST(lo AS DOUBLE) AS lo, CAST(hi AS DOUBLE) AS hi, CAST(count AS BIGINT) AS count "
                      "FROM histograms WHERE layer = ? AND kind = ? AND unit = ? AND stat = ? ORDER BY lo",
                      [layer, kind, unit, stat], tables=("histograms",))
        return {"hist": hist, "rows": int(hist["count"].sum()), "pairs": pairs, "source": "histograms"}
    db.require("activity")
    files = db.partition_files("activity", layer, kind)
    values = db.read_files(f'SELECT "{stat}" AS v FROM {{src}} WHERE unit = ?', files, [unit])
    v = values["v"].to_numpy().astype(np.float64) if values.height else np.zeros(0)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        hist = pl.DataFrame({"lo": [], "hi": [], "count": []}, schema={"lo": pl.Float64, "hi": pl.Float64,
                                                                      "count": pl.Int64})
    else:
        lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            hi = lo + 1e-6
        counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
        hist = pl.DataFrame({"lo": edges[:-1], "hi": edges[1:], "count": counts.astype(np.int64)})
    return {"hist": hist, "rows": int(len(v)), "pairs": pairs, "source": "activity"}


@query
def unit_frequencies(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    """group, freq, mean (and generations) of one unit per prompt group."""
    db.require("frequencies")
    return db.sql('SELECT "group", freq, mean FROM frequencies WHERE layer = ? AND kind = ? AND unit = ? '
                  'ORDER BY "group"', [layer, kind, unit], tables=("frequencies",))


@query
def unit_concepts(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    """The concepts for which this unit is among the best: concept, auroc, step, rank."""
    db.require("concepts")
    return db.sql("SELECT concept, auroc, CAST(step AS INTEGER) AS step, CAST(rank AS INTEGER) AS rank FROM concepts "
                  "WHERE layer = ? AND kind = ? AND unit = ? ORDER BY auroc DESC", [layer, kind, unit],
                  tables=("concepts",))


@query
def unit_localisation(db: Database, layer: str, kind: str, unit: int) -> dict | None:
    """How often the unit's top examples put its heat-map over the object's position: examples, positions, hits,
    share, rank (None when the unit has no row)."""
    db.require("localisation")
    df = db.sql("SELECT * EXCLUDE (layer, kind) FROM localisation WHERE layer = ? AND kind = ? AND unit = ?",
                [layer, kind, unit], tables=("localisation",))
    return df.row(0, named=True) if df.height else None


@query
def unit_page(db: Database, layer: str, kind: str, unit: int) -> dict:
    """Everything the unit page shows about one unit except its examples' rows and histogram, in one cached
    result (one cache lookup per page run instead of a dozen): row, concepts, profile, peaks, frequencies,
    localisation, example_counts ({step: n}), interventions, steering, dreams, activity_bytes, tables. An item
    whose table is missing is None with its table in `missing`; one that fails to read is None with its message
    in `errors`."""
    out: dict = {"tables": sorted(db.sources), "missing": {}, "errors": {}}
    items = {
        "row": ("units", lambda: _QUERIES["unit_row"](db, layer, kind, unit)),
        "concepts": ("concepts", lambda: _QUERIES["unit_concepts"](db, layer, kind, unit)),
        "profile": ("profiles", lambda: _QUERIES["profile"](db, layer, kind, unit)),
        "peaks": ("peaks", lambda: _QUERIES["peaks"](db, layer, kind, unit)),
        "frequencies": ("frequencies", lambda: _QUERIES["unit_frequencies"](db, layer, kind, unit)),
        "localisation": ("localisation", lambda: _QUERIES["unit_localisation"](db, layer, kind, unit)),
        "example_counts": ("examples", lambda: dict(db.sql(
            "SELECT CAST(step AS INTEGER) AS step, count(*) AS n FROM examples WHERE layer = ? AND kind = ? AND "
            "unit = ? GROUP BY step ORDER BY step", [layer, kind, unit], tables=("examples",)).iter_rows())),
        "interventions": ("interventions", lambda: _QUERIES["unit_interventions"](db, layer, kind, unit)),
        "steering": ("steering_success", lambda: _QUERIES["unit_steering_success"](db, layer, kind, unit)),
        "dreams": ("dreams", lambda: _QUERIES["unit_dreams"](db, layer, kind, unit)),
        "activity_bytes": ("activity", lambda: _QUERIES["activity_bytes"](db, layer, kind)),
    }
    for name, (table, fn) in items.items():
        out[name] = None
        if not db.has(table):
            out["missing"][name] = producer(table, db.label)
            continue
        try:
            out[name] = fn()
        except TableMissing as exc:
            out["missing"][name] = exc.command
        except InspectorError as exc:
            out["errors"][name] = str(exc)
    return out


@query
def group_frequencies(db: Database, layer: str, kind: str, group_a: str, group_b: str) -> pl.DataFrame:
    """unit, freq_a, freq_b for every unit of a partition."""
    db.require("frequencies")
    return db.sql('SELECT unit, max(freq) FILTER (WHERE "group" = ?) AS freq_a, max(freq) FILTER (WHERE "group" = ?) '
                  'AS freq_b FROM frequencies WHERE layer = ? AND kind = ? GROUP BY unit ORDER BY unit',
                  [group_a, group_b, layer, kind], tables=("frequencies",))


@query
def comparison_pairs(db: Database) -> pl.DataFrame:
    db.require("comparisons")
    return db.sql("SELECT DISTINCT group_a, group_b FROM comparisons ORDER BY ALL", tables=("comparisons",))


@query
def comparison(db: Database, layer: str, kind: str, group_a: str, group_b: str, limit: int = 100) -> pl.DataFrame:
    """The ranked differential units of A vs B: rank, unit, freq_a, freq_b, ratio, score."""
    db.require("comparisons")
    return db.sql("SELECT CAST(rank AS INTEGER) AS rank, unit, freq_a, freq_b, ratio, score FROM comparisons "
                  "WHERE layer = ? AND kind = ? AND group_a = ? AND group_b = ? ORDER BY rank LIMIT ?",
                  [layer, kind, group_a, group_b, limit], tables=("comparisons",))


@query
def unit_interventions(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    """The interventions recorded for this unit: steering it, and SAE edits that zero or scale it (alone, or among
    several features: rows with unit -1 list them in `features`)."""
    db.require("interventions")
    cols = db.load("interventions")
    order = ", ".join(c for c in ("method", "mode", "scale", "spec", "seed") if c in cols) or "unit"
    if "features" in cols:
        return db.sql(f"SELECT * FROM interventions WHERE layer = ? AND kind = ? AND (unit = ? OR "
                      f"list_contains(features, ?)) ORDER BY {order}", [layer, kind, unit, unit],
                      tables=("interventions",))
    return db.sql(f"SELECT * FROM interventions WHERE layer = ? AND kind = ? AND unit = ? ORDER BY {order}",
                  [layer, kind, unit], tables=("interventions",))


@query
def unit_steering_success(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    db.require("steering_success")
    return db.sql("SELECT * FROM steering_success WHERE layer = ? AND kind = ? AND unit = ? ORDER BY concept",
                  [layer, kind, unit], tables=("steering_success",))


@query
def steering_success(db: Database) -> pl.DataFrame:
    db.require("steering_success")
    return db.sql("SELECT * FROM steering_success ORDER BY layer, kind, concept", tables=("steering_success",))


@query
def unit_dreams(db: Database, layer: str, kind: str, unit: int) -> pl.DataFrame:
    """The deep-dream snapshots of one unit: step, seed, opt_step, activation, penalties (JSON), image."""
    db.require("dreams")
    return db.sql("SELECT CAST(step AS INTEGER) AS step, seed, opt_step, activation, penalties, image FROM dreams "
                  "WHERE layer = ? AND kind = ? AND unit = ? ORDER BY step, seed, opt_step", [layer, kind, unit],
                  tables=("dreams",))


@query
def ablations(db: Database) -> pl.DataFrame:
    """Every ablation row: layer (the block), mode, prompt, seed, image, baseline_image, effect, ..."""
    db.require("ablations")
    return db.sql("SELECT * FROM ablations ORDER BY layer, mode, prompt, seed", tables=("ablations",))


@query
def sae_training(db: Database) -> pl.DataFrame:
    db.require("sae_training")
    return db.sql("SELECT layer, step, tokens, fvu, l0, dead_frac, lr FROM sae_training ORDER BY layer, step",
                  tables=("sae_training",))


@query
def sae_metrics(db: Database) -> pl.DataFrame:
    db.require("sae_metrics")
    return db.sql("SELECT * FROM sae_metrics ORDER BY layer", tables=("sae_metrics",))


@query
def concept_summary(db: Database) -> pl.DataFrame:
    db.require("concept_summary")
    return db.sql("SELECT * FROM concept_summary ORDER BY layer, kind", tables=("concept_summary",))


@query
def first_prompts(db: Database, n: int = 20) -> list[str]:
    db.require("generations")
    return db.sql("SELECT prompt FROM generations GROUP BY prompt ORDER BY min(gen_id) LIMIT ?", [n],
                  tables=("generations",))["prompt"].to_list()


# ------------------------------------------------------------------------------------------------------ manifest views


def stage_table(man: dict) -> pl.DataFrame:
    """stage, status, seconds from a manifest's stages (the sae stage's per-layer entries summed)."""
    rows = []
    for stage, info in (man.get("stages") or {}).items():
        if not isinstance(info, dict):
            continue
        seconds = info.get("seconds")
        if seconds is None:
            per_layer = [v.get("seconds") for v in info.values() if isinstance(v, dict) and "seconds" in v]
            seconds = float(sum(per_layer)) if per_layer else None
        rows.append({"stage": stage, "status": str(info.get("status", "?")),
                     "seconds": float(seconds) if isinstance(seconds, int | float) else None})
    return pl.DataFrame(rows, schema={"stage": pl.String, "status": pl.String, "seconds": pl.Float64})


def run_layers(man: dict) -> list[str]:
    config = man.get("config") or {}
    capture = (man.get("stages") or {}).get("capture") or {}
    return list(capture.get("layers") or (config.get("capture") or {}).get("layers") or [])


def run_model(man: dict) -> str:
    return str((man.get("config") or {}).get("model", "?"))


def analysis_done(man: dict) -> bool:
    return ((man.get("stages") or {}).get("analysis") or {}).get("status") == "done"
