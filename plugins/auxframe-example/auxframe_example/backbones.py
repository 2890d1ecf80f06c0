"""A tiny residual CNN backbone (plugin ``backbones.example_resnet``).

A backbone plugin is a factory ``fn(input_shape, **params) -> nn.Module`` whose module maps images
``(B, C, H, W)`` to features ``(B, F)``. A class whose ``__init__`` takes ``input_shape`` first is
such a factory; its other ``__init__`` parameters become gin parameters
(``backbones.example_resnet.width = 64``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from auxframe.errors import ConfigError


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, added to the block's input: ``relu(x + f(x))``.

    Args:
        width: input and output channels.
    """

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.body(x))


class ExampleResNet(nn.Module):
    """A tiny residual CNN: a 3x3 stem convolution, residual blocks, global average pooling.

    Every layer keeps the image size, so it works on images as small as the 8x8 digits; with the
    defaults it has about 40k parameters.

    Args:
        input_shape: ``(channels, height, width)`` of the input images.
        width: channels of the stem and of every residual block; also the feature size.
        blocks: number of residual blocks after the stem (0 gives stem and pooling only).

    Raises:
        ConfigError: ``width`` is not positive or ``blocks`` is negative.

    Example:
        >>> net = ExampleResNet((1, 8, 8), width=16, blocks=1)
        >>> net(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 16])

    Example (gin)::

        train.backbone = @backbones.example_resnet
        backbones.example_resnet.width = 32
        backbones.example_resnet.blocks = 2
    """

    def __init__(self, input_shape: Sequence[int], width: int = 32, blocks: int = 2):
        super().__init__()
        if int(width) < 1:
            raise ConfigError(f"backbones.example_resnet.width must be a positive integer, got {width!r}.")
        if int(blocks) < 0:
            raise ConfigError(f"backbones.example_resnet.blocks must be 0 or more, got {blocks!r}.")
        width, blocks = int(width), int(blocks)
        self.stem = nn.Sequential(
            nn.Conv2d(int(input_shape[0]), width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(blocks)))
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))
