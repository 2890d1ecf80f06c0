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


class DenseClassificationHead(nn.Module):
    """Per-pixel classifier on feature maps: optional 3x3 conv + ReLU, then a 1x1 conv to classes.

    Args:
        feature_shape: ``(channels, height, width)`` of the backbone's feature maps.
        num_outputs: number of classes per pixel.
        hidden: channels of a 3x3 hidden conv; 0 for a 1x1 classifier only.
        output_size: ``(height, width)`` to upsample the logits to (bilinear); None keeps the
            feature maps' size (use a backbone that keeps the input resolution).

    Raises:
        ValueError: the backbone gives vectors, not maps.
    """

    def __init__(self, feature_shape: Sequence[int], num_outputs: int, hidden: int = 0,
                 output_size: Sequence[int] | None = None):
        super().__init__()
        if len(feature_shape) != 3:
            raise ValueError(
                f"a dense head needs feature maps (C, H, W), but the backbone gives {tuple(feature_shape)}; "
                f"use a backbone without global pooling (e.g. `backbones.small_cnn.global_pool = False`)."
            )
        channels = int(feature_shape[0])
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(inplace=True)]
            channels = hidden
        layers.append(nn.Conv2d(channels, num_outputs, 1))
        self.net = nn.Sequential(*layers)
        self.output_size = tuple(output_size) if output_size else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.net(features)
        if self.output_size and tuple(logits.shape[-2:]) != self.output_size:
            logits = nn.functional.interpolate(logits, size=self.output_size, mode="bilinear", align_corners=False)
        return logits
