"""Wide-ResNet backbone (plugin ``wrn28_2``): the WRN-28-2 of semi-supervised learning benchmarks.

Zagoruyko & Komodakis (2016), "Wide Residual Networks": pre-activation basic blocks in three
groups of widths ``16k, 32k, 64k`` after a 3x3 stem of 16 channels, ``(depth - 4) / 6`` blocks per
group, the second and third groups halving the resolution. WRN-28-2 (depth 28, k = 2, about 1.5 M
parameters) is the backbone of Oliver et al. (2018), "Realistic Evaluation of Deep Semi-Supervised
Learning Algorithms", used by S4L-style and ARML semi-supervised experiments on CIFAR-10 and SVHN;
following them the activations are leaky ReLUs (slope 0.1) and BatchNorm's momentum is 0.001
(TensorFlow's decay 0.999).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from auxframe.errors import ConfigError
from auxframe.models.weights import load_weights


class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-act-conv3x3(stride)-BN-act-[dropout]-conv3x3, plus shortcut.

    When the width or resolution changes, the shortcut is a 1x1 convolution of the *activated*
    input (Zagoruyko & Komodakis' reference code), otherwise the identity of the raw input.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float, slope: float, momentum: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, momentum=momentum)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, momentum=momentum)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.act = nn.LeakyReLU(slope)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.shortcut = None
        if in_ch != out_ch or stride != 1:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act(self.bn1(x))
        out = self.conv2(self.dropout(self.act(self.bn2(self.conv1(pre)))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-k for small images; defaults give WRN-28-2.

    Args:
        input_shape: ``(channels, height, width)`` of the input images (32x32 in the papers).
        depth: total depth; ``(depth - 4)`` must be divisible by 6 (28: 4 blocks per group).
        widen_factor: ``k``, the width multiplier (2 for WRN-28-2).
        dropout: dropout between the two convolutions of each block (0 in Oliver et al.).
        leaky_slope: negative slope of the leaky ReLUs (0 gives plain ReLU).
        bn_momentum: BatchNorm momentum in PyTorch's convention.
        global_pool: average the last maps to a vector ``(B, 64k)``; False returns the maps
            ``(B, 64k, H/4, W/4)``.
        weights_path: a local ``torch.save`` file with this network's state dict (None: random
            initialisation, He normal for convolutions).

    Attributes:
        out_features: ``64 * widen_factor`` (128 for WRN-28-2).

    Raises:
        ConfigError: a depth not of the form ``6n + 4``, or a weights file that does not fit.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        depth: int = 28,
        widen_factor: int = 2,
        dropout: float = 0.0,
        leaky_slope: float = 0.1,
        bn_momentum: float = 0.001,
        global_pool: bool = True,
        weights_path: str | None = None,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(
                f"backbones.wrn28_2.depth = {depth}: a Wide-ResNet's depth is 6n + 4 with n >= 1 blocks per "
                f"group (10, 16, 22, 28, 40, ...)."
            )
        if widen_factor < 1:
            raise ConfigError(f"backbones.wrn28_2.widen_factor = {widen_factor}: use a positive integer (2 for WRN-28-2).")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(int(input_shape[0]), widths[0], 3, padding=1, bias=False)
        groups = []
        for g in range(3):
            layers = [
                _WideBlock(widths[g] if b == 0 else widths[g + 1], widths[g + 1], (1 if g == 0 else 2) if b == 0 else 1,
                           dropout, leaky_slope, bn_momentum)
                for b in range(blocks)
            ]
            groups.append(nn.Sequential(*layers))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(widths[3], momentum=bn_momentum)
        self.act = nn.LeakyReLU(leaky_slope)
        self.global_pool = bool(global_pool)
        self.out_features = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=leaky_slope)
        if weights_path is not None:
            load_weights(self, weights_path, "backbones.wrn28_2.weights_path")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.act(self.bn(self.groups(self.stem(x))))
        return maps.mean(dim=(2, 3)) if self.global_pool else maps
