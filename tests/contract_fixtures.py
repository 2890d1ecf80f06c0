"""Plugins that break their contracts the ways plugin authors do, for tests/test_contracts.py.

Each is what a user wrote in their own package: a weighting that forgets ``super().setup()``, one
whose ``combine`` returns per-sample losses, one whose ``combine`` detaches the total, one that
forgets part of its state, one whose state lives on the CPU; a dataset factory whose images lack
the channel dimension, and one whose declared ``input_shape`` is not its images' shape.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from auxframe.data.base import LabelField, TensorImageDataset
from auxframe.weighting import StepContext, TaskLosses, Weighting, WeightingSetup

MODULE = __name__


class ForgetsSuperSetup(Weighting):
    """Equal weights, but its setup() does not call super().setup(info)."""

    def setup(self, info: WeightingSetup) -> None:
        self.steps = info.total_steps

    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        return losses.means().sum()


class PerSampleCombine(Weighting):
    """Returns the per-sample losses of the main task instead of one scalar."""

    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        return losses[self.main_task] + sum(losses.mean(t) for t in losses.aux_tasks)


class DetachedCombine(Weighting):
    """Returns a number built from .item(): no gradient reaches the model."""

    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        return torch.tensor(sum(losses.mean(t).item() for t in losses.names))


class ForgetsItsState(Weighting):
    """An annealed auxiliary weight whose step counter is not in its state_dict()."""

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        self.step = 0

    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        w = 1.0 / (1 + self.step)
        return losses.mean(self.main_task) + w * sum(losses.mean(t) for t in losses.aux_tasks)

    def after_step(self, ctx: StepContext) -> None:
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {}


class StateOnTheCpu(Weighting):
    """Keeps a running mean of the losses in a CPU tensor, whatever the model's device."""

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        self.running = torch.zeros(1 + len(info.aux_tasks))

    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        self.running = 0.9 * self.running + 0.1 * losses.means().detach().cpu()
        return losses.means().sum()

    def state_dict(self) -> dict[str, Any]:
        return {"running": self.running}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.running = state["running"].clone()


def _fields() -> dict[str, LabelField]:
    return {"digit": LabelField(10, "the digit"), "parity": LabelField(2, "odd or even")}


def _labels(n: int) -> dict[str, torch.Tensor]:
    digit = torch.arange(n) % 10
    return {"digit": digit, "parity": digit % 2}


def images_without_channels(n: int = 600) -> TensorImageDataset:
    """Images (N, 8, 8): the channel dimension forgotten (TensorImageDataset raises a ValueError)."""
    return TensorImageDataset(torch.rand(n, 8, 8), _labels(n), _fields(), "digit")


class _WrongShape(TensorImageDataset):
    input_shape = (3, 8, 8)

    def __init__(self, n: int):
        super().__init__(torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)), _labels(n), _fields(), "digit")
        self.input_shape = (3, 8, 8)  # says RGB, holds greyscale


def declared_shape_differs(n: int = 600) -> TensorImageDataset:
    """A dataset whose input_shape says (3, 8, 8) while its images are (1, 8, 8)."""
    return _WrongShape(n)


class Backbone(nn.Module):
    """A valid small backbone (for completeness of the fake package)."""

    def __init__(self, input_shape, width: int = 8):
        super().__init__()
        self.linear = nn.Linear(int(input_shape[0]) * int(input_shape[1]) * int(input_shape[2]), width)

    def forward(self, x):
        return self.linear(x.flatten(1))


class UnusedLayerBackbone(Backbone):
    """Has a layer its forward pass never uses."""

    def __init__(self, input_shape, width: int = 8):
        super().__init__(input_shape, width)
        self.unused = nn.Linear(width, width)
