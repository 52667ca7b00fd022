"""sweeps/<name>/sweep.json: what a sweep is (base config, grid, runs) and how far it got (each run's status, the
executor, submitit's job ids). docs/run-format.md ("Sweeps") describes its keys; every write is atomic.

One process writes sweep.json: the `sweep` command (it runs the local executor, submits, and refreshes statuses
for `--status`). A SLURM task reports its run's end in `sweeps/<name>/status/<run>.json` (one file per run, one
writer each), which `--status` folds in.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from backend.errors import DifflensError
from backend.fileio import atomic_write_json
from backend.sweep.grid import SweepPlan, SweepRun

SWEEP_FILE = "sweep.json"
SWEEP_VERSION = 1
STATUSES = ("pending", "running", "done", "failed", "submitted")
"""A run's status: not started; started (or interrupted: the next call resumes it); finished; stopped with an
error (`error` says which); handed to SLURM (its job's state is in `job_state`)."""


def sweeps_root(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / "sweeps"


def sweep_dir(runs_dir: str | Path, name: str) -> Path:
    return sweeps_root(runs_dir) / name


def sweep_path(runs_dir: str | Path, name: str) -> Path:
    return sweep_dir(runs_dir, name) / SWEEP_FILE


def task_status_path(directory: Path, run: str) -> Path:
    return directory / "status" / f"{run}.json"


def new_manifest(plan: SweepPlan) -> dict:
    return {
        "sweep_version": SWEEP_VERSION, "name": plan.name, "created": time.time(), "config_file": plan.config_file,
        "sets": plan.sets, "base": plan.base, "grid": plan.grid, "executor": "", "profile": "",
        "runs": [{"name": r.name, "overrides": r.overrides, "status": "pending", "error": "", "seconds": None,
                  "finished": None, "job_id": "", "job_state": ""} for r in plan.runs],
    }


def read_sweep(path: str | Path) -> dict:
    """A sweep.json (one-line errors for a missing or unreadable one)."""
    path = Path(path)
    if not path.is_file():
        raise DifflensError(f"no sweep at {path.parent} (no {SWEEP_FILE}); start one with `python cli.py sweep "
                            "KEY=V1,V2 ...`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DifflensError(f"{path} cannot be read ({exc}); it is corrupt") from exc
    if not isinstance(data, dict) or data.get("sweep_version") != SWEEP_VERSION:
        raise DifflensError(f"{path} is not a sweep manifest of this difflens (sweep_version {SWEEP_VERSION})")
    return data


def write_sweep(path: str | Path, data: dict) -> None:
    atomic_write_json(path, data)


def plan_of(data: dict) -> SweepPlan:
    """The SweepPlan a sweep.json describes (for the tasks, which read nothing else)."""
    runs = [SweepRun(r["name"], r["overrides"]) for r in data["runs"]]
    return SweepPlan(data["name"], data["base"], data["grid"], runs, data.get("config_file"), data.get("sets") or {})


def open_sweep(plan: SweepPlan) -> tuple[Path, dict]:
    """(path, manifest) of the plan's sweep: the existing one when it is the same sweep (its statuses kept, so the
    sweep resumes), else a new one (not yet written). A sweep of the same name with another base config or grid is
    a one-line error."""
    path = sweep_path(plan.runs_dir, plan.name)
    if not path.exists():
        return path, new_manifest(plan)
    data = read_sweep(path)
    if data.get("base") != json.loads(json.dumps(plan.base)) or data.get("grid") != json.loads(json.dumps(plan.grid)):
        raise DifflensError(f"{path.parent} holds a sweep with another base config or grid; choose another --name (or "
                            f"delete {path.parent} and its runs)")
    return path, data


def run_record(data: dict, name: str) -> dict:
    for r in data["runs"]:
        if r["name"] == name:
            return r
    raise KeyError(name)


def set_status(path: Path, data: dict, name: str, status: str, **fields) -> None:
    """Record a run's status (and fields such as error, seconds, job_id) and write sweep.json."""
    assert status in STATUSES, status
    run_record(data, name).update(fields, status=status)
    write_sweep(path, data)
