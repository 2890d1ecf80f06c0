"""Weighting algorithms: how the task losses combine into the loss the model is trained on."""

from auxframe.weighting.base import StepContext, TaskLosses, VectorWeights, Weighting, WeightingSetup
from auxframe.weighting.gramian import GramianWeighting

__all__ = ["GramianWeighting", "StepContext", "TaskLosses", "VectorWeights", "Weighting", "WeightingSetup"]
