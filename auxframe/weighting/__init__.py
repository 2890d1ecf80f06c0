"""Weighting algorithms: how the task losses combine into the loss the model is trained on."""

from auxframe.weighting.base import StepContext, TaskLosses, VectorWeights, Weighting, WeightingSetup

__all__ = ["StepContext", "TaskLosses", "VectorWeights", "Weighting", "WeightingSetup"]
