"""Auto-λ (Liu, James, Davison and Johns, "Auto-Lambda: Disentangling Dynamic Task
Relationships", TMLR 2022).

Task weights ``lambda`` (every task, main included; 0.1 at the start) are meta-learnt so that one
step of the model on ``sum_i lambda_i L_i`` lowers the main task's loss on other data. At every
step, before the model's own update, with ``theta' = theta - eta sum_i lambda_i grad L_i(theta)``
(a virtual gradient step of size ``eta`` on this step's batch):

    d L_meta(theta') / d lambda_i = -eta < grad_theta L_i(theta), grad_theta' L_meta(theta') >

and ``lambda`` takes one Adam step along it. The model then trains on ``sum_i lambda_i L_i`` with
the new weights. The meta loss is the main task's loss on the next training batch (the official
code's "val" batch is a training batch in another order) or, with ``meta_data='aux_set'``, on the
held-out auxiliary set.

The official code (lorenmt/auto-lambda, ``auto_lambda.py``) approximates the mixed second
derivative by central finite differences of the training loss at ``theta +- eps d``; here the
inner products ``<grad L_i, d>`` are exact, by one double backward through this step's graph (the
same batch, batch statistics and dropout masks). Its virtual step also adds the model optimizer's
SGD momentum and weight decay, which a weighting does not see; here it is a plain gradient step,
the DARTS form the paper writes down. Under torchrun the virtual gradient, ``grad L_meta`` and the
inner products are averaged over the ranks.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from auxframe import distributed
from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, TaskLosses, VectorWeights, WeightingSetup

META_DATA = ("train", "aux_set")


class AutoLambda(VectorWeights):
    """Meta-learnt task weights by one-step look-ahead.

    Args:
        weight_init: the initial weight of every task (0.1, the official default).
        meta_lr: Adam's learning rate on the weights (1e-4 in the official dense-prediction runs).
        virtual_lr: the virtual step's size ``eta`` (the official code uses the model's learning rate).
        meta_data: ``'train'`` (the next training batch, the official code) or ``'aux_set'``.
    """

    def __init__(self, weight_init: float = 0.1, meta_lr: float = 1e-4, virtual_lr: float = 0.1,
                 meta_data: str = "train"):
        if meta_data not in META_DATA:
            raise ConfigError(f"weightings.auto_lambda.meta_data must be one of {META_DATA}, got {meta_data!r}.")
        if meta_lr <= 0 or virtual_lr <= 0:
            raise ConfigError(f"weightings.auto_lambda needs meta_lr > 0 and virtual_lr > 0, got {meta_lr}, {virtual_lr}.")
        self.weight_init, self.meta_lr, self.virtual_lr, self.meta_data = float(weight_init), float(meta_lr), float(virtual_lr), meta_data

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        if not self.aux_tasks:
            raise ConfigError("Auto-λ weighs auxiliary tasks, but the task graph has none; use weightings.stl.")
        if self.meta_data == "aux_set" and not info.has_aux_set:
            raise ConfigError("weightings.auto_lambda.meta_data = 'aux_set' needs an auxiliary set; "
                              "set LowDataSplit.aux_per_class > 0, or meta_data = 'train'.")
        self.w = torch.full((len(self.names),), self.weight_init, device=info.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.w], lr=self.meta_lr)
        self._logs: dict[str, float] = {}

    def meta_batch(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and main-task targets of the meta loss."""
        if self.meta_data == "aux_set":
            return ctx.aux_set_batch()
        for tasks, (x, targets) in ctx.train_batch().items():
            if self.main_task in tasks:
                return x, targets[self.main_task]
        raise ConfigError(f"the training batches hold no batch of the main task {self.main_task!r}")

    def meta_gradient(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        """``dL_meta(theta')/dlambda`` (``(T,)``) at the current weights (see the module docstring)."""
        model = distributed.unwrap(ctx.model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        means = losses.means(self.names)
        grads = torch.autograd.grad(self.w.detach() @ means, params, retain_graph=True, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
        distributed.all_reduce_mean(grads)
        virtual = {n: (p - self.virtual_lr * g).detach().requires_grad_(True) for (n, p), g in zip(named, grads)}
        buffers = {n: b.clone() for n, b in model.named_buffers()}  # the look-ahead leaves BatchNorm's statistics
        x, y = self.meta_batch(ctx)
        out = torch.func.functional_call(model, {**virtual, **buffers}, (x,), {"tasks": [self.main_task]})
        meta_loss = ctx.make_losses({self.main_task: out[self.main_task]}, {self.main_task: y}).mean(self.main_task)
        d = torch.autograd.grad(meta_loss, list(virtual.values()), allow_unused=True)
        d = [g if g is not None else torch.zeros_like(p) for g, p in zip(d, params)]
        distributed.all_reduce_mean(d)
        # <grad L_i, d> for every i at once: J d = d/du <J^T u, d> on this step's graph.
        u = torch.zeros_like(means, requires_grad=True)
        jt_u = torch.autograd.grad(means, params, grad_outputs=u, create_graph=True, allow_unused=True)
        pairs = [(g, v) for g, v in zip(jt_u, d) if g is not None and g.requires_grad]
        (inner,) = torch.autograd.grad([g for g, _ in pairs], u, grad_outputs=[v for _, v in pairs], retain_graph=True)
        inner = inner.detach()
        distributed.all_reduce_mean([inner])
        self._logs = {"auto_lambda/meta_loss": float(meta_loss.detach())}
        return -self.virtual_lr * inner

    def backward(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        grad = self.meta_gradient(losses, ctx)
        self.optimizer.zero_grad(set_to_none=True)
        self.w.grad = grad.to(self.w)
        self.optimizer.step()
        return super().backward(losses, ctx)

    def log_values(self) -> dict[str, float]:
        return {**super().log_values(), **self._logs}

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.detach().clone(), "optimizer": self.optimizer.state_dict(), "logs": dict(self._logs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._logs = dict(state["logs"])
