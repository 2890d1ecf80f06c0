"""AuxiNash (Shamsian, Navon, Glazer, Kawaguchi, Chechik and Fetaya, "Auxiliary Learning as an
Asymmetric Bargaining Game", ICML 2023).

The tasks bargain over the update ``d = sum_i alpha_i g_i`` of the shared parameters, as in
Nash-MTL, but with *preferences* ``p`` (one per task, ``p > 0``, summing to T): the asymmetric
Nash bargaining solution maximises ``sum_i p_i log <g_i, d>`` and is characterised by

    G alpha = p / alpha        (elementwise; G = J J^T the tasks' Gramian, alpha > 0),

which is the stationary point of the strictly convex ``f(alpha) = 1/2 alpha^T G alpha -
sum_i p_i log alpha_i``: :func:`nash_bargaining` solves it by damped Newton steps on ``f`` (a
T x T system per step, warm-started from the previous step). As in the official code the
update's norm is then bounded, ``||J^T alpha|| <= max_norm``.

The preferences are learnt: every ``outer_every`` steps, the main task's loss on the held-out
auxiliary set ``L_A`` is differentiated through the bargaining solution,

    dL_A/dp = dL_A/dalpha . dalpha/dp,     dalpha/dp = (G + diag(p / alpha^2))^-1 diag(1 / alpha)

(the implicit function theorem on ``G alpha - p / alpha = 0``), with ``dL_A/dalpha`` the implicit
hypergradient of ``L_A`` through the model trained on ``sum_i alpha_i L_i``
(:func:`auxframe.hypergrad.hypergradient`, a truncated Neumann series, as in AuxiLearn). The
preference gradient is clipped to norm 1, ``p`` takes one SGD step (momentum 0.9), is clamped at
``min_pref`` and renormalised to sum T - the official code's outer step (AvivSham/auxinash,
``experiments/nyuv2/trainer.py``, ``methods/auxinash/hyperstep.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from auxframe import distributed, hypergrad
from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, WeightingSetup
from auxframe.weighting.gradients import check_space
from auxframe.weighting.gramian import GramianWeighting


def nash_bargaining(gramian: torch.Tensor, prefs: torch.Tensor, init: torch.Tensor | None = None,
                    iters: int = 100, tol: float = 1e-10) -> torch.Tensor:
    """The asymmetric Nash bargaining weights: ``alpha > 0`` with ``G alpha = p / alpha``.

    Minimises ``f(a) = a^T G a / 2 - sum_i p_i log a_i`` by Newton's method with a backtracking
    line search that keeps ``a > 0`` (f is strictly convex there; the Hessian ``G + diag(p / a^2)``
    is positive definite). In float64 on the CPU (T is small).

    Args:
        gramian: ``(T, T)`` PSD Gramian of the task gradients.
        prefs: ``(T,)`` positive preferences (all ones: Nash-MTL's ``G a = 1 / a``).
        init: starting point (default: the solution for the Gramian's diagonal alone).
        iters: Newton steps at most.
        tol: stop when the Newton decrement squared is below this.

    Returns:
        ``(T,)`` weights, on ``gramian``'s device and dtype.
    """
    g = gramian.detach().double().cpu()
    p = prefs.detach().double().cpu()
    # A tiny ridge keeps the problem bounded below when the gradients are linearly dependent.
    g = g + 1e-12 * max(float(g.diagonal().max()), 1e-30) * torch.eye(len(p), dtype=g.dtype)
    a = (p / g.diagonal().clamp_min(1e-30)).sqrt() if init is None else init.detach().double().cpu().clamp_min(1e-12)

    def f(x):
        return 0.5 * x @ g @ x - (p * x.log()).sum()

    for _ in range(iters):
        grad = g @ a - p / a
        hess = g + torch.diag(p / a**2)
        step = torch.linalg.solve(hess, grad)
        decrement = float(grad @ step)
        if decrement < tol:
            break
        t = 1.0
        while bool((a - t * step <= 0).any()):
            t *= 0.5
        fa = f(a)
        while f(a - t * step) > fa - 0.25 * t * decrement and t > 1e-12:
            t *= 0.5
        a = a - t * step
    return a.to(device=gramian.device, dtype=gramian.dtype)


def bargaining_jacobian(gramian: torch.Tensor, prefs: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``d alpha / d p`` at the solution: ``(G + diag(p / alpha^2))^-1 diag(1 / alpha)``, ``(T, T)``."""
    g, p, a = gramian.double(), prefs.double(), alpha.double()
    return torch.linalg.solve(g + torch.diag(p / a**2), torch.diag(1.0 / a)).to(gramian.dtype)


class AuxiNash(GramianWeighting):
    """Nash bargaining between the main and auxiliary tasks, with learnt asymmetric preferences.

    Args:
        outer_every: inner steps between preference updates (25 in the official code).
        meta_lr: learning rate of the preferences' SGD (momentum 0.9; 5e-3 in the official code).
        max_norm: bound on ``||sum_i alpha_i g_i||`` (0: none; 1 in the official code).
        min_pref: preferences are clamped at this before renormalising (1e-4).
        neumann_terms: Neumann terms of the hypergradient (3).
        neumann_alpha: the Neumann step (1e-4 in the official code, unscaled).
        aux_batches: auxiliary-set batches averaged into the outer loss.
        pref_optimizer: optimizer factory for the preferences (default SGD with momentum 0.9).
        space: gradient space of the bargaining (``'shared'``, the paper; or ``'last_shared'``,
            ``'representation'``).

    Example (gin)::

        train.weighting = @weightings.auxinash()
        weightings.auxinash.outer_every = 25
    """

    def __init__(
        self,
        outer_every: int = 25,
        meta_lr: float = 5e-3,
        max_norm: float = 1.0,
        min_pref: float = 1e-4,
        neumann_terms: int = 3,
        neumann_alpha: float = 1e-4,
        aux_batches: int = 1,
        pref_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        space: str = "shared",
    ):
        if int(outer_every) < 1:
            raise ConfigError(f"weightings.auxinash.outer_every must be >= 1, got {outer_every}.")
        if min_pref <= 0:
            raise ConfigError(f"weightings.auxinash.min_pref must be > 0, got {min_pref}.")
        super().__init__(None, space=check_space(space, "weightings.auxinash"))
        self.outer_every, self.meta_lr, self.max_norm = int(outer_every), float(meta_lr), float(max_norm)
        self.min_pref, self.neumann_terms, self.neumann_alpha = float(min_pref), int(neumann_terms), float(neumann_alpha)
        self.aux_batches = int(aux_batches)
        self.pref_optimizer_factory = pref_optimizer or (lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9))

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        if not self.aux_tasks:
            raise ConfigError("AuxiNash weighs auxiliary tasks, but the task graph has none; use weightings.stl.")
        if not info.has_aux_set:
            raise ConfigError(
                "AuxiNash learns its preferences on the held-out auxiliary set, but the split has none; "
                "set LowDataSplit.aux_per_class > 0 (see datasets/digits.gin)."
            )
        n = len(self.names)
        self.prefs = torch.ones(n, device=info.device, requires_grad=True)  # sum T, as in the official code
        self.pref_optimizer = self.pref_optimizer_factory([self.prefs], lr=self.meta_lr)
        self.alpha = torch.ones(n, dtype=torch.float64)  # the bargaining solution (before max_norm)
        self.gram = torch.eye(n, dtype=torch.float64)  # the last step's Gramian (for d alpha / d p)
        self.shared = list(info.shared_parameters)
        self._logs: dict[str, float] = {}

    def from_gramian(self, gramian: torch.Tensor) -> torch.Tensor:
        self.gram = gramian.detach().double().cpu()
        self.alpha = nash_bargaining(self.gram, self.prefs.detach(), init=self.alpha)
        scale = 1.0
        if self.max_norm > 0:
            norm = float((self.alpha @ self.gram @ self.alpha).clamp_min(0).sqrt())
            scale = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
        return (self.alpha * scale).to(gramian)

    # -- the outer step: preferences ---------------------------------------------------------------
    def outer_step(self, ctx: StepContext) -> bool:
        """One step of the preferences along ``dL_A/dp`` (see the module docstring)."""
        alpha = self.alpha.to(self.prefs).clone().requires_grad_(True)
        losses = ctx.train_losses()
        train_loss = (alpha * losses.means(self.names)).sum()
        outer = sum(ctx.aux_set_losses().mean(self.main_task) for _ in range(self.aux_batches)) / self.aux_batches
        result = hypergrad.hypergradient(
            train_loss, outer, self.shared, [alpha], method="neumann", neumann_terms=self.neumann_terms,
            alpha=self.neumann_alpha, reduce=distributed.all_reduce_mean if distributed.is_distributed() else None,
        )
        d_alpha = result.grads[0].detach().double().cpu()
        grad = d_alpha @ bargaining_jacobian(self.gram, self.prefs.detach().double().cpu(), self.alpha)
        self.pref_optimizer.zero_grad(set_to_none=True)
        self.prefs.grad = grad.to(self.prefs)
        torch.nn.utils.clip_grad_norm_([self.prefs], max_norm=1.0)
        self.pref_optimizer.step()
        with torch.no_grad():
            p = self.prefs.clamp_min(self.min_pref)
            self.prefs.copy_(p / p.sum() * len(self.names))
        self._logs = {"auxinash/outer_loss": float(outer.detach()), "auxinash/pref_grad_norm": float(grad.norm())}
        return True

    def log_values(self) -> dict[str, float]:
        prefs = dict(zip(self.names, self.prefs.detach().tolist()))
        return {**super().log_values(), **{f"auxinash/pref/{t}": v for t, v in prefs.items()}, **self._logs}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "prefs": self.prefs.detach().clone(), "optimizer": self.pref_optimizer.state_dict(),
                "alpha": self.alpha.clone(), "gram": self.gram.clone(), "logs": dict(self._logs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.prefs.copy_(state["prefs"])
        self.pref_optimizer.load_state_dict(state["optimizer"])
        self.alpha, self.gram = state["alpha"].clone(), state["gram"].clone()
        self._logs = dict(state["logs"])
