"""ARML (Shi, Hoffman, Saenko, Darrell, Xu, "Auxiliary Task Reweighting for Minimum-data
Learning", NeurIPS 2020).

The model trains on ``L = L_main + sum_k w_k L_k``. The auxiliary weights are chosen so that the
weighted auxiliary gradient matches the main-task gradient on the shared parameters:

    min_w  f(w) = || g_main - sum_k w_k g_k ||^2     on  {w >= 0, sum_k w_k = K},

with gradient ``df/dw_k = -2 <d, g_k>``, ``d = g_main - sum_j w_j g_j``. Every ``update_every``
steps the weights take one step of their own optimizer along it, then the exact Euclidean
projection onto the set (the official code shifts then clamps, which can leave the set).

Cost: ``d`` is one backward pass of ``L_main - sum_k w_k L_k``; all K inner products ``<d, g_k>``
come from one directional derivative of the auxiliary-loss vector along ``d`` (one forward-mode
pass of the backbone; see :mod:`auxframe.weighting.gradients`), so the weight step costs the same
at K = 2 and K = 39: 0.8 of the official code's double backward on CPU (bench/gradient_engine.py).

Two algorithms (``algorithm=``):

* ``'langevin'`` (the paper's Algorithm 1): during the first ``burn_in`` steps Gaussian noise of
  standard deviation ``noise_std`` is added to every model parameter after each optimizer step
  (Langevin dynamics: with SGD at learning rate eta, ``noise_std = sqrt(2 * eta * temperature)``
  samples the tempered posterior), so that the weights are fitted on samples around the model
  rather than on one point; regular updates follow.
* ``'simple'`` (the paper's Algorithm 2): no noise; weights and model are updated together.

The schedule of the official code (``SSL/train.py`` of bfshi/ARML_Auxiliary_Task_Reweighting) is an
option too: plain SGD at 0.05 on the weights, the first weight step at iteration 20 (1-based) and
then every 20, and on those iterations the weights step *instead of* the model (the model is not
stepped). ``weight_optimizer = @torch.optim.SGD``, ``first_update = 19`` (0-based steps) and
``freeze_model_on_update = True`` reproduce it; ``weightings/arml_official.gin`` sets all three.
auxframe's default keeps Adam and the simultaneous update (the model steps on every step, with the
weights its objective was evaluated at).

Example (gin)::

    train.weighting = @weightings.arml()
    weightings.arml.update_every = 20
    weightings.arml.weight_lr = 0.05
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, TaskLosses, Weighting, WeightingSetup
from auxframe.weighting.gradients import JVP_MODES, TaskGradients, check_space, has_dropout, project_to_simplex

_ALGORITHMS = ("simple", "langevin")


class ARML(Weighting):
    """Auxiliary weights fitted so that their weighted gradient matches the main gradient.

    Args:
        update_every: steps between weight updates.
        weight_optimizer: optimizer factory for the weights (default: Adam).
        weight_lr: learning rate of the weight optimizer.
        algorithm: ``'simple'`` (Algorithm 2) or ``'langevin'`` (Algorithm 1, noise in burn-in).
        burn_in: steps of Langevin noise (``algorithm='langevin'`` only).
        noise_std: standard deviation of the noise added to each parameter per burn-in step.
        space: where gradients are compared: ``'shared'`` (all backbone parameters, the paper),
            ``'last_shared'`` or ``'representation'`` (see :mod:`auxframe.weighting.gradients`).
        jvp: how the inner products ``<d, g_k>`` are computed after d's backward pass:
            ``'forward'`` (one forward-mode pass through the backbone; the fastest on CPU),
            ``'reverse'`` (a double backward over the losses; exact with dropout), or
            ``'fused'`` (d and the inner products from one backbone pass with a graph and one
            through it; see :meth:`TaskGradients.gradient_and_inner_products`).
        seed: seed of the Langevin noise.
        first_update: the (0-based) step of the first weight update; later ones follow every
            ``update_every`` steps. 0 (default) updates before the first step; the official code's
            first update is at its iteration 20, i.e. ``first_update = 19``.
        freeze_model_on_update: on a weight-update step, update only the weights: the model gets
            no gradient and is not stepped (its optimizer skips parameters without ``.grad``), as
            in the official code. Off by default (the model steps on every step).
        log_gramian: at every weight update also log each task's gradient norm
            (``arml/grad_norm/<task>``) and each auxiliary gradient's cosine with the main one
            (``arml/cos/<task>``), from the tasks' Jacobian (one backward pass per task): to see
            why the weights go where they go. Off by default.
    """

    def __init__(
        self,
        update_every: int = 20,
        weight_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        weight_lr: float = 0.05,
        algorithm: str = "simple",
        burn_in: int = 0,
        noise_std: float = 0.0,
        space: str = "shared",
        jvp: str = "forward",
        seed: int = 0,
        first_update: int = 0,
        freeze_model_on_update: bool = False,
        log_gramian: bool = False,
    ):
        if int(update_every) < 1:
            raise ConfigError(f"weightings.arml.update_every must be >= 1, got {update_every}.")
        if algorithm not in _ALGORITHMS:
            raise ConfigError(f"weightings.arml.algorithm must be one of {_ALGORITHMS}, got {algorithm!r}.")
        if algorithm == "simple" and (burn_in or noise_std):
            raise ConfigError(
                "weightings.arml.burn_in and noise_std belong to algorithm='langevin'; set "
                "`weightings.arml.algorithm = 'langevin'` or drop them."
            )
        if algorithm == "langevin" and (burn_in <= 0 or noise_std <= 0):
            raise ConfigError(
                f"algorithm='langevin' needs burn_in > 0 and noise_std > 0 (got burn_in={burn_in}, "
                f"noise_std={noise_std}); set both, or use algorithm='simple'."
            )
        if jvp not in (*JVP_MODES, "fused"):
            raise ConfigError(f"weightings.arml.jvp must be one of {(*JVP_MODES, 'fused')}, got {jvp!r}.")
        if isinstance(first_update, bool) or not isinstance(first_update, int) or first_update < 0:
            raise ConfigError(f"weightings.arml.first_update must be a step >= 0, got {first_update!r}.")
        self.update_every = int(update_every)
        self.first_update = first_update
        self.freeze_model_on_update = bool(freeze_model_on_update)
        self.log_gramian = bool(log_gramian)
        self.weight_optimizer_factory = weight_optimizer or torch.optim.Adam
        self.weight_lr = float(weight_lr)
        self.algorithm, self.burn_in, self.noise_std = algorithm, int(burn_in), float(noise_std)
        self.space = check_space(space, "weightings.arml")
        self.jvp = jvp
        self.seed = int(seed)

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        if not self.aux_tasks:
            raise ConfigError("ARML weighs auxiliary tasks, but the task graph has none; use weightings.stl.")
        self.model = info.model
        # The inner products by reverse mode (or fused) differentiate the step's graph twice.
        self.double_backward = self.jvp != "forward" or self.space == "last_shared" or has_dropout(info.model.backbone)
        self.w = torch.ones(len(self.aux_tasks), device=info.device, requires_grad=True)
        self.optimizer = self.weight_optimizer_factory([self.w], lr=self.weight_lr)
        self.noise_rng = torch.Generator(device=info.device).manual_seed(self.seed)
        self.updates = 0
        self._logs: dict[str, float] = {}

    # -- the weight step -------------------------------------------------------------------------
    def weight_gradient(self, losses: TaskLosses, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(df/dw, f)`` at the current weights: ``-2 <d, g_k>`` for every k, and ``||d||^2``."""
        engine = TaskGradients.of(losses, ctx, space=self.space, jvp="reverse" if self.jvp == "reverse" else "forward")
        w = self.w.detach()
        coefficients = {self.main_task: 1.0, **{t: -w[i] for i, t in enumerate(self.aux_tasks)}}
        d, inner = engine.gradient_and_inner_products(coefficients, self.aux_tasks, fused=self.jvp == "fused")
        objective = sum((x * x).sum() for x in d)
        return -2.0 * inner, objective

    def _update_weights(self, losses: TaskLosses, ctx: StepContext) -> None:
        grad, objective = self.weight_gradient(losses, ctx)
        self.optimizer.zero_grad(set_to_none=True)
        self.w.grad = grad.to(self.w)
        self.optimizer.step()
        with torch.no_grad():
            self.w.copy_(project_to_simplex(self.w, float(len(self.aux_tasks))))
        self.updates += 1
        if self.log_gramian:
            gram = self._gramian_logs(losses, ctx)
        self._logs = {"arml/objective": float(objective), "arml/weight_grad_norm": float(grad.norm()),
                      # per task: how steadily each weight is pushed (its mean over the updates
                      # against its spread says whether the weights follow a signal or a random walk)
                      **{f"arml/weight_grad/{t}": float(g) for t, g in zip(self.aux_tasks, grad.tolist())}}
        if self.log_gramian:
            self._logs.update(gram)

    def _gramian_logs(self, losses: TaskLosses, ctx: StepContext) -> dict[str, float]:
        """Each task's gradient norm and each auxiliary gradient's cosine with the main one, in the
        weights' space: what ARML's objective is made of (``f(w) = ||g_main - sum_k w_k g_k||^2``)."""
        tasks = [self.main_task, *self.aux_tasks]
        engine = TaskGradients.of(losses, ctx, space=self.space, jvp="reverse")
        gram = engine.gramian(tasks).detach().double()
        norms = gram.diagonal().clamp_min(0).sqrt()
        logs = {f"arml/grad_norm/{t}": float(n) for t, n in zip(tasks, norms)}
        for i, t in enumerate(self.aux_tasks, start=1):
            denominator = float(norms[0] * norms[i])
            logs[f"arml/cos/{t}"] = float(gram[0, i]) / denominator if denominator > 0 else 0.0
        return logs

    # -- the protocol ----------------------------------------------------------------------------
    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        w = self.w.detach().clone()  # a copy: the weight step updates self.w in place
        total = losses.mean(self.main_task)
        for i, task in enumerate(self.aux_tasks):
            if task in losses:
                total = total + w[i] * losses.mean(task)
        return total

    def is_update_step(self, step: int) -> bool:
        """Whether the weights take a step at (0-based) ``step``."""
        return step >= self.first_update and (step - self.first_update) % self.update_every == 0

    def backward(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        # The model's step uses the weights the objective was evaluated at (simultaneous update).
        total = self.combine(losses, ctx)
        if self.is_update_step(ctx.step):
            self._update_weights(losses, ctx)
            if self.freeze_model_on_update:  # no .grad anywhere: the model's optimizer skips this step
                return total.detach()
        ctx.backward(total) if ctx.backward is not None else total.backward()  # (the fp16 loss scale)
        return total.detach()

    def after_step(self, ctx: StepContext) -> bool:
        update = self.is_update_step(ctx.step)
        frozen = update and self.freeze_model_on_update  # the model did not move: no Langevin step either
        if self.algorithm == "langevin" and ctx.step < self.burn_in and not frozen:
            with torch.no_grad():
                for p in ctx.model.parameters():
                    if p.requires_grad:
                        noise = torch.randn(p.shape, generator=self.noise_rng, device=p.device, dtype=p.dtype)
                        p.add_(noise, alpha=self.noise_std)
        return update  # backward took a weight step: it gets its own log row

    def weights(self) -> dict[str, float]:
        w = self.w.detach().tolist()
        return {self.main_task: 1.0, **dict(zip(self.aux_tasks, w))}

    def log_values(self) -> dict[str, float]:
        return {**super().log_values(), **self._logs}

    def state_dict(self) -> dict[str, Any]:
        return {
            "w": self.w.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "noise_rng": self.noise_rng.get_state(),
            "updates": self.updates,
            "logs": dict(self._logs),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise_rng.set_state(state["noise_rng"])
        self.updates = int(state["updates"])
        self._logs = dict(state["logs"])
