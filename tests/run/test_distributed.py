"""Scale-out from the launcher's environment: which variables are trusted (torchrun, an srun step, not the batch
step), the GPU of each process, and the collective timeout. Launchers are simulated with environment variables;
CUDA and the process group are mocked where the CPU cannot run them, and a real gloo group checks the srun path."""

import datetime
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from backend.errors import DifflensError
from backend.run import distributed
from backend.run.distributed import Dist, from_env, local_device

LAUNCH_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
               "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEPID", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_LAUNCH_NODE_IPADDR", "DIFFLENS_DIST_TIMEOUT_MIN", "SLURM_JOB_ID", "SLURM_JOBID"]
TIMEOUT_ENV = "DIFFLENS_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT = datetime.timedelta(minutes=120)


@pytest.fixture
def env(monkeypatch):
    """A clean launch environment: set(**vars) simulates a launcher. Every launch variable is restored afterwards,
    also those distributed() sets itself (MASTER_ADDR, MASTER_PORT)."""
    for var in LAUNCH_VARS:
        monkeypatch.setenv(var, "")  # so that monkeypatch restores it (or removes it) after the test
        monkeypatch.delenv(var)

    def set_vars(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, str(v))

    return set_vars


TORCHRUN = dict(RANK=5, WORLD_SIZE=8, LOCAL_RANK=1)
SRUN_STEP = dict(SLURM_STEP_ID=0, SLURM_STEPID=0, SLURM_PROCID=3, SLURM_NTASKS=4, SLURM_STEP_NUM_TASKS=4,
                 SLURM_LOCALID=1)
# sbatch --ntasks=4: the batch script runs as task 0 of the batch step, with the job's task count
BATCH_STEP = dict(SLURM_PROCID=0, SLURM_NTASKS=4, SLURM_LOCALID=0)


def test_no_launcher_is_one_process(env):
    assert from_env() == Dist()
    assert local_device("cuda") == "cuda"


def test_torchrun(env):
    env(**TORCHRUN)
    assert from_env() == Dist(5, 8, local_rank=1, launcher="torchrun")


def test_srun_step(env):
    env(**SRUN_STEP)
    assert from_env() == Dist(3, 4, local_rank=1, launcher="srun")


def test_srun_torchrun_trusts_torchrun(env):
    """srun torchrun (docs/capture.sbatch): SLURM's variables describe the launcher task, torchrun's this process."""
    env(**SRUN_STEP, **TORCHRUN)
    assert from_env() == Dist(5, 8, local_rank=1, launcher="torchrun")


def test_srun_preserve_env_counts_the_step(env):
    """srun --preserve-env keeps the allocation's SLURM_NTASKS; SLURM_STEP_NUM_TASKS is always the step's."""
    env(**SRUN_STEP | dict(SLURM_NTASKS=16, SLURM_STEP_NUM_TASKS=4))
    assert from_env().world == 4


@pytest.mark.parametrize("step_id", [None, "batch", "-5", "4294967291", "-2", "4294967294", "4294967290", "-6",
                                     "4294967292"])
def test_batch_step_is_one_process(env, step_id):
    """python cli.py in an sbatch script with --ntasks=4: the batch step (and the salloc interactive and extern
    steps) carry SLURM_PROCID / SLURM_NTASKS but are one process; a world of 4 would wait for ranks that never
    start. Special step ids are >= 0xfffffff0 (printed signed by some Slurm versions)."""
    env(**BATCH_STEP)
    if step_id is not None:
        env(SLURM_STEP_ID=step_id, SLURM_STEPID=step_id)
    assert from_env() == Dist()
    assert local_device("cuda") == "cuda"


def test_old_slurm_step_id_name(env):
    """SLURM_STEPID alone (older Slurm) marks an srun step too."""
    env(**{k: v for k, v in SRUN_STEP.items() if k != "SLURM_STEP_ID"})
    assert from_env().world == 4


@pytest.mark.parametrize("launch, expected", [(TORCHRUN, "cuda:1"), (SRUN_STEP, "cuda:1"),
                                              (SRUN_STEP | dict(SLURM_LOCALID=3), "cuda:3")])
def test_cuda_maps_to_the_local_rank(env, monkeypatch, launch, expected):
    env(**launch)
    for count in (0, 4):  # the CPU test machine (no CUDA) and a node with 4 visible GPUs
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        assert local_device("cuda") == expected
        assert local_device("cpu") == "cpu"
        assert local_device("cuda:2") == "cuda:2"  # an explicit device is kept


def test_cuda_bound_to_one_gpu_per_task(env, monkeypatch):
    """srun --gpus-per-task=1 (or --gpu-bind) leaves each task one visible GPU: it is cuda:0 for every task."""
    env(**SRUN_STEP | dict(SLURM_LOCALID=3))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert local_device("cuda") == "cuda:0"


def test_more_processes_than_gpus_is_an_error(env, monkeypatch):
    env(**SRUN_STEP | dict(SLURM_LOCALID=3))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DifflensError, match="local rank 3.*2 GPUs"):
        local_device("cuda")


class FakeGroup:
    """Records init_process_group / set_device calls instead of starting a process group."""

    def __init__(self, monkeypatch, gpus=4):
        self.init = []
        self.set_device = []
        self.destroyed = 0
        self.initialized = False
        td = torch.distributed

        def init_process_group(backend=None, init_method=None, timeout=None, world_size=-1, rank=-1, store=None,
                               group_name="", pg_options=None, device_id=None):
            self.init.append(dict(backend=backend, timeout=timeout, world_size=world_size, rank=rank,
                                  device_id=device_id))
            self.initialized = True

        def destroy_process_group(group=None):
            self.destroyed += 1
            self.initialized = False

        monkeypatch.setattr(td, "init_process_group", init_process_group)
        monkeypatch.setattr(td, "destroy_process_group", destroy_process_group)
        monkeypatch.setattr(td, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.set_device.append(torch.device(d)))


@pytest.mark.parametrize("launch", [TORCHRUN, SRUN_STEP], ids=["torchrun", "srun"])
def test_cuda_group_binds_the_local_gpu(env, monkeypatch, launch):
    """Every process sets its own GPU and binds the NCCL group to it (else all land on GPU 0)."""
    env(**launch)
    group = FakeGroup(monkeypatch)
    with distributed.distributed("cuda") as dist:
        assert dist.local_rank == 1
    (call,) = group.init
    assert call["backend"] == "nccl"
    assert (call["rank"], call["world_size"]) == (dist.rank, dist.world)
    assert call["device_id"] == torch.device("cuda", 1)
    assert group.set_device == [torch.device("cuda", 1)]
    assert group.destroyed == 1


def test_device_id_only_where_torch_accepts_it(env, monkeypatch):
    """torch < 2.3 has no device_id argument: the GPU is still set, the argument left out."""
    env(**SRUN_STEP)
    group = FakeGroup(monkeypatch)
    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend=None, init_method=None, timeout=None, world_size=-1, rank=-1:
                        calls.append(dict(backend=backend, timeout=timeout)) or setattr(group, "initialized", True))
    with distributed.distributed("cuda"):
        pass
    assert calls == [dict(backend="nccl", timeout=DEFAULT_TIMEOUT)]
    assert group.set_device == [torch.device("cuda", 1)]


def test_cpu_group_sets_no_gpu(env, monkeypatch):
    env(**SRUN_STEP)
    group = FakeGroup(monkeypatch)
    with distributed.distributed("cpu"):
        pass
    (call,) = group.init
    assert call["backend"] == "gloo" and call["device_id"] is None and group.set_device == []


@pytest.mark.parametrize("launch", [TORCHRUN, SRUN_STEP], ids=["torchrun", "srun"])
def test_collective_timeout_is_long_and_settable(env, monkeypatch, launch):
    """Rank-0-only work (splice test, --overwrite of a large run) outlasts torch's 10-minute default while the
    other ranks wait at a barrier."""
    env(**launch)
    group = FakeGroup(monkeypatch)
    with distributed.distributed("cpu"):
        pass
    env(**{TIMEOUT_ENV: "45"})
    with distributed.distributed("cpu"):
        pass
    with distributed.distributed("cpu", timeout_min=7.5):  # the argument wins over the environment
        pass
    assert [c["timeout"] for c in group.init] == [DEFAULT_TIMEOUT,
                                                  datetime.timedelta(minutes=45),
                                                  datetime.timedelta(minutes=7.5)]


@pytest.mark.parametrize("bad", ["abc", "0", "-3"])
def test_bad_timeout_is_a_one_line_error(env, monkeypatch, bad):
    env(**SRUN_STEP, **{TIMEOUT_ENV: bad})
    FakeGroup(monkeypatch)
    with pytest.raises(DifflensError, match=TIMEOUT_ENV), distributed.distributed("cpu"):
        pass


SRUN_JOB = SRUN_STEP | dict(SLURM_JOB_ID=4_123_457, SLURM_LAUNCH_NODE_IPADDR="10.0.0.7")


def test_srun_rendezvous_port_comes_from_the_job_id(env, monkeypatch):
    """Plain srun: two jobs on one node must not both listen on 29500; the port is derived from SLURM_JOB_ID."""
    env(**SRUN_JOB)
    FakeGroup(monkeypatch)
    with distributed.distributed("cpu"):
        assert os.environ["MASTER_ADDR"] == "10.0.0.7"
        assert os.environ["MASTER_PORT"] == str(10_000 + 4_123_457 % 20_000) == "13457"
    assert distributed.master_port({"SLURM_JOB_ID": "4123458"}) == "13458"  # the next job: another port
    assert distributed.master_port({"SLURM_JOBID": "7"}) == "10007"  # the old variable name
    assert distributed.master_port({}) == "29500"  # outside a Slurm job: torch's usual port
    assert distributed.master_port({"SLURM_JOB_ID": "12_3"}) == "29500"  # not a number (arrays use their own id)


@pytest.mark.parametrize("given", [dict(MASTER_PORT=31000), dict(MASTER_ADDR="10.0.0.9", MASTER_PORT=31000)])
def test_a_given_master_port_wins(env, monkeypatch, given):
    env(**SRUN_JOB, **given)
    FakeGroup(monkeypatch)
    with distributed.distributed("cpu"):
        assert os.environ["MASTER_PORT"] == "31000"
        assert os.environ["MASTER_ADDR"] == given.get("MASTER_ADDR", "10.0.0.7")


def test_master_addr_without_port_gets_the_job_port(env, monkeypatch):
    """MASTER_ADDR set by the job script but no MASTER_PORT: torch's env:// rendezvous needs both."""
    env(**SRUN_JOB, MASTER_ADDR="10.0.0.9")
    FakeGroup(monkeypatch)
    with distributed.distributed("cpu"):
        assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.9", "13457")


def test_one_process_starts_no_group(env, monkeypatch):
    env(**BATCH_STEP | dict(SLURM_STEP_ID="-5"))
    group = FakeGroup(monkeypatch)
    with distributed.distributed("cuda") as dist:
        assert dist.world == 1
    assert group.init == [] and group.set_device == []


WORKER = """
import datetime, sys
import torch
from backend.run import distributed
with distributed.distributed("cpu") as dist:
    t = torch.tensor([float(dist.rank + 1)])
    if dist.world > 1:
        torch.distributed.all_reduce(t)
    print(dist.rank, dist.world, dist.local_rank, int(t.item()), distributed.local_device("cuda"), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(env_per_task: list[dict], timeout=120) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    base |= dict(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), SLURM_LAUNCH_NODE_IPADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], env=base | {k: str(v) for k, v in task.items()},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for task in env_per_task]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    return [out.strip() for out, _ in outs]


def test_real_srun_step_with_gloo():
    """Two tasks of a simulated srun step form a real gloo group (rendezvous at the launch node)."""
    tasks = [dict(SLURM_STEP_ID=0, SLURM_PROCID=i, SLURM_NTASKS=2, SLURM_STEP_NUM_TASKS=2, SLURM_LOCALID=i)
             for i in range(2)]
    assert launch(tasks) == ["0 2 0 3 cuda:0", "1 2 1 3 cuda:1"]


def test_real_batch_step_does_not_wait():
    """python cli.py in the batch script of an --ntasks=2 job runs alone instead of waiting for a rank 1."""
    assert launch([dict(SLURM_STEP_ID="-5", SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_LOCALID=0)],
                  timeout=60) == ["0 1 0 1 cuda"]
