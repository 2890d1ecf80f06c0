"""Process-group helpers for runs under ``torchrun`` (PyTorch DDP); no-ops in a single process.

Weighting methods call these on every quantity they derive from gradients or losses of the local
batch (task weights, inner products, hypergradients), so that every rank holds the same values at
every step. Outside ``torch.distributed`` (the usual single-process run) each function returns at
once and costs nothing.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself: DistributedDataParallel keeps it in ``.module``."""
    return getattr(model, "module", model)


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


def all_reduce_any(flag: bool, device: torch.device | None = None) -> bool:
    """Whether ``flag`` is true on any process (the flag itself outside a process group).

    Args:
        flag: this process's value.
        device: where the collective runs (the process's device; NCCL needs CUDA tensors).
    """
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` outside a process group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def share_from_main(compute: Callable[[], Any]) -> Any:
    """Run ``compute`` on rank 0 only and give its result, or its error, to every process.

    Rank 0 alone touches shared state (the run directory and its lock, the checkpoint to resume);
    the other processes receive what it found. An error raised on rank 0 is raised on every rank
    (an :class:`~auxframe.errors.AuxframeError` with the same type and message, any other as an
    ``AuxframeError`` naming it), so that no process waits forever for rank 0.

    Args:
        compute: called without arguments on rank 0; its result must be picklable.

    Returns:
        ``compute()``'s result, on every process.
    """
    from auxframe import errors

    if not is_distributed():
        return compute()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", compute())
        except Exception as err:  # whatever stops rank 0 must stop the others too
            box[0] = ("error", type(err).__name__, str(err) if isinstance(err, errors.AuxframeError)
                      else f"rank 0 failed: {type(err).__name__}: {err}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        error_type = getattr(errors, box[0][1], None)
        if not (isinstance(error_type, type) and issubclass(error_type, errors.AuxframeError)) or (
            error_type is errors.PluginLoadError  # its constructor takes the plugin's details
        ):
            error_type = errors.AuxframeError
        raise error_type(box[0][2])
    return box[0][1]


@dataclass
class Launch:
    """How this process was started: its rank, the number of processes, and its device.

    Attributes:
        rank: global rank (0 without ``torchrun``).
        local_rank: rank on this machine, which picks the GPU.
        world_size: number of processes.
        device: this process's device.
        created_group: whether :func:`init_from_env` created the process group.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    created_group: bool = False


def launched_by_torchrun() -> bool:
    """Whether the environment asks for more than one process (``WORLD_SIZE`` > 1, as torchrun sets)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> Launch:
    """Join the process group ``torchrun`` describes in the environment, if any.

    Reads ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Uses NCCL
    when ``device`` is CUDA (each process then takes GPU ``LOCAL_RANK``) and gloo on the CPU. A
    group that the caller already initialised is used as it is. Other ranks' standard output is
    silenced, so that tables and results are printed once; their errors still reach stderr.

    Args:
        device: the device the run asked for (``cuda`` or ``cpu``; the index is replaced by
            ``LOCAL_RANK`` under torchrun).

    Returns:
        A :class:`Launch`.
    """
    if not launched_by_torchrun() and not is_distributed():
        return Launch(0, 0, 1, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            from auxframe.errors import ConfigError

            raise ConfigError(
                f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPU(s); start "
                f"at most that many processes per machine (torchrun --nproc_per_node)."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        atexit.register(_destroy)
        created = True
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    return Launch(dist.get_rank(), local_rank, dist.get_world_size(), device, created)


def _destroy() -> None:
    """Leave the process group at exit, after the other ranks arrive: a rank tearing gloo down while
    another still talks to it can abort the process ("terminate called without an active
    exception"). A rank that never arrives (it crashed) is waited for at most a minute."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        else:
            dist.barrier()
    except Exception:  # noqa: BLE001 - a missing peer must not keep this one from exiting
        pass
    dist.destroy_process_group()
