"""The multi-task model: one shared backbone and one head per task."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn as nn


class MultiTaskModel(nn.Module):
    """A shared backbone with one head per task; ``forward`` returns ``{task name: output}``.

    Args:
        backbone: maps images ``(B, C, H, W)`` to features.
        heads: task name -> head module.

    Example:
        >>> model = MultiTaskModel(backbone, {"digit": head_a, "parity": head_b})
        >>> out = model(images)                       # {"digit": (B, 10), "parity": (B, 2)}
        >>> out = model(images, tasks=["digit"])     # only the heads asked for
    """

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, x: torch.Tensor, tasks: Iterable[str] | None = None, return_features: bool = False):
        """Head outputs by task; with ``return_features`` also the representation each head read.

        With ``return_features=True`` each head reads its own view of the backbone's output, so
        one backward pass gives every task's gradient w.r.t. the representation separately
        (``torch.autograd.grad(sum_of_losses, [features[t] for t in tasks])``); the views cost
        nothing and change no value. Returns ``(outputs, features)`` then, both keyed by task.
        """
        features = self.backbone(x)
        names = self.heads.keys() if tasks is None else tasks
        if not return_features:
            return {name: self.heads[name](features) for name in names}
        views = {name: features.view_as(features) for name in names}
        return {name: self.heads[name](views[name]) for name in names}, views

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the shared backbone (a list, never a generator)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def head_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters of one task's head."""
        return [p for p in self.heads[task].parameters() if p.requires_grad]
