"""Visual attributes of each handwritten digit, measured on its own image: auxiliary labels for every image.

scikit-learn's digits carry one label, the digit. The attribute fields of :mod:`auxframe.data.digits`
(``parity``, ``ge5``, ``loops``) are functions of the digit, so on the labelled images they add
nothing to the main label. Real auxiliary labels are different: CelebA's 40 attributes or CUB's 312
are marked per image by annotators, are correlated with the class without being a function of it,
and exist on images whose main label is missing (ARML's "minimum data" setting). This module makes
labels of that kind: each attribute is *measured on the image*, so two images of the same digit can
differ (a closed or an open four, a slanted or an upright one), and every image has them.

Every attribute reads the raw pixels (0..16) of one 8x8 image; "stroke" means a pixel of value
>= :data:`STROKE_THRESHOLD`. Attributes cut at a median use the median over all 1797 images (a
statistic of the inputs, no label involved), so about half the images have each value.

=================  =======  ==================================================================================
field              classes  what is measured
=================  =======  ==================================================================================
``closed_loops``   3        enclosed background regions of the stroke (0, 1, 2 or more), counted on the image
                            upsampled 3x (bilinear), so that a loop drawn with a one-pixel-wide hole counts
``top_bar``        2        a horizontal run of >= 5 stroke pixels in the top two rows (the bar of a 5 or 7)
``bottom_bar``     2        the same in the bottom two rows (the base of a 2)
``narrow``         2        the stroke spans at most 4 of the 8 columns (most ones)
``top_heavy``      2        the ink's centre of mass lies above the median height
``slant``          2        the ink leans left: its shear moment ``mu_xy / mu_yy`` is below the median
``symmetric``      2        the left-right mirror difference ``sum|x - flip(x)| / sum x`` is below the median
``thick``          2        total ink above the median (a thick pen or a large digit)
=================  =======  ==================================================================================

How much they say about the digit (all 1797 images; ``tests/test_digit_attributes.py`` checks the
numbers marked *):

- No attribute is a function of the digit: for every attribute, at least 3 digits have both values
  on 5% or more of their images (*).
- Mutual information with the digit, in nats (the digit's entropy is 2.30): closed_loops 0.39,
  top_heavy 0.26, slant 0.20, bottom_bar 0.15, symmetric 0.13, top_bar 0.10, narrow 0.08, thick 0.01.
- Jointly they do not give the digit away: the most frequent digit of each attribute combination,
  fitted on half of the images, is right on 51% of the other half (*: below 60%; the digit from
  ``parity``, ``ge5`` and ``loops`` together, fitted the same way, is right on 70%).

``thick`` is close to independent of the digit, as some real attributes are of the class at hand
(CelebA's ``Wearing_Hat`` for ``Attractive``): a weighting should learn to leave it out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

from auxframe.data.base import LabelField, TensorImageDataset

#: Raw pixel value (of 16) from which a pixel counts as stroke.
STROKE_THRESHOLD = 6
#: How much the image is upsampled before closed loops are counted.
LOOP_UPSAMPLING = 3

ATTRIBUTE_FIELDS: dict[str, LabelField] = {
    "closed_loops": LabelField(3, "enclosed background regions of the stroke measured on the image: 0, 1, 2+"),
    "top_bar": LabelField(2, "a horizontal stroke of >= 5 pixels in the top two rows"),
    "bottom_bar": LabelField(2, "a horizontal stroke of >= 5 pixels in the bottom two rows"),
    "narrow": LabelField(2, "the stroke spans at most 4 of the 8 columns"),
    "top_heavy": LabelField(2, "the ink's centre of mass is above the median height"),
    "slant": LabelField(2, "the ink leans left (shear moment below the median)"),
    "symmetric": LabelField(2, "left-right mirror difference below the median"),
    "thick": LabelField(2, "total ink above the median"),
}


def _longest_run(rows: np.ndarray) -> np.ndarray:
    """Longest run of True along the last axis, per row: ``(..., W) bool -> (...) int``."""
    run = np.zeros(rows.shape[:-1], dtype=np.int64)
    best = np.zeros_like(run)
    for j in range(rows.shape[-1]):
        run = np.where(rows[..., j], run + 1, 0)
        best = np.maximum(best, run)
    return best


def count_closed_loops(stroke: np.ndarray) -> int:
    """Background regions of a 2-D stroke mask that do not touch the border (4-connected)."""
    background, count = ndimage.label(~stroke)
    border = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
    return int(count - np.count_nonzero(border))


def measure_attributes(raw: np.ndarray) -> dict[str, np.ndarray]:
    """The attribute fields of raw digit images.

    Args:
        raw: ``(N, 8, 8)`` pixel values in ``[0, 16]`` (``load_digits().images``).

    Returns:
        Field name -> int64 ``(N,)`` labels, for every field in :data:`ATTRIBUTE_FIELDS`.
    """
    raw = np.asarray(raw, dtype=np.float64)
    stroke = raw >= STROKE_THRESHOLD
    up = ndimage.zoom(raw, (1, LOOP_UPSAMPLING, LOOP_UPSAMPLING), order=1) >= STROKE_THRESHOLD
    loops = np.array([count_closed_loops(m) for m in up], dtype=np.int64)
    rows = np.arange(raw.shape[1], dtype=np.float64)[None, :, None]
    cols = np.arange(raw.shape[2], dtype=np.float64)[None, None, :]
    ink = raw.sum(axis=(1, 2))
    cy = (raw * rows).sum(axis=(1, 2)) / ink
    cx = (raw * cols).sum(axis=(1, 2)) / ink
    dy, dx = rows - cy[:, None, None], cols - cx[:, None, None]
    shear = (raw * dx * dy).sum(axis=(1, 2)) / (raw * dy**2).sum(axis=(1, 2))
    mirror = np.abs(raw - raw[:, :, ::-1]).sum(axis=(1, 2)) / ink

    def below_median(v: np.ndarray) -> np.ndarray:
        return (v < np.median(v)).astype(np.int64)

    return {
        "closed_loops": np.minimum(loops, 2),
        "top_bar": (_longest_run(stroke[:, :2]).max(axis=1) >= 5).astype(np.int64),
        "bottom_bar": (_longest_run(stroke[:, -2:]).max(axis=1) >= 5).astype(np.int64),
        "narrow": (stroke.any(axis=1).sum(axis=1) <= 4).astype(np.int64),
        "top_heavy": below_median(cy),
        "slant": below_median(shear),
        "symmetric": below_median(mirror),
        "thick": (ink > np.median(ink)).astype(np.int64),
    }


def digits_attributes(normalize: bool = True, transforms: Any = None) -> TensorImageDataset:
    """scikit-learn's digits with visual attributes measured on every image.

    The fields of :func:`auxframe.data.digits.digits` (``digit``, ``parity``, ``ge5``, ``loops``)
    and the attribute fields of :data:`ATTRIBUTE_FIELDS` (``closed_loops``, ``top_bar``,
    ``bottom_bar``, ``narrow``, ``top_heavy``, ``slant``, ``symmetric``, ``thick``), each documented
    in this module's docstring. An auxiliary task reads them from every training image with
    ``Task.pool = 'train'`` (``auxframe/configs/tasks/digits_min_data.gin``).

    Args:
        normalize: standardise the pixels as :func:`~auxframe.data.digits.digits` does.
        transforms: augmentation of training batches, as for :func:`~auxframe.data.digits.digits`
            (the attributes are those of the unaugmented image).

    Returns:
        A :class:`TensorImageDataset` of the 1797 images ``(1, 8, 8)`` with ``main_field="digit"``.
    """
    from sklearn.datasets import load_digits

    from auxframe.data.digits import digits

    base = digits(normalize=normalize, transforms=transforms)
    attributes = measure_attributes(load_digits().images)
    return TensorImageDataset(
        images=base.images,
        labels={**base.labels, **{name: torch.from_numpy(v) for name, v in attributes.items()}},
        fields={**base.fields, **ATTRIBUTE_FIELDS},
        main_field=base.main_field,
        transforms=transforms,
    )
