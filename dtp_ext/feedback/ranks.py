"""The torch.distributed calls of the feedback phase (docs/feedback_trainer.md §6)."""

from __future__ import annotations

import torch


def process_group_size() -> int:
    """The ranks of the initialised default process group; 1 without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def process_rank() -> int:
    """This process's rank in the initialised default process group; 0 without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over every rank, in place."""
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def average_across_ranks(tensors, world: int):
    """Each of `tensors` averaged over the `world` ranks, in place."""
    for t in tensors:
        sum_across_ranks(t)
        t.div_(world)
