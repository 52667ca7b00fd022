"""Reads of a sweep (the Sweep page): the sweeps under the runs directory (`sweeps/<name>/sweep.json`,
docs/run-format.md "Sweeps") and their runs' results side by side.

A sweep's runs are ordinary runs of the runs directory; their results come through the run queries (SAE metrics,
concept summary, steering success, the manifest's stage times: cached, parameterised DuckDB), one row per (run,
layer). Every path is checked to stay inside the runs directory; a sweep name is checked against the sweeps that
exist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import streamlit as st

from backend.run.schema import is_feature
from inspector.queries.interventions import steering_success
from inspector.queries.overview import concept_summary, sae_metrics
from inspector.queries.run_info import manifest, stage_table
from inspector.runs import InspectorError, RunError, UnsafePath, open_run, safe_path
from inspector.tables import TableMissing

SWEEPS = "sweeps"
SWEEP_FILE = "sweep.json"
METRICS = ("fvu", "l0", "dead_frac", "frac_loss_recovered", "mean_best_auroc", "steering_success")
"""Result columns of sweep_results, in display order (a column is absent when no run of the sweep has it)."""


def list_sweeps(root: str | os.PathLike) -> list[str]:
    """Names of the sweeps under root (sweeps/<name>/sweep.json), sorted; entries that leave root are skipped."""
    try:
        base = safe_path(root, SWEEPS)
    except UnsafePath:
        return []
    if not base.is_dir():
        return []
    out = []
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            if safe_path(root, f"{SWEEPS}/{entry.name}/{SWEEP_FILE}").is_file():
                out.append(entry.name)
        except UnsafePath:
            continue
    return out


def sweep_manifest(root: str | os.PathLike, name: str) -> dict:
    """A sweep's sweep.json (InspectorError for an unknown sweep or an unreadable file)."""
    if name not in list_sweeps(root):
        raise InspectorError(f"no sweep {name!r} under {root}; sweeps: {', '.join(list_sweeps(root)) or 'none'}")
    path = safe_path(root, f"{SWEEPS}/{name}/{SWEEP_FILE}")
    return _read(str(path), path.stat().st_mtime_ns)


@st.cache_data(max_entries=64, show_spinner=False)
def _read(path: str, mtime_ns: int) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{path} cannot be read ({type(exc).__name__}: {exc}); the sweep is corrupt") from exc
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not isinstance(data.get("grid"), dict):
        raise RunError(f"{path} is not a sweep manifest (no runs or grid)")
    return data


def param_columns(data: dict) -> dict[str, str]:
    """Swept key -> its column in sweep_results (dots become '_': chart fields cannot hold dots)."""
    return {key: key.replace(".", "_") for key in data["grid"]}


def _value(value):
    return value if isinstance(value, int | float) and not isinstance(value, bool) else json.dumps(value)


def _optional(fn, run) -> pl.DataFrame | None:
    try:
        return fn(run)
    except TableMissing:
        return None


def _features(frame: pl.DataFrame) -> pl.Expr:
    """Rows of SAE feature kinds (any SAE of the layer)."""
    return pl.col("kind").is_in([k for k in frame["kind"].unique().to_list() if is_feature(k)])


def _run_rows(root, record: dict) -> list[dict]:
    """One row per layer of a run: its SAE metrics, concept recovery of its features, steering success, stage
    times (one row with only the status when the run has no results yet)."""
    try:
        run = open_run(root, record["name"])
    except (RunError, UnsafePath):
        return [{}]
    stages = stage_table(manifest(run))
    times = {f"{r['stage']}_s": r["seconds"] for r in stages.iter_rows(named=True) if r["seconds"] is not None}
    times["total_s"] = float(stages["seconds"].drop_nulls().sum()) if stages.height else None
    metrics = _optional(sae_metrics, run)
    concepts = _optional(concept_summary, run)
    steering = _optional(steering_success, run)
    layers = metrics["layer"].to_list() if metrics is not None else []
    rows = []
    for layer in layers or [None]:
        row = {"layer": layer, **times}
        if metrics is not None and layer is not None:
            m = metrics.filter(pl.col("layer") == layer).row(0, named=True)
            row |= {k: m.get(k) for k in ("fvu", "l0", "dead_frac", "frac_loss_recovered")}
        if concepts is not None and layer is not None:
            mine = concepts.filter((pl.col("layer") == layer) & _features(concepts))
            row["mean_best_auroc"] = mine["mean_best_auroc"].max() if mine.height else None
        if steering is not None and layer is not None:
            mine = steering.filter((pl.col("layer") == layer) & _features(steering))
            row["steering_success"] = mine["rate"].mean() if mine.height else None
        rows.append(row)
    return rows


def sweep_results(root: str | os.PathLike, name: str) -> pl.DataFrame:
    """The sweep's runs side by side: run, status, one column per swept key, layer, the METRICS present, stage
    times (`<stage>_s`, `total_s`); one row per (run, layer)."""
    data = sweep_manifest(root, name)
    columns = param_columns(data)
    rows = []
    for record in data["runs"]:
        params = {columns[k]: _value(v) for k, v in (record.get("overrides") or {}).items() if k in columns}
        for row in _run_rows(root, record):
            rows.append({"run": record["name"], "status": record.get("status", "?"), **params, **row})
    frame = pl.DataFrame(rows, infer_schema_length=None)
    ordered = ["run", "status", *columns.values(), "layer", *[m for m in METRICS if m in frame.columns]]
    rest = [c for c in frame.columns if c not in ordered]
    return frame.select([c for c in ordered if c in frame.columns] + rest)
