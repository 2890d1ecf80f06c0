"""Weightings that look at the task gradients: GradNorm, GCS (CosineSim), OL_AUX and PCGrad.

All four read the per-task gradients only through inner products (norms, cosines, projections),
which :class:`auxframe.weighting.gradients.TaskGradients` computes once per step in the space the
method works in; once the coefficients are known the update is one ordinary backward pass. GCS and
PCGrad are pure "Gramian -> weights" maps (:class:`auxframe.weighting.gramian.GramianWeighting`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, TaskLosses, WeightingSetup
from auxframe.weighting.gradients import check_space, project_to_simplex
from auxframe.weighting.gramian import GramianWeighting

_EPS = 1e-12


class _Coefficients(GramianWeighting):
    """Shared methods of the gradient-based weightings: per-task coefficients over ``[main, *aux]``."""

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        if not self.aux_tasks:
            raise ConfigError(f"{type(self).__name__} weighs auxiliary tasks, but the task graph has none; use weightings.stl.")


class GradNorm(_Coefficients):
    """GradNorm (Chen, Badrinarayanan, Lee and Rabinovich, ICML 2018).

    Learned weights ``w_t`` for every task (main included), trained to equalise the tasks'
    gradient norms on the last shared layer W, scaled by their relative training rates:

        G_t = ||grad_W (w_t L_t)|| = w_t ||grad_W L_t||,       Gbar = mean_t G_t,
        r_t = (L_t / L_t(0)) / mean_j (L_j / L_j(0)),
        L_grad = sum_t | G_t - Gbar * r_t ** alpha |            (the target held constant),

    so ``dL_grad/dw_t = sign(G_t - target_t) * ||grad_W L_t||`` exactly (no double backward). After
    each step of their optimizer the weights are clamped at 0 and renormalised to sum to T, the
    number of tasks. The model trains on ``sum_t w_t L_t``.

    With ``anchor_main=True`` they are divided by the main task's weight instead, so the main task
    keeps weight 1 and the auxiliary weights are relative to it (GradNorm's loss fixes the weights
    only up to a common scale, which the paper pins by their sum; pinning the main one instead keeps
    the main task's step size what it is alone, which is what an auxiliary-learning user wants).

    Args:
        alpha: the asymmetry (restoring force) hyperparameter; 1.5 in the paper's NYUv2 runs.
        weight_optimizer: optimizer factory for the weights (default: Adam).
        weight_lr: its learning rate (0.025 in the paper).
        space: ``'last_shared'`` (the paper), ``'shared'`` or ``'representation'``.
        anchor_main: keep the main task's weight at 1 (divide by it) instead of the sum at T.
    """

    def __init__(
        self,
        alpha: float = 1.5,
        weight_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        weight_lr: float = 0.025,
        space: str = "last_shared",
        anchor_main: bool = False,
    ):
        self.alpha, self.weight_lr, self.anchor_main = float(alpha), float(weight_lr), bool(anchor_main)
        self.weight_optimizer_factory = weight_optimizer or torch.optim.Adam
        self.space = check_space(space, "weightings.gradnorm")

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        self.w.requires_grad_(True)
        self.optimizer = self.weight_optimizer_factory([self.w], lr=self.weight_lr)
        self.initial: torch.Tensor | None = None
        self._logs: dict[str, float] = {}

    def weight_gradient(self, losses: TaskLosses, norms: torch.Tensor) -> torch.Tensor:
        """``dL_grad/dw`` given the per-task gradient norms ``||grad_W L_t||``."""
        values = self.loss_vector(losses)  # averaged over ranks: every rank derives the same weights
        if self.initial is None:
            self.initial = values.clone()
        w = self.w.detach()
        g = w * norms
        ratio = values / self.initial.clamp_min(_EPS)
        target = g.mean() * (ratio / ratio.mean()) ** self.alpha
        self._logs = {"gradnorm/loss": float((g - target).abs().sum())}
        return torch.sign(g - target) * norms

    def backward(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        engine = self.engine(losses, ctx)
        norms = engine.norms(self.names)
        w = dict(zip(self.names, self.current().detach().clone()))
        grad = self.weight_gradient(losses, norms)
        # The model's update sum_t w_t grad L_t by the engine, which reuses what the norms cost:
        # in 'shared' space w @ J (no further backward at all), in the others the heads' pass.
        total = engine.backward(w, w)
        self.optimizer.zero_grad(set_to_none=True)
        self.w.grad = grad.to(self.w)
        self.optimizer.step()
        with torch.no_grad():
            self.w.clamp_(min=0)
            scale = float(self.w[0]) if self.anchor_main else float(self.w.sum()) / len(self.names)
            self.w.div_(scale) if scale > 0 else self.w.fill_(1.0)
        return total.detach()

    def log_values(self) -> dict[str, float]:
        return {**super().log_values(), **self._logs}

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "initial": self.initial, "logs": dict(self._logs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.initial = state["initial"]
        self._logs = dict(state["logs"])


class GCS(_Coefficients):
    """Gradient cosine similarity (Du, Czarnecki, Jayakumar, Farajtabar, Pascanu and
    Lakshminarayanan, "Adapting Auxiliary Losses Using Gradient Similarity", 2018).

    On the shared parameters, an auxiliary gradient is used only when it agrees with the main one:

        g = g_main + sum_k c_k g_k,   c_k = 1[cos(g_main, g_k) >= 0]      (mode='hard', the paper)
                                      c_k = max(0, cos(g_main, g_k))      (mode='soft', CosineSim)

    Each auxiliary head still trains on its own loss (weight 1): only the shared update changes.

    The coefficients are decided anew at every step, so one step's 0/1 mask says little about the
    run. :meth:`weights` (the logged ``weight/<task>`` and ``weights`` in ``metrics.json``) is their
    mean over the steps so far: with ``mode='hard'``, the fraction of steps in which each
    auxiliary gradient was used; ``gcs/last/<task>`` logs the last step's coefficient.

    Args:
        mode: ``'hard'`` (drop) or ``'soft'`` (scale by the cosine).
        space: ``'shared'`` (the paper), ``'last_shared'`` or ``'representation'``.
    """

    def __init__(self, mode: str = "hard", space: str = "shared"):
        if mode not in ("hard", "soft"):
            raise ConfigError(f"weightings.gcs.mode must be 'hard' or 'soft', got {mode!r}.")
        self.mode = mode
        self.space = check_space(space, "weightings.gcs")

    def coefficients(self, gramian: torch.Tensor) -> torch.Tensor:
        """``[1, c_1, ..., c_K]`` from the Gramian of ``[g_main, g_1, ..., g_K]``."""
        norms = gramian.diagonal().clamp_min(0).sqrt()
        cos = gramian[0, 1:] / (norms[0] * norms[1:]).clamp_min(_EPS)
        c = (cos >= 0).to(gramian.dtype) if self.mode == "hard" else cos.clamp_min(0)
        return torch.cat([torch.ones_like(c[:1]), c])

    from_gramian = coefficients

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        self.coefficient_sum = torch.zeros(len(self.names), device=info.device, dtype=torch.float64)
        self.steps = 0

    def backward(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        total = super().backward(losses, ctx)
        self.coefficient_sum += self.w.detach().to(self.coefficient_sum)
        self.steps += 1
        return total

    def mean_coefficients(self) -> torch.Tensor:
        """The mean over the steps so far of each task's coefficient (1 before the first step)."""
        if self.steps == 0:
            return torch.ones_like(self.coefficient_sum)
        return self.coefficient_sum / self.steps

    def weights(self) -> dict[str, float]:
        return dict(zip(self.names, self.mean_coefficients().tolist()))

    def log_values(self) -> dict[str, float]:
        last = {f"gcs/last/{t}": float(c) for t, c in zip(self.names[1:], self.w[1:].tolist())}
        return {**super().log_values(), **last}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "coefficient_sum": self.coefficient_sum.clone(), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.coefficient_sum = state["coefficient_sum"].to(self.coefficient_sum).clone()
        self.steps = int(state["steps"])


class PCGrad(_Coefficients):
    """Projecting conflicting gradients (Yu, Kumar, Gupta, Levine, Hausman and Finn, NeurIPS 2020).

    Each task gradient, in a random order of the others, loses its component along every other
    task's (original) gradient it conflicts with: ``g_i <- g_i - (<g_i, g_j> / ||g_j||^2) g_j`` when
    ``<g_i, g_j> < 0``; the shared update is the sum of the projected gradients. With
    ``aux_only=True`` the main gradient is left alone and each auxiliary gradient is projected only
    off the main one, so no auxiliary gradient is left conflicting with the main task.

    Every projected gradient is a combination of the original ones, so only the Gramian is needed:
    the update is ``sum_k c_k g_k`` with ``c`` computed from it, one backward pass. Heads train on
    their own losses, unchanged.

    Args:
        aux_only: project only auxiliary gradients, and only off the main gradient.
        space: ``'shared'`` (the paper), ``'last_shared'`` or ``'representation'``.
        seed: seed of the random projection order.
    """

    def __init__(self, aux_only: bool = False, space: str = "shared", seed: int = 0):
        self.aux_only = bool(aux_only)
        self.space = check_space(space, "weightings.pcgrad")
        self.seed = int(seed)

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        self.rng = torch.Generator().manual_seed(self.seed)

    def projection(self, gramian: torch.Tensor) -> torch.Tensor:
        """Matrix ``A`` with the projected gradients as ``A @ [g_main, g_1, ...]``, ``(T, T)``."""
        gram = gramian.detach().double().cpu()
        n = gram.shape[0]
        a = torch.eye(n, dtype=torch.float64)
        for i in range(1 if self.aux_only else 0, n):
            others = [0] if self.aux_only else [j for j in torch.randperm(n, generator=self.rng).tolist() if j != i]
            for j in others:
                dot = a[i] @ gram[:, j]
                if dot < 0 and gram[j, j] > 0:
                    a[i, j] -= dot / gram[j, j]
        return a

    def from_gramian(self, gramian: torch.Tensor) -> torch.Tensor:
        """The update's coefficients: the sum of the projected gradients' rows of :meth:`projection`."""
        return self.projection(gramian).sum(0).to(gramian)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self.rng.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.rng.set_state(state["rng"])


class OLAux(_Coefficients):
    """Online learning of auxiliary weights (Lin, Baweja, Kantor and Held, "Adaptive Auxiliary
    Task Weighting for Reinforcement Learning", NeurIPS 2019).

    The weights follow the main loss one step ahead: with the model stepping along
    ``g_main + sum_k w_k g_k`` at learning rate eta, ``dL_main(next)/dw_k = -eta <g_main, g_k>``, so
    every ``horizon`` steps

        w_k <- w_k + weight_lr * mean over the horizon of <g_main, g_k>

    clamped at 0 unless ``nonnegative=False``. The model trains on ``L_main + sum_k w_k L_k``.

    That is all the paper and the authors' code do to the weights: their update is
    ``clip(w + beta * mean <g_aux, g_main>, 0, None)`` (``olaux/ddpg.py`` and
    ``baselines/common/mpi_aux_update.py`` of the OL-AUX code), a lower bound and no upper one, so
    a task whose gradient keeps agreeing with the main one grows without limit (weights 10-12
    after 1,500 steps on digits). Two options bound them: ``max_weight`` clips each weight into
    ``[0, max_weight]``, and ``normalize=True`` projects the auxiliary weights after each update
    onto ``{w >= 0, sum_k w_k = K}`` (ARML's set: the weights then only redistribute a fixed
    budget, starting from 1 each). Neither is in the paper; both are off by default.
    The inner products are one row of the Gramian (:meth:`TaskGradients.gramian_row`): ``g_main``
    by one backbone pass, four or more tasks on a batch by one forward-mode pass along it, whatever
    their number; fewer, or a task alone on its batch (a self-supervised task), by the backward
    each one's update needs anyway.

    Args:
        horizon: steps per weight update (the paper's N).
        weight_lr: step size of the weight update (the paper's beta times the model's eta).
        nonnegative: keep weights >= 0 (a negative weight would ascend an auxiliary loss).
        space: ``'shared'`` (the paper), ``'last_shared'`` or ``'representation'``.
        max_weight: clip each auxiliary weight to at most this (None: no upper bound, the paper).
        normalize: after each update, project the auxiliary weights onto ``{w >= 0, sum = K}``.
    """

    def __init__(self, horizon: int = 5, weight_lr: float = 1.0, nonnegative: bool = True, space: str = "shared",
                 max_weight: float | None = None, normalize: bool = False):
        if int(horizon) < 1:
            raise ConfigError(f"weightings.ol_aux.horizon must be >= 1, got {horizon}.")
        if max_weight is not None and not (isinstance(max_weight, (int, float)) and max_weight > 0):
            raise ConfigError(f"weightings.ol_aux.max_weight must be a positive number or None, got {max_weight!r}.")
        if normalize and (max_weight is not None or not nonnegative):
            raise ConfigError(
                "weightings.ol_aux.normalize = True keeps the weights on {w >= 0, sum = K} by itself; drop "
                "max_weight and leave nonnegative = True."
            )
        self.horizon, self.weight_lr, self.nonnegative = int(horizon), float(weight_lr), bool(nonnegative)
        self.max_weight, self.normalize = (None if max_weight is None else float(max_weight)), bool(normalize)
        self.space = check_space(space, "weightings.ol_aux")

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        self.acc = torch.zeros(len(self.aux_tasks), device=info.device)
        self.count = 0

    def backward(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        engine = self.engine(losses, ctx)
        # One row of the Gramian, <g_main, g_k>: g_main by one backbone pass, many tasks sharing a
        # batch by one forward-mode pass along it (constant in their number), a few or a task alone
        # on its batch by the backwards the update reuses (TaskGradients.gramian_row).
        self.acc += engine.gramian_row(self.main_task, self.aux_tasks)
        self.count += 1
        w = self.w
        return engine.backward(dict(zip(self.names, w)), dict(zip(self.names, w))).detach()

    def after_step(self, ctx: StepContext) -> bool:
        """Every ``horizon`` steps, move the weights along the horizon's mean inner products."""
        if self.count < self.horizon:
            return False
        new = self.w[1:] + self.weight_lr * self.acc / self.count
        if self.normalize:
            new = project_to_simplex(new, float(len(self.aux_tasks)))
        elif self.nonnegative or self.max_weight is not None:
            new = new.clamp(min=0.0 if self.nonnegative else None, max=self.max_weight)
        self.w = torch.cat([self.w[:1], new])
        self.acc.zero_()
        self.count = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "acc": self.acc.clone(), "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.acc = state["acc"].to(self.w.device).clone()
        self.count = int(state["count"])


class CosineSim(GCS):
    """GCS in its soft form: each auxiliary gradient scaled by ``max(0, cos(g_main, g_k))``."""

    def __init__(self, space: str = "shared"):
        super().__init__(mode="soft", space=space)
