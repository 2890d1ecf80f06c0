"""Where and how the model trains: the device, the processes of a ``torchrun`` launch (DDP), the
numerical precision and the speed options.

The trainer meets devices, processes and precision only through one :class:`Strategy` (the role of
Lightning Fabric's ``fabric.setup`` / ``fabric.backward``): it prepares the model, gives the module
the inner step's forward runs through (``train_model``), applies the weighting's backward and the
optimizer step, and agrees values between processes. In a single process every collective
returns at once.

**Processes.** Under ``torchrun`` every process runs the same loop on its shard of each global
batch. The standard inner step (a weighting that only defines ``combine``) goes through
``DistributedDataParallel`` (gradients reduced in buckets during backward; heads of tasks the
weighting does not compute are left out of it); a weighting that writes gradients itself (overrides
``backward``) bypasses DDP's hooks, so the strategy averages the model's gradients after its
``backward``. The weighting's own inner parameters (e.g. learned log-variances) are averaged in both
cases. Loss means, the stop flag and the finiteness checks are agreed between processes; only rank
0 logs and writes files.

**Precision** (``precision='fp32' | 'bf16' | 'fp16'``). Which computation runs in which precision:

=============================================================  =========================================
the inner step's forward (backbone and heads), and every       reduced: ``torch.autocast`` around
gradient taken through its graph: the model's backward, the    ``train_model``; parameters, optimizer
per-task gradients of the gradient engine (Gramians, norms,    states and the gradients in ``.grad``
inner products; the folded backward where it is enabled),      stay fp32
ARML's ``d`` and its reverse-mode or fused JVPs
the task losses                                                fp32 (the heads' outputs are cast back
                                                               before the loss)
forward-mode passes a weighting runs during the inner step     fp32 (they run outside the autocast
(ARML's and OL_AUX's JVPs, ``jvp='forward'``)                  region, on the fp32 parameters)
outer steps: AuxiLearn's training and auxiliary-set losses,    fp32 (they run outside ``train_model``):
its hypergradient (HVPs, Neumann/CG solves, the mixed term),   a Neumann series sums many HVPs and
its CUDA graph; generated-label outer updates                  the hypergradient is small beside them
evaluation                                                     fp32
=============================================================  =========================================

bf16 has fp32's range: no loss scale. fp16 adds ``torch.amp.GradScaler``: the loss the model's
backward starts from is scaled so that small gradients do not underflow, the gradients are unscaled
before anything reads them, and a step whose gradients overflowed is not taken (the scale halves;
it grows again after 2,000 good steps). The scale applies to the backward a weighting runs through
``ctx.backward(loss)``: the default :meth:`~auxframe.weighting.Weighting.backward` does, and so do
the methods built on it (DWA, AdaLoss, Uncertainty, AuxiLearn's inner step) and ARML. A weighting
that writes ``.grad`` by other means (PCGrad, GCS, GradNorm and OL_AUX through the gradient engine)
gets no loss scale: its gradients are computed unscaled in fp16 (one warning says so; bf16 is the
precision for them). Tolerances against fp32 are tested in tests/test_precision.py.

**Speed options.** ``tf32`` lets fp32 matrix products and convolutions use TF32 on Ampere and later
GPUs; ``channels_last`` stores convolution weights and the inner step's inputs in NHWC;
``compile`` runs the inner step's forward through ``torch.compile`` (outer steps stay eager), except
for a weighting that differentiates the step's graph twice (``Weighting.double_backward``), which
``torch.compile`` cannot do: its inner steps run eagerly, with one warning; ``cudnn_benchmark``
lets cuDNN time its algorithms; ``deterministic`` asks for deterministic algorithms (cuDNN's and
cuBLAS's too, through ``CUBLAS_WORKSPACE_CONFIG``), so that a resumed run is bit-identical to an
uninterrupted one on a GPU as it is on the CPU (an operation without a deterministic implementation
warns, naming itself).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from auxframe import distributed
from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, TaskLosses, Weighting

#: ``train.precision`` -> the autocast dtype of the inner step's forward (None: no autocast).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: cuBLAS's workspace setting that makes its results deterministic (see the CUDA docs).
CUBLAS_WORKSPACE = ":4096:8"


class Strategy:
    """The device, the process group, the precision and the speed options of a run.

    Args:
        device: the device this process trains on (under ``torchrun``, the index is replaced by
            ``LOCAL_RANK``: see :func:`auxframe.distributed.init_from_env`).
        sync_batchnorm: under ``torchrun``, convert BatchNorm layers to SyncBatchNorm so that batch
            statistics are those of the global batch. None: on GPUs, unless the weighting takes
            outer steps (their second derivatives cannot pass through SyncBatchNorm).
        precision: ``'fp32'``, ``'bf16'`` or ``'fp16'`` for the inner step's forward (see the
            module docstring for what runs in which precision).
        tf32: allow TF32 in fp32 matrix products and convolutions on CUDA (Ampere and later).
        channels_last: NHWC memory format for the model's 4-D weights and the inner step's inputs.
        compile: ``torch.compile`` the inner step's forward: False, True (the ``'inductor'``
            backend) or a backend name (e.g. ``'aot_eager'``).
        cudnn_benchmark: let cuDNN pick its fastest algorithms by timing them (None: on CUDA unless
            ``deterministic``).
        deterministic: deterministic algorithms (``torch.use_deterministic_algorithms``, cuDNN
            deterministic, ``CUBLAS_WORKSPACE_CONFIG``); an operation that has no deterministic
            implementation warns, naming itself (a run with one is not bit-reproducible).

    Raises:
        ConfigError: for an unknown precision, or a precision the device cannot run.

    Example::

        strategy = Strategy(torch.device("cuda"), precision="bf16")
        model = strategy.prepare_model(model, weighting)     # device, SyncBatchNorm, memory format
        strategy.setup(model, weighting, optimizer)           # DDP / compile / autocast wrappers
        outputs = strategy.train_model(x, tasks=[...])        # the inner step's forward
        strategy.backward(weighting, losses, ctx)
        strategy.optimizer_step(optimizer)
        strategy.close()                                      # the global flags it set, restored
    """

    def __init__(
        self,
        device: torch.device,
        sync_batchnorm: bool | None = None,
        precision: str = "fp32",
        tf32: bool = True,
        channels_last: bool = False,
        compile: bool | str = False,
        cudnn_benchmark: bool | None = None,
        deterministic: bool = False,
    ):
        if precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {tuple(PRECISIONS)}, got {precision!r}.")
        device = torch.device(device)
        self._restore: list[tuple[Any, str, Any]] = []  # (object, attribute, value before)
        self.deterministic = bool(deterministic)
        if self.deterministic:  # before CUDA starts: cuBLAS reads its workspace setting once
            self._deterministic_algorithms(device)
        launch = distributed.init_from_env(device)
        self.device = launch.device
        self.rank, self.world_size = launch.rank, launch.world_size
        self.writes = self.rank == 0  # logs, progress bar and files come from rank 0 only
        self.sync_batchnorm = sync_batchnorm
        # Checks are free on the CPU; on a GPU a check every step would synchronise it every step.
        self.check_each_step = self.device.type == "cpu"
        self.precision, self.dtype = precision, PRECISIONS[precision]
        if self.dtype is torch.bfloat16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.precision = 'bf16' but {torch.cuda.get_device_name(self.device)} has no bf16; "
                              f"use 'fp16' or 'fp32'.")
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype is torch.float16 else None
        self.channels_last = bool(channels_last)
        self.compile = "inductor" if compile is True else (compile or None)
        if self.device.type == "cuda":
            self._set(torch.backends.cuda.matmul, "allow_tf32", bool(tf32))
            self._set(torch.backends.cudnn, "allow_tf32", bool(tf32))
            benchmark = (not self.deterministic) if cudnn_benchmark is None else bool(cudnn_benchmark)
            if benchmark and self.deterministic:
                raise ConfigError("train.cudnn_benchmark = True picks algorithms by timing, which "
                                  "train.deterministic = True rules out; drop one of them.")
            self._set(torch.backends.cudnn, "benchmark", benchmark)
        self.model: nn.Module | None = None
        self.train_model: nn.Module | None = None  # what the inner step's forward calls
        self.synced_parameters: list[nn.Parameter] = []  # gradients averaged over ranks after backward
        self._optimizer: torch.optim.Optimizer | None = None
        self._scaled = False  # this step's backward went through the loss scale
        self._unscaled_warned = False

    def _set(self, obj: Any, name: str, value: Any) -> None:
        """Set a global flag, remembering its value for :meth:`close`."""
        self._restore.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def _deterministic_algorithms(self, device: torch.device) -> None:
        if device.type == "cuda" and os.environ.get("CUBLAS_WORKSPACE_CONFIG") is None:
            if torch.cuda.is_initialized():
                warnings.warn("train.deterministic: CUDA was started before the run set CUBLAS_WORKSPACE_CONFIG, so "
                              "cuBLAS may stay non-deterministic; set CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment.",
                              stacklevel=3)
            self._restore.append((os.environ, "CUBLAS_WORKSPACE_CONFIG", None))
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
        self._restore.append((torch, "use_deterministic_algorithms",
                              (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())))
        torch.use_deterministic_algorithms(True, warn_only=True)  # a missing one warns rather than ending the run
        self._set(torch.backends.cudnn, "deterministic", True)

    def close(self) -> None:
        """Put back the global flags this strategy set (TF32, cuDNN, deterministic algorithms)."""
        for obj, name, value in reversed(self._restore):
            if obj is os.environ:
                os.environ.pop(name, None)
            elif name == "use_deterministic_algorithms":
                torch.use_deterministic_algorithms(value[0], warn_only=value[1])
            else:
                setattr(obj, name, value)
        self._restore = []

    # -- the model -------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, weighting: Weighting) -> nn.Module:
        """The model on this process's device (in NHWC with ``channels_last``), with SyncBatchNorm
        under ``torchrun`` where it applies.

        Call it before the weighting's setup and the optimizer (they hold the model's parameters).
        """
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
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

    def setup(self, model: nn.Module, weighting: Weighting, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Build what the inner step's forward runs through: ``DistributedDataParallel`` under
        ``torchrun`` for the standard inner step, ``torch.compile`` where it applies, autocast and
        the NHWC inputs; and choose which gradients are averaged after backward.

        Args:
            model: the model, prepared (:meth:`prepare_model`).
            weighting: the weighting, set up.
            optimizer: the model's optimizer (the fp16 loss scale unscales its gradients).
        """
        self.model, self._optimizer = model, optimizer
        core = self._distributed(model, weighting)
        backbone = self._compiled(model.backbone, weighting) if self.compile is not None else None
        plain = self.dtype is None and not self.channels_last and backbone is None
        self.train_model = core if plain else _Forward(core, self, backbone)

    def _distributed(self, model: nn.Module, weighting: Weighting) -> nn.Module:
        self.synced_parameters = []
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        own = list(weighting.inner_parameters())
        if type(weighting).backward is not Weighting.backward:
            self.synced_parameters = [p for p in model.parameters() if p.requires_grad] + own
            return model
        needed = set(weighting.tasks_needed())
        unused = [f"heads.{t}.{n}" for t, head in model.heads.items() if t not in needed
                  for n, _ in head.named_parameters()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, unused)
        self.synced_parameters = own
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def _compiled(self, module: nn.Module, weighting: Weighting) -> nn.Module | None:
        """The backbone through ``torch.compile`` (the heads stay eager, so that the representation
        the heads read is a tensor the weightings can differentiate), or None where it does not apply."""
        if compile_applies(weighting):
            # Weightings take several gradients through one step's graph (retain_graph=True), which
            # AOTAutograd's donated buffers rule out.
            import torch._functorch.config as functorch_config

            self._set(functorch_config, "donated_buffer", False)
            return torch.compile(module, backend=self.compile)
        warnings.warn(
            f"train.compile: {type(weighting).__name__} differentiates the inner step's graph twice "
            f"(Weighting.double_backward), which torch.compile's graphs do not support; its inner steps run "
            f"eagerly.", stacklevel=3)
        return None

    # -- the step --------------------------------------------------------------------------------
    def backward(self, weighting: Weighting, losses: TaskLosses, ctx: StepContext) -> None:
        """The weighting's backward (``ctx.backward`` scales the loss under fp16), the gradients DDP
        did not reduce averaged over ranks, then the fp16 gradients unscaled."""
        self._scaled = False
        try:
            weighting.backward(losses, ctx)
        except RuntimeError as err:
            if self.compile is not None and "double backward" in str(err):
                raise ConfigError(
                    f"{type(weighting).__name__} differentiated the inner step's graph twice, which torch.compile "
                    f"does not support: set train.compile = False, or declare `double_backward = True` on the "
                    f"weighting so that its inner steps run eagerly."
                ) from err
            raise
        if self.synced_parameters:  # (before unscaling, so that an overflow on one rank reaches every rank)
            distributed.all_reduce_mean([p.grad for p in self.synced_parameters if p.grad is not None])
        if self.scaler is not None:
            self._unscale(weighting)

    def scaled_backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the fp16 loss scale (``ctx.backward``)."""
        if self.scaler is None or self._optimizer is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self._scaled = True

    def _unscale(self, weighting: Weighting) -> None:
        if self._scaled:
            self.scaler.unscale_(self._optimizer)  # records whether the scaled gradients overflowed
        elif not self._unscaled_warned:
            self._unscaled_warned = True
            warnings.warn(
                f"train.precision = 'fp16': {type(weighting).__name__} writes its gradients without "
                f"ctx.backward, so they are not loss-scaled and small ones may underflow in fp16; "
                f"train.precision = 'bf16' needs no loss scale.", stacklevel=3)

    def overflowed(self) -> bool:
        """Whether this step's loss-scaled gradients overflowed (the step is then not taken)."""
        if self.scaler is None or not self._scaled:
            return False
        found = self.scaler._per_optimizer_states[id(self._optimizer)]["found_inf_per_device"]
        return bool(sum(v.item() for v in found.values()))

    def optimizer_step(self, optimizer: torch.optim.Optimizer, skip: bool = False) -> None:
        """One step of the model's optimizer, unless ``skip`` (under fp16 through the loss scale,
        which skips a step whose gradients overflowed and then halves the scale).

        Args:
            optimizer: the model's optimizer.
            skip: the step is dropped (the loss scale still ends its step).
        """
        if self._scaled:
            if not skip:
                self.scaler.step(optimizer)
            self.scaler.update()
            self._scaled = False
        elif not skip:
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
        """Scalars for the training log rows: the fp16 loss scale."""
        return {"train/loss_scale": float(self.scaler.get_scale())} if self.scaler is not None else {}

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume: the fp16 loss scale's state."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a checkpoint of another precision: nothing)."""
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class _Forward(nn.Module):
    """The inner step's forward: under autocast (the heads' outputs cast back to fp32 for the
    losses; the representation stays as the heads read it), with NHWC inputs, and with the compiled
    backbone in place of the model's own for this call only (outer steps, evaluation and a
    weighting's forward-mode passes run the model's own)."""

    def __init__(self, module: nn.Module, strategy: Strategy, compiled_backbone: nn.Module | None = None):
        super().__init__()
        self.module = module
        self.device_type, self.dtype, self.channels_last = strategy.device.type, strategy.dtype, strategy.channels_last
        self.compiled_backbone = compiled_backbone

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        model = distributed.unwrap(self.module)
        own = model._modules["backbone"]
        if self.compiled_backbone is not None:
            model._modules["backbone"] = self.compiled_backbone  # the same parameters, compiled
        try:
            with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
                result = self.module(x, *args, **kwargs)
        finally:
            model._modules["backbone"] = own
        if isinstance(result, tuple):  # (outputs, features)
            return (_float(result[0]), *result[1:])
        return _float(result)


def _float(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in outputs.items()}


def compile_applies(weighting: Weighting) -> bool:
    """Whether the weighting's inner step can run through ``torch.compile``: not when its backward
    differentiates the step's graph twice (``weighting.double_backward``)."""
    return not bool(getattr(weighting, "double_backward", False))


def all_gradients(optimizer: torch.optim.Optimizer) -> Sequence[torch.Tensor]:
    """The gradients of every parameter the optimizer updates (those that have one)."""
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
