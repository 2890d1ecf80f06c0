"""Weightings that look only at the loss values: Uncertainty, AdaLoss and DWA.

Every task, main and auxiliary, gets a weight; the model trains on ``sum_t w_t L_t`` (Uncertainty
adds its regulariser). None of them needs a gradient beyond the model's own backward pass.

They were made for multi-task learning, where every task counts: AdaLoss and DWA normalise the
weights over all tasks (they sum to T) and Uncertainty learns one for every task. In auxiliary
learning with few main labels the main task's training loss falls fastest, so they hand it most of
the budget (AdaLoss ~5 of 5 on the planted benchmark) or take it away. ``anchor_main=True`` keeps
the main task at weight 1 and makes each auxiliary weight relative to it: AdaLoss
``w_k = m_main / m_k``, DWA ``w_k = exp((r_k - r_main) / temperature)``, Uncertainty with no learned
variance for the main task (its term is ``L_main``). GradNorm has the same option
(:class:`auxframe.weighting.gradient_based.GradNorm`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, TaskLosses, VectorWeights, WeightingSetup


class Uncertainty(VectorWeights):
    """Homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018).

    Each task has a learned log-variance ``s_t`` (trained with the model by its optimizer):

        L = sum_t 0.5 * exp(-s_t) * L_t + 0.5 * s_t,

    the paper's Gaussian form ``L_t / (2 sigma_t^2) + log sigma_t`` with ``s_t = log sigma_t^2``,
    as in the reference implementations. The effective weight of a task is ``0.5 * exp(-s_t)``.

    Args:
        init_log_var: initial ``s_t`` for every task (0: every weight starts at 0.5).
        anchor_main: the main task has no learned variance: its term is ``L_main`` (weight 1, no
            regulariser), and only the auxiliary tasks' ``s_k`` are learned.
    """

    def __init__(self, init_log_var: float = 0.0, anchor_main: bool = False):
        self.init_log_var = float(init_log_var)
        self.anchor_main = bool(anchor_main)

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        self.log_var = nn.Parameter(torch.full((len(self.names),), self.init_log_var, device=info.device))

    def inner_parameters(self) -> list[nn.Parameter]:
        return [self.log_var]

    def current(self) -> torch.Tensor:
        w = 0.5 * torch.exp(-self.log_var)
        return torch.cat([torch.ones_like(w[:1]), w[1:]]) if self.anchor_main else w

    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        first = 1 if self.anchor_main else 0
        present = [i for i, t in enumerate(self.names) if t in losses and i >= first]
        total = sum(0.5 * torch.exp(-self.log_var[i]) * losses.mean(self.names[i]) + 0.5 * self.log_var[i]
                    for i in present)
        return total + losses.mean(self.main_task) if self.anchor_main else total

    def state_dict(self) -> dict[str, Any]:
        return {"log_var": self.log_var.detach().clone()}  # its optimizer state is the model optimizer's

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():  # in place: the model optimizer holds this very Parameter
            self.log_var.copy_(state["log_var"])


class AdaLoss(VectorWeights):
    """Adaptive loss balancing (Hu, Dey, Hebert and Bagnell, AAAI 2019).

    Minimising ``sum_t log L_t`` instead of ``sum_t L_t`` weights each task by the inverse of its
    loss; with a running average for stability:

        m_t <- beta * m_t + (1 - beta) * L_t        (m_t starts at the first loss)
        w_t = T * (1 / (m_t + eps)) / sum_j (1 / (m_j + eps)),

    so the weights sum to the number of tasks T. Each step uses the average of the previous steps.

    With ``anchor_main=True``, ``w_t = (1 / (m_t + eps)) / (1 / (m_main + eps))``: the main task
    keeps weight 1.

    Args:
        beta: decay of the running average of each loss.
        eps: added to the averages before inverting.
        anchor_main: normalise by the main task's inverse loss instead of the sum over tasks.
    """

    def __init__(self, beta: float = 0.9, eps: float = 1e-8, anchor_main: bool = False):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"weightings.adaloss.beta must be in [0, 1), got {beta}.")
        self.beta, self.eps, self.anchor_main = float(beta), float(eps), bool(anchor_main)

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        self.avg = torch.zeros(len(self.names), device=info.device)
        self.started = False

    def after_losses(self, losses: TaskLosses) -> None:
        values = self.loss_vector(losses)
        if not self.started:
            self.avg, self.started = values.clone(), True
        else:
            self.avg = self.beta * self.avg + (1 - self.beta) * values
        self.w = normalise(1.0 / (self.avg + self.eps), self.anchor_main)

    def backward(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        if not self.started:  # the first step has no history: weigh it by its own losses
            self.after_losses(losses)
            total = super().backward(losses, ctx)
        else:
            total = super().backward(losses, ctx)
            self.after_losses(losses)
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.clone(), "avg": self.avg.clone(), "started": self.started}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.avg = state["avg"].to(self.w.device).clone()
        self.started = bool(state["started"])


class DWA(VectorWeights):
    """Dynamic Weight Average (Liu, Johns and Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019).

    With ``Lbar_t(e)`` the average training loss of task t over epoch e and ``r_t(e) =
    Lbar_t(e - 1) / Lbar_t(e - 2)``, the weights of epoch e are

        w_t(e) = T * exp(r_t(e) / temperature) / sum_j exp(r_j(e) / temperature),

    and 1 for the first two epochs. An epoch is ``steps_per_epoch`` inner steps (one pass over the
    main task's labelled data) unless ``epoch_steps`` says otherwise.

    With ``anchor_main=True``, ``w_t(e) = exp((r_t(e) - r_main(e)) / temperature)``: the main
    task keeps weight 1.

    Args:
        temperature: T in the paper (2 there).
        epoch_steps: steps per averaging period (None: the run's epoch).
        anchor_main: normalise by the main task's term instead of the sum over tasks.
    """

    def __init__(self, temperature: float = 2.0, epoch_steps: int | None = None, anchor_main: bool = False):
        if temperature <= 0:
            raise ConfigError(f"weightings.dwa.temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        self.anchor_main = bool(anchor_main)
        self.epoch_steps = epoch_steps

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        self.period = int(self.epoch_steps or max(info.steps_per_epoch, 1))
        self.sum = torch.zeros(len(self.names), device=info.device)
        self.count = 0
        self.history: list[torch.Tensor] = []  # the last two epoch averages

    def backward(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        total = super().backward(losses, ctx)
        self.sum += self.loss_vector(losses)
        self.count += 1
        return total

    def after_step(self, ctx: StepContext) -> bool:
        if self.count < self.period:
            return False
        self.history = [*self.history, self.sum / self.count][-2:]
        self.sum, self.count = torch.zeros_like(self.sum), 0
        if len(self.history) < 2:
            return False
        self.w = dwa_weights(self.history[1], self.history[0], self.temperature, self.anchor_main)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.clone(), "sum": self.sum.clone(), "count": self.count,
                "history": [h.clone() for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.sum = state["sum"].to(self.w.device).clone()
        self.count = int(state["count"])
        self.history = [h.to(self.w.device).clone() for h in state["history"]]


def dwa_weights(last: torch.Tensor, before: torch.Tensor, temperature: float, anchor_main: bool = False) -> torch.Tensor:
    """DWA's weights from the last two epoch-average losses (``(T,)`` each, main task first)."""
    logits = (last / before) / temperature
    return normalise(torch.exp(logits - logits.max()), anchor_main)  # (shifted: the same ratios, no overflow)


def normalise(scores: torch.Tensor, anchor_main: bool) -> torch.Tensor:
    """Positive per-task scores ``(T,)`` (main task first) as weights: ``T * s / sum(s)``, or
    ``s / s_main`` (the main task at 1) with ``anchor_main``."""
    return scores / scores[0] if anchor_main else len(scores) * scores / scores.sum()
