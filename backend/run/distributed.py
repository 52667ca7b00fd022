"""Rank and world size for scale-out: from torchrun (RANK, WORLD_SIZE) or SLURM (SLURM_PROCID, SLURM_NTASKS).

Stages run unchanged under either: each rank takes the generations with `gen_id % world == rank`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, ids):
        """The ids this rank owns."""
        return [i for i in ids if i % self.world == self.rank]

    def barrier(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()


def from_env() -> Dist:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Dist(int(env["RANK"]), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return Dist(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]))
    return Dist()


@contextmanager
def distributed(device: str = "cpu"):
    """Yield this process's Dist, with a process group (gloo on CPU, nccl on CUDA) when world > 1."""
    dist = from_env()
    started = False
    if dist.world > 1 and not torch.distributed.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
            os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend, rank=dist.rank, world_size=dist.world)
        started = True
    try:
        yield dist
    finally:
        if started:
            torch.distributed.destroy_process_group()


def local_device(device: str) -> str:
    """cuda under a multi-GPU launch maps to cuda:<LOCAL_RANK>."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device
