"""Data-parallel runs under ``torchrun``: the process group, this process's place in it, and the few collectives the
trainer needs. A plain ``python -m icrl_fast.train`` is a world of one and touches no ``torch.distributed`` API.

``torchrun --nproc_per_node=N -m icrl_fast.train ...`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; the group
uses NCCL on CUDA and gloo on the CPU. Gradients are averaged by ``DistributedDataParallel`` (``--parallel ddp``,
the default: every process holds the whole model) or, with ``--parallel fsdp``, by FSDP2 (``fully_shard``: a
pretrained model's decoder layers and embeddings are sharded over the processes, for models that do not fit one
GPU; see ``QNetwork.shard``). Sharded tensors are gathered for checkpoints (``full``) and before the evaluation.
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
        """The mean of a scalar over all processes (every rank gets it: a NaN anywhere stops every rank). The value
        may live anywhere (a rollout's statistic is a CPU tensor): it is reduced on the collective's device, since
        NCCL reduces CUDA tensors only."""
        if not self.distributed:
            return float(value.detach())
        t = value.detach().float().reshape(1).to(collective_device())
        dist.all_reduce(t)
        return float(t) / self.size

    def key(self) -> tuple[int, ...]:
        """What makes this process's random streams its own: ``(rank,)`` under torchrun, nothing in a world of one
        (so a single process draws exactly what it always drew)."""
        return (self.rank,) if self.distributed else ()

    def shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's share of a global batch (every ``size``-th item from ``rank``)."""
        return indices[self.rank:: self.size]


def collective_device() -> torch.device:
    """Where tensors handed to this process group's collectives must live: this process's GPU under NCCL, else the
    CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_size() -> int:
    """The number of processes ``torchrun`` started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank among the processes ``torchrun`` started (0 without torchrun; torchrun always sets
    ``RANK`` beside ``WORLD_SIZE``)."""
    return int(os.environ["RANK"]) if world_size() > 1 else 0


def setup(device: str) -> tuple[World, str]:
    """Join the process group ``torchrun`` describes (if any); returns the world and this process's device."""
    size = world_size()
    if size == 1:
        return World(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank(), size, local), device


def gather_objects(world: World, obj) -> list:
    """``obj`` of every process, in rank order (a collective); ``[obj]`` in a world of one."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def mesh(world: World, device: str):
    """The 1-D device mesh of all processes (FSDP2 shards over it)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(torch.device(device).type, (world.size,))


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective: every process must call it), else ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, present on every process) laid out like ``ref``: this process's shard when
    ``ref`` is sharded (no communication), else ``value`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(ref, DTensor):
        return value
    return distribute_tensor(value.to(ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
