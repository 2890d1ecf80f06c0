"""AuxiLearn (Navon et al., "Auxiliary Learning by Implicit Differentiation", ICLR 2021).

An auxiliary network g_phi (an ``auxnets`` plugin: linear, nonlinear, per-pixel conv) combines the
task losses into the training loss, ``L_T(W, phi) = g_phi(l_main, l_1, ..., l_K)``. The model
trains on L_T; every ``outer_every`` inner steps phi takes one step along the hypergradient of
the main-task loss on the held-out auxiliary set, ``L_A(W)``:

    dL_A/dphi = - (d2 L_T / dW dphi)^T (H_W L_T)^-1 grad_W L_A,

with the inverse Hessian approximated by a truncated Neumann series of Hessian-vector products
(see :mod:`auxframe.hypergrad`). W is the shared backbone by default (``inner_params='shared'``).

Per-sample losses of tasks computed on the main task's batch enter the network row by row; a task
on another batch (a self-supervised task on unlabelled images, a task on other data) enters as its
batch-mean loss, repeated on every row. For the linear network the two are the same; for nonlinear
networks it means the network sees that task through its mean.

With a generated-label task (``Task.generator``, see :mod:`auxframe.labelgen`) the label
generator's parameters are outer parameters too, learned by the same hypergradient (the
generated labels enter ``L_T`` through the auxiliary head's soft cross-entropy, so the mixed term
reaches the generator), jointly with the auxiliary network or alone (``learn_auxnet=False``); a
generator's own regulariser (MAXL's entropy term) is added to the outer loss.

Example (gin)::

    train.weighting = @weightings.auxilearn()
    weightings.auxilearn.auxnet = @auxnets.nonlinear
    auxnets.nonlinear.skip_main = True
    weightings.auxilearn.outer_every = 20
    weightings.auxilearn.neumann_terms = 3
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Mapping

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

from auxframe import distributed, hypergrad
from auxframe.auxnets import LinearAuxNet
from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, TaskLosses, Weighting, WeightingSetup
from auxframe.weighting.gradients import has_dropout
from auxframe.weighting.graphed import GraphedHypergradient

_INNER = ("shared", "all")
_BN_MODES = ("train", "eval")
_MIXED = ("auto", "forward", "vjp", "jacobian")
#: The settings that decide the outer step's execution path (:class:`OuterPath`), chosen at setup.
PATH_SETTINGS = ("method", "curvature", "curvature_fraction", "mixed", "cuda_graph", "aux_batches")
_ON_DIVERGENCE = "on_divergence"
_NORMALIZE = (None, "main", "sum")
_REPORT_AFTER = 20  # outer steps seen before "most outer steps diverge" is said (early transients pass)


class AuxiLearn(Weighting):
    """Losses combined by a learned auxiliary network, trained by implicit differentiation.

    Args:
        auxnet: the auxiliary network: an ``auxnets`` plugin factory (``@auxnets.linear``) or its
            registered name; called with ``num_tasks`` (main + auxiliary).
        outer_every: inner steps between outer steps.
        outer_optimizer: optimizer factory for phi (default: Adam).
        outer_lr: learning rate of the outer optimizer.
        aux_batches: batches of the auxiliary set averaged into one outer loss.
        method: ``'neumann'``, ``'cg'``, ``'exact'`` or ``'first_order'`` (see :mod:`auxframe.hypergrad`).
        neumann_terms: J, the number of Neumann terms after the first.
        alpha: the Neumann scale; ``'auto'`` picks a safe one, ``1 / |lambda|``, from a power-iteration
            estimate of the Hessian's eigenvalue of largest magnitude at the first outer step, and
            keeps it up to date as ``alpha_refresh`` says.
        scale_by_alpha: multiply the series by alpha (the true inverse); the reference code does not.
        curvature: ``'hessian'`` or ``'gauss_newton'``.
        grad_clip: clip the hypergradient to this norm (None: no clipping).
        inner_params: W: ``'shared'`` (the backbone) or ``'all'`` (backbone and heads).
        outer_bn_mode: BatchNorm mode during the outer step, ``'train'`` (batch statistics) or
            ``'eval'`` (running statistics); either way the running statistics are left as they were.
        alpha_refresh: when ``alpha='auto'`` is estimated again. ``'on_divergence'`` (default): at
            the outer step after one whose Neumann series diverged (its last term larger than its
            first), and when the series diverges right after a fresh estimate, alpha is halved
            (and stays halved for later estimates). The curvature grows as training goes on, so an
            estimate from the first outer step goes stale: on the planted benchmark (5 seeds,
            2,000 steps, weightings/auxilearn_linear.gin) the series diverged in 81-100% of outer
            steps with one estimate, and in 2% with ``'on_divergence'``, whose alpha changed twice,
            within the first six outer steps (docs/synthetic.md). An int N re-estimates every N
            outer steps (0: only once, the earlier default).
        mixed: how the mixed term ``(d2 L_T / dW dphi)^T p`` is computed: ``'forward'`` (one
            forward-mode pass of the model along ``p`` gives the directional derivative of every
            per-sample loss, then a backward through the auxiliary network only), ``'vjp'`` (one
            backward through the gradient graph of the training loss), ``'jacobian'`` (one
            first-order backward per element of phi; with ``method='first_order'`` it needs no
            double backward through the model, for models with operations that lack it), or
            ``'auto'`` (default): ``'forward'`` where it applies - no label generators (their
            labels depend on phi), no active dropout (a second pass would draw other masks) -
            else ``'vjp'``; an operation without forward-mode support switches to ``'vjp'`` with
            a warning.
        curvature_fraction: the part of each training batch, in ``(0, 1]``, that the curvature
            products (and ``alpha='auto'``'s power iteration) run on: a random subset drawn
            afresh at every outer step (seeded, so runs repeat and resume exactly). Each
            Hessian-vector product costs in proportion to the examples it runs through, and
            they are most of an outer step; the gradient ``grad_W L_A`` and the mixed term still
            use whole batches. 1.0 (default) uses the whole batch, as the reference code does.
            A curvature mini-batch smaller than the gradient mini-batch is the practice of
            Hessian-free optimisation (Martens 2010; Byrd et al. 2011); ``bench/auxilearn_cost.py``
            measures what it saves and how far the hypergradient moves.
        cuda_graph: on a GPU, capture the outer step's hypergradient once in a CUDA graph and
            replay it at every outer step (:mod:`auxframe.weighting.graphed`): the same numbers,
            several times faster where small models leave the GPU waiting on kernel launches.
            Applies with ``method='neumann'``, ``curvature='hessian'``, ``curvature_fraction=1``,
            one auxiliary-set batch, no label generators, no active dropout, one process; the
            first outer step (which estimates ``alpha='auto'``) and batches of another shape run
            eagerly. Costs the memory of one outer step's graphs for the rest of the run.
            ``'auto'``: the same, where it applies, and eagerly without a word elsewhere (the CPU,
            torchrun, another method); the default stays False until the whole CUDA suite has
            passed with it on (``scripts/gpu_session.sh`` runs the suite so).
        learn_auxnet: learn the auxiliary network's parameters; False keeps them at their
            initial values (the linear net: weight 1 on every task) and learns only the label
            generators of generated-label tasks.
        generator_lr: learning rate of the label generators' parameters in the outer optimizer
            (None: ``outer_lr``).
        normalize: fix the scale of the linear network's weights after every outer step:
            ``'main'`` divides them by the main task's weight (the main task stays at 1, the
            auxiliary weights are relative to it), ``'sum'`` scales them to sum to T; None (default)
            leaves them free, as the reference code does. The inner problem cannot tell the
            weights ``c * w`` from ``w`` (``argmin_W sum_t c w_t L_t`` is the same for every
            ``c > 0``), so their scale is not identified by the implicit gradient: it drifts with
            whatever the truncated series, the inner optimizer's weight decay and Adam's
            per-coordinate steps make of it (docs/synthetic.md). Linear networks without
            ``skip_main`` only.
    """

    def __init__(
        self,
        auxnet: Callable[..., nn.Module] | str = "linear",
        outer_every: int = 20,
        outer_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        outer_lr: float = 1e-3,
        aux_batches: int = 1,
        method: str = "neumann",
        neumann_terms: int = 3,
        alpha: float | str = "auto",
        scale_by_alpha: bool = False,
        curvature: str = "hessian",
        grad_clip: float | None = None,
        inner_params: str = "shared",
        outer_bn_mode: str = "train",
        alpha_refresh: int | str = "on_divergence",
        mixed: str = "auto",
        learn_auxnet: bool = True,
        generator_lr: float | None = None,
        curvature_fraction: float = 1.0,
        cuda_graph: bool | str = False,
        normalize: str | None = None,
    ):
        _check_choice("inner_params", inner_params, _INNER)
        _check_choice("outer_bn_mode", outer_bn_mode, _BN_MODES)
        if not isinstance(outer_every, int) or outer_every < 1:
            raise ConfigError(f"weightings.auxilearn.outer_every must be a positive integer, got {outer_every!r}.")
        if alpha != "auto" and not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ConfigError(f"weightings.auxilearn.alpha must be 'auto' or a positive number, got {alpha!r}.")
        if alpha_refresh != _ON_DIVERGENCE and (isinstance(alpha_refresh, bool) or not isinstance(alpha_refresh, int)
                                                or alpha_refresh < 0):
            raise ConfigError(
                f"weightings.auxilearn.alpha_refresh must be {_ON_DIVERGENCE!r} or an integer >= 0 (outer steps "
                f"between estimates of alpha; 0: only once), got {alpha_refresh!r}."
            )
        if aux_batches < 1:
            raise ConfigError(f"weightings.auxilearn.aux_batches must be >= 1, got {aux_batches!r}.")
        self.auxnet_factory = auxnet
        self.outer_every = outer_every
        self.outer_optimizer_factory = outer_optimizer
        self.outer_lr = outer_lr
        self.aux_batches = aux_batches
        self.method, self.neumann_terms, self.curvature = method, neumann_terms, curvature
        self.alpha_setting, self.scale_by_alpha = alpha, scale_by_alpha
        self.grad_clip, self.inner_params = grad_clip, inner_params
        self.outer_bn_mode, self.alpha_refresh = outer_bn_mode, alpha_refresh
        _check_path_settings(mixed=mixed, curvature_fraction=curvature_fraction, method=method)
        self.mixed, self.curvature_fraction = mixed, float(curvature_fraction)
        if cuda_graph not in (True, False, "auto"):
            raise ConfigError(f"weightings.auxilearn.cuda_graph must be True, False or 'auto', got {cuda_graph!r}.")
        self.cuda_graph = cuda_graph
        self._graphed: GraphedHypergradient | None = None  # the captured hypergradient
        self.learn_auxnet, self.generator_lr = bool(learn_auxnet), generator_lr
        if normalize not in _NORMALIZE:
            raise ConfigError(f"weightings.auxilearn.normalize must be one of {_NORMALIZE}, got {normalize!r}.")
        self.normalize = normalize

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        if not info.has_aux_set:
            raise ConfigError(
                "AuxiLearn takes its outer steps on the held-out auxiliary set, but the split has none. "
                "Set `LowDataSplit.aux_per_class` (e.g. 5) or `LowDataSplit.aux_fraction`."
            )
        factory = self.auxnet_factory
        if isinstance(factory, str):
            from auxframe.registry import registry

            factory = registry.get("auxnets", factory)
        self.tasks = [self.main_task, *self.aux_tasks]
        self.auxnet = factory(num_tasks=len(self.tasks)).to(info.device)
        if not isinstance(self.auxnet, nn.Module):
            raise ConfigError(f"the auxiliary network factory returned {type(self.auxnet).__name__}, not an nn.Module.")
        self.generators = dict(info.label_generators)
        if self.normalize is not None and not (isinstance(self.auxnet, LinearAuxNet) and not self.auxnet.skip_main):
            raise ConfigError(
                f"weightings.auxilearn.normalize = {self.normalize!r} rescales a linear auxiliary network's weights; "
                f"this one is {type(self.auxnet).__name__}{' with skip_main' if getattr(self.auxnet, 'skip_main', False) else ''}. "
                f"Use auxnets.linear without skip_main, or normalize = None."
            )
        groups = self._outer_groups()
        self.outer_params = [p for g in groups for p in g["params"]]
        make_opt = self.outer_optimizer_factory or torch.optim.Adam
        self.outer_optimizer = make_opt(groups, lr=self.outer_lr)
        self.model = info.model
        self.alpha: float | None = None if self.alpha_setting == "auto" else float(self.alpha_setting)
        self.outer_steps = 0
        self.alpha_scale = 1.0  # halved by alpha_refresh='on_divergence' when a fresh estimate diverges
        self.diverged_steps = 0  # outer steps whose Neumann series diverged
        self._refresh_next = False  # the last series diverged: estimate alpha again
        self._estimated_now = False
        self._divergence_reported = False
        self._logs: dict[str, float] = {}
        probe = (1, len(self.tasks), 1, 1) if getattr(self.auxnet, "dense_input", False) else (1, len(self.tasks))
        self._weights = self._effective_weights(torch.ones(probe, device=info.device))
        self._info = info
        self.path = self._choose_path(info)

    # -- inner step ------------------------------------------------------------------------------
    def loss_matrix(self, losses: TaskLosses) -> torch.Tensor:
        """The tasks' losses as ``(B, T)`` rows (or ``(B, T, H, W)`` for per-pixel nets), main first."""
        main = losses[self.main_task]
        batch = main.shape[0]
        same_batch = next((set(g) for g in losses.groups if self.main_task in g), {self.main_task})
        dense = getattr(self.auxnet, "dense_input", False)
        columns = []
        for task in self.tasks:
            value = losses[task]
            aligned = task in same_batch and value.shape[0] == batch
            if dense and aligned and value.shape == main.shape:
                columns.append(value)
            elif aligned:
                columns.append(value.reshape(batch, -1).mean(dim=1) if value.ndim > 1 else value)
            else:
                columns.append(value.mean().expand(batch))
        if dense and columns[0].ndim > 1:
            columns = [c if c.ndim > 1 else c.reshape(batch, *[1] * (main.ndim - 1)).expand_as(main) for c in columns]
        return torch.stack(columns, dim=1)

    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        return self.auxnet(self.loss_matrix(losses))

    def _outer_groups(self) -> list[dict[str, Any]]:
        """The outer optimizer's parameter groups: the auxiliary network, then the label generators."""
        groups = []
        if self.learn_auxnet:
            groups.append({"params": list(self.auxnet.parameters()), "lr": self.outer_lr})
        else:
            self.auxnet.requires_grad_(False)
        generated = [p for g in self.generators.values() for p in g.parameters()]
        if generated:
            lr = self.generator_lr if self.generator_lr is not None else self.outer_lr
            groups.append({"params": generated, "lr": lr})
        if not groups:
            raise ConfigError(
                "weightings.auxilearn.learn_auxnet = False and no task has a label generator: the outer step "
                "would learn nothing. Set learn_auxnet = True, or add a task with `Task.generator`."
            )
        return groups

    def tasks_needed(self) -> list[str]:
        return list(self.tasks)

    # -- the execution path, chosen at setup ---------------------------------------------------------
    def _choose_path(self, info: WeightingSetup) -> OuterPath:
        """How outer steps are computed, from the settings and the model: once, at setup.

        What only the first outer step can tell (whether the trainer records the inputs a
        forward-mode pass needs, and offers the raw batches a CUDA graph copies in) and what fails
        at run time (an operation without forward mode, a failed capture) narrow the path later,
        once, with a warning (:meth:`_narrow`).
        """
        model = distributed.unwrap(info.model)
        dropout = has_dropout(model, training_only=True)  # a second pass would draw other masks
        if self.mixed == "forward" and (self.generators or dropout):
            why = "label generators (their labels depend on phi)" if self.generators else "active dropout"
            raise ConfigError(
                f"weightings.auxilearn.mixed = 'forward' re-runs the model in forward mode, which does not "
                f"reproduce this step with {why}; use mixed = 'auto' (it picks 'vjp' here) or 'vjp'."
            )
        if self.mixed == "auto":
            mixed = "vjp" if self.generators or dropout else "forward"
        else:
            mixed = self.mixed
        blockers = [
            (info.device.type != "cuda", "the model is not on a CUDA device"),
            (self.method != "neumann", f"method={self.method!r} (needs 'neumann')"),
            (self.curvature != "hessian", f"curvature={self.curvature!r} (needs 'hessian')"),
            (self.curvature_fraction < 1, "curvature_fraction < 1"),
            (self.aux_batches != 1, "aux_batches > 1"),
            (bool(self.generators), "label generators"),
            (distributed.is_distributed(), "torchrun (several processes)"),
            (has_dropout(model), "dropout in the model"),
        ]
        blocker = next((why for blocked, why in blockers if blocked), None)
        if self.cuda_graph is True and blocker is not None:
            warnings.warn(f"AuxiLearn: cuda_graph=True does not apply here ({blocker}); outer steps run eagerly.",
                          RuntimeWarning, stacklevel=3)
        return OuterPath(
            mixed=mixed,
            forward_gauss_newton=self.curvature == "gauss_newton" and not dropout,
            curvature_subset=self.curvature_fraction < 1,
            graphed=bool(self.cuda_graph) and blocker is None,
        )

    def reconfigure(self, **settings: Any) -> None:
        """Change settings that decide the execution path (``method``, ``curvature``,
        ``curvature_fraction``, ``mixed``, ``cuda_graph``, ``aux_batches``) after setup, and choose
        the path again (earlier narrowings are forgotten).

        Raises:
            ConfigError: an unknown or invalid setting.
        """
        unknown = set(settings) - set(PATH_SETTINGS)
        if unknown:
            raise ConfigError(f"AuxiLearn.reconfigure takes {', '.join(PATH_SETTINGS)}; got {sorted(unknown)}.")
        merged = {k: getattr(self, k) for k in PATH_SETTINGS} | settings
        _check_path_settings(mixed=merged["mixed"], curvature_fraction=merged["curvature_fraction"],
                             method=merged["method"])
        for name, value in settings.items():
            object.__setattr__(self, name, value)
        if getattr(self, "_info", None) is not None:
            self._graphed = None
            object.__setattr__(self, "path", self._choose_path(self._info))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in PATH_SETTINGS and getattr(self, "path", None) is not None:
            raise ConfigError(
                f"AuxiLearn.{name} decides how outer steps run, which setup chose; change it with "
                f"reconfigure({name}=...), which chooses again."
            )
        super().__setattr__(name, value)

    def _narrow(self, message: str | None = None, **changes: Any) -> None:
        """Leave a part of the execution path for the rest of the run (saying why, when ``message``)."""
        self.path = dataclasses.replace(self.path, **changes)
        if message:
            warnings.warn(f"AuxiLearn: {message}", RuntimeWarning, stacklevel=3)

    def _forward_mode_off(self, reason: str) -> None:
        """No forward-mode passes from now on: the mixed term by vjp, Gauss-Newton products by double vjp."""
        self._narrow(reason, mixed="vjp" if self.path.mixed == "forward" else self.path.mixed,
                     forward_gauss_newton=False)

    # -- outer step ------------------------------------------------------------------------------
    def outer_step(self, ctx: StepContext) -> bool:
        """One step of phi along the hypergradient of the auxiliary-set main loss.

        Returns:
            True: every outer step changes the weights and gets its own log row.
        """
        bn_modes = _set_batchnorm_mode(ctx.model, self.outer_bn_mode == "train")
        try:
            computed = self._graphed_step(ctx) if self.path.graphed else None
            if computed is None:
                computed = self._eager_step(ctx)
        finally:
            _restore_batchnorm_mode(bn_modes)
        self._apply(*computed)
        return True

    def _eager_step(self, ctx: StepContext) -> tuple[hypergrad.HypergradResult, torch.Tensor, torch.Tensor]:
        # With the forward-mode mixed term and the curvature on a sub-batch, nothing is
        # differentiated through the whole training batch's forward pass: run it without a graph.
        with torch.set_grad_enabled(not self.path.light):
            train_losses = ctx.train_losses()
        outer_loss = sum(ctx.aux_set_losses().mean(self.main_task) for _ in range(self.aux_batches)) / self.aux_batches
        outer_loss = outer_loss + self._generator_regularizers(train_losses)
        result, matrix = self.hypergradient(ctx, train_losses, outer_loss)
        return result, matrix, outer_loss

    def _apply(self, result: hypergrad.HypergradResult, matrix: torch.Tensor, outer_loss: torch.Tensor) -> None:
        """Step phi along the hypergradient and record what users see."""
        phi = self.outer_params
        for p, g in zip(phi, result.grads):
            p.grad = g.detach()
        norm = float(torch.nn.utils.clip_grad_norm_(phi, self.grad_clip if self.grad_clip else math.inf))
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        self.auxnet.project_()
        self._normalize_weights()
        self.outer_steps += 1
        self._weights = self._effective_weights(matrix.detach())
        self._logs.update({
            "auxilearn/hypergrad_norm": norm,
            "auxilearn/outer_loss": float(outer_loss.detach()),
            "auxilearn/diverging": float(result.diverging),
            "auxilearn/alpha": float(self.alpha) if self.alpha is not None else float("nan"),
        })
        for task, source in self.generators.items():
            self._logs.update({f"labelgen/{task}/{k}": v for k, v in source.statistics().items()})
        self._track_divergence(result.diverging)  # (after the log of the alpha this step used)

    def _normalize_weights(self) -> None:
        """Rescale the linear network's weights so that the main one is 1 (``'main'``) or they sum
        to T (``'sum'``); a zero scale (every weight projected to 0) is left as it is."""
        if self.normalize is None:
            return
        w = self.auxnet.weights.detach()
        scale = float(w[self.auxnet.main_index]) if self.normalize == "main" else float(w.sum()) / len(w)
        if scale > 0:
            self.auxnet.set_weights_(w / scale)

    def hypergradient(
        self, ctx: StepContext, train_losses: TaskLosses, outer_loss: torch.Tensor
    ) -> tuple[hypergrad.HypergradResult, torch.Tensor]:
        """The hypergradient of ``outer_loss`` w.r.t. phi at the current W, without stepping.

        ``train_losses`` are a training batch's losses (``ctx.train_losses()``); the BatchNorm
        mode is the caller's. Updates alpha when ``alpha='auto'`` is due. Returns the result and
        the batch's loss matrix (for the effective weights).
        """
        if self.path.uses_forward_mode and not _records_inputs(train_losses):
            self._forward_mode_off("the trainer's losses carry no inputs to re-run the model in forward mode; "
                                   "the mixed term and Gauss-Newton products use backward passes.")
            train_losses = self._with_graph(ctx, train_losses)
        try:
            return self._hypergradient(ctx, train_losses, outer_loss)
        except _ForwardModeUnsupported as error:
            self._forward_mode_off(
                f"a forward-mode pass through the model failed ({error}); the mixed term and Gauss-Newton "
                f"products use backward passes from now on (the same values, more time). "
                f"weightings.auxilearn.mixed = 'vjp' skips the forward-mode mixed term from the start."
            )
            return self._hypergradient(ctx, self._with_graph(ctx, train_losses), outer_loss)

    def _with_graph(self, ctx: StepContext, train_losses: TaskLosses) -> TaskLosses:
        """``train_losses``, or a fresh batch's with its graph where a light outer step drew it without."""
        return train_losses if self.loss_matrix(train_losses).requires_grad else ctx.train_losses()

    def _hypergradient(
        self, ctx: StepContext, train_losses: TaskLosses, outer_loss: torch.Tensor
    ) -> tuple[hypergrad.HypergradResult, torch.Tensor]:
        """:meth:`hypergradient` along the current execution path."""
        matrix = self.loss_matrix(train_losses)
        train_loss = self.auxnet(matrix)
        inner = self._inner_parameters(ctx)
        curvature_losses, hessian_loss = train_losses, None
        if self.path.curvature_subset:
            curvature_losses = self._curvature_subset(ctx, train_losses)
            hessian_loss = self.auxnet(self.loss_matrix(curvature_losses))
        curvature = self._curvature_args(curvature_losses, ctx, inner)
        if self._alpha_due():
            top = hypergrad.top_eigenvalue(
                train_loss if hessian_loss is None else hessian_loss, inner, seed=self.outer_steps,
                reduce=_reduce(), **curvature,
            )
            # Power iteration finds the eigenvalue of largest magnitude; bounding alpha by it keeps
            # alpha * lambda < 2 for every positive eigenvalue (negative ones diverge regardless).
            self.alpha = hypergrad.safe_alpha(abs(top) if top != 0 else 1.0) * self.alpha_scale
            self._estimated_now = True
            self._logs["auxilearn/top_eigenvalue"] = top
        options = dict(
            method=self.method, neumann_terms=self.neumann_terms,
            alpha=self.alpha if self.alpha is not None else 1.0,  # (unused by cg / exact)
            scale_by_alpha=self.scale_by_alpha, reduce=_reduce(), hessian_loss=hessian_loss, **curvature,
        )
        if self.path.mixed == "forward":
            options.update(mixed="directional", directional=self._directional(ctx, train_losses, matrix, inner))
        else:
            options.update(mixed=self.path.mixed)
        return hypergrad.hypergradient(train_loss, outer_loss, inner, self.outer_params, **options), matrix

    # -- the outer step captured in a CUDA graph ---------------------------------------------------
    def graph(self, model: nn.Module, inner: list[nn.Parameter], make_losses: Callable, batch, aux_batch,
              capture: bool = True) -> GraphedHypergradient:
        """This weighting's hypergradient (Neumann, Hessian, mixed by vjp) on static copies of
        ``batch`` and ``aux_batch``, captured in a CUDA graph (``capture=False``: the same
        function, run eagerly on every call). See :class:`auxframe.weighting.graphed.GraphedHypergradient`."""
        main = self.main_task

        def train_loss(outputs, targets):
            matrix = self.loss_matrix(make_losses(outputs, targets))
            return self.auxnet(matrix), matrix

        def outer_loss(output, targets):
            return make_losses({main: output}, {main: targets}).mean(main)

        return GraphedHypergradient(
            model, inner, self.outer_params, train_loss, outer_loss, main, batch, aux_batch, self.alpha,
            neumann_terms=self.neumann_terms, scale_by_alpha=self.scale_by_alpha, capture=capture,
        )

    def _graphed_step(self, ctx: StepContext) -> tuple[hypergrad.HypergradResult, torch.Tensor, torch.Tensor] | None:
        """The outer step's hypergradient replayed from the CUDA graph, or None (then eagerly)."""
        if ctx.train_batch is None or ctx.aux_set_batch is None or ctx.make_losses is None:
            self._narrow("cuda_graph=True does not apply here (the trainer offers no raw batches); outer steps "
                         "run eagerly." if self.cuda_graph is True else None, graphed=False)
            return None
        if self.alpha is None or self._alpha_due():
            return None  # (the first outer step estimates alpha eagerly)
        batch, aux_batch = ctx.train_batch(), ctx.aux_set_batch()
        if self._graphed is not None and self._graphed.settings != (self.neumann_terms, self.scale_by_alpha):
            self._graphed = None  # J or the scaling changed since the capture: capture again
        if self._graphed is None:
            try:
                self._graphed = self.graph(distributed.unwrap(ctx.model), self._inner_parameters(ctx),
                                           ctx.make_losses, batch, aux_batch)
            except Exception as error:  # (CUDA errors of a failed capture, whatever their class)
                self._narrow(f"capture failed: {type(error).__name__}: {str(error).splitlines()[0]}; outer steps "
                             f"run eagerly.", graphed=False)
                return None
        if not self._graphed.fits(batch, aux_batch):
            return None
        result, matrix, outer = self._graphed(batch, aux_batch, self.alpha)
        return result, matrix, outer

    # -- forward mode: the mixed term and Gauss-Newton products ----------------------------------
    def _forward_mode(self, ctx: StepContext, losses: TaskLosses, inner: list[nn.Parameter],
                      tangents: list[torch.Tensor], read: Callable[[dict[str, torch.Tensor]], Any]) -> Any:
        """Run the model on ``losses``' inputs with W made dual along ``tangents`` (one forward-mode
        pass) and return ``read(outputs)``, called inside the dual level."""
        model = distributed.unwrap(ctx.model)
        names = {id(p): n for n, p in model.named_parameters()}
        # Copies of the buffers: the re-run must not move BatchNorm's running statistics.
        state = {n: b.clone() for n, b in model.named_buffers()}
        state.update({n: q.detach() for n, q in model.named_parameters()})
        try:
            with torch.no_grad(), fwAD.dual_level():
                for param, tangent in zip(inner, tangents):
                    state[names[id(param)]] = fwAD.make_dual(param.detach(), tangent.to(param.dtype))
                outputs: dict[str, torch.Tensor] = {}
                for group in _groups_of(losses):
                    x = losses.inputs[group[0]]
                    outputs.update(torch.func.functional_call(model, state, (x,), {"tasks": list(group)}))
                return read(outputs)
        except (RuntimeError, NotImplementedError) as error:
            raise _ForwardModeUnsupported(str(error).splitlines()[0]) from error

    def _directional(self, ctx: StepContext, losses: TaskLosses, matrix: torch.Tensor, inner: list[nn.Parameter]):
        """``p -> <grad_W L_T, p>`` as a function of phi: ``<dg/dM (M), dM>``, with ``dM`` the
        directional derivative of the loss matrix ``M`` along ``p`` from one forward-mode pass of
        the model (``M`` does not depend on phi, so only ``dg/dM`` carries phi's graph)."""
        detached = matrix.detach().requires_grad_()
        (slope,) = torch.autograd.grad(self.auxnet(detached), detached, create_graph=True)

        def directional(p: list[torch.Tensor]) -> torch.Tensor:
            tangent = self._forward_mode(
                ctx, losses, inner, p, lambda outs: fwAD.unpack_dual(self.loss_matrix(losses.from_outputs(outs))).tangent
            )
            if tangent is None:  # the losses do not depend on W along p
                tangent = torch.zeros_like(matrix)
            return (slope * tangent.to(slope.dtype)).sum()

        return directional

    # -- the curvature mini-batch ----------------------------------------------------------------
    def _curvature_subset(self, ctx: StepContext, losses: TaskLosses) -> TaskLosses:
        """The training losses on a random ``curvature_fraction`` of each group's batch (the same
        inputs and targets, re-run through the model), for the Hessian-vector products."""
        if losses.from_outputs is None or not all(t in losses.inputs and t in losses.targets for t in losses.names):
            raise ConfigError(
                "weightings.auxilearn.curvature_fraction < 1 re-runs part of the training batch, but this "
                "trainer's losses carry no inputs/targets; set curvature_fraction = 1.0."
            )
        model = distributed.unwrap(ctx.model)
        generator = torch.Generator().manual_seed(7_919 * (self.outer_steps + 1))
        outputs: dict[str, torch.Tensor] = {}
        targets: dict[str, torch.Tensor] = {}
        self.curvature_index: dict[tuple[str, ...], torch.Tensor] = {}  # the rows used, per group
        for group in _groups_of(losses):
            x = losses.inputs[group[0]]
            n = x.shape[0]
            keep = max(1, math.ceil(self.curvature_fraction * n))
            index = torch.randperm(n, generator=generator)[:keep].sort().values.to(x.device)
            self.curvature_index[group] = index
            outputs.update(model(x[index], tasks=list(group)))
            targets.update({t: losses.targets[t][index] for t in group})
        subset = losses.from_outputs(outputs, targets)
        subset.inputs = {t: losses.inputs[t][self.curvature_index[g]] for g in self.curvature_index for t in g}
        return subset

    def _generator_regularizers(self, losses: TaskLosses) -> torch.Tensor | float:
        """The label generators' own outer-loss terms on this batch, logged as ``labelgen/<task>/regularizer``."""
        total: torch.Tensor | float = 0.0
        for task, source in self.generators.items():
            if task in losses.targets:
                reg = source.regularizer(losses.targets[task], losses.targets[self.main_task])
                if reg is not None:
                    total = total + reg
                    self._logs[f"labelgen/{task}/regularizer"] = float(reg.detach())
        return total

    def _alpha_due(self) -> bool:
        """Whether ``alpha='auto'`` needs a (new) power-iteration estimate before this outer step."""
        uses_alpha = self.method == "neumann" or (self.method == "first_order" and self.scale_by_alpha)
        if self.alpha_setting != "auto" or not uses_alpha:
            return False
        if self.alpha is None:
            return True
        if self.alpha_refresh == _ON_DIVERGENCE:
            return self._refresh_next
        return bool(self.alpha_refresh and self.outer_steps % self.alpha_refresh == 0)

    def _track_divergence(self, diverging: bool) -> None:
        """Count diverging Neumann series, adapt ``alpha='auto'`` to them (``alpha_refresh='on_divergence'``)
        and say once, plainly, when most outer steps diverge."""
        adaptive = self.alpha_setting == "auto" and self.alpha_refresh == _ON_DIVERGENCE and self.method == "neumann"
        fresh, self._estimated_now = self._estimated_now, False
        self.diverged_steps += int(diverging)
        self._logs["auxilearn/diverged_fraction"] = self.diverged_steps / self.outer_steps
        if adaptive:
            self._refresh_next = diverging and not fresh
            if diverging and fresh:  # a fresh estimate and still diverging: back off
                self.alpha_scale *= 0.5
                self.alpha *= 0.5
            self._logs["auxilearn/alpha_scale"] = self.alpha_scale
        if (not self._divergence_reported and self.outer_steps >= _REPORT_AFTER
                and self.diverged_steps > self.outer_steps / 2):
            self._divergence_reported = True
            warnings.warn(f"AuxiLearn: {self._divergence_message()}", RuntimeWarning, stacklevel=4)

    def _divergence_message(self) -> str:
        """What a run whose Neumann series diverges in most outer steps is told, with the fix."""
        share = f"the Neumann series diverged in {self.diverged_steps} of {self.outer_steps} outer steps"
        meaning = ("their hypergradients are not the implicit gradient, so the task weights move at random "
                   "(auxilearn/diverging in scalars.jsonl marks each one)")
        if self.method != "neumann":
            fix = "lower weightings.auxilearn.alpha, or use method = 'neumann' with alpha = 'auto'"
        elif self.alpha_setting != "auto":
            fix = (f"alpha = {self.alpha_setting} is too large for this Hessian; set weightings.auxilearn.alpha = 'auto' "
                   f"(estimated from the Hessian and re-estimated when the series diverges)")
        elif self.alpha_refresh != _ON_DIVERGENCE:
            fix = ("alpha was estimated once and went stale as the curvature grew; set "
                   "weightings.auxilearn.alpha_refresh = 'on_divergence' (the default)")
        else:
            fix = ("alpha is re-estimated and halved already, so the Hessian has negative curvature here; use "
                   "weightings.auxilearn.curvature = 'gauss_newton' (positive semi-definite), or fewer "
                   "neumann_terms")
        return f"{share}: {meaning}. Fix: {fix}."

    def _curvature_args(self, losses: TaskLosses, ctx: StepContext | None = None,
                        inner: list[nn.Parameter] | None = None) -> dict[str, Any]:
        """Keyword arguments selecting the curvature; Gauss-Newton works on the heads' outputs, with
        ``J v`` by one forward-mode pass of the model where the execution path says so."""
        if self.curvature != "gauss_newton":
            return {"curvature": self.curvature}
        if losses.outputs is None or losses.from_outputs is None:
            raise ConfigError("curvature='gauss_newton' needs the heads' outputs, which this trainer did not provide.")
        names = list(losses.outputs)

        def output_loss(outs):
            return self.auxnet(self.loss_matrix(losses.from_outputs(dict(zip(names, outs)))))

        args = {"curvature": "gauss_newton", "outputs": [losses.outputs[n] for n in names], "output_loss": output_loss}
        if self.path.forward_gauss_newton and ctx is not None and _records_inputs(losses):
            def read(outs):
                return [fwAD.unpack_dual(outs[n]).tangent for n in names]

            args["output_jvp"] = lambda v: self._forward_mode(ctx, losses, inner, v, read)
        return args

    def _inner_parameters(self, ctx: StepContext) -> list[nn.Parameter]:
        if self.inner_params == "shared":
            return list(ctx.shared_parameters)
        return [p for p in ctx.model.parameters() if p.requires_grad]

    def _effective_weights(self, matrix: torch.Tensor) -> dict[str, float]:
        weights = self.auxnet.effective_weights(matrix)
        distributed.all_reduce_mean([weights])  # under torchrun: each rank's batch gives its own
        return {t: float(w) for t, w in zip(self.tasks, weights)}

    # -- reporting and state ---------------------------------------------------------------------
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    def log_values(self) -> dict[str, float]:
        return {**super().log_values(), **self._logs}

    def state_dict(self) -> dict[str, Any]:
        return {
            "auxnet": self.auxnet.state_dict(),
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "alpha": self.alpha,
            "alpha_state": {"scale": self.alpha_scale, "diverged_steps": self.diverged_steps,
                            "refresh_next": self._refresh_next, "reported": self._divergence_reported},
            "outer_steps": self.outer_steps,
            "weights": dict(self._weights),
            "logs": dict(self._logs),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.auxnet.load_state_dict(state["auxnet"])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.alpha = state["alpha"]
        extra = state.get("alpha_state")  # (checkpoints from before alpha_refresh='on_divergence' lack it)
        if extra is not None:
            self.alpha_scale, self.diverged_steps = float(extra["scale"]), int(extra["diverged_steps"])
            self._refresh_next, self._divergence_reported = bool(extra["refresh_next"]), bool(extra["reported"])
        self.outer_steps = int(state["outer_steps"])
        self._weights = dict(state["weights"])
        self._logs = dict(state["logs"])


@dataclasses.dataclass(frozen=True)
class OuterPath:
    """How AuxiLearn's outer steps are computed: chosen once, at setup (:meth:`AuxiLearn._choose_path`).

    Attributes:
        mixed: the mixed term: ``'forward'`` (a forward-mode pass of the model along ``p``),
            ``'vjp'`` or ``'jacobian'`` (``mixed='auto'`` resolved).
        forward_gauss_newton: Gauss-Newton products take ``J v`` from a forward-mode pass.
        curvature_subset: the curvature products run on a random part of each batch.
        graphed: the hypergradient is replayed from a CUDA graph (after the first outer step).
    """

    mixed: str
    forward_gauss_newton: bool
    curvature_subset: bool
    graphed: bool

    @property
    def light(self) -> bool:
        """The training batch's forward pass needs no graph: the mixed term by forward mode and
        the curvature on a re-run subset."""
        return self.curvature_subset and self.mixed == "forward"

    @property
    def uses_forward_mode(self) -> bool:
        return self.mixed == "forward" or self.forward_gauss_newton


def _records_inputs(losses: TaskLosses) -> bool:
    """Whether ``losses`` carry what a forward-mode re-run of the model needs (inputs, ``from_outputs``)."""
    return losses.from_outputs is not None and all(t in losses.inputs for t in losses.names)


class _ForwardModeUnsupported(RuntimeError):
    """An operation in the model or a loss has no forward-mode derivative."""



def _groups_of(losses: TaskLosses) -> list[tuple[str, ...]]:
    """The step's batch groups that hold computed tasks (tasks that share one input batch)."""
    groups = [tuple(t for t in g if t in losses.values) for g in losses.groups]
    groups = [g for g in groups if g]
    covered = {t for g in groups for t in g}
    return groups + [(t,) for t in losses.names if t not in covered]


def _reduce():
    """Under torchrun, the hypergradient's reduction over ranks (the whole batch's hypergradient)."""
    return distributed.all_reduce_mean if distributed.is_distributed() else None


def _check_path_settings(mixed: str, curvature_fraction: float, method: str) -> None:
    _check_choice("mixed", mixed, _MIXED)
    if isinstance(curvature_fraction, bool) or not (
        isinstance(curvature_fraction, (int, float)) and 0 < curvature_fraction <= 1
    ):
        raise ConfigError(
            f"weightings.auxilearn.curvature_fraction must be a number in (0, 1] (the part of each "
            f"training batch the Hessian-vector products use), got {curvature_fraction!r}."
        )
    if curvature_fraction < 1 and method in ("first_order",):
        raise ConfigError(
            "weightings.auxilearn.curvature_fraction < 1 has no effect with method='first_order' "
            "(no curvature products); leave it at 1.0."
        )


def _check_choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"weightings.auxilearn.{name} must be one of {', '.join(map(repr, options))}, got {value!r}.")


def _set_batchnorm_mode(model: nn.Module, train: bool) -> list[tuple[nn.Module, bool, dict]]:
    """Put BatchNorm layers in ``train`` mode (batch statistics) or eval mode for the outer step.

    Their running statistics are saved and later restored: the outer step's extra forward passes
    (a fresh training batch and the held-out auxiliary set) must not leak into the statistics the
    model is evaluated with.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            buffers = {k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None}
            saved.append((m, m.training, buffers))
            m.train(train)
    return saved


def _restore_batchnorm_mode(saved: list[tuple[nn.Module, bool, dict]]) -> None:
    with torch.no_grad():
        for m, mode, buffers in saved:
            m.train(mode)
            for k, value in buffers.items():
                getattr(m, k).copy_(value)
