"""What a dataset plugin returns: images plus named label fields, fetched a batch at a time.

A dataset plugin (entry-point group ``auxframe.datasets``) is a factory returning an
:class:`ImageDataset`. Each dataset names its label *fields* (e.g. digits has ``digit``, ``parity``
and ``ge5``); a task picks its labels by field name. The splitter stratifies on ``main_field``.

In-memory datasets subclass :class:`TensorImageDataset`, whose ``get_batch`` is one indexing
operation. Datasets too large for memory implement ``__getitem__`` and inherit the default
``get_batch``, which stacks single examples (:class:`auxframe.data.images.SampleDataset` reads
images from disk one at a time, through aligned albumentations transforms).

Label conventions, by the field's ``kind``:

- ``'class'``: one class per image, int64 ``(N,)``, ``-1`` = missing.
- ``'dense_class'``: one class per pixel, int64 ``(N, H, W)``, ``-1`` = ignored pixel.
- ``'regression'``: real values, float32 ``(N, channels)`` per image or ``(N, channels, H, W)`` per
  pixel. Depth maps use 0 for an invalid pixel, surface normals an all-zero vector.

Training batches are drawn through :meth:`ImageDataset.get_train_batch`, which datasets with
train-time augmentation override; evaluation reads :meth:`ImageDataset.get_batch`.

The trainer makes a batch in two stages (:mod:`auxframe.data.loader`): :meth:`ImageDataset.fetch_batch`
in a DataLoader worker process (reading, decoding, per-image transforms), then, after the copy to the
training device, :meth:`ImageDataset.finish_batch` (batched tensor operations: the in-memory datasets'
augmentation). By default everything happens in ``fetch_batch``; a dataset that splits the work
defines ``get_batch`` and ``get_train_batch`` as the two stages one after the other, so that both
paths give the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


#: The kinds of label field (see the module docstring for their dtypes and shapes).
FIELD_KINDS = ("class", "dense_class", "regression")


@dataclass(frozen=True)
class LabelField:
    """One kind of label a dataset carries.

    Attributes:
        num_classes: number of classes of a ``'class'`` or ``'dense_class'`` field (labels are int64
            in ``[0, num_classes)``, ``-1`` = missing); 0 for a ``'regression'`` field.
        description: what the label means, shown by ``auxframe describe``.
        kind: ``'class'`` (one class per image), ``'dense_class'`` (one class per pixel) or
            ``'regression'`` (float values, ``channels`` per image or per pixel).
        channels: values per image or pixel of a ``'regression'`` field (1 for depth, 3 for normals).

    Example:
        >>> LabelField(13, "semantic class per pixel", kind="dense_class").num_outputs
        13
        >>> LabelField(kind="regression", channels=3, description="surface normal").num_outputs
        3
    """

    num_classes: int = 0
    description: str = ""
    kind: str = "class"
    channels: int = 1

    def __post_init__(self):
        if self.kind not in FIELD_KINDS:
            raise ValueError(f"LabelField kind must be one of {FIELD_KINDS}, got {self.kind!r}")
        if self.kind != "regression" and self.num_classes < 1:
            raise ValueError(f"a '{self.kind}' LabelField needs num_classes >= 1, got {self.num_classes}")
        if self.channels < 1:
            raise ValueError(f"LabelField channels must be >= 1, got {self.channels}")

    @property
    def num_outputs(self) -> int:
        """What a head predicts per image or pixel: ``num_classes`` scores, or ``channels`` values."""
        return self.channels if self.kind == "regression" else self.num_classes

    @property
    def dtype(self) -> torch.dtype:
        """The labels' dtype: float32 for regression, int64 for classes."""
        return torch.float32 if self.kind == "regression" else torch.int64


class ImageDataset(torch.utils.data.Dataset):
    """Base class of dataset plugins' return values.

    Subclasses set ``fields``, ``main_field`` and ``input_shape`` and implement ``__len__``,
    ``targets`` and either ``get_batch`` or ``__getitem__``.

    Attributes:
        fields: label fields by name.
        main_field: the field the low-data splitter stratifies on (usually the main task's).
        input_shape: ``(channels, height, width)`` of one image.
        official_test: indices of the data set's official test images, or None; the low-data
            splitter uses them as its test split (``LowDataSplit.official_test``).
    """

    fields: dict[str, LabelField]
    main_field: str
    input_shape: tuple[int, int, int]
    official_test: np.ndarray | None = None

    def targets(self, field: str) -> np.ndarray:
        """Labels of every example for ``field`` (int64 array of length ``len(self)``)."""
        raise NotImplementedError(f"{type(self).__name__} must define targets(field) (the splitter stratifies on it)")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One example: image ``(C, H, W)`` and its labels by field (or override :meth:`get_batch`)."""
        raise NotImplementedError(f"{type(self).__name__} must define __getitem__ or get_batch")

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images ``(B, C, H, W)`` float32 and a dict field -> labels ``(B,)`` int64."""
        items = [self[int(i)] for i in indices]
        images = torch.stack([img for img, _ in items])
        labels = {f: torch.stack([torch.as_tensor(lab[f]) for _, lab in items]) for f in self.fields}
        return images, labels

    def get_train_batch(self, indices: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A training batch: like :meth:`get_batch`, with train-time augmentation where the dataset has it.

        Args:
            indices: example indices ``(B,)``.
            seed: seeds the batch's augmentation, so that a batch is a pure function of its
                indices and seed (the loader derives it from its own state; resumes are exact).

        Returns:
            As :meth:`get_batch`. The default has no augmentation and ignores ``seed``.
        """
        return self.get_batch(indices)

    def fetch_batch(self, indices: torch.Tensor, seed: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The first stage of making a batch, run in a DataLoader worker process.

        Args:
            indices: example indices ``(B,)``.
            seed: the training batch's augmentation seed; None for an evaluation batch.

        Returns:
            ``(images, labels)`` as :meth:`finish_batch` takes them. The default is the whole batch,
            ``get_batch`` or ``get_train_batch``.
        """
        return self.get_batch(indices) if seed is None else self.get_train_batch(indices, seed)

    def finish_batch(self, images: torch.Tensor, labels: dict[str, torch.Tensor], seed: int | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The second stage, run on the training device after the copy: batched tensor operations.

        Args:
            images: what :meth:`fetch_batch` returned, on the training device.
            labels: likewise.
            seed: the seed :meth:`fetch_batch` was given (None: an evaluation batch).

        Returns:
            The batch as :meth:`get_batch` gives it. The default returns its inputs.
        """
        return images, labels

    def field(self, name: str) -> LabelField:
        """The field called ``name``; a clear error lists the fields that exist."""
        from auxframe.errors import DataError

        if name not in self.fields:
            raise DataError(
                f"{type(self).__name__} has no label field '{name}'; its fields are: "
                f"{', '.join(sorted(self.fields))}. Set the task's `labels` to one of them."
            )
        return self.fields[name]


class TensorImageDataset(ImageDataset):
    """An in-memory dataset: one image tensor and one label tensor per field.

    Args:
        images: ``(N, C, H, W)`` float tensor.
        labels: field name -> ``(N,)`` int64 tensor, or ``(N, H, W)`` for a per-pixel field, or
            float ``(N, channels[, H, W])`` for a ``'regression'`` field (cast to each field's dtype).
        fields: field name -> :class:`LabelField`; must have the same keys as ``labels``.
        main_field: the field to stratify on.
        transforms: augmentation of training batches (and a centre crop, if it has one, of every
            batch), run on whole batches on the training device (:meth:`Transforms.batched
            <auxframe.data.transforms.Transforms.batched>`); the images' values are taken as they are
            (fills and noise in their units). None: no augmentation.

    Raises:
        ConfigError: ``transforms`` has a step with no batched form.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: dict[str, torch.Tensor],
        fields: dict[str, LabelField],
        main_field: str,
        transforms: Any = None,
    ):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if set(labels) != set(fields):
            raise ValueError(f"labels {sorted(labels)} and fields {sorted(fields)} differ")
        if main_field not in fields:
            raise ValueError(f"main_field '{main_field}' is not one of {sorted(fields)}")
        for name, lab in labels.items():
            if lab.ndim < 1 or lab.shape[0] != images.shape[0]:
                raise ValueError(f"labels '{name}' must have {images.shape[0]} rows, got shape {tuple(lab.shape)}")
        self.images = images.float().contiguous()
        self.labels = {k: v.to(fields[k].dtype).contiguous() for k, v in labels.items()}
        self.fields = dict(fields)
        self.main_field = main_field
        self.batched = None
        if transforms is not None:
            from auxframe.errors import ConfigError

            self.batched = transforms.batched(size=tuple(images.shape[2:]), channels=images.shape[1])
            if self.batched is None:
                raise ConfigError(
                    f"{type(self).__name__} augments whole batches only, and its transforms cannot: "
                    f"{transforms.batched_reason(tuple(images.shape[2:]))}. Use the batched steps listed in "
                    f"auxframe.data.transforms."
                )
        self.input_shape = tuple(images.shape[1:]) if self.batched is None else tuple(self.get_batch(torch.arange(1))[0].shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def targets(self, field: str) -> np.ndarray:
        from auxframe.errors import DataError

        if self.field(field).kind == "regression" or self.labels[field].ndim != 1:
            raise DataError(
                f"field '{field}' holds {'per-pixel' if self.labels[field].ndim > 2 else 'real-valued'} labels "
                f"{tuple(self.labels[field].shape[1:])}, not one class per image; stratify on a "
                f"per-image field instead (e.g. `LowDataSplit.stratify_on = '{self.main_field}'`)."
            )
        return self.labels[field].numpy()

    def __getitem__(self, index: int):
        if self.batched is not None:
            images, labels = self.get_batch(torch.tensor([int(index)]))
            return images[0], {k: v[0] for k, v in labels.items()}
        return self.images[index], {k: v[index] for k, v in self.labels.items()}

    def fetch_batch(self, indices: torch.Tensor, seed: int | None = None):
        return self.images[indices], {k: v[indices] for k, v in self.labels.items()}

    def finish_batch(self, images: torch.Tensor, labels: dict[str, torch.Tensor], seed: int | None = None):
        if self.batched is None:
            return images, labels
        return self.batched(images, seed, channels_last=False), labels

    def get_batch(self, indices: torch.Tensor):
        return self.finish_batch(*self.fetch_batch(indices))

    def get_train_batch(self, indices: torch.Tensor, seed: int):
        return self.finish_batch(*self.fetch_batch(indices, seed), seed)
