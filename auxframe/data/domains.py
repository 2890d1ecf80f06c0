"""Domains of the handwritten digits for few-shot domain adaptation (ARML's PACS setting, on digits).

PACS has one label space (7 classes) drawn in four styles; ARML adapts to one style (the *target*)
from k labelled images per class, with every other style an auxiliary task on its own fully
labelled images. This module makes the same on scikit-learn's digits: each *domain* is a fixed,
documented transformation of the digit images, and disjoint parts of the 1797 images are given
to the target and to each source domain, so that no image (in any transformation) is in two of
them: the target's test images are never seen by a source task.

The domains (each on images in ``[0, 1]``, white stroke on black, before standardisation; every
domain keeps the digit's label):

============  ============================================================================================
``original``  the image as it is
``inverted``  ``1 - x``: a dark stroke on a light background
``thick``     strokes thickened: a grey-level dilation (max filter) over a 2x2 window, anchored at the
              top-left pixel, so every stroke grows by one pixel to the right and down
``noisy``     Gaussian pixel noise of standard deviation :data:`NOISE_STD`, clipped to ``[0, 1]`` (one
              draw per pixel, seeded)
``elastic``   an elastic distortion (Simard et al., ICDAR 2003): a random displacement field, each pixel's
              x and y shifts drawn from ``U(-1, 1)``, smoothed by a Gaussian of width
              :data:`ELASTIC_SIGMA` and scaled by :data:`ELASTIC_ALPHA` pixels, applied by bilinear
              resampling (one field per image, seeded)
``blurred``   a Gaussian blur of width :data:`BLUR_SIGMA` pixels, rescaled so that each image's maximum
              stays what it was
============  ============================================================================================

The random domains (``noisy``, ``elastic``) draw from ``numpy.random.default_rng((seed, index))``,
``index`` the domain's position in :data:`DOMAINS`; the same seed gives the same images, on every
machine. The other domains do not depend on the seed.

**Parts.** :func:`domain_parts` deals each class's images, in a seeded random order, into
``parts`` disjoint parts: part 0 (the target's) gets ``target_fraction`` of every class and parts
1 .. parts-1 share the rest equally. :func:`digits_domain` returns one part in one domain, as an
ordinary in-memory dataset with the field ``digit``; the recipe
``auxframe/configs/tasks/digits_domains.gin`` gives part 0 in ``original`` to the main task (its
low-data split cuts test, validation, labelled and auxiliary images from that part only) and parts
1-4 in ``inverted``, ``thick``, ``noisy`` and ``elastic`` to four auxiliary tasks.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from auxframe.data.base import LabelField, TensorImageDataset
from auxframe.errors import DataError

#: Standard deviation of the ``noisy`` domain's pixel noise (images in [0, 1]).
NOISE_STD = 0.3
#: Width (pixels) of the Gaussian that smooths the ``elastic`` domain's displacement field.
ELASTIC_SIGMA = 1.5
#: Scale (pixels) of the ``elastic`` domain's smoothed displacement field.
ELASTIC_ALPHA = 4.0
#: Width (pixels) of the ``blurred`` domain's Gaussian.
BLUR_SIGMA = 0.8


def _original(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return images


def _inverted(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - images


def _thick(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # origin (-1, -1): the window covers the pixel, its left and its upper neighbours, so the
    # stroke grows by one pixel to the right and down.
    return ndimage.grey_dilation(images, size=(1, 2, 2), origin=(0, -1, -1), mode="constant", cval=0.0)


def _noisy(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(images + NOISE_STD * rng.standard_normal(images.shape), 0.0, 1.0)


def _elastic(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, h, w = images.shape
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    out = np.empty_like(images)
    for i in range(n):
        dy, dx = (ELASTIC_ALPHA * ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, (h, w)), ELASTIC_SIGMA, mode="constant")
                  for _ in range(2))
        out[i] = ndimage.map_coordinates(images[i], [rows + dy, cols + dx], order=1, mode="constant", cval=0.0)
    return out


def _blurred(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blurred = ndimage.gaussian_filter(images, sigma=(0, BLUR_SIGMA, BLUR_SIGMA), mode="constant")
    peak = blurred.max(axis=(1, 2), keepdims=True)
    return blurred * np.divide(images.max(axis=(1, 2), keepdims=True), peak, out=np.zeros_like(peak), where=peak > 0)


#: Every domain: name -> ``fn(images (N, H, W) in [0, 1], rng) -> images (N, H, W) in [0, 1]``.
DOMAINS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "original": _original,
    "inverted": _inverted,
    "thick": _thick,
    "noisy": _noisy,
    "elastic": _elastic,
    "blurred": _blurred,
}


def transform(images: np.ndarray, domain: str, seed: int = 0) -> np.ndarray:
    """Digit images in one domain.

    Args:
        images: ``(N, H, W)`` or ``(N, 1, H, W)`` images in ``[0, 1]``.
        domain: one of :data:`DOMAINS`.
        seed: seeds the random domains (``noisy``, ``elastic``).

    Returns:
        float32 images of the input's shape, in ``[0, 1]``.

    Raises:
        DataError: an unknown domain.
    """
    if domain not in DOMAINS:
        raise DataError(f"unknown digits domain '{domain}'; the domains are: {', '.join(DOMAINS)}.")
    images = np.asarray(images, dtype=np.float64)
    flat = images.reshape(-1, *images.shape[-2:])
    rng = np.random.default_rng((int(seed), list(DOMAINS).index(domain)))
    out = DOMAINS[domain](flat, rng)
    return np.clip(out, 0.0, 1.0).reshape(images.shape).astype(np.float32)


def domain_parts(labels: np.ndarray, parts: int, target_fraction: float, seed: int = 0) -> list[np.ndarray]:
    """Disjoint, class-stratified parts of a labelled set.

    Args:
        labels: int labels of every image.
        parts: how many parts (the target's and one per source domain).
        target_fraction: share of every class given to part 0; parts 1 .. parts-1 share the rest
            equally (dealt in turn, so their sizes differ by at most one image per class).
        seed: seeds the order in which each class's images are dealt.

    Returns:
        ``parts`` sorted int64 index arrays, disjoint, together every index.

    Raises:
        DataError: fewer than 2 parts, or a fraction outside ``(0, 1)``.
    """
    if isinstance(parts, bool) or not isinstance(parts, (int, np.integer)) or parts < 2:
        raise DataError(f"datasets.digits_domain.parts must be an integer >= 2 (the target and a source), got {parts!r}.")
    if not 0.0 < float(target_fraction) < 1.0:
        raise DataError(f"datasets.digits_domain.target_fraction must be in (0, 1), got {target_fraction!r}.")
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(parts)]
    labels = np.asarray(labels)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = int(np.floor(target_fraction * len(members) + 0.5))
        out[0] += members[:k].tolist()
        for j, index in enumerate(members[k:]):
            out[1 + j % (parts - 1)].append(int(index))
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in out]


def digits_domain(
    domain: str = "original",
    part: int = 0,
    parts: int = 5,
    target_fraction: float = 0.5,
    partition_seed: int = 0,
    seed: int = 0,
    normalize: bool = True,
) -> TensorImageDataset:
    """One part of scikit-learn's digits, in one domain.

    Args:
        domain: the transformation, one of :data:`DOMAINS` (documented in this module's docstring).
        part: which part of the images (:func:`domain_parts`): 0 is the target's, 1 .. parts-1 the
            source domains'. Give every domain of an experiment its own part.
        parts: how many parts the images are cut into (the target and each source).
        target_fraction: share of every class in part 0.
        partition_seed: seeds the parts; keep it the same for every domain of an experiment, so
            that the parts are disjoint.
        seed: seeds the random domains' noise and displacement fields.
        normalize: standardise with the digits' mean and standard deviation
            (:data:`auxframe.data.digits.DIGITS_MEAN`, ``DIGITS_STD``), the same for every domain.

    Returns:
        A :class:`TensorImageDataset` of the part's images ``(1, 8, 8)`` with the field ``digit``.

    Raises:
        DataError: an unknown domain, or a part outside ``[0, parts)``.
    """
    from auxframe.data.digits import DIGITS_MEAN, DIGITS_STD, load_digit_images

    images, labels = load_digit_images()
    chosen = domain_parts(labels, parts, target_fraction, partition_seed)
    if isinstance(part, bool) or not isinstance(part, (int, np.integer)) or not 0 <= part < parts:
        raise DataError(f"datasets.digits_domain.part must be an integer in [0, {parts}), got {part!r}.")
    index = chosen[part]
    x = torch.from_numpy(transform(images[index], domain, seed))
    if normalize:
        x = (x - DIGITS_MEAN) / DIGITS_STD
    return TensorImageDataset(
        images=x,
        labels={"digit": torch.from_numpy(labels[index])},
        fields={"digit": LabelField(10, f"the handwritten digit, 0-9, in the '{domain}' domain")},
        main_field="digit",
    )
