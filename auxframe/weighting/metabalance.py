"""MetaBalance (He, Feng, Cheng, Lv, Xu, Wang, Wang and Zhang, "MetaBalance: Improving Multi-Task
Recommendations via Adapting Gradient Magnitudes of Auxiliary Tasks", WWW 2022).

Per shared parameter tensor ``theta`` (a layer's weight or bias), each auxiliary gradient is
rescaled toward the main gradient's magnitude, using moving averages of the magnitudes:

    m_k(theta) <- beta m_k(theta) + (1 - beta) ||grad_theta L_k||            (m starts at 0)
    g_k(theta) <- r (m_main(theta) / m_k(theta)) g_k(theta) + (1 - r) g_k(theta)

and the update of ``theta`` is ``g_main(theta) + sum_k g_k(theta)``. The relax factor ``r`` in
``[0, 1)`` sets how close the magnitudes get (0: Equal; the official default 0.7). The paper's
three strategies adapt every auxiliary gradient (``'both'``, the official code), only those
larger than the main one (``'decrease'``) or only smaller ones (``'increase'``).

The per-task gradients come from the step's Jacobian (one backbone pass per task on its own
batch, as for the other gradient methods); every magnitude is read from it, and the update is a
per-layer combination of its rows, so no further backward pass. Each head trains on its own
loss. The moving averages are of rank-averaged gradients under torchrun, the same on every rank.
The official code is an optimizer wrapper (facebookresearch/MetaBalance, ``metabalance.py``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, TaskLosses, VectorWeights, WeightingSetup
from auxframe.weighting.gradients import TaskGradients, check_space

STRATEGIES = ("both", "decrease", "increase")
_EPS = 1e-12


def metabalance_coefficients(norms: torch.Tensor, averages: torch.Tensor, beta: float, relax: float,
                             strategy: str = "both") -> tuple[torch.Tensor, torch.Tensor]:
    """One MetaBalance step on the magnitudes.

    Args:
        norms: ``(T, P)`` gradient norms of each task (main first) on each of P parameter tensors.
        averages: ``(T, P)`` their moving averages before this step.
        beta: the moving average's rate.
        relax: the relax factor r.
        strategy: ``'both'``, ``'decrease'`` or ``'increase'``.

    Returns:
        ``(coefficients, averages)``: the ``(T, P)`` factor of each task's gradient on each
        parameter tensor (the main row all ones), and the updated averages.
    """
    averages = beta * averages + (1 - beta) * norms
    ratio = averages[:1] / averages.clamp_min(_EPS)
    coefficients = relax * ratio + (1 - relax)
    if strategy == "decrease":
        coefficients = torch.where(averages > averages[:1], coefficients, torch.ones_like(coefficients))
    elif strategy == "increase":
        coefficients = torch.where(averages < averages[:1], coefficients, torch.ones_like(coefficients))
    coefficients[0] = 1.0
    return coefficients, averages


class MetaBalance(VectorWeights):
    """Auxiliary gradients rescaled per layer toward the main gradient's magnitude.

    Args:
        relax_factor: r in ``[0, 1)`` (0.7, the official default).
        beta: rate of the magnitudes' moving averages (0.9).
        strategy: ``'both'`` (the official code), ``'decrease'`` or ``'increase'``.
        space: ``'shared'`` (every backbone parameter tensor; the paper) or ``'last_shared'``.
    """

    def __init__(self, relax_factor: float = 0.7, beta: float = 0.9, strategy: str = "both", space: str = "shared"):
        if not 0.0 <= relax_factor < 1.0:
            raise ConfigError(f"weightings.metabalance.relax_factor must be in [0, 1), got {relax_factor}.")
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"weightings.metabalance.beta must be in [0, 1), got {beta}.")
        if strategy not in STRATEGIES:
            raise ConfigError(f"weightings.metabalance.strategy must be one of {STRATEGIES}, got {strategy!r}.")
        if space == "representation":
            raise ConfigError("weightings.metabalance rescales per parameter tensor; use space='shared' or 'last_shared'.")
        self.relax, self.beta, self.strategy = float(relax_factor), float(beta), strategy
        self.space = check_space(space, "weightings.metabalance")

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        if not self.aux_tasks:
            raise ConfigError("MetaBalance rescales auxiliary gradients, but the task graph has none; use weightings.stl.")
        self.averages: torch.Tensor | None = None  # (T, P), created at the first step (P known then)

    def backward(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        engine = TaskGradients.of(losses, ctx, space=self.space)
        jac = engine.jacobian(self.names)  # (T, n), averaged over ranks
        sizes = [p.numel() for p in engine.params]
        blocks = jac.split(sizes, dim=1)
        norms = torch.stack([b.norm(dim=1) for b in blocks], dim=1)  # (T, P)
        if self.averages is None:
            self.averages = torch.zeros_like(norms)
        coefficients, self.averages = metabalance_coefficients(norms, self.averages, self.beta, self.relax, self.strategy)
        # Equal's update (c @ J from the Jacobian in 'shared' space: no backbone pass), each head on
        # its own loss; then each balanced tensor's rows rescaled by its coefficients.
        total = engine.backward({t: 1.0 for t in self.names})
        for p, block, c in zip(engine.params, blocks, coefficients.T):
            p.grad += ((c - 1).to(block) @ block).view_as(p)
        self.w = (coefficients * norms).sum(1) / norms.sum(1).clamp_min(_EPS)  # magnitude-weighted mean factor
        return total

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "averages": None if self.averages is None else self.averages.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.averages = None if state["averages"] is None else state["averages"].to(self.w.device).clone()
