"""Where and how the model trains: the device, the processes of a ``torchrun`` launch (DDP).

The trainer meets devices and processes only through one :class:`Strategy` (the role of Lightning
Fabric's ``fabric.setup`` / ``fabric.backward``): it prepares the model, runs the inner step's
forward through the right wrapper, applies the weighting's backward and the optimizer step, and
agrees values between processes. In a single process every collective returns at once.

Under ``torchrun`` every process runs the same loop on its shard of each global batch. The standard
inner step (a weighting that only defines ``combine``) goes through ``DistributedDataParallel``
(gradients reduced in buckets during backward; heads of tasks the weighting does not compute are
left out of it); a weighting that writes gradients itself (overrides ``backward``) bypasses DDP's
hooks, so the strategy averages the model's gradients after its ``backward``. The weighting's own
inner parameters (e.g. learned log-variances) are averaged in both cases. Loss means, the stop flag
and the finiteness checks are agreed between processes; only rank 0 logs and writes files.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from auxframe import distributed
from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, TaskLosses, Weighting


class Strategy:
    """The device and the process group of a run.

    Args:
        device: the device this process trains on (under ``torchrun``, the index is replaced by
            ``LOCAL_RANK``: see :func:`auxframe.distributed.init_from_env`).
        sync_batchnorm: under ``torchrun``, convert BatchNorm layers to SyncBatchNorm so that batch
            statistics are those of the global batch. None: on GPUs, unless the weighting takes
            outer steps (their second derivatives cannot pass through SyncBatchNorm).

    Example::

        strategy = Strategy(torch.device("cuda"))
        model = strategy.prepare_model(model, weighting)     # device, SyncBatchNorm
        strategy.setup(model, weighting)                      # DDP wrapper under torchrun
        outputs = strategy.train_model(x, tasks=[...])        # the inner step's forward
        strategy.backward(weighting, losses, ctx)
        strategy.optimizer_step(optimizer)
    """

    def __init__(self, device: torch.device, sync_batchnorm: bool | None = None):
        launch = distributed.init_from_env(torch.device(device))
        self.device = launch.device
        self.rank, self.world_size = launch.rank, launch.world_size
        self.writes = self.rank == 0  # logs, progress bar and files come from rank 0 only
        self.sync_batchnorm = sync_batchnorm
        # Checks are free on the CPU; on a GPU a check every step would synchronise it every step.
        self.check_each_step = self.device.type == "cpu"
        self.model: nn.Module | None = None
        self.train_model: nn.Module | None = None  # what the inner step's forward calls
        self.synced_parameters: list[nn.Parameter] = []  # gradients averaged over ranks after backward

    # -- the model -------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, weighting: Weighting) -> nn.Module:
        """The model on this process's device, with SyncBatchNorm under ``torchrun`` where it applies.

        Call it before the weighting's setup and the optimizer (they hold the model's parameters).
        """
        model = model.to(self.device)
        if self.world_size > 1 and self._use_sync_batchnorm(weighting):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def _use_sync_batchnorm(self, weighting: Weighting) -> bool:
        if self.sync_batchnorm is None:
            return self.device.type == "cuda" and not weighting.outer_every
        if self.sync_batchnorm and self.device.type != "cuda":
            raise ConfigError(
                "train.sync_batchnorm = True needs GPUs (PyTorch's SyncBatchNorm does not run on the CPU); "
                "set it to False, or leave it unset."
            )
        return bool(self.sync_batchnorm)

    def setup(self, model: nn.Module, weighting: Weighting) -> None:
        """Choose what the inner step's forward runs through (``DistributedDataParallel`` under
        ``torchrun`` for the standard inner step) and which gradients are averaged after backward."""
        self.model = self.train_model = model
        self.synced_parameters = []
        if self.world_size == 1:
            return
        from torch.nn.parallel import DistributedDataParallel

        own = list(weighting.inner_parameters())
        if type(weighting).backward is not Weighting.backward:
            self.synced_parameters = [p for p in model.parameters() if p.requires_grad] + own
            return
        needed = set(weighting.tasks_needed())
        unused = [f"heads.{t}.{n}" for t, head in model.heads.items() if t not in needed
                  for n, _ in head.named_parameters()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, unused)
        self.train_model = DistributedDataParallel(
            model, device_ids=[self.device] if self.device.type == "cuda" else None,
        )
        self.synced_parameters = own

    # -- the step --------------------------------------------------------------------------------
    def backward(self, weighting: Weighting, losses: TaskLosses, ctx: StepContext) -> None:
        """The weighting's backward, then the gradients DDP did not reduce averaged over ranks."""
        weighting.backward(losses, ctx)
        if self.synced_parameters:
            distributed.all_reduce_mean([p.grad for p in self.synced_parameters if p.grad is not None])

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """One step of the model's optimizer."""
        optimizer.step()

    # -- agreement between processes -------------------------------------------------------------
    def agree(self, sums: Mapping[str, torch.Tensor], stop: bool) -> tuple[dict[str, torch.Tensor], bool]:
        """Loss sums averaged over ranks, and whether any rank was asked to stop (one collective;
        in a single process, ``sums`` and ``stop`` as they are)."""
        if self.world_size == 1:
            return dict(sums), stop
        keys = list(sums)
        flat = torch.stack([*(sums[k].float() for k in keys), torch.tensor(float(stop), device=self.device)])
        distributed.all_reduce_mean([flat])
        return dict(zip(keys, flat[:-1])), bool(flat[-1] > 0)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank."""
        return distributed.all_reduce_any(flag, self.device)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order (a collective; ``[obj]`` in one process)."""
        return distributed.gather_objects(obj)

    def log_values(self) -> dict[str, float]:
        """Scalars for the training log rows (none yet)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume (nothing yet)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def all_gradients(optimizer: torch.optim.Optimizer) -> Sequence[torch.Tensor]:
    """The gradients of every parameter the optimizer updates (those that have one)."""
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
