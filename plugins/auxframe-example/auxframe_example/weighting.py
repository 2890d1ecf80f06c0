"""Annealed auxiliary weights (plugin ``weightings.aux_anneal``).

Auxiliary tasks often help most early in training, as a source of features, and can compete with
the main task late in training; a common remedy is to lower their weight over the run. This plugin
does that on a fixed schedule: the main task keeps its weight, every auxiliary task's weight goes
from ``start`` to ``end``, linearly or along a half cosine, over ``WeightingSetup.total_steps``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from auxframe.errors import ConfigError
from auxframe.weighting import StepContext, TaskLosses, Weighting, WeightingSetup

SCHEDULES = ("linear", "cosine")


class AuxAnneal(Weighting):
    """Auxiliary weights that decay from ``start`` to ``end`` over the run.

    With ``T`` the run's total steps and ``p = min(step / (T - 1), 1)`` its progress, every
    auxiliary task's weight at an inner step is::

        linear: end + (start - end) * (1 - p)
        cosine: end + (start - end) * (1 + cos(pi * p)) / 2

    so the first step uses ``start`` and the last uses ``end``. The step count is the weighting's
    state, so a resumed run continues on the same schedule.

    Args:
        start: auxiliary weight at the first step.
        end: auxiliary weight at the last step (may be larger than ``start`` to warm up instead).
        schedule: ``'linear'`` or ``'cosine'``.
        main_weight: constant weight of the main task.

    Raises:
        ConfigError: an unknown ``schedule`` or a negative weight.

    Example (gin)::

        train.weighting = @weightings.aux_anneal()
        weightings.aux_anneal.start = 1.0
        weightings.aux_anneal.end = 0.0
        weightings.aux_anneal.schedule = 'cosine'
    """

    def __init__(self, start: float = 1.0, end: float = 0.0, schedule: str = "linear", main_weight: float = 1.0):
        if schedule not in SCHEDULES:
            raise ConfigError(
                f"weightings.aux_anneal.schedule = {schedule!r} is unknown; use one of {', '.join(map(repr, SCHEDULES))}."
            )
        for name, value in (("start", start), ("end", end), ("main_weight", main_weight)):
            if not float(value) >= 0.0:  # also rejects NaN
                raise ConfigError(f"weightings.aux_anneal.{name} must be a weight >= 0, got {value!r}.")
        self.start, self.end, self.main_weight = float(start), float(end), float(main_weight)
        self.schedule = schedule
        self.step = 0
        self.total_steps = 1

    def setup(self, info: WeightingSetup) -> None:
        """Remember the tasks and the run's length; the schedule starts at step 0."""
        super().setup(info)
        self.total_steps = max(1, int(info.total_steps))
        self.step = 0

    def aux_weight(self, step: int | None = None) -> float:
        """The weight of every auxiliary task at ``step`` (default: the current step).

        Args:
            step: an inner step, 0-based.

        Returns:
            The auxiliary weight, between ``start`` and ``end``.
        """
        step = self.step if step is None else step
        progress = min(max(step, 0) / max(self.total_steps - 1, 1), 1.0)
        if self.schedule == "linear":
            remaining = 1.0 - progress
        else:
            remaining = (1.0 + math.cos(math.pi * progress)) / 2.0
        return self.end + (self.start - self.end) * remaining

    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        """``main_weight * L_main + aux_weight() * sum_k L_k``."""
        total = self.main_weight * losses.mean(self.main_task)
        w = self.aux_weight()
        if w != 0.0:
            for task in losses.aux_tasks:
                total = total + w * losses.mean(task)
        return total

    def after_step(self, ctx: StepContext) -> None:
        """Advance the schedule by one inner step.

        A schedule changes the weight a little every step, which is no periodic update worth a
        log row of its own (a weighting returns True for those), so this returns None.
        """
        self.step += 1

    def weights(self) -> dict[str, float]:
        """The main task's weight and the current auxiliary weight of each auxiliary task."""
        if not hasattr(self, "main_task"):
            return {}
        w = self.aux_weight()
        return {self.main_task: self.main_weight, **{t: w for t in self.aux_tasks}}

    def state_dict(self) -> dict[str, Any]:
        """The step the schedule is at; with the same ``train.steps`` a resumed run is exact."""
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the schedule at the saved step.

        If ``train.steps`` changed on resume, the schedule goes on from that step towards ``end``
        at the new run length.
        """
        self.step = int(state["step"])
