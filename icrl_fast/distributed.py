"""Data-parallel runs under ``torchrun``: the process group, this process's place in it, and the few collectives the
trainer needs. A plain ``python -m icrl_fast.train`` is a world of one and touches no ``torch.distributed`` API.

``torchrun --nproc_per_node=N -m icrl_fast.train ...`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; the group
uses NCCL on CUDA and gloo on the CPU. Gradients are averaged by ``DistributedDataParallel`` (see ``train.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` data-parallel processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes the run directory (config, metrics, checkpoints, evaluation)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all processes (every rank gets it: a NaN anywhere stops every rank)."""
        if not self.distributed:
            return float(value.detach())
        t = value.detach().float().reshape(1).clone()
        dist.all_reduce(t)
        return float(t) / self.size

    def shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's share of a global batch (every ``size``-th item from ``rank``)."""
        return indices[self.rank:: self.size]


def world_size() -> int:
    """The number of processes ``torchrun`` started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str) -> tuple[World, str]:
    """Join the process group ``torchrun`` describes (if any); returns the world and this process's device."""
    size = world_size()
    if size == 1:
        return World(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank, size, local), device


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
