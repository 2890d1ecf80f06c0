"""A valid weighting declared under a name that auxframe-example also declares (``aux_anneal``)."""

from __future__ import annotations

import torch

from auxframe.weighting import StepContext, TaskLosses, Weighting


class DuplicateAuxAnneal(Weighting):
    """Equal weights; it exists only so that two packages declare ``weightings.aux_anneal``."""

    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        return sum((losses.mean(t) for t in losses.names), torch.zeros(()))
