"""Built-in heads (plugin kind ``heads``).

A head plugin is a factory ``fn(feature_shape, num_outputs, **params) -> nn.Module`` mapping the
backbone's features to one task's output (logits for classification).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


def _flat_size(feature_shape: Sequence[int]) -> int:
    n = 1
    for d in feature_shape:
        n *= int(d)
    return n


class ClassificationHead(nn.Module):
    """Linear classifier on flattened features, optionally with one hidden layer.

    Args:
        feature_shape: shape of one example's features, e.g. ``(64,)``.
        num_outputs: number of classes.
        hidden: width of a hidden ReLU layer; 0 for a linear head.
        dropout: dropout before the last layer.
    """

    def __init__(self, feature_shape: Sequence[int], num_outputs: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        in_f = _flat_size(feature_shape)
        layers: list[nn.Module] = [nn.Flatten()] if len(feature_shape) > 1 else []
        if hidden:
            layers += [nn.Linear(in_f, hidden), nn.ReLU(inplace=True)]
            in_f = hidden
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(in_f, num_outputs))
        self.net = nn.Sequential(*layers)
        self.num_outputs = num_outputs

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)
