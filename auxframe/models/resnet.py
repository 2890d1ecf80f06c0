"""torchvision ResNet-18/34/50 backbones (plugins ``resnet18``, ``resnet34``, ``resnet50``).

Random initialisation by default; pretrained weights only from a local file the user names
(``weights_path``), e.g. torchvision's ImageNet file saved on their own machine. The classifier
(``fc``) is dropped: the backbone returns pooled features ``(B, 512)`` for ResNet-18/34 and
``(B, 2048)`` for ResNet-50, or the last feature maps with ``global_pool=False``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torchvision

from auxframe.models.weights import load_weights


class ResNet(nn.Module):
    """A torchvision ResNet without its classifier; subclasses fix the depth.

    Args:
        input_shape: ``(channels, height, width)`` of the input images; channels other than 3
            get a first convolution of that many input channels.
        small_images: CIFAR-style stem for small images (32x32): a 3x3 stride-1 first convolution
            and no max pooling, so the maps are 1/8 of the input size instead of 1/32.
        global_pool: average the last maps to a vector ``(B, F)``; False returns the maps
            ``(B, F, H/32, W/32)`` (``H/8, W/8`` with ``small_images``).
        weights_path: a local ``torch.save`` file with the state dict of a torchvision ResNet of
            the same depth (keys ``conv1.weight``, ``layer1.0.conv1.weight``, ...; ``fc.*`` keys
            are ignored). None: random initialisation.

    Attributes:
        out_features: ``F``, 512 (ResNet-18/34) or 2048 (ResNet-50).

    Raises:
        ConfigError: the weights file is missing or does not fit (e.g. ImageNet weights with
            ``small_images=True``, whose first convolution is 3x3, not 7x7).
    """

    depth: int = 18
    _builders = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34, 50: torchvision.models.resnet50}

    def __init__(
        self,
        input_shape: Sequence[int],
        small_images: bool = False,
        global_pool: bool = True,
        weights_path: str | None = None,
    ):
        super().__init__()
        net = self._builders[self.depth](weights=None)
        in_ch = int(input_shape[0])
        if small_images or in_ch != 3:
            kernel, stride, padding = (3, 1, 1) if small_images else (7, 2, 3)
            net.conv1 = nn.Conv2d(in_ch, 64, kernel, stride=stride, padding=padding, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        if small_images:
            net.maxpool = nn.Identity()
        self.out_features = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net
        self.global_pool = bool(global_pool)
        if weights_path is not None:
            name = f"backbones.resnet{self.depth}.weights_path"
            load_weights(self.net, weights_path, name, skip_prefixes=("fc.",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return x.mean(dim=(2, 3)) if self.global_pool else x


class ResNet18(ResNet):
    __doc__ = ResNet.__doc__.replace("subclasses fix the depth", "depth 18 (features: 512)")
    depth = 18


class ResNet34(ResNet):
    __doc__ = ResNet.__doc__.replace("subclasses fix the depth", "depth 34 (features: 512)")
    depth = 34


class ResNet50(ResNet):
    __doc__ = ResNet.__doc__.replace("subclasses fix the depth", "depth 50, bottleneck blocks (features: 2048)")
    depth = 50
