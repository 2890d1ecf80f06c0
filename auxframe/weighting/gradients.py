"""The per-task gradient engine shared by the gradient-based weightings.

ARML, GCS, OL_AUX, GradNorm and PCGrad all look at the gradients ``g_k`` of the task losses w.r.t.
the shared parameters, but only through a few quantities: inner products ``<g_k, v>`` with one
vector, the Gramian ``G[j, k] = <g_j, g_k>`` (norms and cosines are read from it) and, once
weights are known, the update ``sum_k c_k g_k``. :class:`TaskGradients` computes each of them the
cheapest exact way and caches it for the step, so a method that asks twice (or two consumers in
one step) pays once, and a method that asks for nothing pays nothing.

Spaces (``space=``):

* ``'shared'`` - all trainable backbone parameters (the default; what the papers use).
* ``'last_shared'`` - only the backbone's last weight layer, normalisation layers skipped
  (GradNorm's choice; cheap; see :func:`last_shared_layer`).
* ``'representation'`` - the backbone's output ``z``: ``g_k = dL_k/dz`` summed over the batch.
  One backward pass through the heads only gives every task's ``g_k`` at once (each head reads
  its own view of ``z``; see :class:`auxframe.models.multitask.MultiTaskModel`). All tasks must
  then share one batch, since ``z`` of different batches are different spaces.

How each quantity is computed:

* Gramian: the Jacobian ``J`` (tasks x parameters), then ``J @ J.T``. The heads are traversed
  once for all tasks (the representation gradients above); only the backbone part
  ``(dz/dW)^T dL_k/dz`` is per task, on public autograd: on GPUs one vmapped reverse pass over
  the graph the forward pass recorded (``autograd.grad(..., is_grads_batched=True)``), on CPUs one
  backward per task (faster there; see bench/gradient_engine.py). Any layer autograd
  differentiates works, with no per-operation code. The folded backward
  (:mod:`auxframe.weighting.batched_backward`: the tasks folded into the batch dimension by
  hand-written rules, each convolution, BatchNorm, pooling ... node once at batch ``K * B``) is an
  opt-in fast path (``batched='fold'``), version-gated and checked against the public path at
  its first use on each backbone. In representation space the heads-only backward gives ``J``
  directly; without recorded representations (or in ``'last_shared'`` space) the Jacobian comes
  from the losses by one backward per task, or a vmapped backward when batched.
* ``d = sum_k c_k g_k`` with ``<g_j, d>`` for all j (ARML, OL_AUX): one backbone backward with a
  graph gives d, one more pass through that graph gives every inner product - less work than
  the reference code's double backward through the whole model, at any K.
* Inner products ``<g_k, v>`` for all k at once, constant in the number of tasks:
  ``jvp='forward'`` runs the backbone once more in forward mode (``torch.func.jvp``) to get
  ``dz = (dz/dW) v`` and contracts it with the per-task representation gradients;
  ``jvp='reverse'`` uses the double-backward identity ``J v = d/du <J^T u, v>`` on the graph
  already built (exact with dropout, where the forward re-run would draw other masks).
* Update: :meth:`TaskGradients.backward` writes ``sum_k c_k g_k`` into the shared parameters'
  ``.grad`` and ``sum_k h_k grad_head_k L_k`` into the heads' by one pass through the heads and
  one through the backbone - the cost of an ordinary backward pass. The heads' pass is the one
  that gives the representation gradients (each head's gradient of its own loss comes out of it
  and is kept), so a step that already read the Gramian or inner products pays it once.

Under ``torchrun`` every gradient-derived quantity is averaged over the ranks (see
:mod:`auxframe.distributed`) so that every rank derives the same weights.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Callable, Mapping, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

from auxframe import distributed
from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, TaskLosses
from auxframe.weighting.batched_backward import Unsupported, batched_vjp

#: The "Gramian -> weights" step: the ``(T, T)`` Gramian of the tasks' gradients to ``(T,)`` weights,
#: a pure function. TorchJD's Gramian weightings (``torchjd.aggregation.UPGradWeighting()``, ...)
#: are such callables. See :meth:`TaskGradients.gramian_backward`.
GramianToWeights = Callable[[torch.Tensor], torch.Tensor]

SPACES = ("shared", "last_shared", "representation")
JVP_MODES = ("forward", "reverse")
BATCHED = ("auto", "vmap", "loop", "fold", True, False)
# What batched='auto' means per device type (bench/gradient_engine.py; see TaskGradients): the
# public autograd paths, the loop on CPUs, one vmapped backward on GPUs.
AUTO_BATCHED: dict[str, str] = {"cpu": "loop", "cuda": "vmap"}
AUTO_MIN_ROWS = 3  # 'auto' loops over groups of fewer tasks (H200: batched / loop 1.0-1.1 at 2 tasks)
#: Setting this environment variable to 1 makes batched='auto' use the folded backward where it
#: would batch (GPUs), after its checks (see TaskGradients).
FOLD_ENV = "AUXFRAME_FOLDED_BACKWARD"
#: torch versions the folded backward's rules were written and tested against (it reads autograd
#: nodes' private saved tensors, whose meaning may change between releases).
FOLD_TESTED_TORCH = ("2.14.",)
# Rows per folded pass: on CPUs 4 keep the gradients in the cache (K = 39: 1.03 of the loop, all 39 at once 1.45).
FOLD_CHUNK: dict[str, int] = {"cpu": 4}
#: :meth:`TaskGradients.gramian_row` takes a batch's inner products from one forward-mode pass when
#: at least this many of the row's tasks share it (besides the row's own task), else one backward
#: each, which the update then reuses. CPU, small CNN, batch 32, forward mode / backward rows at
#: 2, 3, 4, 6 tasks on the main task's batch: 1.53, 1.11, 0.98, 0.82.
ROW_FORWARD_MIN = 4
_CHECKED = "checked"
# backbone -> {training: _CHECKED, or why the folded pass is off for it}: each backbone's folded
# pass is checked against the public path at first use (per train / eval mode).
_FOLD_STATE: "weakref.WeakKeyDictionary[nn.Module, dict[bool, str]]" = weakref.WeakKeyDictionary()
# backbones whose graph has an operation without a vmap rule (they get the loop).
_NO_VMAP: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_untested_torch_said = False


def check_space(space: str, method: str) -> str:
    """Validate a ``space=`` argument, naming the method and the choices."""
    if space not in SPACES:
        raise ConfigError(f"{method}: space must be one of {SPACES}, got {space!r}.")
    return space


#: Normalisation layers: their scale and shift are not "the last shared layer of weights".
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*  # noqa: SLF001
    nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def last_shared_layer(backbone: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the backbone's last weight layer (the last module that owns
    parameters directly and is not a normalisation layer).

    GradNorm's ``W`` is "the last shared layer of weights" (Chen et al. 2018): the last convolution
    or linear layer. A backbone that ends in BatchNorm (a WRN, the small CNN) would otherwise give
    the norm's scale and shift, whose gradients say little about how each task pulls the features.
    A backbone made only of normalisation layers falls back to its last one.
    "Last" is in registration order, which is execution order for the sequential backbones
    shipped with auxframe (and for torchvision's ResNets).
    """
    last: list[nn.Parameter] = []
    last_norm: list[nn.Parameter] = []
    for module in backbone.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and isinstance(module, NORM_LAYERS):
            last_norm = own
        elif own:
            last = own
    if not (last or last_norm):
        raise ConfigError(f"the backbone {type(backbone).__name__} has no trainable parameters")
    return last or last_norm



class TaskGradients:
    """Gradient quantities of one step's task losses, computed on demand and cached.

    Use :meth:`of` to share one instance between everything that runs in a step.

    Args:
        losses: the step's :class:`TaskLosses` (graph alive).
        ctx: the step context (model, shared parameters).
        space: ``'shared'``, ``'last_shared'`` or ``'representation'`` (see the module docs).
        batched: how the backbone's per-task part of the Jacobian is computed. The public
            autograd paths: ``'vmap'`` (or True), one vmapped backward
            (``autograd.grad(..., is_grads_batched=True)``); ``'loop'`` (or False), one backward
            per task. ``'auto'`` (default): ``'vmap'`` on GPUs for three or more tasks on a batch,
            else the loop. They need no per-operation code: any layer autograd differentiates
            (GELU, SiLU, LayerNorm, GroupNorm, attention, ``cat``, ``interpolate``) works.
            ``'fold'``: the opt-in fast path of :mod:`auxframe.weighting.batched_backward`, one
            reverse pass with the tasks folded into the batch by hand-written rules that read
            autograd nodes' private saved tensors. It runs only on the torch versions it was
            tested on (:data:`FOLD_TESTED_TORCH`), checks itself against ``'vmap'`` once per
            backbone (and train / eval mode) at first use, and falls back to the public path
            with one warning on a mismatch, an untested torch or an operation without a rule.
            With the environment variable ``AUXFRAME_FOLDED_BACKWARD=1``, ``'auto'`` folds
            where it would batch. bench/gradient_engine.py (small CNN, batch 64), folded / loop
            at K = 1, 5, 10, 39 auxiliary tasks, three runs: H200 1.07-1.11, 0.58-0.81,
            0.54-0.62, 0.31-0.39 (vmap / loop 0.99-1.01, 0.72-0.79, 0.65-0.70, 0.49-0.59); one
            CPU thread 1.5-2.0 (vmap 1.0-1.1): on a CPU a convolution's backward at batch
            ``K * B`` is slower than K at batch B, whose activations stay in the cache.
        jvp: ``'forward'`` or ``'reverse'``: how :meth:`inner_products` gets ``J v``.
    """

    def __init__(
        self,
        losses: TaskLosses,
        ctx: StepContext,
        space: str = "shared",
        batched: bool | str = "auto",
        jvp: str = "forward",
    ):
        self.losses, self.ctx = losses, ctx
        self.space = check_space(space, "TaskGradients")
        if jvp not in JVP_MODES:
            raise ConfigError(f"TaskGradients: jvp must be one of {JVP_MODES}, got {jvp!r}.")
        self.model = distributed.unwrap(ctx.model)
        if batched not in BATCHED:
            raise ConfigError(f"TaskGradients: batched must be one of {BATCHED}, got {batched!r}.")
        device = next(iter(ctx.shared_parameters)).device.type
        self._auto = batched == "auto"
        mode = {True: "vmap", False: "loop"}.get(batched, batched)
        if self._auto:
            mode = AUTO_BATCHED.get(device, "vmap")
            if mode == "vmap" and os.environ.get(FOLD_ENV) == "1":
                mode = "fold"
        self.batched = None if mode == "loop" else mode  # None: the loop
        self.jvp = jvp
        if space == "last_shared":
            self.params = last_shared_layer(self.model.backbone)
        else:
            self.params = list(ctx.shared_parameters)
        self._jacobians: dict[tuple[str, ...], torch.Tensor] = {}
        self._rows: dict[str, torch.Tensor] = {}  # single tasks' flat gradients (averaged over ranks)
        self._rep: dict[str, torch.Tensor] | None = None
        self._head_grads: dict[str, list[torch.Tensor | None]] | None = None

    @classmethod
    def of(cls, losses: TaskLosses, ctx: StepContext, space: str = "shared", **options) -> "TaskGradients":
        """The step's engine for ``space`` (created on first use, then shared through ``ctx.extras``)."""
        key = ("task_gradients", space, tuple(sorted(options.items())))
        engine = ctx.extras.get(key)
        if engine is None or engine.losses is not losses:
            engine = ctx.extras[key] = cls(losses, ctx, space=space, **options)
        return engine

    # -- representation gradients ----------------------------------------------------------------
    def representation_gradients(self) -> dict[str, torch.Tensor]:
        """``dL_k/dz_k`` for every task with a recorded representation (one heads-only backward)."""
        if self._rep is None:
            tasks = [t for t in self.losses.names if t in self.losses.features]
            missing = [t for t in self.losses.names if t not in self.losses.features]
            if missing:
                raise ConfigError(
                    f"the step's losses carry no representation for task(s) {missing}; representation-"
                    f"space gradients need the trainer's TaskLosses (features recorded per task)."
                )
            total = sum(self.losses.mean(t) for t in tasks)
            # The same pass gives each head's gradient of its own loss (a head reads only its task's
            # loss), kept for backward(), which then needs no second pass through the heads.
            heads = {t: self.model.head_parameters(t) for t in tasks}
            head_params = [p for t in tasks for p in heads[t]]
            if len({id(p) for p in head_params}) < len(head_params):  # heads sharing parameters
                heads, head_params = {}, []
            features = [self.losses.features[t] for t in tasks]
            grads = torch.autograd.grad(total, features + head_params, retain_graph=True, allow_unused=True)
            self._rep = {
                t: (g if g is not None else torch.zeros_like(self.losses.features[t])) for t, g in zip(tasks, grads)
            }
            rest = iter(grads[len(tasks):])
            self._head_grads = {t: [next(rest) for _ in heads[t]] for t in heads} if heads else None
        return self._rep

    def _one_batch(self, tasks: Sequence[str]) -> None:
        bases = {id(self._base(t)) for t in tasks}
        if len(bases) > 1:
            raise ConfigError(
                f"representation-space gradients compare tasks on one batch, but {list(tasks)} were "
                f"computed on different batches (groups {self.losses.groups}); set the method's "
                f"`space = 'shared'` (parameter space) for this task graph."
            )

    def _base(self, task: str) -> torch.Tensor:
        view = self.losses.features[task]
        return view._base if view._base is not None else view

    # -- Jacobian and Gramian --------------------------------------------------------------------
    def jacobian(self, tasks: Sequence[str]) -> torch.Tensor:
        """Per-task gradients as rows, ``(len(tasks), n)`` with n the size of the space."""
        key = tuple(tasks)
        if key not in self._jacobians:
            if self.space == "representation":
                self._one_batch(tasks)
                rep = self.representation_gradients()
                jac = torch.stack([rep[t].reshape(-1) for t in tasks])
            else:
                jac = self._parameter_jacobian(tasks)
            distributed.all_reduce_mean([jac])
            if self.space == "representation":
                # Each rank's per-sample gradients are of its local mean, world times too large.
                jac = jac / distributed.world_size()
            self._jacobians[key] = jac
        return self._jacobians[key]

    def _parameter_jacobian(self, tasks: Sequence[str]) -> torch.Tensor:
        if self.space in ("shared", "last_shared") and all(t in self.losses.features for t in tasks):
            return self._jacobian_through_representation(tasks)
        means = self.losses.means(list(tasks))
        if self.batched:  # no representation to start from: the folded pass would meet the heads
            eye = torch.eye(len(tasks), device=means.device, dtype=means.dtype)
            rows = torch.autograd.grad(
                means, self.params, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
            return torch.cat(
                [
                    (g if g is not None else torch.zeros((len(tasks), *p.shape), device=p.device, dtype=p.dtype))
                    .reshape(len(tasks), -1)
                    for g, p in zip(rows, self.params)
                ],
                dim=1,
            )
        out = []
        for i in range(len(tasks)):
            grads = torch.autograd.grad(means[i], self.params, retain_graph=True, allow_unused=True)
            out.append(_flat(grads, self.params))
        return torch.stack(out)

    def _jacobian_through_representation(self, tasks: Sequence[str]) -> torch.Tensor:
        """Rows ``g_k = (dz/dW)^T dL_k/dz``: the heads' part once for all tasks (one heads-only
        backward), then only the backbone per task - batched, or one backward per task."""
        rep = self.representation_gradients()
        rows: dict[str, torch.Tensor] = {}
        for base, group in self._by_base(tasks):
            batched = self.batched and not (self._auto and len(group) < AUTO_MIN_ROWS)
            grads = self._batched_grad(base, torch.stack([rep[t] for t in group])) if batched else None
            if grads is not None:
                flat = torch.cat([
                    (g if g is not None else torch.zeros((len(group), *p.shape), device=p.device, dtype=p.dtype))
                    .reshape(len(group), -1) for g, p in zip(grads, self.params)
                ], dim=1)
                rows.update(zip(group, flat))
            else:
                for t in group:
                    grads = torch.autograd.grad(base, self.params, grad_outputs=rep[t], retain_graph=True, allow_unused=True)
                    rows[t] = _flat(grads, self.params)
        return torch.stack([rows[t] for t in tasks])

    def _batched_grad(self, output: torch.Tensor, rows: torch.Tensor):
        """Per-row gradients by one batched reverse pass (``'fold'``: tasks folded into the batch,
        see :mod:`auxframe.weighting.batched_backward`, where it is checked to apply; else a
        vmapped backward), or None (then the caller loops) where an operation of the backbone
        has no vmap rule."""
        if self.batched == "fold":
            grads = self._folded_grad(output, rows)
            if grads is not None:
                return grads
        return self._vmapped_grad(output, rows)

    def _vmapped_grad(self, output: torch.Tensor, rows: torch.Tensor):
        """The public batched path, ``autograd.grad(..., is_grads_batched=True)``, or None."""
        backbone = self.model.backbone
        if backbone in _NO_VMAP:
            return None
        try:
            return torch.autograd.grad(
                output, self.params, grad_outputs=rows, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
        except RuntimeError as err:  # e.g. an op without a vmap rule: fall back to the loop
            _NO_VMAP.add(backbone)
            warnings.warn(f"batched per-task gradients failed in {type(backbone).__name__} "
                          f"({str(err).splitlines()[0]}); using one backward per task for this backbone",
                          RuntimeWarning, stacklevel=4)
            return None

    def _folded_grad(self, output: torch.Tensor, rows: torch.Tensor):
        """The opt-in folded pass where it applies to this backbone, or None (then the public path).

        Off on untested torch versions; at the first use per backbone and mode checked against the
        public path, and off for that backbone on a mismatch or an operation without a rule, each
        said once.
        """
        global _untested_torch_said
        if not torch.__version__.startswith(FOLD_TESTED_TORCH):
            if not _untested_torch_said:
                _untested_torch_said = True
                warnings.warn(f"batched per-task gradients: the folded backward was tested on torch "
                              f"{', '.join(v + 'x' for v in FOLD_TESTED_TORCH)}, not {torch.__version__}; using "
                              f"the public batched path (is_grads_batched) instead", RuntimeWarning, stacklevel=4)
            return None
        backbone = self.model.backbone
        state = _FOLD_STATE.setdefault(backbone, {})
        status = state.get(backbone.training)
        if status not in (None, _CHECKED):
            return None
        try:
            grads = batched_vjp(output, rows, self.params, chunk=FOLD_CHUNK.get(output.device.type))
        except Unsupported as err:
            if err.transient:  # this graph's state, not the backbone's: fold again next time
                warnings.warn(f"batched per-task gradients: {err}; using the public path for this step",
                              RuntimeWarning, stacklevel=4)
                return None
            state[backbone.training] = f"no batched rule for {err}"
            warnings.warn(f"batched per-task gradients: no folded rule for {err} in {type(backbone).__name__}; "
                          f"using the public batched path for this backbone", RuntimeWarning, stacklevel=4)
            return None
        if status is None:  # first use for this backbone and mode: against the public path
            public = self._vmapped_grad(output, rows)
            if public is None:
                public = _rowwise_grad(output, rows, self.params)
            mismatch = _disagreement(grads, public, self.params)
            if mismatch is not None:
                state[backbone.training] = f"differs from the public path ({mismatch})"
                warnings.warn(f"batched per-task gradients: the folded backward differs from autograd's in "
                              f"{type(backbone).__name__} ({mismatch}); using the public batched path for this "
                              f"backbone", RuntimeWarning, stacklevel=4)
                return public
            state[backbone.training] = _CHECKED
        return grads

    def _by_base(self, tasks: Sequence[str]) -> list[tuple[torch.Tensor, list[str]]]:
        """Tasks grouped by the representation tensor (the batch) they were computed on."""
        groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
        for t in tasks:
            base = self._base(t)
            groups.setdefault(id(base), (base, []))[1].append(t)
        return list(groups.values())

    def gramian(self, tasks: Sequence[str]) -> torch.Tensor:
        """``G[j, k] = <g_j, g_k>``, ``(T, T)``."""
        key = ("gramian", *tasks)
        if key not in self._jacobians:
            jac = self.jacobian(tasks)
            self._jacobians[key] = jac @ jac.T
        return self._jacobians[key]

    def norms(self, tasks: Sequence[str]) -> torch.Tensor:
        """``||g_k||`` for each task, ``(T,)``."""
        return self.gramian(tasks).diagonal().clamp_min(0).sqrt()

    def gramian_row(self, task: str, tasks: Sequence[str]) -> torch.Tensor:
        """``<g_task, g_k>`` for every k in ``tasks``, ``(len(tasks),)``: one row of the Gramian,
        without the others.

        Where this step's Jacobian covers the tasks, or outside parameter space
        (``'representation'``, ``'last_shared'``: the Jacobian is cheap there), the Gramian's row.
        Otherwise, with the representations recorded: ``g_task`` by one backbone backward on its
        batch; then on each batch, :data:`ROW_FORWARD_MIN` or more tasks sharing it get their inner
        products with ``g_task`` from one forward-mode pass of the backbone along ``g_task``
        (constant in their number); fewer, or a task alone on its batch, get their gradients by one
        backward each, which :meth:`backward` then reuses for the update (the pass the update
        spends on that batch anyway). With active dropout (a forward-mode re-run would draw other
        masks) or ``jvp='reverse'``, one backward per task.

        Args:
            task: the task whose gradient every other is compared with (the main task).
            tasks: the tasks of the row.
        """
        tasks = list(tasks)
        everyone = [task, *[t for t in tasks if t != task]]
        covered = next((key for key in self._jacobians if key and key[0] != "gramian" and set(everyone) <= set(key)),
                       None)
        if (covered is not None or self.space != "shared" or not all(t in self.losses.features for t in everyone)):
            gram = self.gramian(everyone)
            return gram[0, [everyone.index(t) for t in tasks]]
        rep = self.representation_gradients()
        g = self._backbone_row(task)
        distributed.all_reduce_mean([g])  # the whole batch's g_task: inner products then average
        self._rows[task] = g
        g_params = _unflat(g, self.params)
        forward = self.jvp == "forward" and not has_dropout(self.model.backbone)
        inner: dict[str, torch.Tensor] = {}
        for _, group in self._by_base(tasks):
            if forward and len(group) > 1 and len([t for t in group if t != task]) >= ROW_FORWARD_MIN:
                inner.update(zip(group, self._forward_inner_products(group, g_params)))
                continue
            for t in group:
                if t == task:
                    inner[t] = g @ g
                    continue
                row = self._backbone_row(t)
                inner[t] = g @ row
                distributed.all_reduce_mean([row])
                self._rows[t] = row
        out = torch.stack([inner[t] for t in tasks])
        distributed.all_reduce_mean([out])
        return out

    def _backbone_row(self, task: str) -> torch.Tensor:
        """``g_task`` as one flat vector, by one backbone backward from the representation gradient."""
        grads = torch.autograd.grad(self._base(task), self.params, grad_outputs=self.representation_gradients()[task],
                                    retain_graph=True, allow_unused=True)
        return _flat(grads, self.params)

    def gramian_backward(
        self,
        tasks: Sequence[str],
        weighting: GramianToWeights,
        heads: Mapping[str, float | torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The "Gramian -> weights" step: ``w = weighting(G)``, then ``sum_k w_k g_k`` into ``.grad``.

        The engine computes the Gramian ``G`` of ``tasks``' gradients (cached for the step),
        ``weighting`` maps it to one weight per task - a pure function of ``G``, run without
        gradient; a TorchJD ``Weighting`` such as ``torchjd.aggregation.UPGradWeighting()`` is
        one - and :meth:`backward` applies the combination. In parameter space the Jacobian that
        gave ``G`` also gives the update (``w @ J``), so the step costs the Jacobian and no further
        pass through the backbone. This is TorchJD's
        ``GramianWeightedAggregator(weighting << compute_gramian)`` with auxframe computing the
        Gramian. Under torchrun ``G`` is averaged over the ranks first, so a deterministic
        ``weighting`` gives every rank the same weights.

        Args:
            tasks: the tasks, in the order of ``G``'s rows (``[main, *aux]`` for the built-ins).
            weighting: ``(T, T) Gramian -> (T,) weights``.
            heads: task -> weight of its loss for its own head (default 1: each head trains on
                its own loss, as in TorchJD's ``mtl_backward``).

        Returns:
            ``(weights, loss)``: the weights (detached, on ``G``'s device) and the head-weighted
            loss (detached, for logging).

        Raises:
            ConfigError: ``weighting`` does not return one weight per task.
        """
        weights = weights_from_gramian(weighting, self.gramian(tasks))
        return weights, self.backward(dict(zip(tasks, weights)), heads)

    # -- gradients and inner products ------------------------------------------------------------
    def gradient(self, coefficients: Mapping[str, float | torch.Tensor]) -> list[torch.Tensor]:
        """``sum_k c_k g_k`` in the space, as a list of tensors (one per parameter; in
        representation space one flat vector).

        One backward pass of the weighted loss (no per-task gradients), averaged over ranks.
        """
        if self.space == "representation":
            tasks = list(coefficients)
            c = torch.stack([torch.as_tensor(coefficients[t], dtype=torch.float32) for t in tasks])
            jac = self.jacobian(tasks)
            return [c.to(jac) @ jac]
        total = sum(torch.as_tensor(c) * self.losses.mean(t) for t, c in coefficients.items())
        grads = torch.autograd.grad(total, self.params, retain_graph=True, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]
        distributed.all_reduce_mean(grads)
        return grads

    def gradient_and_inner_products(
        self, coefficients: Mapping[str, float | torch.Tensor], tasks: Sequence[str], fused: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``d = sum_k c_k g_k`` and ``<g_j, d>`` for every task j.

        By default :meth:`gradient` then :meth:`inner_products` (with the engine's ``jvp`` mode).
        With ``fused=True``, in parameter space with the representation recorded and in one
        process, both come from one pass through the backbone's graph and one through that: with ``r_g =
        sum_k c_k dL_k/dz_g`` per batch, one backbone backward with ``create_graph`` of
        ``u_g -> sum_g (dz_g/dW)^T u_g`` at ``u_g = r_g`` gives ``d``; differentiating ``<that, d>``
        in ``u_g`` gives ``(dz_g/dW) d`` for every batch; contracting with each task's
        ``dL_j/dz`` gives the inner products. The heads are traversed once, without a graph.
        (bench/gradient_engine.py: on CPU the default with ``jvp='forward'`` is faster, 0.8 of
        the reference's double backward against 0.93-0.99 fused.)

        Returns:
            ``(d, inner)``: d as a list over the space's parameters, inner ``(len(tasks),)``.
        """
        fused = (
            fused and self.space == "shared" and not distributed.is_distributed()
            and all(t in self.losses.features for t in [*coefficients, *tasks])
        )
        if not fused:
            d = self.gradient(coefficients)
            return d, self.inner_products(tasks, d)
        rep = self.representation_gradients()
        groups = self._by_base([*coefficients, *[t for t in tasks if t not in coefficients]])
        bases, us = [], []
        for base, group in groups:
            r = sum(torch.as_tensor(coefficients.get(t, 0.0)).to(rep[t]) * rep[t] for t in group)
            bases.append(base)
            us.append(r.detach().requires_grad_(True))
        d_graph = torch.autograd.grad(bases, self.params, grad_outputs=us, create_graph=True, allow_unused=True)
        d = [g.detach() if g is not None else torch.zeros_like(p) for g, p in zip(d_graph, self.params)]
        pairs = [(g, x) for g, x in zip(d_graph, d) if g is not None and g.requires_grad]
        if pairs:
            jd = torch.autograd.grad([g for g, _ in pairs], us, grad_outputs=[x for _, x in pairs], allow_unused=True)
        else:
            jd = [None] * len(us)
        along = {id(b): (j if j is not None else torch.zeros_like(b)) for b, j in zip(bases, jd)}
        inner = torch.stack([(rep[t] * along[id(self._base(t))]).sum() for t in tasks])
        return d, inner.detach()

    def inner_products(self, tasks: Sequence[str], v: Sequence[torch.Tensor]) -> torch.Tensor:
        """``<g_k, v>`` for every task at once, ``(T,)``; cost independent of ``len(tasks)``.

        Args:
            tasks: the tasks.
            v: a vector over the space's parameters (same shapes as they), the same on every rank.
        """
        if self.space == "representation":
            jac = self.jacobian(tasks)
            return jac @ torch.cat([x.reshape(-1) for x in v])
        if self.jvp == "forward" and self.space == "shared" and not has_dropout(self.model.backbone):
            out = self._forward_inner_products(tasks, v)
        else:
            out = self._reverse_inner_products(tasks, v)
        distributed.all_reduce_mean([out])
        return out

    def _reverse_inner_products(self, tasks: Sequence[str], v: Sequence[torch.Tensor]) -> torch.Tensor:
        means = self.losses.means(list(tasks))
        u = torch.zeros_like(means, requires_grad=True)
        jt_u = torch.autograd.grad(means, self.params, grad_outputs=u, create_graph=True, allow_unused=True)
        pairs = [(g, x) for g, x in zip(jt_u, v) if g is not None]
        if not pairs:
            return torch.zeros_like(means)
        (jv,) = torch.autograd.grad([g for g, _ in pairs], u, grad_outputs=[x for _, x in pairs], retain_graph=True)
        return jv.detach()

    def _forward_inner_products(self, tasks: Sequence[str], v: Sequence[torch.Tensor]) -> torch.Tensor:
        rep = self.representation_gradients()
        backbone = self.model.backbone
        names = _names_of(backbone, self.params)
        directional: dict[int, torch.Tensor] = {}
        out = []
        for t in tasks:
            base = self._base(t)
            if id(base) not in directional:
                # Copies of the buffers: the re-run must not move BatchNorm's running statistics.
                buffers = {n: b.clone() for n, b in backbone.named_buffers()}
                with torch.no_grad(), fwAD.dual_level():
                    duals = {n: fwAD.make_dual(p.detach(), x.detach()) for n, p, x in zip(names, self.params, v)}
                    z = torch.func.functional_call(backbone, {**duals, **buffers}, (self.losses.inputs[t],))
                    directional[id(base)] = fwAD.unpack_dual(z).tangent
            out.append((rep[t] * directional[id(base)]).sum())
        return torch.stack(out)

    # -- the update ------------------------------------------------------------------------------
    def backward(
        self,
        shared: Mapping[str, float | torch.Tensor],
        heads: Mapping[str, float | torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Accumulate ``sum_k shared[k] g_k`` into the backbone's ``.grad`` and ``heads[k] * grad L_k``
        into each head's.

        When this step's parameter-space Jacobian of those tasks is already computed (a method
        read the Gramian), the backbone's part is ``c @ J`` with no pass through the backbone at
        all; otherwise it costs one ordinary backward pass.

        Args:
            shared: task -> coefficient of its gradient in the shared parameters.
            heads: task -> weight of its loss for its own head (default: 1 for every task).

        Returns:
            the head-weighted loss, detached (for logging).
        """
        tasks = [t for t in self.losses.names if t in shared or (heads and t in heads)]
        if not tasks:
            raise ConfigError(f"TaskGradients.backward: no task of this step in {list(shared)}.")
        heads = {t: 1.0 for t in tasks} if heads is None else heads
        # One vector operation per quantity, not one per task: with many heads on a GPU the
        # per-task kernels would cost more than the arithmetic.
        head_w = _coefficients([heads.get(t, 0.0) for t in tasks], self.losses.mean(tasks[0]))
        head_total = head_w @ self.losses.means(tasks)
        jac_tasks = self._cached_jacobian_tasks(shared)
        if self._rep is None and jac_tasks is None and all(t in self.losses.features for t in tasks):
            self.representation_gradients()  # needed below anyway; gives the heads' gradients too
        cached = self._head_grads
        if cached is not None and all(t in cached for t in tasks):
            # From the representation pass: head k's gradient of L_k, scaled by its weight.
            for t in tasks:
                weight = heads.get(t, 0.0)
                if isinstance(weight, (int, float)) and weight == 0:
                    continue
                for p, g in zip(self.model.head_parameters(t), cached[t]):
                    if g is None:
                        continue
                    g = g if isinstance(weight, (int, float)) and weight == 1 else g * weight
                    p.grad = g if p.grad is None else p.grad + g
            self._head_grads = None  # handed over to .grad (which optimizers may change in place)
        else:
            head_params = [p for t in tasks for p in self.model.head_parameters(t)]
            if head_params:
                torch.autograd.backward(head_total, inputs=head_params, retain_graph=True)
        if jac_tasks is None and self._rows:
            return self._backward_reusing_rows(tasks, shared, head_total)
        if jac_tasks is not None:
            jac = self._jacobians[jac_tasks]
            c = _coefficients([shared.get(t, 0.0) for t in jac_tasks], jac)
            flat = c @ jac  # already averaged over ranks, like the Jacobian
            offset = 0
            for p in self.params:
                g = flat[offset : offset + p.numel()].view_as(p)
                p.grad = g.clone() if p.grad is None else p.grad + g
                offset += p.numel()
            return head_total.detach()
        rep = self.representation_gradients()
        bases, grads = [], []
        for base, group in self._by_base(tasks):
            c = _coefficients([shared.get(t, 0.0) for t in group], rep[group[0]])
            stacked = torch.stack([rep[t] for t in group])
            bases.append(base)
            grads.append(torch.tensordot(c, stacked, dims=1))
        torch.autograd.backward(bases, grad_tensors=grads, inputs=list(self.ctx.shared_parameters))
        return head_total.detach()

    def _backward_reusing_rows(self, tasks: list[str], shared: Mapping[str, float | torch.Tensor],
                               head_total: torch.Tensor) -> torch.Tensor:
        """The backbone's part of :meth:`backward` where single tasks' gradients are computed: a
        batch whose weighted tasks all have one gets ``sum_k c_k g_k`` from them, the others one
        backward together (heads already done)."""
        rep = self.representation_gradients()
        flat = None
        bases, grads = [], []
        for base, group in self._by_base(tasks):
            weighted = [t for t in group if not _is_zero(shared.get(t, 0.0))]
            if weighted and all(t in self._rows for t in weighted):
                c = _coefficients([shared[t] for t in weighted], self._rows[weighted[0]])
                part = c @ torch.stack([self._rows[t] for t in weighted])
                flat = part if flat is None else flat + part
                continue
            c = _coefficients([shared.get(t, 0.0) for t in group], rep[group[0]])
            bases.append(base)
            grads.append(torch.tensordot(c, torch.stack([rep[t] for t in group]), dims=1))
        if bases:
            torch.autograd.backward(bases, grad_tensors=grads, inputs=list(self.ctx.shared_parameters))
        if flat is not None:  # (averaged over ranks, like the rows; the trainer's mean keeps it)
            for p, g in zip(self.params, _unflat(flat, self.params)):
                p.grad = g.clone() if p.grad is None else p.grad + g
        return head_total.detach()

    def _cached_jacobian_tasks(self, shared: Mapping[str, float | torch.Tensor]) -> tuple[str, ...] | None:
        """The task tuple of a computed shared-space Jacobian covering every task of ``shared``."""
        if self.space != "shared":
            return None
        needed = {t for t, c in shared.items() if not (isinstance(c, (int, float)) and c == 0)}
        for key in self._jacobians:
            if key and key[0] != "gramian" and needed <= set(key):
                return key
        return None


def weights_from_gramian(weighting: GramianToWeights, gramian: torch.Tensor) -> torch.Tensor:
    """``weighting(gramian)`` without gradient, checked to be one weight per row of ``gramian``.

    Raises:
        ConfigError: the result is not a tensor of shape ``(T,)``.
    """
    with torch.no_grad():
        weights = weighting(gramian.detach())
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (gramian.shape[0],):
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ConfigError(
            f"the Gramian weighting {getattr(weighting, '__qualname__', type(weighting).__name__)} returned "
            f"{got} for a {tuple(gramian.shape)} Gramian; it must return one weight per task, a tensor of "
            f"shape ({gramian.shape[0]},)."
        )
    return weights.detach().to(gramian.device)


def _coefficients(values: Sequence[float | torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Per-task coefficients (numbers or 0-dim tensors) as one vector on ``like``'s device and dtype,
    made by one copy (numbers) or one stack (tensors), not one transfer per task."""
    if all(isinstance(v, (int, float)) for v in values):
        return torch.tensor(values, dtype=like.dtype, device=like.device)
    return torch.stack([torch.as_tensor(v).to(like).reshape(()) for v in values])


def _rowwise_grad(output: torch.Tensor, rows: torch.Tensor, params: Sequence[torch.Tensor]) -> list:
    """``(d output / d p)^T rows[k]`` for every row by one backward each, stacked per parameter."""
    per_row = [torch.autograd.grad(output, params, grad_outputs=r, retain_graph=True, allow_unused=True) for r in rows]
    return [None if g[0] is None else torch.stack(g) for g in zip(*per_row)]


def _disagreement(got: Sequence[torch.Tensor | None], expected: Sequence[torch.Tensor | None],
                  params: Sequence[torch.Tensor]) -> str | None:
    """Where two per-row gradient lists differ beyond rounding (relative to each parameter's
    largest entry), as a short description; None when they agree."""
    for i, (a, b) in enumerate(zip(got, expected)):
        if (a is None) != (b is None):
            return f"parameter {i} of shape {tuple(params[i].shape)} reached by one path only"
        if a is None:
            continue
        tol = (3e-2 if b.dtype in (torch.float16, torch.bfloat16) else 1e-3) * float(b.detach().abs().max()) + 1e-30
        err = float((a.detach().to(b.dtype) - b.detach()).abs().max())
        if not err <= tol:  # (NaN fails too)
            return f"parameter {i} of shape {tuple(params[i].shape)}: max difference {err:.3g}, tolerance {tol:.3g}"
    return None


def _is_zero(c: float | torch.Tensor) -> bool:
    return isinstance(c, (int, float)) and c == 0


def _unflat(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A flat vector over ``params`` as one view per parameter."""
    return [piece.view_as(p) for piece, p in zip(flat.split([p.numel() for p in params]), params)]


def _flat(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def _names_of(module: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    by_id = {id(p): n for n, p in module.named_parameters()}
    try:
        return [by_id[id(p)] for p in params]
    except KeyError:
        raise ConfigError(
            "forward-mode inner products need the shared parameters to be the backbone's; "
            "use jvp='reverse' for this model"
        ) from None


def has_dropout(module: nn.Module, training_only: bool = False) -> bool:
    """Whether ``module`` holds dropout with p > 0 (with ``training_only``: in training mode), which a
    second pass through it would draw other masks from."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and (m.training or not training_only)
               for m in module.modules())


def project_to_simplex(v: torch.Tensor, total: float) -> torch.Tensor:
    """Euclidean projection of ``v`` onto ``{w : w >= 0, sum(w) = total}`` (exact, O(n log n)).

    The sort-based algorithm of Held, Wolfe and Crowder (1974) / Duchi et al. (2008): with ``u``
    sorted decreasingly, ``rho = max{j : u_j - (sum_{i<=j} u_i - total) / j > 0}``,
    ``theta = (sum_{i<=rho} u_i - total) / rho`` and ``w = max(v - theta, 0)``.

    Args:
        v: ``(n,)`` vector.
        total: the sum the result must have (> 0).
    """
    if total <= 0:
        raise ValueError(f"the simplex total must be positive, got {total}")
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - total
    idx = torch.arange(1, v.numel() + 1, device=v.device, dtype=v.dtype)
    rho = int(torch.nonzero(u - css / idx > 0).max())
    theta = css[rho] / (rho + 1)
    return torch.clamp(v - theta, min=0)
