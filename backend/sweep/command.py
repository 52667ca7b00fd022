"""`python cli.py sweep`: validate everything (grid, configs, profile, run directories), then run the sweep here,
submit it to SLURM, print what would be submitted (--dry-run), or report its status (--status).

Nothing is written before every check has passed: a refused sweep leaves no sweep.json and no run behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from backend.errors import DifflensError
from backend.sweep.checks import check_models, check_run_dirs
from backend.sweep.grid import plan_sweep
from backend.sweep.manifest import (
    open_sweep,
    plan_of,
    read_sweep,
    run_record,
    sweep_path,
    task_status_path,
    write_sweep,
)
from backend.sweep.profiles import load_profile

EXECUTORS = ("local", "slurm")


@dataclass
class SweepResult:
    path: Path
    """The sweep's sweep.json."""
    runs: list[dict] = field(default_factory=list)
    """Its run records (name, overrides, status, error, seconds, job_id, job_state)."""
    failed: list[str] = field(default_factory=list)
    script: str = ""
    """--dry-run on SLURM: the sbatch script that would be submitted."""
    dry_run: bool = False
    jobs: list = field(default_factory=list)
    """submitit's jobs, when submitted."""


def run_sweep(grid_items: list[str], config_file: str | Path | None = None, sets: dict | None = None,
              name: str | None = None, executor: str = "local", profile: str | None = None, dry_run: bool = False,
              progress: bool = True, echo: Callable[[str], None] = print, cluster: str = "slurm") -> SweepResult:
    """Plan and validate the sweep, then run it (local), submit it (slurm; `cluster="local"` runs the same array
    with submitit's LocalExecutor) or, with dry_run, only say what would be done."""
    if executor not in EXECUTORS:
        raise DifflensError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    if executor == "slurm" and not profile:
        from backend.sweep.profiles import profile_names

        raise DifflensError(f"--executor slurm needs --profile NAME (profiles: {', '.join(profile_names())}, or a path "
                            "to a .toml)")
    infra = load_profile(profile or "local")
    plan = plan_sweep(grid_items, config_file, sets, name)
    check_run_dirs(plan)
    if executor == "local":
        check_models(plan)
    path, data = open_sweep(plan)
    result = SweepResult(path, data["runs"], dry_run=dry_run)
    if executor == "slurm":
        from backend.sweep import slurm

        folder = slurm.submitit_folder(path.parent)
        todo = _unfinished(data, plan, cluster)
        if dry_run:
            result.script = slurm.submission_script(infra, folder, f"difflens-{plan.name}", max(len(todo), 1))
            result.runs = [r for r in data["runs"] if r["name"] in todo]
            return result
        job = slurm.make_executor(infra, folder, f"difflens-{plan.name}", cluster=cluster)
        data.update(executor="slurm", profile=profile, cluster=cluster, submitit_folder=str(folder))
        write_sweep(path, data)
        jobs = slurm.submit(job, path, todo) if todo else []
        for run_name, submitted in zip(todo, jobs, strict=True):
            run_record(data, run_name).update(status="submitted", job_id=str(submitted.job_id), job_state="",
                                              error="")
        write_sweep(path, data)
        result.jobs = jobs
        return result
    if dry_run:
        return result
    from backend.sweep.local import run_local

    data["profile"] = profile or "local"
    write_sweep(path, data)
    result.failed = run_local(plan, path, data, threads=infra.cpus_per_task, progress=progress, echo=echo)
    return result


def _unfinished(data: dict, plan, cluster: str) -> list[str]:
    """Runs to submit: not finished, and not queued or running already."""
    from backend.sweep.slurm import ACTIVE_STATES
    from backend.sweep.task import run_finished

    refresh(data, cluster_default=cluster)
    return [r["name"] for r in data["runs"]
            if not run_finished(plan.config(plan.run(r["name"]))) and r.get("job_state") not in ACTIVE_STATES]


def refresh(data: dict, directory: Path | None = None, cluster_default: str = "slurm") -> dict:
    """Each run's status from what exists: its run directory (finished?), its task's report
    (sweeps/<name>/status/<run>.json) and its job's state (submitit), in the run records of data."""
    from backend.sweep.slurm import FAILED_STATES, job_state
    from backend.sweep.task import run_finished

    plan = plan_of(data)
    directory = directory or sweep_path(plan.runs_dir, plan.name).parent
    cluster = data.get("cluster") or cluster_default
    for record in data["runs"]:
        if record.get("job_id") and data.get("submitit_folder"):
            record["job_state"] = job_state(data["submitit_folder"], record["job_id"], cluster)
        report = task_status_path(directory, record["name"])
        if run_finished(plan.config(plan.run(record["name"]))):
            record.update(status="done", error="")
            continue
        if report.is_file():
            task = json.loads(report.read_text())
            if task.get("status") == "failed":
                record.update(status="failed", error=task.get("error", ""))
                continue
        state = record.get("job_state", "")
        if state == "RUNNING":
            record["status"] = "running"
        elif record.get("job_id") and state in FAILED_STATES:
            record.update(status="failed", error=f"job {record['job_id']} ended {state}; submit the sweep again to "
                                                 "resume the run")
    return data


def sweep_status(runs_dir: str | Path, name: str) -> SweepResult:
    """A sweep's runs with their status refreshed (run directories, task reports, job states); sweep.json is
    updated."""
    path = sweep_path(runs_dir, name)
    data = refresh(read_sweep(path), path.parent)
    write_sweep(path, data)
    return SweepResult(path, data["runs"], failed=[r["name"] for r in data["runs"] if r["status"] == "failed"])
