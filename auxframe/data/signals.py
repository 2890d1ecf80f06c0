"""Self-supervised label sources (plugin kind ``signals``): labels made from the images themselves.

A signal is an object with an attribute ``num_classes: int`` and a method

    ``__call__(images, generator=None, train=True) -> (images, labels)``

taking a float batch ``(B, C, H, W)`` and returning the transformed images ``(B', C, H', W')`` with
their int64 labels ``(B',)`` in ``[0, num_classes)``, on the input's device. Random signals draw
only from ``generator`` so that runs are reproducible. ``train=False`` asks for the deterministic
evaluation form of the task.

The experiment sizes the task's head with ``num_classes``. A signal whose head output is not a
class score per label (``Exemplar``: an embedding, with instance ids as labels) sets
``num_classes`` to the head's output size and says so, and also names it ``num_outputs``.
"""

from __future__ import annotations

import torch

from auxframe.data.batched import cutout, flip, gaussian_noise
from auxframe.errors import ConfigError, DataError


class Rotation:
    """Rotation prediction (Gidaris et al., 2018), as used by S4L (Zhai et al., 2019).

    Label ``k`` means the image was rotated by ``k * 90`` degrees counter-clockwise
    (``torch.rot90(images, k, dims=(2, 3))``), for ``k`` in 0..3.

    Args:
        all_rotations: return every image in all four rotations (the S4L way: ``4B`` images, the
            whole batch rotated by 0, then by 90, 180 and 270 degrees). If False, training batches
            get one random rotation per image (``B`` images, order kept); evaluation
            (``train=False``) still gets all four.

    Attributes:
        num_classes: 4.
    """

    num_classes: int = 4

    def __init__(self, all_rotations: bool = True):
        self.all_rotations = bool(all_rotations)

    def __repr__(self) -> str:
        return f"Rotation(all_rotations={self.all_rotations})"

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        train: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate a batch and label each image with its rotation.

        Args:
            images: ``(B, C, H, W)`` batch of square images.
            generator: source of the random rotations (``all_rotations=False``, ``train=True``).
            train: False gives all four rotations whatever ``all_rotations`` says.

        Returns:
            ``(rotated, labels)``: ``(4B, C, H, W)`` and ``[0]*B + [1]*B + [2]*B + [3]*B`` in the
            all-rotations form, else ``(B, C, H, W)`` and one random label per image.

        Raises:
            DataError: ``images`` is not a 4-d batch or its images are not square.
        """
        _check_square(images)
        if self.all_rotations or not train:
            return _all_rotations(images)
        return _random_rotations(images, generator)


def _check_batch(images: torch.Tensor, signal: str) -> None:
    if images.ndim != 4:
        raise DataError(
            f"{signal} needs a batch of images (B, C, H, W), got shape {tuple(images.shape)}; "
            f"pass a 4-d batch."
        )


def _check_square(images: torch.Tensor) -> None:
    _check_batch(images, "Rotation")
    height, width = images.shape[-2:]
    if height != width:
        raise DataError(
            f"Rotation needs square images, got image shape {tuple(images.shape[1:])} "
            f"(height {height} != width {width}): rotating by 90 degrees would swap height and "
            f"width. Crop the images to a square first (e.g. a {min(height, width)}x"
            f"{min(height, width)} center crop)."
        )


def _all_rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch = images.shape[0]
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(batch)
    return rotated, labels


def _random_rotations(
    images: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    # Draw on the generator's own device (a CPU generator cannot fill a CUDA tensor), then move.
    device = generator.device if generator is not None else torch.device("cpu")
    labels = torch.randint(0, 4, (images.shape[0],), generator=generator, device=device)
    labels = labels.to(images.device)
    # Index into all four rotations rather than masking: no host-device synchronisation.
    every = torch.stack([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    rotated = every[labels, torch.arange(images.shape[0], device=images.device)]
    return rotated, labels


class Exemplar:
    """Exemplar views (Dosovitskiy et al., 2014) for the S4L-Exemplar task (Zhai et al., 2019).

    Each image of a batch of ``B`` becomes ``n_views`` augmented copies, labelled with the image's
    index in the batch (its instance id); ``heads.embedding`` with ``losses.triplet`` then learns
    features that are invariant to the augmentations: random horizontal flip, additive Gaussian
    noise and Cutout (DeVries & Taylor, 2017), as in the ARML paper's semi-supervised setting.

    Layout: the whole batch ``n_views`` times, view by view (like ``Rotation``): example
    ``v * B + i`` is view ``v`` of image ``i``, with label ``i``. Each copy is augmented
    independently, in this order (and with draws in this order from the generator): flip with
    probability ``flip_prob`` (one uniform per copy), add ``noise_std`` times standard normal noise
    (one per value), then set a square of side ``round(cutout_fraction * min(H, W))``, centred at a
    uniformly drawn pixel (row, then column) and clipped at the borders, to ``cutout_fill``.
    Draws are made on the generator's device and moved to the images' device; give a generator on
    the images' device (the trainer does) so that nothing is drawn on the CPU and copied. The three
    augmentations are :mod:`auxframe.data.batched`'s ``flip``, ``gaussian_noise`` and ``cutout``.

    Args:
        n_views: augmented copies per image (8 in S4L); at least 2, so that every anchor of the
            triplet loss has a positive.
        embedding_dim: the embedding head's output size (``num_outputs``).
        flip_prob: probability of a horizontal flip.
        noise_std: standard deviation of the noise, in the units of the (normalised) inputs.
        cutout_fraction: side of the Cutout square as a fraction of the shorter image side (0.5:
            16 pixels on 32x32 CIFAR images, as DeVries & Taylor use); 0 disables Cutout.
        cutout_fill: the value written inside the square (0: the mean of normalised inputs).
        eval_seed: evaluation (``train=False``) draws from a generator seeded with this, so that
            every evaluation sees the same views.

    Attributes:
        num_outputs: ``embedding_dim``.
        num_classes: ``embedding_dim`` too, for code that reads only the classic signal protocol
            (instance ids are *not* bounded by it: they run over ``0..B-1``).

    Raises:
        ConfigError: fewer than 2 views, or an out-of-range probability, deviation or fraction.

    Example:
        >>> views, ids = Exemplar(n_views=4)(images, generator=torch.Generator().manual_seed(0))
        >>> views.shape[0] == 4 * images.shape[0] and ids[:images.shape[0]].tolist() == list(range(images.shape[0]))
        True
    """

    def __init__(
        self,
        n_views: int = 8,
        embedding_dim: int = 128,
        flip_prob: float = 0.5,
        noise_std: float = 0.1,
        cutout_fraction: float = 0.5,
        cutout_fill: float = 0.0,
        eval_seed: int = 0,
    ):
        checks = [
            (int(n_views) == n_views and n_views >= 2, "n_views", n_views, "an integer >= 2 (8 in S4L)"),
            (int(embedding_dim) == embedding_dim and embedding_dim >= 1, "embedding_dim", embedding_dim, "a positive integer"),
            (0.0 <= flip_prob <= 1.0, "flip_prob", flip_prob, "a probability in [0, 1]"),
            (noise_std >= 0.0, "noise_std", noise_std, ">= 0"),
            (0.0 <= cutout_fraction <= 1.0, "cutout_fraction", cutout_fraction, "a fraction in [0, 1]"),
        ]
        for ok, name, value, want in checks:
            if not ok:
                raise ConfigError(f"signals.exemplar.{name} = {value!r}: it must be {want}.")
        self.n_views, self.num_outputs = int(n_views), int(embedding_dim)
        self.num_classes = self.num_outputs
        self.flip_prob, self.noise_std = float(flip_prob), float(noise_std)
        self.cutout_fraction, self.cutout_fill = float(cutout_fraction), float(cutout_fill)
        self.eval_seed = int(eval_seed)

    def __repr__(self) -> str:
        return (f"Exemplar(n_views={self.n_views}, embedding_dim={self.num_outputs}, flip_prob={self.flip_prob}, "
                f"noise_std={self.noise_std}, cutout_fraction={self.cutout_fraction})")

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        train: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Make ``n_views`` augmented copies of each image, labelled with the image's index.

        Args:
            images: ``(B, C, H, W)`` float batch.
            generator: source of every random draw (None: torch's global generator).
            train: False draws from a generator seeded with ``eval_seed`` (same views each time).

        Returns:
            ``(views, ids)``: ``(n_views * B, C, H, W)`` and ``[0, ..., B-1] * n_views`` (int64),
            on the images' device.

        Raises:
            DataError: ``images`` is not a 4-d batch.
        """
        _check_batch(images, "Exemplar")
        if not train:  # on the images' device: no draws made on the CPU and copied over
            generator = torch.Generator(device=images.device).manual_seed(self.eval_seed)
        batch = images.shape[0]
        views = flip(images.repeat(self.n_views, 1, 1, 1), self.flip_prob, generator)
        if self.noise_std:
            views = gaussian_noise(views, self.noise_std, generator)
        side = round(self.cutout_fraction * min(images.shape[-2:]))
        if side:
            views = cutout(views, side, self.cutout_fill, generator)
        ids = torch.arange(batch, device=images.device).repeat(self.n_views)
        return views, ids
