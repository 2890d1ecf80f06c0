"""Data: dataset plugins, the low-data splitter, self-supervised signals and batch loaders."""

from auxframe.data.base import ImageDataset, LabelField, TensorImageDataset

__all__ = ["ImageDataset", "LabelField", "TensorImageDataset"]
