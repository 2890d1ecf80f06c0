"""Built-in losses (plugin kind ``losses``).

A loss plugin is ``fn(output, target) -> tensor`` that returns the loss *unreduced*, with the batch
as its first dimension (``(B,)`` per sample, ``(B, H, W)`` per pixel). Weightings see these
unreduced values, so networks over per-sample loss vectors (AuxiLearn) can be built on them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(output: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample softmax cross-entropy; ``target`` holds class indices (``-1`` entries give 0 loss).

    Args:
        output: logits ``(B, C)`` (or ``(B, C, H, W)`` for per-pixel classification).
        target: class indices ``(B,)`` (or ``(B, H, W)``), int64.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
    """
    return F.cross_entropy(output, target, reduction="none", ignore_index=-1, label_smoothing=label_smoothing)


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, averaged over every non-batch dimension."""
    diff = (output - target.to(output.dtype)).pow(2)
    return diff.reshape(diff.shape[0], -1).mean(dim=1)
