"""Builders of what a plugin meets in a run, at a tiny size: a multi-task model, its
:class:`~auxframe.weighting.WeightingSetup`, the step's :class:`~auxframe.weighting.TaskLosses` and
:class:`~auxframe.weighting.StepContext`, and a few-step training loop (:class:`TinyRun`).

The shapes are those of a digits run: images ``(B, 1, 8, 8)``, a main task ``digit`` with 10
classes and an auxiliary task ``parity`` (2 classes) on the same batch, and ``rotation`` (4
classes) on a batch of its own, as a self-supervised task is. Every batch is a pure function of
``(seed, step, draw)``, so two runs see the same data and a resumed run sees what an uninterrupted
one would.

Example:
    >>> setup = weighting_setup()
    >>> losses = task_losses(setup.model)                 # TaskLosses of step 0, with gradients
    >>> ctx = step_context(setup.model)
    >>> total = MyWeighting().combine(losses, ctx)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from auxframe.models.multitask import MultiTaskModel
from auxframe.weighting.base import StepContext, TaskLosses, Weighting, WeightingSetup

INPUT_SHAPE = (1, 8, 8)
#: task -> number of classes of the tiny problem
TASKS = {"digit": 10, "parity": 2, "rotation": 4}
MAIN = "digit"
#: the batch groups: tasks computed on one batch
GROUPS = (("digit", "parity"), ("rotation",))
BATCH = 8


def default_device() -> torch.device:
    """CUDA when present, else the CPU (the device a plugin is checked on)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TinyBackbone(nn.Module):
    """A 3x3 convolution, pooling and a linear layer: ``(B, 1, 8, 8) -> (B, 16)``."""

    def __init__(self, input_shape: Sequence[int] = INPUT_SHAPE, width: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(int(input_shape[0]), 4, 3, padding=1)
        self.linear = nn.Linear(4 * 4 * 4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv(x)), 2)
        return F.relu(self.linear(h.flatten(1)))


def tiny_model(tasks: Mapping[str, int] = TASKS, device: torch.device | str | None = None, seed: int = 0) -> MultiTaskModel:
    """A :class:`~auxframe.models.multitask.MultiTaskModel`: :class:`TinyBackbone` and one linear head per task."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = MultiTaskModel(TinyBackbone(), {t: nn.Linear(16, k) for t, k in tasks.items()})
    finally:
        torch.random.set_rng_state(gen_state)
    return model.to(device or default_device())


def weighting_setup(
    model: MultiTaskModel | None = None,
    main_task: str = MAIN,
    aux_tasks: Sequence[str] | None = None,
    total_steps: int = 20,
    steps_per_epoch: int = 5,
    has_aux_set: bool = True,
    device: torch.device | str | None = None,
) -> WeightingSetup:
    """The :class:`~auxframe.weighting.WeightingSetup` a weighting gets for the tiny problem."""
    model = model if model is not None else tiny_model(device=device)
    aux = list(aux_tasks) if aux_tasks is not None else [t for t in model.heads if t != main_task]
    return WeightingSetup(
        main_task=main_task, aux_tasks=aux, model=model, shared_parameters=model.shared_parameters(),
        device=next(model.parameters()).device, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        has_aux_set=has_aux_set,
    )


def _generator(seed: int, step: int, draw: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + draw) % 2**62)


def batch(step: int = 0, draw: int = 0, seed: int = 0, size: int = BATCH, device: torch.device | str | None = None,
          groups: Sequence[Sequence[str]] = GROUPS) -> dict[tuple[str, ...], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """One batch per group, as the trainer prepares them: ``{group's tasks: (inputs, {task: targets})}``."""
    device = device or default_device()
    out = {}
    for i, group in enumerate(groups):
        g = _generator(seed, step, draw * 16 + i)
        x = torch.rand(size, *INPUT_SHAPE, generator=g)
        digit = torch.randint(0, 10, (size,), generator=g)
        targets = {}
        for t in group:
            if t == "parity":
                targets[t] = digit % 2
            elif t in ("digit", MAIN):
                targets[t] = digit
            else:
                targets[t] = torch.randint(0, TASKS.get(t, 2), (size,), generator=g)
        out[tuple(group)] = (x.to(device), {t: y.to(device) for t, y in targets.items()})
    return out


def losses_of(model: MultiTaskModel, batches: Mapping[tuple[str, ...], tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
              main_task: str = MAIN, tasks: Sequence[str] | None = None) -> TaskLosses:
    """Unreduced cross-entropy losses of the model on ``batches``, with what the trainer adds
    (groups, outputs, features, inputs, targets, ``from_outputs``)."""
    wanted = set(tasks) if tasks is not None else None
    outputs, features, inputs, targets = {}, {}, {}, {}
    groups = []
    for group, (x, ys) in batches.items():
        group = [t for t in group if wanted is None or t in wanted]
        if not group:
            continue
        out, feats = model(x, tasks=group, return_features=True)
        outputs.update(out)
        features.update(feats)
        inputs.update({t: x for t in group})
        targets.update({t: ys[t] for t in group})
        groups.append(tuple(group))
    return _losses(outputs, targets, main_task, [t for t in model.heads if t != main_task], groups, features, inputs)


def _losses(outputs, targets, main_task, aux, groups, features=None, inputs=None) -> TaskLosses:
    values = {t: F.cross_entropy(outputs[t], targets[t], reduction="none") for t in outputs}
    return TaskLosses(values, main_task, aux, groups, outputs=outputs,
                      from_outputs=lambda new, other=None: _losses(new, targets if other is None else other,
                                                                   main_task, aux, groups),
                      features=features, inputs=inputs, targets=targets)


def task_losses(model: MultiTaskModel | None = None, step: int = 0, seed: int = 0, tasks: Sequence[str] | None = None,
                main_task: str = MAIN) -> TaskLosses:
    """The :class:`~auxframe.weighting.TaskLosses` of one step of the tiny problem (with gradients)."""
    model = model if model is not None else tiny_model()
    return losses_of(model, batch(step, 0, seed, device=next(model.parameters()).device), main_task, tasks)


def step_context(model: MultiTaskModel | None = None, step: int = 0, seed: int = 0, tasks: Sequence[str] | None = None,
                 main_task: str = MAIN, aux_set: bool = True) -> StepContext:
    """The :class:`~auxframe.weighting.StepContext` of one step: extra training batches, the
    auxiliary set, raw batches and the loss function, each draw a new seeded batch."""
    model = model if model is not None else tiny_model()
    device = next(model.parameters()).device
    draws = iter(range(1, 1_000_000))

    def train_batch():
        return batch(step, next(draws), seed, device=device)

    def aux_set_batch():
        x, ys = batch(step, next(draws), seed, device=device, groups=((main_task,),))[(main_task,)]
        return x, ys[main_task]

    def aux_set_losses():
        x, y = aux_set_batch()
        out = model(x, tasks=[main_task])
        return TaskLosses({main_task: F.cross_entropy(out[main_task], y, reduction="none")}, main_task, [], [[main_task]])

    def make_losses(outputs, targets):
        groups = [tuple(t for t in g if t in outputs) for g in GROUPS]
        return _losses(dict(outputs), dict(targets), main_task, [t for t in model.heads if t != main_task],
                       [g for g in groups if g])

    return StepContext(
        step=step, model=model, shared_parameters=model.shared_parameters(),
        train_losses=lambda: losses_of(model, train_batch(), main_task, tasks),
        aux_set_losses=aux_set_losses if aux_set else None, train_batch=train_batch,
        aux_set_batch=aux_set_batch if aux_set else None, make_losses=make_losses,
    )


class TinyRun:
    """A few steps of training with a weighting, in the trainer's order: ``backward``, the
    optimizer's step, ``after_step``, and ``outer_step`` every ``outer_every`` steps.

    Args:
        make: makes a fresh weighting (not yet set up).
        device: where to train (default: CUDA when present).
        seed: the model's initialisation and the batches.
        total_steps: what :class:`~auxframe.weighting.WeightingSetup` says the run's length is.
        on_setup: called with the weighting and its setup right after ``setup`` (the contract
            checks look at it there).
    """

    def __init__(self, make: Callable[[], Weighting], device: torch.device | str | None = None, seed: int = 0,
                 total_steps: int = 20, on_setup: Callable[[Weighting, WeightingSetup], None] | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.seed = seed
        self.model = tiny_model(device=self.device, seed=seed)
        self.setup = weighting_setup(self.model, total_steps=total_steps)
        self.weighting = make()
        self.weighting.setup(self.setup)
        if on_setup is not None:
            on_setup(self.weighting, self.setup)
        self.tasks = list(self.weighting.tasks_needed())
        self.optimizer = torch.optim.SGD(list(self.model.parameters()) + list(self.weighting.inner_parameters()),
                                         lr=0.05, momentum=0.9)
        self.step = 0

    def losses(self) -> TaskLosses:
        return losses_of(self.model, batch(self.step, 0, self.seed, device=self.device), self.setup.main_task, self.tasks)

    def context(self) -> StepContext:
        return step_context(self.model, self.step, self.seed, self.tasks, self.setup.main_task)

    def train_step(self, before_backward: Callable[[TaskLosses, StepContext], None] | None = None,
                   after_backward: Callable[[Any], None] | None = None) -> Any:
        """One inner step (and the outer step when due); returns what ``backward`` returned.

        The global RNG is seeded from the step, so that runs (and resumed runs) draw alike.
        """
        torch.manual_seed(self.seed * 7_919 + self.step)
        self.model.train()
        ctx = self.context()
        losses = self.losses()
        if before_backward is not None:
            before_backward(losses, ctx)
        self.optimizer.zero_grad(set_to_none=True)
        total = self.weighting.backward(losses, ctx)
        if after_backward is not None:
            after_backward(total)
        self.optimizer.step()
        self.weighting.after_step(ctx)
        self.step += 1
        every = self.weighting.outer_every
        if every and self.step % every == 0:
            torch.manual_seed(self.seed * 7_919 + self.step + 500_009)
            self.weighting.outer_step(self.context())
        return total

    def state_dict(self) -> dict[str, Any]:
        """The run's checkpoint, as the trainer keeps it: model, optimizer, weighting, step."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "weighting": self.weighting.state_dict(), "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.weighting.load_state_dict(state["weighting"])
        self.step = int(state["step"])
