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

    def forward(self, x: torch.Tensor, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        names = self.heads.keys() if tasks is None else tasks
        return {name: self.heads[name](features) for name in names}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the shared backbone (a list, never a generator)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def head_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters of one task's head."""
        return [p for p in self.heads[task].parameters() if p.requires_grad]
