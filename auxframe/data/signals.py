"""Self-supervised label sources (plugin kind ``signals``): labels made from the images themselves.

A signal is an object with an attribute ``num_classes: int`` and a method

    ``__call__(images, generator=None, train=True) -> (images, labels)``

taking a float batch ``(B, C, H, W)`` and returning the transformed images ``(B', C, H', W')`` with
their int64 labels ``(B',)`` in ``[0, num_classes)``, on the input's device. Random signals draw
only from ``generator`` so that runs are reproducible. ``train=False`` asks for the deterministic
evaluation form of the task.
"""

from __future__ import annotations

import torch

from auxframe.errors import DataError


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


def _check_square(images: torch.Tensor) -> None:
    if images.ndim != 4:
        raise DataError(
            f"Rotation needs a batch of images (B, C, H, W), got shape {tuple(images.shape)}; "
            f"pass a 4-d batch."
        )
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
