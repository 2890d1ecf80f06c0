"""The split SegNet backbone (plugin ``segnet``) of the NYUv2 experiments of MTAN and AuxiLearn.

Liu et al. (2019), "End-to-End Multi-Task Learning with Attention" (MTAN), define a SegNet with
hard parameter sharing for NYUv2: a shared VGG-style encoder-decoder (max pooling with indices,
max unpooling), then one small prediction layer per task. AuxiLearn (Navon et al., 2021) uses the
same network (``SegNetSplit`` in its ``experiments/nyuv2/model.py``). This backbone is the shared
part: it maps ``(B, C, H, W)`` images to per-pixel features ``(B, filters[0], H, W)``; the task
layers are the ``segmentation``, ``depth`` and ``normals`` heads.

Module names follow that code (``encoder_block``, ``decoder_block``, ``conv_block_enc``,
``conv_block_dec``), so its trained weights load with ``weights_path`` (task layers and
``logsigma`` are ignored).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from auxframe.errors import ConfigError
from auxframe.models.weights import load_weights


def _conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class SegNet(nn.Module):
    """Shared SegNet encoder-decoder giving per-pixel features at the input resolution.

    Level ``i`` of the encoder is a 3x3 conv to ``filters[i]`` channels followed by one more conv
    (levels 0 and 1) or two (deeper levels), then 2x2 max pooling; the decoder mirrors it with max
    unpooling at the stored indices. Every conv is conv-BatchNorm-ReLU, initialised as in MTAN
    (Xavier normal weights, zero biases).

    Args:
        input_shape: ``(channels, height, width)``; height and width must be at least
            ``2 ** len(filters)`` (each level halves them; odd sizes are fine).
        filters: channels per level; MTAN's ``(64, 128, 256, 512, 1024)`` by default. Fewer
            levels give a smaller network (e.g. for tests).
        weights_path: a local ``torch.save`` file with the state dict of this network or of MTAN's
            / AuxiLearn's SegNet (their ``pred_task*`` and ``logsigma`` entries are ignored).

    Attributes:
        out_features: ``filters[0]``, the channels of the per-pixel features.

    Raises:
        ConfigError: empty ``filters``, images too small for the number of levels, or a weights
            file that does not fit.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        filters: Sequence[int] = (64, 128, 256, 512, 1024),
        weights_path: str | None = None,
    ):
        super().__init__()
        f = [int(c) for c in filters]
        if not f or min(f) < 1:
            raise ConfigError(f"backbones.segnet.filters = {tuple(filters)}: give one positive channel count per level.")
        height, width = int(input_shape[1]), int(input_shape[2])
        if min(height, width) < 2 ** len(f):
            raise ConfigError(
                f"backbones.segnet: {len(f)} levels halve the image {len(f)} times, so images must be at least "
                f"{2 ** len(f)}x{2 ** len(f)}; got {height}x{width}. Use larger images or fewer `filters`."
            )
        levels = len(f)
        self.encoder_block = nn.ModuleList([_conv(int(input_shape[0]), f[0])] + [_conv(f[i - 1], f[i]) for i in range(1, levels)])
        self.decoder_block = nn.ModuleList([_conv(f[0], f[0])] + [_conv(f[i], f[i - 1]) for i in range(1, levels)])
        self.conv_block_enc = nn.ModuleList([self._refine(f[i], i) for i in range(levels)])
        self.conv_block_dec = nn.ModuleList([self._refine(f[max(i - 1, 0)], i) for i in range(levels)])
        self.down_sampling = nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True)
        self.up_sampling = nn.MaxUnpool2d(kernel_size=2, stride=2)
        self.out_features = f[0]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
        if weights_path is not None:
            load_weights(self, weights_path, "backbones.segnet.weights_path", skip_prefixes=("pred_task", "logsigma"))

    @staticmethod
    def _refine(channels: int, level: int) -> nn.Sequential:
        if level < 2:
            return _conv(channels, channels)
        return nn.Sequential(_conv(channels, channels), _conv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices, sizes = [], []
        for enc, refine in zip(self.encoder_block, self.conv_block_enc):
            x = refine(enc(x))
            sizes.append(x.shape[-2:])
            x, idx = self.down_sampling(x)
            indices.append(idx)
        for level in reversed(range(len(self.encoder_block))):
            x = self.up_sampling(x, indices[level], output_size=sizes[level])
            x = self.conv_block_dec[level](self.decoder_block[level](x))
        return x
