"""Datasets read one example at a time, through aligned transforms; file checks with clear errors.

:class:`SampleDataset` is the base of the real-data loaders (CIFAR, SVHN, CelebA, Pet, CUB, PACS,
NYUv2). Per-image labels are small and held in memory as arrays; images and dense label maps are
read by the subclass's :meth:`SampleDataset.read` when a batch asks for them (from an in-memory
array for CIFAR and SVHN, from disk for the others), then go through one
:class:`~auxframe.data.transforms.Transforms` pipeline: evaluation batches are resized, cropped and
normalised, training batches (:meth:`get_train_batch`) are augmented too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from auxframe.data.base import ImageDataset, LabelField
from auxframe.data.transforms import Transforms
from auxframe.errors import DataError


class SampleDataset(ImageDataset):
    """Base class of datasets whose examples are read one at a time.

    Subclasses set up what :meth:`read` needs, then call ``super().__init__``, and implement
    ``__len__`` and :meth:`read`.

    Args:
        labels: per-image field name -> labels ``(N,)`` (int64 classes, -1 = missing).
        fields: every field, per-image and dense; the dense ones are those not in ``labels``.
        main_field: the field the splitter stratifies on.
        transforms: resizing, augmentation and normalisation (default: none, pixels in ``[0, 1]``).
        dense_roles: dense field -> its role for the transforms (``'mask'``, ``'depth'``,
            ``'normals'`` or ``'values'``); every field not in ``labels`` must have one.
        official_test: indices of the official test images, or None.

    Raises:
        DataError: label arrays of the wrong length, or a field with neither labels nor role.
    """

    def __init__(
        self,
        labels: Mapping[str, np.ndarray],
        fields: Mapping[str, LabelField],
        main_field: str,
        transforms: Transforms | None = None,
        dense_roles: Mapping[str, str] | None = None,
        official_test: np.ndarray | None = None,
    ):
        dense_roles = dict(dense_roles or {})
        self.fields = dict(fields)
        self.main_field = main_field
        self.labels = {k: np.asarray(v, dtype=np.int64) for k, v in labels.items()}
        for name in self.fields:
            if name not in self.labels and name not in dense_roles:
                raise DataError(f"{type(self).__name__}: field '{name}' has neither per-image labels nor a dense role.")
        for name, values in self.labels.items():
            if values.shape != (len(self),):
                raise DataError(f"{type(self).__name__}: labels '{name}' have shape {values.shape}, expected ({len(self)},).")
        self.dense_roles = dense_roles
        self.transforms = transforms or Transforms()
        self.pipeline = self.transforms.pipeline(dense_roles)
        self.official_test = None if official_test is None else np.asarray(official_test, dtype=np.int64)
        if len(self) == 0:
            raise DataError(f"{type(self).__name__} found no examples; check its data directory.")
        self.input_shape = tuple(self[0][0].shape)

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define __len__")

    def read(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Example ``index`` as stored: image ``(H, W, C)`` (uint8, or float in ``[0, 1]``) and dense maps.

        Returns:
            ``(image, dense)``, ``dense`` mapping each dense field to its ``(H, W)`` or
            ``(H, W, C)`` map (empty for datasets with per-image labels only).
        """
        raise NotImplementedError(f"{type(self).__name__} must define read(index)")

    def targets(self, field: str) -> np.ndarray:
        if self.field(field).kind != "class" or field not in self.labels:
            raise DataError(
                f"field '{field}' of {type(self).__name__} is not one class per image; stratify on one "
                f"that is (e.g. `LowDataSplit.stratify_on = '{self.main_field}'`)."
            )
        return self.labels[field]

    def _example(self, index: int, train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Image ``index`` through the pipeline, with its dense label maps (per-image labels: :meth:`_labels`)."""
        image, dense = self.read(index)
        return self.pipeline(image, dense, train=train)

    def _labels(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The per-image labels of a batch, by one indexing of each field's array."""
        idx = np.asarray(indices, dtype=np.int64)
        return {name: torch.from_numpy(values[idx]) for name, values in self.labels.items()}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, labels = self._example(int(index), train=False)
        labels.update({name: torch.tensor(values[int(index)]) for name, values in self.labels.items()})
        return x, labels

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = [int(i) for i in indices]
        return self._collate([self._example(i, train=False) for i in idx], self._labels(idx))

    def get_train_batch(self, indices: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.pipeline.seed(seed)
        idx = [int(i) for i in indices]
        return self._collate([self._example(i, train=True) for i in idx], self._labels(idx))

    def _collate(self, items: list, labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        shapes = {tuple(x.shape) for x, _ in items}
        if len(shapes) > 1:
            raise DataError(
                f"{type(self).__name__} images come in different sizes {sorted(shapes)}; give them one size "
                f"with its transforms (e.g. `Transforms.resize = (224, 224)`)."
            )
        images = torch.stack([x for x, _ in items])
        dense = {f: torch.stack([lab[f] for _, lab in items]) for f in self.fields if f not in labels}
        return images, {f: labels[f] if f in labels else dense[f] for f in self.fields}


# -- files ------------------------------------------------------------------------------------------
def require_dir(path: str | Path, dataset: str, how: str) -> Path:
    """``path`` as a Path if it is a directory; else a DataError saying what was expected and how to get it."""
    path = Path(path).expanduser().absolute()
    if not path.is_dir():
        raise DataError(f"{dataset} not found: expected the directory {path}. {how}")
    return path


def require_file(path: str | Path, dataset: str, how: str) -> Path:
    """``path`` as a Path if it is a file; else a DataError naming it and how to get the data."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise DataError(f"{dataset}: the file {path} is missing. {how}")
    return path


def read_image(path: Path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB; a DataError names a file that cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read the image {path}: {exc}. Replace or remove the file.") from exc


def read_rows(path: Path, columns: int, what: str, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows of a text file, each with at least ``columns`` fields.

    Args:
        path: the file.
        columns: fields every (non-empty) row must have at least.
        what: what a row should look like, for the error message (e.g. ``'<image_id> <class_id>'``).
        skip: header lines to skip.

    Raises:
        DataError: a row has fewer fields, naming the file and line.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if lineno <= skip or not line.strip():
                continue
            parts = line.split()
            if len(parts) < columns:
                raise DataError(f"{path}:{lineno}: expected '{what}', got {line.strip()!r}. The file is malformed.")
            rows.append(parts)
    return rows


def to_int(value: str, path: Path, what: str) -> int:
    """``int(value)``, or a DataError naming the file and what was expected."""
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}: expected an integer {what}, got {value!r}. The file is malformed.") from None
