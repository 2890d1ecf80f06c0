"""The Weighting protocol: how every weighting algorithm meets the trainer.

Fixed, loss-based, gradient-based and bilevel methods all implement this one class. The trainer
calls, per inner step::

    losses = TaskLosses(...)                 # unreduced per-task losses of this step
    weighting.backward(losses, ctx)          # default: ctx.backward(combine(losses, ctx))
    optimizer.step()
    updated = weighting.after_step(ctx)      # True: a periodic update changed the weights
    if weighting.outer_every and step % weighting.outer_every == 0:
        updated = weighting.outer_step(ctx) or updated  # bilevel: hypergradient on the aux set
    if updated:
        log(weighting.log_values())          # a periodic update gets its own log row

Everything a method needs is passed explicitly: :class:`WeightingSetup` once, :class:`StepContext`
every step. A method that manipulates gradients (PCGrad) overrides :meth:`Weighting.backward`; a
method with its own learnable weights trained with the model (Uncertainty) returns them from
:meth:`Weighting.inner_parameters`; a method with an outer optimizer creates it in :meth:`setup` and
saves it in :meth:`state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from auxframe import distributed


class TaskLosses:
    """The per-task losses of one step, unreduced.

    Args:
        values: task name -> loss tensor with the batch as first dimension (``(B,)`` per sample,
            ``(B, H, W)`` per pixel).
        main_task: name of the main task.
        aux_tasks: names of the auxiliary tasks present, in task-graph order.
        groups: tuples of task names that were computed on the same batch; their per-sample
            losses line up (see :meth:`per_sample`).
        outputs: the heads' outputs these losses were computed from (task name -> tensor), when
            the trainer provides them (curvature methods that work in output space use them).
        from_outputs: recomputes the losses from other outputs, with the same targets or others
            (a subset of the batch), as ``from_outputs({task: output}, targets=None) -> TaskLosses``.
        features: task -> the shared representation its head read (the backbone's output, one
            view per task, so that gradients w.r.t. it come out per task in one backward pass).
        inputs: task -> the input batch of its group (after any signal), for methods that
            re-run the backbone (forward-mode directional derivatives).
        targets: task -> the targets the losses were computed against (class indices, or the
            soft labels of a generated-label task, with gradients to its generator in outer steps).

    Example:
        >>> total = losses.mean("digit") + 0.5 * losses.mean("parity")
        >>> matrix = losses.per_sample(["digit", "parity"])     # (B, 2), same batch
    """

    def __init__(
        self,
        values: Mapping[str, torch.Tensor],
        main_task: str,
        aux_tasks: Sequence[str],
        groups: Sequence[Sequence[str]] = (),
        outputs: Mapping[str, torch.Tensor] | None = None,
        from_outputs: Callable[[Mapping[str, torch.Tensor]], "TaskLosses"] | None = None,
        features: Mapping[str, torch.Tensor] | None = None,
        inputs: Mapping[str, torch.Tensor] | None = None,
        targets: Mapping[str, torch.Tensor] | None = None,
    ):
        self.values = dict(values)
        self.features = dict(features) if features else {}
        self.inputs = dict(inputs) if inputs else {}
        self.targets = dict(targets) if targets else {}
        self.outputs = dict(outputs) if outputs is not None else None
        self.from_outputs = from_outputs
        self.main_task = main_task
        self.aux_tasks = [t for t in aux_tasks if t in self.values]
        self.groups = [tuple(g) for g in groups]
        self._means: dict[str, torch.Tensor] = {}

    @property
    def names(self) -> list[str]:
        """Main task first, then the auxiliary tasks."""
        return [self.main_task, *self.aux_tasks]

    def __getitem__(self, task: str) -> torch.Tensor:
        return self.values[task]

    def __contains__(self, task: str) -> bool:
        return task in self.values

    def mean(self, task: str) -> torch.Tensor:
        """The scalar mean loss of ``task`` (computed once per step)."""
        if task not in self._means:
            self._means[task] = self.values[task].mean()
        return self._means[task]

    def means(self, tasks: Sequence[str] | None = None) -> torch.Tensor:
        """Mean losses of ``tasks`` (default: main then auxiliary) as one vector."""
        return torch.stack([self.mean(t) for t in (tasks or self.names)])

    def per_sample(self, tasks: Sequence[str]) -> torch.Tensor:
        """Losses of tasks computed on one batch, stacked as ``(B, len(tasks), ...)``.

        Raises:
            ValueError: if the tasks were computed on different batches.
        """
        if self.groups and not any(set(tasks) <= set(g) for g in self.groups):
            raise ValueError(
                f"tasks {list(tasks)} were computed on different batches (groups: {self.groups}); "
                f"per-sample losses only line up within one group"
            )
        return torch.stack([self.values[t] for t in tasks], dim=1)

    def detached_means(self) -> dict[str, torch.Tensor]:
        """Per-task mean losses without gradient, for logging."""
        return {t: self.mean(t).detach() for t in self.names}


@dataclass
class WeightingSetup:
    """What a weighting learns about the experiment once, before training.

    Attributes:
        main_task: name of the main task.
        aux_tasks: names of the auxiliary tasks, in task-graph order.
        model: the multi-task model (``model.backbone``, ``model.heads``).
        shared_parameters: the backbone's trainable parameters (a list).
        device: where the model lives.
        total_steps: the number of inner steps the run will take.
        steps_per_epoch: inner steps per pass over the main task's labelled data.
        has_aux_set: whether a held-out auxiliary set exists (bilevel methods need one).
        label_generators: task name -> :class:`~auxframe.labelgen.GeneratedLabels` for each task
            whose labels a generator makes (bilevel methods learn the generators' parameters).
    """

    main_task: str
    aux_tasks: list[str]
    model: nn.Module
    shared_parameters: list[nn.Parameter]
    device: torch.device
    total_steps: int
    steps_per_epoch: int
    has_aux_set: bool = False
    label_generators: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a weighting can use during a step.

    Attributes:
        step: the inner step being taken (0-based).
        model: the multi-task model.
        shared_parameters: the backbone's trainable parameters.
        train_losses: draws the next training batches and returns their :class:`TaskLosses`
            with gradients (for methods that need extra batches, e.g. in an outer step).
        aux_set_losses: draws the next batch of the held-out auxiliary set and returns the main
            task's losses on it (None when the split has no auxiliary set).
        extras: per-step quantities shared between methods and computed once (e.g. per-task
            gradients); a cache keyed by name.
        train_batch: draws the next training batches without a forward pass, as ``{group's
            tasks: (inputs, {task: targets})}`` (None where the trainer does not offer it).
        aux_set_batch: draws the next auxiliary-set batch as ``(inputs, main-task targets)``.
        make_losses: the trainer's task losses of given head outputs and targets,
            ``make_losses({task: output}, {task: targets}) -> TaskLosses``.
        backward: ``backward(loss)`` fills ``.grad`` from a scalar loss as ``loss.backward()`` does,
            through the fp16 loss scale when there is one; call it for the model's backward (None:
            ``loss.backward()``).
    """

    step: int
    model: nn.Module
    shared_parameters: list[nn.Parameter]
    train_losses: Callable[[], TaskLosses]
    aux_set_losses: Callable[[], TaskLosses] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    train_batch: Callable[[], dict[tuple[str, ...], tuple[torch.Tensor, dict[str, torch.Tensor]]]] | None = None
    aux_set_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    make_losses: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], TaskLosses] | None = None
    backward: Callable[[torch.Tensor], None] | None = None


class Weighting:
    """Base class of weighting algorithms. Subclasses override :meth:`combine` at least.

    Attributes:
        outer_every: run :meth:`outer_step` every this many inner steps; 0 for none.
        double_backward: :meth:`backward` differentiates the inner step's graph twice (e.g. by
            reverse-mode Jacobian-vector products). ``torch.compile``'s graphs cannot be, so with
            ``train.compile`` such a weighting's inner steps run eagerly (with one warning).

    :meth:`after_step` and :meth:`outer_step` return True in a step where a periodic update
    changed the weights (ARML's weight step, an outer step, DWA's epoch): the trainer then logs
    :meth:`log_values` at that step, between its log intervals too. They return None (or False)
    otherwise.
    """

    outer_every: int = 0
    double_backward: bool = False

    def setup(self, info: WeightingSetup) -> None:
        """Called once before training (and before :meth:`load_state_dict` on resume)."""
        self.main_task = info.main_task
        self.aux_tasks = list(info.aux_tasks)

    def tasks_needed(self) -> list[str]:
        """Tasks whose losses the trainer must compute each step (default: all)."""
        return [self.main_task, *self.aux_tasks]

    def inner_parameters(self) -> list[nn.Parameter]:
        """Extra parameters trained by the model's optimizer (e.g. learned log-variances)."""
        return []

    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        """Combine the task losses into the scalar the model is trained on.

        Every weighting defines this, or overrides :meth:`backward` to write gradients itself.
        """
        raise NotImplementedError(f"{type(self).__name__} must define combine(losses, ctx) or override backward()")

    def backward(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        """Put gradients into ``.grad`` of the parameters; returns the combined loss (detached).

        Run the model's backward through ``ctx.backward(loss)`` (as here), so that the fp16 loss
        scale applies to it.
        """
        total = self.combine(losses, ctx)
        if ctx.backward is not None:
            ctx.backward(total)
        else:
            total.backward()
        return total.detach()

    def after_step(self, ctx: StepContext) -> bool | None:
        """Called after the optimizer step (e.g. to project weights, or update per epoch).

        Returns:
            True when a periodic update changed the weights in this step (the trainer then logs
            :meth:`log_values` at this step); None or False otherwise.
        """
        return None

    def outer_step(self, ctx: StepContext) -> bool | None:
        """Called every :attr:`outer_every` inner steps, when that is non-zero.

        Returns:
            True when the step changed the weights (the trainer then logs :meth:`log_values` at
            this step); None or False otherwise.
        """
        return None

    def weights(self) -> dict[str, float]:
        """The current weight of each task, for progress bars and logs."""
        return {}

    def log_values(self) -> dict[str, float]:
        """Scalars for the loggers; by default ``weight/<task>`` for every weight."""
        return {f"weight/{task}": float(w) for task, w in self.weights().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after a resume (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class VectorWeights(Weighting):
    """A weighting whose state is one weight per task, in ``[main, *aux]`` order, combined as
    ``sum_t w_t L_t``: the base of the loss- and gradient-based methods.

    Subclasses change ``self.w`` (a ``(T,)`` tensor, all ones at the start) and may override
    :meth:`current` when the weights are derived from other parameters.
    """

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        self.names = [self.main_task, *self.aux_tasks]
        self.w = torch.ones(len(self.names), device=info.device)

    def current(self) -> torch.Tensor:
        """The weights used for this step's update, ``(T,)`` in ``[main, *aux]`` order."""
        return self.w

    def loss_vector(self, losses: TaskLosses) -> torch.Tensor:
        """The step's mean losses ``(T,)``, detached, averaged over ranks under torchrun."""
        values = torch.stack([losses.mean(t).detach() for t in self.names])
        distributed.all_reduce_mean([values])
        return values

    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        w = self.current().detach()
        return sum(w[i] * losses.mean(t) for i, t in enumerate(self.names) if t in losses)

    def weights(self) -> dict[str, float]:
        return dict(zip(self.names, self.current().detach().tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.detach().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.w = state["w"].to(self.w.device).clone()
