"""Rank, world size and local rank for scale-out, from the launcher's environment; the process group and GPU.

Which variables are trusted, first match wins:

- torchrun (any launcher that sets RANK and WORLD_SIZE): RANK, WORLD_SIZE and LOCAL_RANK. They win over SLURM's,
  which under `srun torchrun` describe the torchrun launcher task, not this process.
- srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS; `srun --preserve-env` keeps the allocation's
  SLURM_NTASKS) and SLURM_LOCALID, but only inside an srun job step, i.e. when SLURM_STEP_ID (SLURM_STEPID on old
  Slurm) is a normal step id, 0 <= id < 0xfffffff0. The batch script itself runs in the *batch* step, which also
  carries SLURM_PROCID=0, SLURM_LOCALID=0 and the job's SLURM_NTASKS, but a special step id (0xfffffffb, or
  0xfffffffe before Slurm 20.11; some versions print it signed, -5) or none. So does salloc's interactive step
  (0xfffffffa). A plain `python cli.py` there is one process, not rank 0 of a world that never starts.
- otherwise: one process.

Stages run unchanged under either launcher: the run's batches (of batch_size generations, in gen_id order) are
shared out, batch i to rank `i % world`.
`--device cuda` becomes this process's GPU, `cuda:<local rank>` (`cuda:0` when the task sees one GPU, as under
`srun --gpus-per-task=1`); distributed() sets it as the current CUDA device and binds the NCCL group to it.
Collectives wait DIFFLENS_DIST_TIMEOUT_MIN minutes (default 120) before failing: rank-0-only work (the splice test,
deleting a large run for --overwrite) can outlast torch's 10-minute default while the other ranks wait at a barrier.
Under plain srun the rendezvous is MASTER_ADDR:MASTER_PORT when set, else the launch node
(SLURM_LAUNCH_NODE_IPADDR) on a port derived from the job id (master_port), so two jobs sharing a node do not
both listen on torch's usual 29500.
"""

from __future__ import annotations

import datetime
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from backend.errors import DifflensError

TIMEOUT_ENV = "DIFFLENS_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 120.0
SLURM_MAX_NORMAL_STEP_ID = 0xFFFFFFF0
"""Step ids from here up are Slurm's special steps (batch, extern, interactive, pending)."""
DEFAULT_MASTER_PORT = 29500
"""The rendezvous port outside a Slurm job (torch's usual one)."""
JOB_PORT_BASE, JOB_PORT_SPAN = 10_000, 20_000
"""In a Slurm job the port is JOB_PORT_BASE + SLURM_JOB_ID % JOB_PORT_SPAN: 10000-29999, below Linux's ephemeral
range (32768-60999) so it never collides with an outgoing connection's port, and different for jobs whose ids
differ by less than 20000."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    """This process's index on its node (its GPU)."""
    launcher: str = ""
    """torchrun, srun, or empty for a process started on its own."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, ids):
        """The ids this rank owns."""
        return [i for i in ids if i % self.world == self.rank]

    def barrier(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()


def in_srun_step(env=None) -> bool:
    """Whether this process is a task of an srun job step (not the batch script, not salloc's shell)."""
    env = os.environ if env is None else env
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    try:
        return step is not None and 0 <= int(step) < SLURM_MAX_NORMAL_STEP_ID
    except ValueError:  # e.g. "batch", "extern"
        return False


def from_env() -> Dist:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Dist(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if in_srun_step(env) and "SLURM_PROCID" in env:
        world = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
        if world is not None:
            return Dist(int(env["SLURM_PROCID"]), int(world), int(env.get("SLURM_LOCALID", 0)), "srun")
    return Dist()


def gpu_index(local_rank: int) -> int:
    """The CUDA index of this process's GPU: its local rank, or 0 when it sees a single GPU (Slurm bound one GPU
    per task, e.g. srun --gpus-per-task=1). With no GPU visible (CPU), the local rank."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if count and local_rank >= count:
        raise DifflensError(f"local rank {local_rank} but this node shows {count} GPUs: launch at most one "
                            f"process per GPU (torchrun --nproc_per_node / srun --ntasks-per-node)")
    return local_rank


def local_device(device: str) -> str:
    """`cuda` in a launched process (torchrun or srun) maps to its GPU, cuda:<index>; other devices are kept."""
    dist = from_env()
    if str(device) == "cuda" and dist.launcher:
        return f"cuda:{gpu_index(dist.local_rank)}"
    return str(device)


def device_problem(device: str) -> str | None:
    """Why this process cannot use a torch device (None when it can): an unknown name, CUDA missing from this torch
    build or not visible, a GPU index beyond the visible ones, no MPS."""
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        return f"unknown device {device!r}; use cpu, cuda, cuda:<index> or mps"
    if dev.type == "cuda":
        if torch.version.cuda is None and not torch.cuda.is_available():
            return (f"this torch ({torch.__version__}) is a CPU build without CUDA: install a CUDA build of torch "
                    "(README, section GPU)")
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to this process (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            return f"{dev} does not exist: this process sees {count} GPU(s), cuda:0..cuda:{count - 1}"
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine"
    return None


def check_device(device: str, whose: str = "") -> None:
    """A one-line DifflensError when device_problem(device) finds one; `whose` names where the device came from
    (e.g. "the run's device"), and the error then says how to choose another."""
    problem = device_problem(device)
    if problem:
        origin = f" ({whose}; pass --device cpu to use the CPU)" if whose else ""
        raise DifflensError(f"device {device!r}{origin}: {problem}")


def master_port(env=None) -> str:
    """The rendezvous port when MASTER_PORT is not set: in a Slurm job 10000 + SLURM_JOB_ID % 20000 (two jobs on
    one node get different ports), else 29500."""
    env = os.environ if env is None else env
    job = str(env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", ""))).strip()
    if job.isdigit():
        return str(JOB_PORT_BASE + int(job) % JOB_PORT_SPAN)
    return str(DEFAULT_MASTER_PORT)


def timeout_minutes(timeout_min: float | None = None) -> float:
    """The collective timeout: the argument, else DIFFLENS_DIST_TIMEOUT_MIN, else 120 minutes."""
    if timeout_min is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT_MIN
        try:
            timeout_min = float(raw)
        except ValueError:
            timeout_min = float("nan")
        if not timeout_min > 0:
            raise DifflensError(f"{TIMEOUT_ENV} must be a positive number of minutes, got {raw!r}")
    if not timeout_min > 0:
        raise DifflensError(f"the collective timeout must be a positive number of minutes, got {timeout_min!r}")
    return float(timeout_min)


@contextmanager
def distributed(device: str = "cpu", timeout_min: float | None = None):
    """Yield this process's Dist, with a process group (gloo on CPU, nccl on CUDA) when world > 1.

    On CUDA the process's GPU becomes the current device and the group is bound to it (device_id, where torch
    accepts it), so NCCL never falls back to GPU 0. Collectives time out after timeout_minutes(timeout_min).
    """
    dist = from_env()
    started = False
    if dist.world > 1 and not torch.distributed.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes(timeout_min))
        # torchrun sets both; under srun: the launch node, on a port of this job (see master_port)
        os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", master_port())
        cuda = str(device).startswith("cuda")
        kwargs = {}
        if cuda and torch.cuda.is_available():
            gpu = torch.device(local_device(device) if str(device) == "cuda" else device)
            torch.cuda.set_device(gpu)
            if "device_id" in inspect.signature(torch.distributed.init_process_group).parameters:
                kwargs["device_id"] = gpu
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=dist.rank, world_size=dist.world,
                                             timeout=timeout, **kwargs)
        started = True
    try:
        yield dist
    finally:
        if started:
            torch.distributed.destroy_process_group()
