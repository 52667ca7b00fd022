"""Where the inspector finds runs and which paths it may read: the runs directory, run names, `Run` handles, path
safety and the errors the pages show.

Runs live under one runs directory (`--runs DIR`, else $DIFFLENS_RUNS, else `runs`). A run is a subdirectory with a
`manifest.json` (or the runs directory itself, when it is a run). No path leaves the runs directory: every path is
resolved (symlinks included) and checked by `safe_path`; names that come from a URL are checked against what exists.

A run is identified by its resolved path and a *signature* (modification times of its manifest and of every
directory and single-file table under tables/; writers rename files into place, which changes their directory's
time): every cache of the inspector (inspector/db.py, inspector/queries/) is keyed by it, so a finished stage is
picked up on the next page run and stale results are never served.

Errors are `InspectorError`s with a message fit for the page: `RunError` (not a run, a corrupt manifest or Parquet
file), `UnsafePath` and `TableMissing` (inspector/tables.py).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from backend.errors import DifflensError
from backend.run.manifest import MANIFEST, is_run, not_a_run_message
from backend.run.schema import check_format_version

RUNS_ENV = "DIFFLENS_RUNS"
DEFAULT_RUNS = "runs"


# ------------------------------------------------------------------------------------------------------ errors


class InspectorError(Exception):
    """A problem the page shows as a message, never as a traceback."""


class UnsafePath(InspectorError):
    """A path that would leave the runs directory."""


class RunError(InspectorError):
    """A missing, partial or corrupt run."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (DuckDB's run to several), for a one-line page message."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# ------------------------------------------------------------------------------------------------------ paths


@functools.lru_cache(maxsize=256)
def _display_path(path: str, cwd: str) -> str:
    try:
        return Path(path).relative_to(cwd).as_posix()
    except ValueError:
        return path


def display_path(path: str | os.PathLike) -> str:
    """A path as a user would type it here: relative to the working directory when inside it."""
    return _display_path(str(path), os.getcwd())


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
    if is_run(base):
        return ["."]
    out = []
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            path = safe_path(base, entry.name)
        except UnsafePath:
            continue
        if is_run(path):
            out.append(entry.name)
    return out


def signature(run_path: str | os.PathLike) -> str:
    """Changes whenever the manifest or a table of the run changes (see the module docstring)."""
    path = Path(run_path)
    h = hashlib.blake2b(digest_size=10)
    item = path / MANIFEST
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
    if not is_run(path):
        raise RunError(not_a_run_message(f"`{name}` under {base}"))
    return Run(str(base), name, str(path), signature(path))


def read_manifest(run_path: str | os.PathLike) -> dict:
    """A run's manifest.json, read now (RunError when it is not a JSON object, e.g. half-written by hand). Pages
    read it through the cached `inspector.queries.manifest`."""
    path = Path(run_path)
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"the manifest of {path.name} cannot be read ({type(exc).__name__}: {exc}); the run "
                       "is corrupt or still being written") from exc
    if not isinstance(data, dict):
        raise RunError(f"the manifest of {path.name} is not a JSON object; the run is corrupt")
    try:
        check_format_version(data, path)
    except DifflensError as exc:
        raise RunError(str(exc)) from exc
    return data


def run_file(run: Run, relative: str) -> Path:
    """A file of the run by its run-relative path (as stored in tables), checked to stay inside the run."""
    path = safe_path(run.path, relative)
    if not path.is_file():
        raise RunError(f"{relative} is missing from run {run.label}")
    return path
