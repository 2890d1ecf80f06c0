"""scikit-learn's bundled handwritten digits as an auxframe dataset (no download).

The data are the 1797 real 8x8 greyscale images of ``sklearn.datasets.load_digits`` (pixel values
0..16), returned as a ``(1797, 1, 8, 8)`` float32 tensor scaled to ``[0, 1]`` and, by default,
standardised with the fixed mean and standard deviation of the whole scaled array.

Label fields (all int64, computed from the digit itself):

- ``digit``: the digit 0-9 (10 classes); the main field the low-data splitter stratifies on.
- ``parity``: 0 for an even digit, 1 for an odd one.
- ``ge5``: 1 if the digit is 5 or more, else 0.
- ``loops``: the number of closed loops in the digit's usual handwritten shape (3 classes):
  0, 6 and 9 have one, 8 has two, every other digit none. The four counts as open-topped
  (no loop), the way it is usually handwritten, although a printed closed four has one.

The attribute fields are deterministic functions of ``digit``: they make cheap, fully labelled
auxiliary tasks for testing auxiliary-learning methods.

With ``dense=True`` two per-pixel fields (``(8, 8)`` label maps) are added, a small dense setting for
per-pixel losses until a real segmentation dataset is at hand:

- ``stroke``: 1 where the pen wrote (raw pixel value >= :data:`STROKE_THRESHOLD` of 16), else 0.
- ``digit_map``: 0 on background pixels, ``1 + digit`` on stroke pixels (11 classes): a
  semantic-segmentation map of the digit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from auxframe.data.base import LabelField, TensorImageDataset
from auxframe.errors import ConfigError

#: Mean and standard deviation of every pixel of the whole digits array after scaling to [0, 1],
#: computed once in float64 as ``x = load_digits().images / 16.0; x.mean(), x.std()``
#: (scikit-learn 1.9.1; the bundled data do not change between versions).
DIGITS_MEAN = 0.3052603
DIGITS_STD = 0.3760492

#: Closed loops of each digit 0-9 in its usual handwritten shape (the four open-topped).
LOOPS_PER_DIGIT = np.array([1, 0, 0, 0, 0, 0, 1, 0, 2, 1], dtype=np.int64)

FIELDS: dict[str, LabelField] = {
    "digit": LabelField(10, "the handwritten digit, 0-9 (main task)"),
    "parity": LabelField(2, "parity of the digit: 0 even, 1 odd"),
    "ge5": LabelField(2, "1 if the digit is 5 or more, else 0"),
    "loops": LabelField(
        3, "closed loops in the digit's handwritten shape: 0/6/9 one, 8 two, others (open 4) none"
    ),
}


def digit_attributes(digits: np.ndarray) -> dict[str, np.ndarray]:
    """The label fields derived from digit labels.

    Args:
        digits: int array of digits in ``[0, 9]``.

    Returns:
        Field name -> int64 array of the same length, for every field in :data:`FIELDS`.
    """
    digits = np.asarray(digits, dtype=np.int64)
    return {
        "digit": digits,
        "parity": digits % 2,
        "ge5": (digits >= 5).astype(np.int64),
        "loops": LOOPS_PER_DIGIT[digits],
    }


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The raw digits data scaled to ``[0, 1]``.

    Returns:
        ``(images, digits)``: float32 ``(1797, 1, 8, 8)`` images in ``[0, 1]`` and int64 digits.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    return images, bunch.target.astype(np.int64)


#: Raw pixel value (of 16) from which a pixel counts as stroke in the dense ``stroke`` field.
STROKE_THRESHOLD = 6

DENSE_FIELDS: dict[str, LabelField] = {
    "stroke": LabelField(2, "per pixel: 1 where the pen wrote, 0 on background", kind="dense_class"),
    "digit_map": LabelField(11, "per pixel: 0 on background, 1 + digit on stroke pixels", kind="dense_class"),
}


def dense_labels(images: np.ndarray, digits_: np.ndarray) -> dict[str, np.ndarray]:
    """The per-pixel fields ``stroke`` and ``digit_map`` of ``(N, 1, 8, 8)`` images in ``[0, 1]``."""
    stroke = (images[:, 0] * 16.0 >= STROKE_THRESHOLD).astype(np.int64)
    return {"stroke": stroke, "digit_map": stroke * (1 + digits_[:, None, None])}


def digits(normalize: bool = True, dense: bool = False, transforms: Any = None) -> TensorImageDataset:
    """scikit-learn's digits with the fields ``digit``, ``parity``, ``ge5`` and ``loops``.

    Args:
        normalize: standardise the ``[0, 1]`` pixels with :data:`DIGITS_MEAN` and
            :data:`DIGITS_STD`; if False, images stay in ``[0, 1]``.
        dense: also provide the per-pixel fields ``stroke`` and ``digit_map``.
        transforms: augmentation of training batches, run on whole batches on the training device
            (a :class:`~auxframe.data.transforms.Transforms` whose steps have batched forms, e.g.
            ``PadIfNeeded`` + ``RandomCrop`` for shifts of a pixel or two; fills and noise are in the
            units of the images, standardised or not). None: no augmentation. Not with ``dense``
            (per-pixel labels would not follow the pixels).

    Raises:
        ConfigError: ``transforms`` with ``dense``, or a step with no batched form.

    Returns:
        A :class:`TensorImageDataset` of 1797 images ``(1, 8, 8)`` with ``main_field="digit"``.
    """
    if transforms is not None and dense:
        raise ConfigError("datasets.digits: transforms with dense=True would move the pixels but not the per-pixel "
                          "labels; use one or the other.")
    images, labels = load_digit_images()
    tensor = torch.from_numpy(images)
    if normalize:
        tensor = (tensor - DIGITS_MEAN) / DIGITS_STD
    fields = digit_attributes(labels)
    infos = dict(FIELDS)
    if dense:
        fields.update(dense_labels(images, labels))
        infos.update(DENSE_FIELDS)
    return TensorImageDataset(
        images=tensor,
        labels={name: torch.from_numpy(values) for name, values in fields.items()},
        fields=infos,
        main_field="digit",
        transforms=transforms,
    )
