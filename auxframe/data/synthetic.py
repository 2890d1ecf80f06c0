"""A synthetic task graph with planted auxiliary tasks: check in seconds what a weighting finds.

Every example has a low-dimensional *main latent* ``z``; the main label is a readout of ``z``.
Auxiliary label fields are planted with a known relation to the main task, so a weighting method
can be judged by whether it up-weights the helpful ones and switches off the others:

- ``helpful_<i>``: another readout of the same latent ``z`` (different angle, more classes). It
  shares the main task's structure: learning it teaches the backbone where ``z`` lies in the input.
- ``redundant_<i>``: the main label again, each label replaced by another class with probability
  ``redundant_noise`` (independent noise per task).
- ``noise_<i>``: labels drawn uniformly at random, independent of the input and of every other field.
- ``adversarial_<i>``: a fine readout (16 classes) of a *nuisance* latent that dominates the input's
  variance and is independent of the main label. Its best shared representation is built from the
  nuisance directions: trained with equal weight, the shared layers turn their features toward
  them, and the main head, fitted on a few labels, finds spurious fits among these strong
  features. The main task ends clearly worse than alone (by 0.05-0.10 test accuracy on each of
  8 seeds with the recipe's MLP; also with a (512, 256) MLP, so it is not a matter of width;
  ``tests/test_synthetic.py`` checks it on three seeds).

The generator (all draws from ``numpy.random.default_rng(seed)``, in this order):

1. Orthonormal directions. ``D = C * H * W`` pixels. One Gaussian ``D x (d + 2A)`` matrix, made
   orthonormal by a QR decomposition, gives ``U`` (``D x d``, the main latent's directions) and
   ``V_1 .. V_A`` (``D x 2`` each, the adversarial tasks' nuisance directions); all mutually
   orthogonal. ``d = latent_dim``, ``A = num_adversarial``.
2. Latents. ``z ~ N(0, I_d)`` and ``u_j ~ N(0, I_2)`` for every example, independent.
3. Images. ``x = signal_scale * U z + nuisance_scale * sum_j V_j u_j + noise_std * e`` with
   ``e ~ N(0, I_D)``, reshaped to ``(C, H, W)``. Per pixel the variance is about
   ``(signal_scale^2 d + 2 A nuisance_scale^2) / D + noise_std^2``.
4. Sector readouts. For a 2-vector ``p`` and ``K`` classes, ``sector_K(p, phi) =
   floor(K * ((atan2(p_2, p_1) - phi) mod 2 pi) / (2 pi))``: the angle of ``p`` cut into ``K``
   equal sectors starting at ``phi``. For an isotropic Gaussian ``p`` the angle is uniform, so the
   ``K`` classes are equally likely.
5. ``main = sector_K(P z, 0)`` with ``K = main_classes`` and ``P`` the first two rows of a random
   ``d x d`` orthogonal matrix (``P z ~ N(0, I_2)``). With ``d > 2`` the other directions of ``z``
   carry no main-label information but are shared with the helpful tasks.
6. ``helpful_i = sector_{K_h}(Q_i z, phi_i)`` with ``Q_i`` two rows of another random orthogonal
   matrix, ``phi_i ~ U[0, 2 pi)`` and ``K_h = helpful_classes``.
7. ``redundant_i``: ``main``, except that with probability ``redundant_noise`` (one Bernoulli draw
   per example and task) it becomes ``(main + r) mod K`` with ``r`` uniform on ``{1, .., K-1}``; so
   ``P(redundant_i = main) = 1 - redundant_noise`` exactly in expectation.
8. ``noise_i`` uniform on ``{0, .., noise_classes - 1}``, independent of everything.
9. ``adversarial_j = sector_{K_a}(u_j, psi_j)`` with ``psi_j ~ U[0, 2 pi)``, ``K_a = adversarial_classes``.

Fields are named ``main``, ``helpful_0``, ..., ``redundant_0``, ..., ``noise_0``, ...,
``adversarial_0``, ...; ``main_field`` is ``main``. ``auxframe/configs/experiments/synthetic_equal.gin``
trains the main task with every planted task (Equal weighting); see ``docs/synthetic.md``.
"""

from __future__ import annotations

from numbers import Integral
from typing import Sequence

import numpy as np
import torch

from auxframe.data.base import LabelField, TensorImageDataset
from auxframe.errors import DataError

TASK_KINDS = ("helpful", "redundant", "noise", "adversarial")


def sector(points: np.ndarray, num_classes: int, phase: float = 0.0) -> np.ndarray:
    """The angle of 2-D points cut into equal sectors.

    Args:
        points: ``(N, 2)`` array.
        num_classes: number of sectors ``K``.
        phase: angle where sector 0 starts (radians).

    Returns:
        ``(N,)`` int64 labels in ``[0, K)``: ``floor(K * ((atan2(y, x) - phase) mod 2 pi) / (2 pi))``.
    """
    angle = np.mod(np.arctan2(points[:, 1], points[:, 0]) - phase, 2 * np.pi)
    return np.minimum((angle * num_classes / (2 * np.pi)).astype(np.int64), num_classes - 1)


def _orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random ``n x n`` orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise DataError(f"datasets.synthetic.{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_number(name: str, value, low: float, high: float | None = None) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise DataError(f"datasets.synthetic.{name} must be a number {bound}, got {value!r}.")
    return float(value)


def synthetic(
    num_examples: int = 3000,
    image_shape: Sequence[int] = (1, 8, 8),
    latent_dim: int = 2,
    main_classes: int = 4,
    num_helpful: int = 1,
    num_redundant: int = 1,
    num_noise: int = 1,
    num_adversarial: int = 1,
    helpful_classes: int = 8,
    redundant_noise: float = 0.2,
    noise_classes: int | None = None,
    adversarial_classes: int = 16,
    signal_scale: float = 1.0,
    nuisance_scale: float = 5.0,
    noise_std: float = 0.5,
    seed: int = 0,
) -> TensorImageDataset:
    """A planted task graph: main task, helpful, redundant, noise and adversarial label fields.

    The generator is documented (with its maths) in the module docstring of
    ``auxframe.data.synthetic``.

    Args:
        num_examples: number of examples ``N``.
        image_shape: ``(C, H, W)`` of the inputs; ``C * H * W`` must be at least
            ``latent_dim + 2 * num_adversarial``.
        latent_dim: dimension ``d >= 2`` of the main latent ``z``.
        main_classes: classes of the main task (sectors of the main readout's angle).
        num_helpful: number of ``helpful_<i>`` fields.
        num_redundant: number of ``redundant_<i>`` fields.
        num_noise: number of ``noise_<i>`` fields.
        num_adversarial: number of ``adversarial_<j>`` fields (each with its own nuisance latent).
        helpful_classes: classes of each helpful task.
        redundant_noise: probability that a redundant label differs from the main label.
        noise_classes: classes of each noise task (default: ``main_classes``).
        adversarial_classes: classes of each adversarial task.
        signal_scale: scale of the main latent in the input.
        nuisance_scale: scale of the adversarial tasks' nuisance latents in the input.
        noise_std: standard deviation of the isotropic pixel noise.
        seed: seed of every draw; the same seed gives the same dataset.

    Returns:
        A :class:`TensorImageDataset` of ``N`` float32 images ``image_shape`` with int64 label
        fields ``main``, ``helpful_<i>``, ``redundant_<i>``, ``noise_<i>``, ``adversarial_<j>``.

    Raises:
        DataError: a count, class number or scale is out of range, or the image has fewer pixels
            than the planted directions need.
    """
    n = _check_int("num_examples", num_examples, 1)
    d = _check_int("latent_dim", latent_dim, 2)
    k_main = _check_int("main_classes", main_classes, 2)
    counts = {kind: _check_int(f"num_{kind}", c, 0)
              for kind, c in zip(TASK_KINDS, (num_helpful, num_redundant, num_noise, num_adversarial))}
    k_help = _check_int("helpful_classes", helpful_classes, 2)
    k_noise = _check_int("noise_classes", k_main if noise_classes is None else noise_classes, 2)
    k_adv = _check_int("adversarial_classes", adversarial_classes, 2)
    flip = _check_number("redundant_noise", redundant_noise, 0.0, 1.0)
    scales = {name: _check_number(name, v, 0.0) for name, v in
              (("signal_scale", signal_scale), ("nuisance_scale", nuisance_scale), ("noise_std", noise_std))}
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"datasets.synthetic.image_shape must be (C, H, W) of positive sizes, got {image_shape!r}.")
    pixels = shape[0] * shape[1] * shape[2]
    n_adv = counts["adversarial"]
    if pixels < d + 2 * n_adv:
        raise DataError(
            f"datasets.synthetic: an image of {shape} has {pixels} pixels, fewer than the {d + 2 * n_adv} "
            f"orthogonal directions the latents need (latent_dim + 2 * num_adversarial); enlarge image_shape."
        )

    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((pixels, d + 2 * n_adv)))
    directions_main, directions_adv = basis[:, :d], basis[:, d:]
    z = rng.standard_normal((n, d))
    u = rng.standard_normal((n, 2 * n_adv))
    x = (scales["signal_scale"] * z @ directions_main.T + scales["nuisance_scale"] * u @ directions_adv.T
         + scales["noise_std"] * rng.standard_normal((n, pixels)))

    main = sector(z @ _orthogonal(rng, d)[:2].T, k_main)
    labels: dict[str, np.ndarray] = {"main": main}
    fields: dict[str, LabelField] = {"main": LabelField(k_main, f"main task: sector of the main latent's angle ({k_main} classes)")}
    for i in range(counts["helpful"]):
        readout, phase = _orthogonal(rng, d)[:2], rng.uniform(0, 2 * np.pi)
        labels[f"helpful_{i}"] = sector(z @ readout.T, k_help, phase)
        fields[f"helpful_{i}"] = LabelField(k_help, "helpful: another readout of the main latent")
    for i in range(counts["redundant"]):
        flipped = rng.random(n) < flip
        labels[f"redundant_{i}"] = np.where(flipped, (main + rng.integers(1, k_main, n)) % k_main, main)
        fields[f"redundant_{i}"] = LabelField(k_main, f"redundant: the main label, {flip:.0%} replaced at random")
    for i in range(counts["noise"]):
        labels[f"noise_{i}"] = rng.integers(0, k_noise, n)
        fields[f"noise_{i}"] = LabelField(k_noise, "noise: uniform labels independent of the input")
    for j in range(n_adv):
        labels[f"adversarial_{j}"] = sector(u[:, 2 * j: 2 * j + 2], k_adv, rng.uniform(0, 2 * np.pi))
        fields[f"adversarial_{j}"] = LabelField(k_adv, "adversarial: readout of a strong nuisance latent")

    return TensorImageDataset(
        images=torch.from_numpy(x.astype(np.float32).reshape(n, *shape)),
        labels={name: torch.from_numpy(v.astype(np.int64)) for name, v in labels.items()},
        fields=fields,
        main_field="main",
    )
