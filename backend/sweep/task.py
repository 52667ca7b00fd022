"""One run of a sweep: its config from sweep.json (the base config under its combination), run-all on it (a finished
run is a no-op, an interrupted one resumes), and what became of it.

`run_task` is what a SLURM array task runs (submitit pickles a call to it): it reads only sweep.json, so a task
started anywhere that sees the runs directory runs the same run. Its rank 0 reports the end in
`sweeps/<name>/status/<run>.json`.
"""

from __future__ import annotations

import time
from pathlib import Path

from backend.errors import DifflensError
from backend.fileio import atomic_write_json
from backend.run.config import RunConfig
from backend.run.manifest import is_run
from backend.run.manifest import stage as stage_record
from backend.run.store import RunStore
from backend.sweep.grid import SweepPlan


def pipeline_stages(cfg: RunConfig) -> list[str]:
    """The stages run-all runs for cfg, in order."""
    stages = ["capture", "sae"] + (["features"] if cfg.sae.record_features else []) + ["analysis"]
    return stages + (["interventions"] if cfg.interventions.enabled else [])


def run_finished(cfg: RunConfig) -> bool:
    """Whether cfg's run directory holds a finished run-all of cfg (every stage done)."""
    if not is_run(cfg.out_dir):
        return False
    manifest = RunStore(cfg.out_dir).read_manifest() or {}
    return all(stage_record(manifest, s).get("status") == "done" for s in pipeline_stages(cfg))


def error_line(exc: BaseException) -> str:
    """A failed run's error in one line: a DifflensError's message, else the exception's type and first line."""
    if isinstance(exc, DifflensError):
        return str(exc)
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def run_one(plan: SweepPlan, name: str, progress: bool = True, share_from: list[Path] = ()) -> float:
    """Run-all one run of the plan (resuming it); with share_from, a run not yet started first takes the capture
    of the first of those run directories that captured the same (backend/sweep/share.py). Returns seconds."""
    from backend.stages.pipeline import run_all
    from backend.sweep.share import shared_capture_source, start_from_capture

    cfg = plan.config(plan.run(name))
    t0 = time.perf_counter()
    if share_from and not cfg.out_dir.exists():
        source = shared_capture_source(cfg, list(share_from))
        if source is not None:
            start_from_capture(cfg, source)
    run_all(cfg, progress=progress)
    return time.perf_counter() - t0


def run_task(sweep_json: str, name: str) -> dict:
    """A SLURM task: run one run of the sweep described by sweep_json; returns (and on rank 0 records) its status."""
    from backend.run import distributed
    from backend.sweep.manifest import plan_of, read_sweep, task_status_path

    path = Path(sweep_json)
    plan = plan_of(read_sweep(path))
    report = {"run": name, "status": "running", "error": "", "seconds": None, "finished": None}
    main = distributed.from_env().is_main
    try:
        report["seconds"] = round(run_one(plan, name), 3)
        report["status"] = "done"
    except Exception as exc:  # recorded for `sweep --status`, then submitit records the job as failed
        report.update(status="failed", error=error_line(exc))
        raise
    finally:
        report["finished"] = time.time()
        if main:
            atomic_write_json(task_status_path(path.parent, name), report)
    return report
