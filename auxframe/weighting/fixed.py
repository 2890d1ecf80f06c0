"""Fixed-weight baselines: single-task learning (STL), equal weights, and user-chosen weights.

Each combines the mean task losses as ``L = w_main * L_main + sum_k w_k * L_k`` with weights that
never change, so its state is empty.
"""

from __future__ import annotations

from typing import Mapping

import torch

from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, TaskLosses, Weighting, WeightingSetup


class Fixed(Weighting):
    """Fixed task weights chosen by the user.

    Args:
        weights: auxiliary task name -> weight. Tasks not listed get ``default``.
        main_weight: weight of the main task.
        default: weight of auxiliary tasks not in ``weights``.

    Example (gin)::

        train.weighting = @weightings.fixed()
        weightings.fixed.weights = {'parity': 0.3, 'rotation': 1.0}
    """

    def __init__(self, weights: Mapping[str, float] | None = None, main_weight: float = 1.0, default: float = 1.0):
        self.given = dict(weights or {})
        self.main_weight = float(main_weight)
        self.default = float(default)

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        unknown = sorted(set(self.given) - set(self.aux_tasks))
        if unknown:
            raise ConfigError(
                f"{type(self).__name__} weights name unknown auxiliary task(s) {unknown}; the "
                f"auxiliary tasks are {self.aux_tasks}. Fix the names in `weights`."
            )
        self._weights = {self.main_task: self.main_weight}
        self._weights.update({t: float(self.given.get(t, self.default)) for t in self.aux_tasks})

    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        # Weights of exactly 1 skip the multiplication (one op fewer forward and backward per task).
        w = self._weights[self.main_task]
        total = losses.mean(self.main_task) if w == 1.0 else w * losses.mean(self.main_task)
        for task in losses.aux_tasks:
            w = self._weights[task]
            if w == 1.0:
                total = total + losses.mean(task)
            elif w != 0.0:
                total = total + w * losses.mean(task)
        return total

    def tasks_needed(self) -> list[str]:
        return [self.main_task] + [t for t in self.aux_tasks if self._weights[t] != 0.0]

    def weights(self) -> dict[str, float]:
        return dict(self._weights)


class Equal(Fixed):
    """Every task, main and auxiliary, with weight 1 (the "Equal" baseline)."""

    def __init__(self):
        super().__init__(weights=None, main_weight=1.0, default=1.0)


class STL(Fixed):
    """Single-task learning: the main task alone; auxiliary tasks are not even computed."""

    def __init__(self):
        super().__init__(weights=None, main_weight=1.0, default=0.0)
