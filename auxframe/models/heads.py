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


class MultiLabelHead(ClassificationHead):
    """Binary logits: one per attribute of a multi-hot field, or a single logit for one attribute.

    A binary task (a label field with 2 classes, labels 0/1 of shape ``(B,)``) gets one logit,
    returned as ``(B,)`` so that it lines up with its labels for ``losses.binary_cross_entropy``
    and ``metrics.multilabel_map``; a field of ``A > 2`` outputs gets ``(B, A)`` logits.

    Args:
        feature_shape: shape of one example's features.
        num_outputs: the task's output size (2 for a binary attribute, ``A`` for ``A`` attributes).
        hidden: width of a hidden ReLU layer; 0 for a linear head.
        dropout: dropout before the last layer.
        num_logits: force the number of logits (None: 1 when ``num_outputs <= 2``, else
            ``num_outputs``). A head of one logit returns ``(B,)``.
    """

    def __init__(self, feature_shape: Sequence[int], num_outputs: int, hidden: int = 0, dropout: float = 0.0,
                 num_logits: int | None = None):
        if num_logits is None:
            num_logits = 1 if num_outputs <= 2 else num_outputs
        super().__init__(feature_shape, num_logits, hidden=hidden, dropout=dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.net(features)
        return logits.squeeze(1) if logits.shape[1] == 1 else logits


class EmbeddingHead(ClassificationHead):
    """Embedding of each example (e.g. for the Exemplar task with ``losses.triplet``).

    Args:
        feature_shape: shape of one example's features.
        num_outputs: the embedding dimension (the Exemplar signal's ``num_outputs``).
        hidden: width of a hidden ReLU layer (a projection MLP); 0 for a linear map.
        dropout: dropout before the last layer.
        normalize: divide each embedding by its L2 norm (embeddings on the unit sphere).

    Returns (forward):
        ``(B, num_outputs)`` embeddings.
    """

    def __init__(self, feature_shape: Sequence[int], num_outputs: int, hidden: int = 0, dropout: float = 0.0,
                 normalize: bool = False):
        super().__init__(feature_shape, num_outputs, hidden=hidden, dropout=dropout)
        self.normalize = bool(normalize)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.net(features)
        return nn.functional.normalize(out, dim=1) if self.normalize else out


class DensePrediction(nn.Module):
    """Per-pixel prediction on feature maps: an optional 3x3 conv, then a 1x1 conv to the outputs.

    The base of the dense heads below; it is not a plugin itself.

    Args:
        feature_shape: ``(channels, height, width)`` of the backbone's feature maps.
        out_channels: channels of the prediction.
        hidden: channels of the 3x3 conv; 0 for none, -1 for as many as the features have.
        activation: ReLU after the 3x3 conv (the split SegNet's prediction layers have none).
        output_size: ``(height, width)`` to upsample the prediction to (bilinear); None keeps the
            feature maps' size (use a backbone that keeps the input resolution).
        head: the head's registered name, for error messages.

    Raises:
        ValueError: the backbone gives vectors, not maps.
    """

    def __init__(self, feature_shape: Sequence[int], out_channels: int, hidden: int, activation: bool,
                 output_size: Sequence[int] | None, head: str):
        super().__init__()
        if len(feature_shape) != 3:
            raise ValueError(
                f"heads.{head} needs feature maps (C, H, W), but the backbone gives {tuple(feature_shape)}; "
                f"use a backbone without global pooling (e.g. `backbones.small_cnn.global_pool = False`, "
                f"or `backbones.segnet`)."
            )
        channels = int(feature_shape[0])
        hidden = channels if hidden == -1 else int(hidden)
        layers: list[nn.Module] = []
        if hidden:
            layers.append(nn.Conv2d(channels, hidden, 3, padding=1))
            if activation:
                layers.append(nn.ReLU(inplace=True))
            channels = hidden
        layers.append(nn.Conv2d(channels, out_channels, 1))
        self.net = nn.Sequential(*layers)
        self.output_size = tuple(output_size) if output_size else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.net(features)
        if self.output_size and tuple(out.shape[-2:]) != self.output_size:
            out = nn.functional.interpolate(out, size=self.output_size, mode="bilinear", align_corners=False)
        return out


class DenseClassificationHead(DensePrediction):
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
        super().__init__(feature_shape, num_outputs, hidden, True, output_size, "dense_classification")


class SegmentationHead(DensePrediction):
    """Semantic segmentation logits ``(B, num_outputs, H, W)``: the split SegNet's prediction layer.

    A 3x3 conv keeping the channels, then a 1x1 conv to the classes, no activation between
    (MTAN / AuxiLearn ``pred_task1``). Use with ``losses.cross_entropy`` (labels ``(B, H, W)``,
    ``-1`` ignored) and ``metrics.miou``.

    Args:
        feature_shape: ``(channels, height, width)`` of the backbone's feature maps.
        num_outputs: number of classes (13 for NYUv2).
        hidden: channels of the 3x3 conv; -1 for as many as the features (the SegNet way), 0
            for a 1x1 classifier only.
        output_size: ``(height, width)`` to upsample the logits to; None keeps the maps' size.

    Raises:
        ValueError: the backbone gives vectors, not maps.
    """

    def __init__(self, feature_shape: Sequence[int], num_outputs: int, hidden: int = -1,
                 output_size: Sequence[int] | None = None):
        super().__init__(feature_shape, num_outputs, hidden, False, output_size, "segmentation")


def _check_channels(head: str, num_outputs: int, channels: int) -> None:
    if num_outputs not in (0, 1, channels):
        raise ValueError(
            f"heads.{head} predicts {channels} channel(s) per pixel, but its task asks for {num_outputs} "
            f"outputs; a label field of {num_outputs} classes is a classification task: use "
            f"`heads.segmentation` or `heads.dense_classification` for it."
        )


class DepthHead(DensePrediction):
    """Depth ``(B, 1, H, W)``: the split SegNet's depth layer (3x3 conv, 1x1 conv to 1 channel).

    Use with ``losses.l1_depth`` and ``metrics.depth_error`` (targets ``(B, 1, H, W)``, 0 = invalid).

    Args:
        feature_shape: ``(channels, height, width)`` of the backbone's feature maps.
        num_outputs: the task's output size; must be 0 or 1 (depth has one channel).
        hidden: channels of the 3x3 conv; -1 for as many as the features, 0 for none.
        output_size: ``(height, width)`` to upsample to; None keeps the maps' size.

    Raises:
        ValueError: vector features, or a task asking for several outputs.
    """

    channels, registered_name = 1, "depth"

    def __init__(self, feature_shape: Sequence[int], num_outputs: int = 1, hidden: int = -1,
                 output_size: Sequence[int] | None = None):
        _check_channels(self.registered_name, num_outputs, self.channels)
        super().__init__(feature_shape, self.channels, hidden, False, output_size, self.registered_name)


class NormalsHead(DepthHead):
    """Surface normals ``(B, 3, H, W)`` of unit length per pixel: the split SegNet's normal layer.

    A 3x3 conv, a 1x1 conv to 3 channels, then division by the per-pixel L2 norm (``1e-12``
    guards a zero vector). Use with ``losses.cosine_normal`` and ``metrics.normal_angle``.

    Args:
        feature_shape: ``(channels, height, width)`` of the backbone's feature maps.
        num_outputs: the task's output size; must be 0, 1 or 3.
        hidden: channels of the 3x3 conv; -1 for as many as the features, 0 for none.
        output_size: ``(height, width)`` to upsample to (before normalising); None keeps the size.

    Raises:
        ValueError: vector features, or a task asking for another number of outputs.
    """

    channels, registered_name = 3, "normals"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(super().forward(features), dim=1, eps=1e-12)
