"""The SLURM executor: a sweep's unfinished runs as one submitit job array, one task per run, each running
backend/sweep/task.py run_task (run-all on its run: a resubmitted run resumes). The resources come from an
infrastructure profile (profiles.py); a run with tasks_per_node > 1 is that many processes under srun, which the run
sees as ranks (SLURM_PROCID, backend/run/distributed.py).

submitit (the `cluster` extra) is imported only here, when a sweep is submitted, dry-run or asked for its status.
`cluster="local"` uses submitit's LocalExecutor instead (the same pickled tasks as subprocesses of this machine: how
the tests run this path without a cluster).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from backend.errors import DifflensError
from backend.sweep.profiles import InfraProfile

ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING")
"""SLURM job states of a task that is still queued or running (it is not submitted again)."""
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                 "DEADLINE")
"""SLURM job states of a task that ended without finishing its run (submitting the sweep again resumes it)."""


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise DifflensError("the slurm executor needs submitit: pip install -e '.[cluster]' (or pip install "
                            "submitit==1.5.4)") from None
    return submitit


def submitit_folder(sweep_dir: Path) -> Path:
    """Where submitit keeps the array's pickles and logs (under the sweep: a filesystem every node sees)."""
    return (sweep_dir / "submitit").absolute()


def sbatch_parameters(profile: InfraProfile, job_name: str) -> dict:
    """The profile as submitit SlurmExecutor parameters (its sbatch options; empty settings are left out)."""
    params = {"job_name": job_name, "time": profile.time_minutes(), "nodes": profile.nodes,
              "ntasks_per_node": profile.tasks_per_node, "cpus_per_task": profile.cpus_per_task,
              "array_parallelism": profile.array_parallelism, "setup": list(profile.setup)}
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(profile, key):
            params[key] = getattr(profile, key)
    if profile.gpus_per_node:
        params["gpus_per_node"] = profile.gpus_per_node
    if profile.mem_gb:
        mem = profile.mem_gb
        params["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    return params


def submission_command(folder: Path) -> str:
    """What each array task runs (submitit's own: it unpickles and calls the task's function)."""
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def submission_script(profile: InfraProfile, folder: Path, job_name: str, n_runs: int) -> str:
    """The sbatch script submitit writes for an array of n_runs tasks (what --dry-run prints)."""
    import_submitit()
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=submission_command(folder), folder=folder, map_count=n_runs,
                               **sbatch_parameters(profile, job_name))


def make_executor(profile: InfraProfile, folder: Path, job_name: str, cluster: str = "slurm"):
    """A submitit executor for the profile: SlurmExecutor (needs sbatch/srun on PATH), or LocalExecutor."""
    submitit = import_submitit()
    if cluster == "slurm":
        try:
            executor = submitit.SlurmExecutor(folder=folder)
        except RuntimeError as exc:
            raise DifflensError(f"cannot submit to SLURM from here ({exc}); run on a login node, or use --dry-run to "
                                "see the script") from exc
        executor.update_parameters(**sbatch_parameters(profile, job_name))
        return executor
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=profile.time_minutes(), tasks_per_node=profile.tasks_per_node,
                               gpus_per_node=profile.gpus_per_node)
    return executor


def submit(executor, sweep_json: Path, names: list[str]) -> list:
    """Submit one task per run name (an array); returns submitit's jobs, in names' order."""
    from backend.sweep.task import run_task

    return executor.map_array(run_task, [str(sweep_json.absolute())] * len(names), names)


def job_state(folder: str, job_id: str, cluster: str) -> str:
    """A submitted task's state as submitit reports it (sacct on SLURM; UNKNOWN when it cannot tell)."""
    submitit = import_submitit()
    if cluster == "slurm":
        state = str(submitit.SlurmJob(folder=folder, job_id=job_id).state)
    else:
        from submitit.local.local import LocalJob

        state = str(LocalJob(folder=folder, job_id=job_id).state)
    return re.sub(r" by \d+$", "", state.strip()).upper()  # sacct says "CANCELLED by <uid>"
