"""Image augmentation on whole batches as tensor operations, on whatever device the batch is on.

In-memory datasets (CIFAR-10/100, SVHN, digits) augment their training batches here, on the training
device after the copy, rather than image by image through albumentations in the main process: a
batch of 384 CIFAR images is a few kernels on a GPU. :meth:`Transforms.batched
<auxframe.data.transforms.Transforms.batched>` turns a :class:`~auxframe.data.transforms.Transforms`
whose augmentations are all listed below into a :class:`BatchedTransforms` that computes the same
thing as the per-image pipeline:

- geometry (``Transforms.crop``, ``PadIfNeeded``, ``RandomCrop``, ``CenterCrop``, ``Crop``,
  ``HorizontalFlip``, ``VerticalFlip``): each image's output pixel ``(i, j)`` is the stored pixel
  ``(rows[i], cols[j])``. Pads, crops and flips only move these two index maps, and one gather per
  run of geometric steps makes the pixels. Given the same crop offsets and flips, the result equals
  albumentations' exactly, for every OpenCV border mode (reflect-101, reflect, replicate, wrap,
  constant with a fill per channel).
- pixels (``GaussNoise``, :class:`~auxframe.data.transforms.Cutout`): Gaussian noise with a standard
  deviation drawn per image from ``std_range`` (of the maximum pixel value), clipped to the pixel
  range and, for uint8 sources, rounded to the 1/255 grid as albumentations' uint8 result is; Cutout
  squares centred at a uniformly drawn pixel.
- every step applies to each image with its own probability ``p``, as in albumentations.

Random draws come from one ``torch.Generator`` on the batch's device, seeded per batch, step by
step in pipeline order (per step: whether it applies, then its parameters), so a batch is a pure
function of its images and its seed. The draws are not albumentations' (a different generator), so
batched and per-image pipelines agree in distribution, and exactly where the parameters are given.

The functions :func:`flip`, :func:`gaussian_noise` and :func:`cutout` are also the Exemplar signal's
augmentations (:class:`auxframe.data.signals.Exemplar`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from auxframe.errors import DataError

#: OpenCV border modes (``cv2.BORDER_*``) by number, as albumentations takes them.
BORDER_MODES = {0: "constant", 1: "replicate", 2: "reflect", 3: "wrap", 4: "reflect_101"}


# -- random draws -----------------------------------------------------------------------------------
def _draw(generator: torch.Generator | None) -> dict[str, Any]:
    """Keyword arguments that make a draw on the generator's device (a CPU one cannot fill CUDA tensors)."""
    return {"generator": generator, "device": generator.device if generator is not None else torch.device("cpu")}


def _applies(n: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor | None:
    """Which of ``n`` images a step with probability ``p`` applies to (None: all of them, nothing drawn)."""
    if p >= 1.0:
        return None
    return (torch.rand(n, **_draw(generator)) < p).to(device)


# -- pixel steps, shared with the Exemplar signal ---------------------------------------------------
def flip(images: torch.Tensor, p: float, generator: torch.Generator | None, dim: int = -1) -> torch.Tensor:
    """Flip each image along ``dim`` (-1: horizontally) with probability ``p`` (one uniform per image).

    Args:
        images: ``(B, C, H, W)``.
        p: probability of a flip.
        generator: the source of the draws (None: torch's global generator).
        dim: -1 flips left-right, -2 top-bottom.
    """
    mask = (torch.rand(images.shape[0], **_draw(generator)) < p).to(images.device)
    return torch.where(mask[:, None, None, None], images.flip(dim), images)


def gaussian_noise(
    images: torch.Tensor,
    std: float | tuple[float, float],
    generator: torch.Generator | None,
    p: float = 1.0,
    mean: float | tuple[float, float] = 0.0,
    per_channel: bool = True,
    clip: tuple[float, float] | None = None,
    levels: int | None = None,
) -> torch.Tensor:
    """Add Gaussian noise, each image with probability ``p``.

    Draws, in order: whether each image gets noise (only if ``p < 1``), its standard deviation and mean
    (only where a range is given), then one standard normal per value (per pixel and channel, or per
    pixel shared by the channels).

    Args:
        images: ``(B, C, H, W)`` float.
        std: the standard deviation, or a ``(low, high)`` range drawn from uniformly per image.
        generator: the source of the draws.
        p: probability that an image gets noise.
        mean: the noise's mean, or a range like ``std``.
        per_channel: independent noise per channel (False: one value per pixel for every channel).
        clip: clip the result to this range (the pixel range), or None.
        levels: round the result to ``levels - 1`` steps of the clip range (255: a uint8 image's grid).
    """
    n, channels, height, width = images.shape
    draw = _draw(generator)
    applies = _applies(n, p, generator, images.device)
    sigma = _per_image(std, n, draw, images)
    mu = _per_image(mean, n, draw, images)
    noise = torch.randn(n, channels if per_channel else 1, height, width, dtype=images.dtype, **draw).to(images.device)
    noise = noise * sigma + mu
    if applies is not None:
        noise = noise * applies[:, None, None, None].to(noise.dtype)
    out = images + noise
    if clip is not None:
        low, high = clip
        out = out.clamp(low, high)
        if levels is not None:
            scale = (levels - 1) / (high - low)
            out = torch.round((out - low) * scale) / scale + low
    return out


def _per_image(value: float | Sequence[float], n: int, draw: dict, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(value, (int, float)):
        return float(value)
    low, high = float(value[0]), float(value[1])
    if low == high:
        return low
    u = torch.rand(n, dtype=like.dtype, **draw).to(like.device)
    return (low + (high - low) * u)[:, None, None, None]


def cutout(
    images: torch.Tensor, side: int, fill: float | torch.Tensor, generator: torch.Generator | None, p: float = 1.0
) -> torch.Tensor:
    """Cutout (DeVries & Taylor, 2017): set a ``side`` x ``side`` square per image to ``fill``.

    The square is centred at a uniformly drawn pixel (row, then column) and clipped at the borders.
    Draws, in order: whether each image gets a square (only if ``p < 1``), the centre rows, the centre
    columns.

    Args:
        images: ``(B, C, H, W)``.
        side: the square's side in pixels.
        fill: the value written inside the square (a number, or one value per channel ``(C,)``).
        generator: the source of the draws.
        p: probability that an image gets a square.
    """
    n, _, height, width = images.shape
    draw = _draw(generator)
    applies = _applies(n, p, generator, images.device)
    centre_row = torch.randint(0, height, (n,), **draw).to(images.device)
    centre_col = torch.randint(0, width, (n,), **draw).to(images.device)
    top, left = centre_row - side // 2, centre_col - side // 2
    rows = torch.arange(height, device=images.device)[None, :]
    cols = torch.arange(width, device=images.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
    square = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    if applies is not None:
        square = square & applies[:, None, None, None]
    if isinstance(fill, torch.Tensor):
        return torch.where(square, fill.to(images.device, images.dtype).view(1, -1, 1, 1), images)
    return images.masked_fill(square, fill)


# -- geometry as index maps -------------------------------------------------------------------------
def border_index(positions: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Where OpenCV's border ``mode`` reads position ``positions`` of a line of ``size`` pixels from.

    Args:
        positions: integer positions, possibly outside ``[0, size)``.
        size: the line's length.
        mode: one of :data:`BORDER_MODES`' values; ``'constant'`` gives -1 outside the line.
    """
    if mode == "constant":
        return torch.where((positions >= 0) & (positions < size), positions, torch.full_like(positions, -1))
    if mode == "replicate":
        return positions.clamp(0, size - 1)
    if mode == "wrap":
        return positions.remainder(size)
    if mode == "reflect":  # fedcba|abcdefgh|hgfedcb
        period = positions.remainder(2 * size)
        return torch.where(period >= size, 2 * size - 1 - period, period)
    if mode == "reflect_101":  # gfedcb|abcdefgh|gfedcba
        if size == 1:
            return torch.zeros_like(positions)
        period = positions.remainder(2 * (size - 1))
        return torch.where(period >= size, 2 * (size - 1) - period, period)
    raise ValueError(f"unknown border mode {mode!r}; expected one of {sorted(BORDER_MODES.values())}")


class _Maps:
    """Per image, the stored row and column each output row and column reads (-1: the fill value)."""

    def __init__(self, batch: int, height: int, width: int, device: torch.device, scale: float = 1.0):
        self.scale = scale  # a fill is in stored units: divided by this on float pixels made from uint8
        self.rows = torch.arange(height, device=device).expand(batch, height)
        self.cols = torch.arange(width, device=device).expand(batch, width)
        self.fill: torch.Tensor | None = None  # (C,), stored units, for the entries that are -1
        self.identity = True

    @property
    def size(self) -> tuple[int, int]:
        return self.rows.shape[1], self.cols.shape[1]

    def pad(self, top: int, bottom: int, left: int, right: int, mode: str) -> None:
        height, width = self.size
        rows = border_index(torch.arange(-top, height + bottom, device=self.rows.device), height, mode)
        cols = border_index(torch.arange(-left, width + right, device=self.cols.device), width, mode)
        self.rows, self.cols = _compose(self.rows, rows), _compose(self.cols, cols)
        self.identity = False

    def crop(self, top: torch.Tensor | int, left: torch.Tensor | int, height: int, width: int) -> None:
        self.rows = _window(self.rows, top, height)
        self.cols = _window(self.cols, left, width)
        self.identity = False

    def flip(self, mask: torch.Tensor | None, rows: bool) -> None:
        maps = self.rows if rows else self.cols
        flipped = maps.flip(1) if mask is None else torch.where(mask[:, None], maps.flip(1), maps)
        if rows:
            self.rows = flipped
        else:
            self.cols = flipped
        self.identity = False

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """The output images: one gather along rows, one along columns, then the fill."""
        if self.identity:
            return images
        n, channels, height, width = images.shape
        out_h, out_w = self.size
        rows, cols = self.rows.clamp(min=0), self.cols.clamp(min=0)
        out = images.gather(2, rows[:, None, :, None].expand(n, channels, out_h, width))
        out = out.gather(3, cols[:, None, None, :].expand(n, channels, out_h, out_w))
        if self.fill is not None:
            inside = (self.rows >= 0)[:, None, :, None] & (self.cols >= 0)[:, None, None, :]
            fill = self.fill / self.scale if out.is_floating_point() else self.fill.round()
            out = torch.where(inside, out, fill.to(out.device, out.dtype).view(1, -1, 1, 1))
        return out


def _compose(maps: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``maps`` read at ``positions`` (a border index; -1 stays -1)."""
    picked = maps[:, positions.clamp(min=0)]
    return torch.where(positions[None, :] >= 0, picked, torch.full_like(picked, -1))


def _window(maps: torch.Tensor, start: torch.Tensor | int, length: int) -> torch.Tensor:
    offsets = torch.arange(length, device=maps.device)
    if isinstance(start, int):
        return maps[:, start : start + length]
    return maps.gather(1, start[:, None] + offsets[None, :])


# -- the steps of a batched pipeline ----------------------------------------------------------------
@dataclass(frozen=True)
class Pad:
    """Pad by fixed amounts with an OpenCV border mode (``PadIfNeeded`` at its computed padding)."""

    top: int
    bottom: int
    left: int
    right: int
    mode: str = "reflect_101"
    fill: tuple[float, ...] = (0.0,)


@dataclass(frozen=True)
class Crop:
    """Cut ``height`` x ``width``: at a uniformly drawn place (``random``), in the middle, or at ``at``."""

    height: int
    width: int
    random: bool = False
    at: tuple[int, int] | None = None  # (top, left) of a fixed crop (albumentations' Crop)


@dataclass(frozen=True)
class Flip:
    """Flip left-right (``rows=False``) or top-bottom (``rows=True``) with probability ``p``."""

    p: float = 0.5
    rows: bool = False


@dataclass(frozen=True)
class Noise:
    """Gaussian noise of ``std_range`` and ``mean_range`` times the pixel maximum, probability ``p``."""

    std_range: tuple[float, float]
    mean_range: tuple[float, float] = (0.0, 0.0)
    per_channel: bool = True
    p: float = 0.5


@dataclass(frozen=True)
class CutoutStep:
    """A Cutout square of ``size`` pixels (or ``fraction`` of the shorter side), probability ``p``."""

    size: int | None
    fraction: float | None
    fill: tuple[float, ...] = (0.0,)
    p: float = 1.0


GEOMETRY = (Pad, Crop, Flip)


class BatchedTransforms:
    """A :class:`~auxframe.data.transforms.Transforms` pipeline run on whole batches (see the module docstring).

    Made by :meth:`Transforms.batched <auxframe.data.transforms.Transforms.batched>`; call it on a batch
    as the dataset stores it.

    Args:
        train_steps: the training pipeline, in order (crop of ``Transforms.crop``, then ``augment``).
        eval_steps: the evaluation pipeline (a centre crop, or nothing).
        mean: per-channel mean of ``[0, 1]`` pixels (one value: every channel).
        std: per-channel standard deviation.
        size: the output ``(height, width)`` a training batch must have (None: the stored size).
        names: the augmentations' names, for error messages.

    Example:
        >>> import albumentations as A
        >>> from auxframe.data.transforms import Transforms
        >>> t = Transforms(augment=[A.PadIfNeeded(36, 36, border_mode=4), A.RandomCrop(32, 32), A.HorizontalFlip()])
        >>> batched = t.batched()
        >>> images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)   # (B, H, W, C) as CIFAR stores them
        >>> batched(images, seed=0).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(self, train_steps: Sequence[Any], eval_steps: Sequence[Any], mean: Sequence[float],
                 std: Sequence[float], size: tuple[int, int] | None = None, names: Sequence[str] = ()):
        self.train_steps, self.eval_steps = list(train_steps), list(eval_steps)
        self.mean = torch.tensor(list(mean), dtype=torch.float32)
        self.std = torch.tensor(list(std), dtype=torch.float32)
        self.size, self.names = size, list(names)

    def __repr__(self) -> str:
        return f"BatchedTransforms(train={self.train_steps}, eval={self.eval_steps})"

    def __call__(self, images: torch.Tensor, seed: int | None = None, channels_last: bool | None = None) -> torch.Tensor:
        """Augment (``seed`` given) or only crop and normalise (``seed=None``) a batch.

        Args:
            images: ``(B, H, W, C)`` uint8 pixels (as CIFAR and SVHN are stored), or ``(B, C, H, W)``
                float images (taken as they are: noise is not clipped and fills are in their units).
            seed: seeds the batch's augmentation; None gives the evaluation form.
            channels_last: the layout of ``images`` (default: ``(B, H, W, C)`` for uint8, else ``(B, C, H, W)``).

        Returns:
            ``(B, C, H', W')`` float32, normalised with ``mean`` and ``std``, on the images' device.

        Raises:
            DataError: the augmentations change the image size (end them with a crop to it).
        """
        if images.ndim != 4:
            raise DataError(f"a batch of images must be 4-d, got shape {tuple(images.shape)}")
        uint8 = images.dtype == torch.uint8
        if channels_last if channels_last is not None else uint8:
            images = images.permute(0, 3, 1, 2)
        steps = self.eval_steps if seed is None else self.train_steps
        generator = None
        if seed is not None:
            generator = torch.Generator(device=images.device).manual_seed(int(seed))
        scale = 255.0 if uint8 else 1.0
        x = images
        maps = _Maps(x.shape[0], x.shape[2], x.shape[3], x.device, scale)
        for step in steps:
            if isinstance(step, GEOMETRY):
                maps, x = self._geometry(step, maps, x, generator, scale)
                continue
            x = maps.apply(x)
            maps = _Maps(x.shape[0], x.shape[2], x.shape[3], x.device, scale)
            if not x.is_floating_point():
                x = x.float() / scale
            x = self._pixels(step, x, generator, scale, uint8)
        x = maps.apply(x)
        if not x.is_floating_point():
            x = x.float() / scale
        if seed is not None and self.size is not None and tuple(x.shape[2:]) != tuple(self.size):
            raise DataError(
                f"Transforms.augment {self.names} changed the image size to {tuple(x.shape[2:])} from "
                f"{tuple(self.size)}; end it with a crop to that size."
            )
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        channels = x.shape[1]
        if mean.numel() not in (1, channels) or std.numel() not in (1, channels):
            from auxframe.errors import ConfigError

            raise ConfigError(f"Transforms.mean/std have {mean.numel()}/{std.numel()} values for images with "
                              f"{channels} channels; give one value or {channels}.")
        return ((x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).contiguous()

    def _geometry(self, step, maps: _Maps, x: torch.Tensor, generator, scale: float) -> tuple[_Maps, torch.Tensor]:
        """Move the index maps by one geometric step (making the pixels first only where two constant
        pads with different fills meet)."""
        if isinstance(step, Pad):
            if step.mode == "constant":
                fill = torch.tensor(step.fill, dtype=torch.float32)
                fill = fill.expand(x.shape[1]).clone() if fill.numel() == 1 else fill
                if maps.fill is not None and not torch.equal(maps.fill, fill):
                    x = maps.apply(x)
                    maps = _Maps(x.shape[0], x.shape[2], x.shape[3], x.device, scale)
                maps.fill = fill
            maps.pad(step.top, step.bottom, step.left, step.right, step.mode)
        elif isinstance(step, Crop):
            height, width = maps.size
            if step.height > height or step.width > width:
                raise DataError(
                    f"a crop of {step.height}x{step.width} does not fit images of {height}x{width}; pad them first "
                    f"(e.g. @albumentations.PadIfNeeded()) or crop less."
                )
            if step.random:
                draw = _draw(generator)
                n = x.shape[0]
                top = torch.randint(0, height - step.height + 1, (n,), **draw).to(x.device)
                left = torch.randint(0, width - step.width + 1, (n,), **draw).to(x.device)
                maps.crop(top, left, step.height, step.width)
            elif step.at is not None:
                maps.crop(step.at[0], step.at[1], step.height, step.width)
            else:  # albumentations' CenterCrop: (size - crop) // 2 from the top and the left
                maps.crop((height - step.height) // 2, (width - step.width) // 2, step.height, step.width)
        elif isinstance(step, Flip):
            if step.p > 0.0:
                mask = _applies(x.shape[0], step.p, generator, x.device)
                maps.flip(mask, rows=step.rows)
        return maps, x

    @staticmethod
    def _pixels(step, x: torch.Tensor, generator, scale: float, uint8: bool) -> torch.Tensor:
        clip = (0.0, 1.0) if uint8 else None
        if isinstance(step, Noise):
            return gaussian_noise(x, step.std_range, generator, p=step.p, mean=step.mean_range,
                                  per_channel=step.per_channel, clip=clip, levels=256 if uint8 else None)
        if isinstance(step, CutoutStep):
            height, width = x.shape[2:]
            side = step.size if step.size is not None else round(step.fraction * min(height, width))
            if side <= 0:
                return x
            fill = torch.tensor(step.fill, dtype=torch.float32) / scale
            return cutout(x, side, fill if fill.numel() > 1 else float(fill), generator, p=step.p)
        raise TypeError(f"not a batched step: {step!r}")

