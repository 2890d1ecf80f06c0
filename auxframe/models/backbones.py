"""Built-in backbones (plugin kind ``backbones``): small networks for small images.

A backbone plugin is a factory ``fn(input_shape, **params) -> nn.Module``; the module maps a batch
``(B, C, H, W)`` to features ``(B, F)`` (or ``(B, C', H', W')`` for dense tasks). The model builder
finds the feature shape with one dry forward pass, so a backbone needs no extra attributes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    """A few 3x3 conv layers with BatchNorm and ReLU, then global average pooling.

    Sized for 8x8 digits and 32x32 images; the default is a few ten thousand parameters, small
    enough that second-order steps stay cheap on a CPU.

    Args:
        input_shape: ``(channels, height, width)`` of the input images.
        channels: output channels of each conv layer.
        pool_after: indices of layers followed by 2x2 max pooling.
        batch_norm: use BatchNorm after each conv.
        global_pool: average the feature maps to a vector ``(B, C)``; False keeps the maps
            ``(B, C, H', W')`` for per-pixel heads (use ``pool_after=()`` to keep full resolution).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: Sequence[int] = (32, 64, 64),
        pool_after: Sequence[int] = (1,),
        batch_norm: bool = True,
        global_pool: bool = True,
    ):
        super().__init__()
        self.global_pool = global_pool
        in_ch = int(input_shape[0])
        layers: list[nn.Module] = []
        for i, out_ch in enumerate(channels):
            layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
            if i in pool_after:
                layers.append(nn.MaxPool2d(2))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.out_features = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x)
        return maps.mean(dim=(2, 3)) if self.global_pool else maps


class MLP(nn.Module):
    """Flatten, then fully connected layers with ReLU.

    Args:
        input_shape: ``(channels, height, width)`` of the input images.
        hidden: width of each hidden layer; the last is the feature size.
        dropout: dropout probability after each hidden layer.
    """

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (128, 64), dropout: float = 0.0):
        super().__init__()
        in_f = 1
        for d in input_shape:
            in_f *= int(d)
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(in_f, h), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            in_f = h
        self.net = nn.Sequential(*layers)
        self.out_features = in_f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
