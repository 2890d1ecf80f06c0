"""FAMO (Liu, Liang, Chen, Stone and Liu, "FAMO: Fast Adaptive Multitask Optimization",
NeurIPS 2023).

The tasks' log-losses are decreased at equal rates, with no per-task gradient: weights
``z = softmax(xi)`` of learnt logits ``xi``, and the model trains on

    sum_i c^-1 z_i log(L_i - L_i*),      c = sum_i z_i / (L_i - L_i*),

whose gradient is ``sum_i w_i grad L_i`` with ``w_i = z_i / (c (L_i - L_i*))`` (weights that
sum to 1; ``L_i*`` a lower bound of each loss, 0 by default). After the model's step the losses
are computed again on the same batch (one forward pass without gradient) and the logits take one
step of Adam (weight decay gamma) along

    d xi = J_softmax(xi)^T delta,    delta_i = log(L_i - L_i*)_before - log(L_i - L_i*)_after,

the official code's update (Cranial-XIX/FAMO, ``famo.py``: ``w_lr = 0.025``, ``gamma = 0.01``). The
re-forward leaves BatchNorm's running statistics as they were. Under torchrun both loss vectors are
averaged over the ranks, so every rank holds the same logits.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from auxframe import distributed
from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, TaskLosses, VectorWeights, WeightingSetup

_EPS = 1e-8


class FAMO(VectorWeights):
    """Fast adaptive multitask optimisation: equal rates of log-loss decrease.

    Args:
        weight_lr: Adam's learning rate on the logits (0.025).
        gamma: Adam's weight decay on the logits (0.01).
        min_losses: task -> lower bound ``L_i*`` of its loss (default 0 for every task).
        max_norm: clip the shared parameters' gradient to this norm (0: no clipping; the official
            code clips to 1 with every method, a choice of its training scripts).
    """

    def __init__(self, weight_lr: float = 0.025, gamma: float = 0.01, min_losses: Mapping[str, float] | None = None,
                 max_norm: float = 0.0):
        if weight_lr <= 0 or gamma < 0:
            raise ConfigError(f"weightings.famo needs weight_lr > 0 and gamma >= 0, got {weight_lr}, {gamma}.")
        self.weight_lr, self.gamma, self.max_norm = float(weight_lr), float(gamma), float(max_norm)
        self.given_min = dict(min_losses or {})

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        unknown = sorted(set(self.given_min) - set(self.names))
        if unknown:
            raise ConfigError(f"weightings.famo.min_losses names unknown task(s) {unknown}; the tasks are {self.names}.")
        self.min_losses = torch.tensor([float(self.given_min.get(t, 0.0)) for t in self.names], device=info.device)
        self.logits = torch.zeros(len(self.names), device=info.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=self.weight_lr, weight_decay=self.gamma)
        self.w = self.current_weights(torch.ones(len(self.names), device=info.device))
        self.shared = list(info.shared_parameters)
        self._step: tuple[TaskLosses, torch.Tensor] | None = None

    def current_weights(self, values: torch.Tensor) -> torch.Tensor:
        """``w_i = z_i / (c (L_i - L_i*))`` at the loss values ``values``."""
        z = torch.softmax(self.logits.detach(), 0)
        inverse = z / (values - self.min_losses + _EPS)
        return inverse / inverse.sum()

    def backward(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        values = self.loss_vector(losses)
        self.w = self.current_weights(values)
        total = super().backward(losses, ctx)
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.shared, self.max_norm)
        self._step = (losses, values)
        return total

    @torch.no_grad()
    def losses_after_step(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        """The step's task losses again, on the same batch, with the updated model."""
        model = distributed.unwrap(ctx.model)
        buffers = [b.clone() for b in model.buffers()]
        outputs: dict[str, torch.Tensor] = {}
        by_input: dict[int, list[str]] = {}
        for t in self.names:
            by_input.setdefault(id(losses.inputs[t]), []).append(t)
        for tasks in by_input.values():
            outputs.update(model(losses.inputs[tasks[0]], tasks=tasks))
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
        again = losses.from_outputs(outputs)
        values = torch.stack([again.mean(t) for t in self.names]).detach()
        distributed.all_reduce_mean([values])
        return values

    def after_step(self, ctx: StepContext) -> bool:
        if self._step is None:
            return False
        losses, before = self._step
        self._step = None
        self.update_logits(before, self.losses_after_step(losses, ctx))
        return False

    def update_logits(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """One Adam step of the logits from the task losses before and after the model's step."""
        delta = (before - self.min_losses + _EPS).log() - (after - self.min_losses + _EPS).log()
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(torch.softmax(self.logits, 0), self.logits, grad_outputs=delta)
        self.optimizer.zero_grad(set_to_none=True)
        self.logits.grad = grad
        self.optimizer.step()

    def log_values(self) -> dict[str, float]:
        z = torch.softmax(self.logits.detach(), 0).tolist()
        return {**super().log_values(), **{f"famo/z/{t}": v for t, v in zip(self.names, z)}}

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.clone(), "logits": self.logits.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.optimizer.load_state_dict(state["optimizer"])
