"""Weightings that read the task gradients only through their Gramian: the "Gramian -> weights" seam.

A step of such a method has three parts, and a method writes only the middle one:

1. the engine (:class:`auxframe.weighting.gradients.TaskGradients`) computes the Gramian
   ``G[j, k] = <g_j, g_k>`` of the tasks' gradients ``[g_main, g_1, ..., g_K]`` in the method's
   space, once per step, shared with anything else in the step that asks for it;
2. the method maps ``G`` to one weight per task with a pure function, :meth:`GramianWeighting.from_gramian`;
3. the engine writes ``sum_k w_k g_k`` into the backbone's ``.grad`` (from the Jacobian that gave
   ``G``: no further backward pass) and each task's loss gradient into its own head's.

This is TorchJD's ``GramianWeightedAggregator(weighting << compute_gramian)``, with auxframe's
engine computing the Gramian, so any TorchJD Gramian weighting plugs in as it is::

    from torchjd.aggregation import UPGradWeighting

    class UPGrad(GramianWeighting):
        def __init__(self, space: str = "shared"):
            super().__init__(UPGradWeighting(), space=space)

PCGrad and GCS (:mod:`auxframe.weighting.gradient_based`) are written this way.
"""

from __future__ import annotations

import torch

from auxframe.weighting.base import StepContext, TaskLosses, VectorWeights
from auxframe.weighting.gradients import GramianToWeights, TaskGradients, check_space


class GramianWeighting(VectorWeights):
    """Base class of the weightings that map the per-task Gramian to weights.

    Subclasses override :meth:`from_gramian`, or pass the map (a TorchJD ``Weighting``, any
    callable) to the constructor. The weights of the last step are ``self.w`` (logged and
    checkpointed by :class:`~auxframe.weighting.base.VectorWeights`).

    Args:
        weighting: ``(T, T) Gramian -> (T,) weights`` (None: the subclass's :meth:`from_gramian`).
        space: where the gradients live: ``'shared'`` (all backbone parameters), ``'last_shared'``
            or ``'representation'`` (see :mod:`auxframe.weighting.gradients`).

    Example:
        >>> from torchjd.aggregation import MGDAWeighting
        >>> mgda = GramianWeighting(MGDAWeighting())          # train.weighting = ... in Python
    """

    space = "shared"

    def __init__(self, weighting: GramianToWeights | None = None, space: str = "shared"):
        self.gramian_weighting = weighting
        self.space = check_space(space, type(self).__name__)

    def from_gramian(self, gramian: torch.Tensor) -> torch.Tensor:
        """The weights ``(T,)`` of ``[main, *aux]`` given their gradients' Gramian ``(T, T)``.

        A pure function of the Gramian (state such as a random generator or a moving average
        is the method's own, saved in :meth:`state_dict`). Called without gradient.
        """
        if self.gramian_weighting is None:
            raise NotImplementedError(f"{type(self).__name__} must define from_gramian(gramian) or pass a weighting")
        return self.gramian_weighting(gramian)

    def engine(self, losses: TaskLosses, ctx: StepContext) -> TaskGradients:
        """The step's shared per-task gradient engine in this method's space."""
        return TaskGradients.of(losses, ctx, space=self.space)

    def backward(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        self.w, total = self.engine(losses, ctx).gramian_backward(self.names, self.from_gramian)
        return total
