"""The local executor: a sweep's runs one after another in this process, each through run-all.

Resumable like run-all: a finished run is skipped, an interrupted one (status "running") resumes where it stopped.
A run that fails is marked "failed" with its error (the traceback of an unexpected one goes to
`sweeps/<name>/logs/<run>.txt`) and the next run starts; the caller exits non-zero at the end. A run whose capture
would repeat an earlier run's starts from it (backend/sweep/share.py): a sweep over `sae.*` keys captures once.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path

from backend.errors import DifflensError
from backend.fileio import atomic_write_text
from backend.sweep.grid import SweepPlan
from backend.sweep.manifest import run_record, set_status
from backend.sweep.task import error_line, run_finished, run_one

FIGURE = "metrics.png"
"""sweeps/<name>/metrics.png: FVU and concept recovery against the first numeric swept key (figure.py)."""


def _eta(durations: list[float], remaining: int) -> str:
    if not durations:
        return ""
    seconds = sum(durations) / len(durations) * remaining
    return f", ETA {int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_local(plan: SweepPlan, path: Path, data: dict, threads: int = 0, progress: bool = True,
              echo: Callable[[str], None] = print) -> list[str]:
    """Run (or resume) every run of the plan in order, recording each status in sweep.json (path, data); returns
    the names of the runs that failed."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    data["executor"] = "local"
    n, durations, failed = len(plan.runs), [], []
    dirs = [plan.config(r).out_dir for r in plan.runs]
    for i, run in enumerate(plan.runs):
        cfg = plan.config(run)
        label = f"[{i + 1}/{n}] {run.name}"
        if run_finished(cfg):
            if run_record(data, run.name)["status"] != "done":
                set_status(path, data, run.name, "done", error="")
            echo(f"{label}: finished already, skipped")
            continue
        resumed = run_record(data, run.name)["status"] == "running"
        todo = sum(1 for r in plan.runs[i:] if not run_finished(plan.config(r)))
        settings = " ".join(f"{k}={v}" for k, v in run.overrides.items())
        echo(f"{label}: {settings}{' (resuming)' if resumed else ''}{_eta(durations, todo)}")
        set_status(path, data, run.name, "running", error="")
        try:
            seconds = run_one(plan, run.name, progress=progress, share_from=dirs[:i] + dirs[i + 1:])
        except Exception as exc:  # noqa: BLE001 - a failed run is recorded and the sweep goes on
            error = error_line(exc)
            if not isinstance(exc, DifflensError):
                log = path.parent / "logs" / f"{run.name}.txt"
                atomic_write_text(log, traceback.format_exc())
                error += f" (traceback: {log})"
            set_status(path, data, run.name, "failed", error=error, finished=time.time())
            echo(f"{label}: failed: {error}")
            failed.append(run.name)
            continue
        durations.append(seconds)
        set_status(path, data, run.name, "done", error="", seconds=round(seconds, 3), finished=time.time())
        echo(f"{label}: done in {seconds:.1f} s -> {cfg.out_dir}")
    if not failed:
        from backend.sweep.figure import write_sweep_figure

        figure = write_sweep_figure(plan, path.parent / FIGURE)
        if figure is not None:
            echo(f"figure: {figure}")
    return failed
