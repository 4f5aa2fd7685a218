"""Data parallelism through torch.distributed, as ``torchrun`` or ``accelerate launch`` start it.

We bring no engine of our own: the launcher sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the
rendezvous address, this module opens the process group (NCCL on GPUs, gloo on CPUs) and the loop wraps
its model in :class:`torch.nn.parallel.DistributedDataParallel`. Without those variables everything
below is a no-op, so a single process needs nothing special.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(hours=4)
"""Generous, because other ranks wait at a barrier while rank 0 annotates the data."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job; ``world == 1`` when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we opened the process group, so we close it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(*, use_cuda: bool) -> Ranks:
    """Join the process group the launcher describes (or the one already open); a no-op when alone."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def teardown(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def sum_over_ranks(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (for the logged loss and token counts)."""
    if not ranks.distributed:
        return values
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]
