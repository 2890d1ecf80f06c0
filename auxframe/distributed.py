"""Process-group helpers for runs under ``torchrun`` (PyTorch DDP); no-ops in a single process.

Weighting methods call these on every quantity they derive from gradients or losses of the local
batch (task weights, inner products, hypergradients), so that every rank holds the same values at
every step. Outside ``torch.distributed`` (the usual single-process run) each function returns at
once and costs nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Whether this process writes logs and checkpoints (rank 0)."""
    return rank() == 0


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its mean over all processes (one flat collective).

    Args:
        tensors: tensors of any shapes on this process's device; updated in place.
    """
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.detach().copy_(flat[offset : offset + n].view_as(t))
        offset += n


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor, in place, with rank ``src``'s value."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t.detach(), src=src)
