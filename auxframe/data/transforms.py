"""Aligned image transforms: resize and crop, train-time augmentation, normalisation (albumentations).

An image and its dense labels (segmentation masks, depth maps, surface normals) go through the same
geometric transforms in one albumentations call, so they stay aligned under crops and flips. Two
label geometries need more than moving pixels, and get it after the call from the parameters
albumentations records (``save_applied_params``):

- surface normals ``(x, y, z)``: a horizontal flip negates ``x``, a vertical flip negates ``y``;
- depth: zooming in by ``s`` (:class:`RandomScaleCrop`) brings the scene ``s`` times closer, so
  depth is divided by ``s`` (as in MTAN's ``RandomScaleCrop``, Liu et al., CVPR 2019).

A transform that would move normals or depth in any other way (rotations, affine warps, other
zooms) is refused when the dataset has such fields. Label maps use nearest-neighbour resampling.

Configure in gin (every albumentations transform is registered as ``albumentations.<Name>``)::

    datasets.cifar10.transforms = @cifar/Transforms()
    cifar/Transforms.mean = (0.4914, 0.4822, 0.4465)
    cifar/Transforms.std = (0.2470, 0.2435, 0.2616)
    cifar/Transforms.augment = [@albumentations.PadIfNeeded(), @albumentations.RandomCrop(),
                                @albumentations.HorizontalFlip()]
    albumentations.PadIfNeeded.min_height = 40
    ...

Augmentation applies to training batches only (``ImageDataset.get_train_batch``); evaluation
batches are resized, centre-cropped and normalised.

In-memory datasets (CIFAR-10/100, SVHN, digits) run the same pipeline on whole batches as tensor
operations on the training device (:meth:`Transforms.batched`, :mod:`auxframe.data.batched`) when
every step has a batched form: ``Transforms.crop``, ``PadIfNeeded``, ``RandomCrop``, ``CenterCrop``,
``Crop``, ``HorizontalFlip``, ``VerticalFlip``, ``GaussNoise`` and :class:`Cutout`. Other pipelines,
and every dataset read from files, go through albumentations image by image, in the DataLoader's
worker processes. ``Transforms.batched = False`` keeps an in-memory dataset on the per-image path.
"""

from __future__ import annotations

import inspect
import random
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import albumentations as A
import cv2
import gin
import numpy as np
import torch

from auxframe.errors import ConfigError, DataError

if TYPE_CHECKING:
    from auxframe.data.batched import BatchedTransforms

#: Roles of dense label maps: class masks, depth, surface normals, other real-valued maps.
ROLES = ("mask", "depth", "normals", "values")


class RandomScaleCrop(A.DualTransform):
    """Zoom in by a random scale: crop ``1/s`` of each side at a random place, resize back.

    MTAN's NYUv2 augmentation (Liu et al., CVPR 2019, ``create_dataset.py``): ``s`` is drawn from
    ``scales``; the image is resampled bilinearly, label maps by nearest neighbour, and
    :class:`Transforms` divides depth by ``s``.

    Args:
        scales: the zoom factors to draw from (>= 1).
        p: probability of applying the transform.
    """

    def __init__(self, scales: Sequence[float] = (1.0, 1.2, 1.5), p: float = 1.0):
        super().__init__(p=p)
        if not scales or min(scales) < 1.0:
            raise ConfigError(f"RandomScaleCrop.scales must be factors >= 1, got {scales!r}.")
        self.scales = tuple(float(s) for s in scales)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        scale = self.scales[self.py_random.randint(0, len(self.scales) - 1)]
        h, w = int(height / scale), int(width / scale)
        top, left = self.py_random.randint(0, height - h), self.py_random.randint(0, width - w)
        return {"scale": scale, "crop_coords": (left, top, left + w, top + h)}

    @staticmethod
    def _crop_resize(img: np.ndarray, crop_coords, interpolation: int) -> np.ndarray:
        left, top, right, bottom = crop_coords
        out = cv2.resize(img[top:bottom, left:right], (img.shape[1], img.shape[0]), interpolation=interpolation)
        return out.reshape(img.shape) if out.ndim < img.ndim else out

    def apply(self, img: np.ndarray, crop_coords=(0, 0, 0, 0), **params) -> np.ndarray:
        return self._crop_resize(img, crop_coords, cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, crop_coords=(0, 0, 0, 0), **params) -> np.ndarray:
        return self._crop_resize(mask, crop_coords, cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scales",)


class Cutout(A.ImageOnlyTransform):
    """Cutout (DeVries & Taylor, 2017): one square, centred at a uniformly drawn pixel and clipped at the
    borders, set to ``fill``.

    Its batched form (:func:`auxframe.data.batched.cutout`) is the Exemplar signal's Cutout too.

    Args:
        size: the square's side in pixels; None: ``fraction`` of the shorter image side.
        fraction: the side as a fraction of the shorter image side (0.5: 16 pixels on 32x32 images, as
            DeVries & Taylor use on CIFAR-10), when ``size`` is None.
        fill: the value written inside the square, in the stored pixel range (0-255 for uint8 images),
            one number or one per channel.
        p: probability of applying the transform.
    """

    def __init__(self, size: int | None = None, fraction: float = 0.5, fill: float | Sequence[float] = 0.0,
                 p: float = 1.0):
        super().__init__(p=p)
        if size is not None and (int(size) != size or size < 1):
            raise ConfigError(f"Cutout.size must be a positive number of pixels or None, got {size!r}.")
        if size is None and not 0.0 < fraction <= 1.0:
            raise ConfigError(f"Cutout.fraction must be in (0, 1], got {fraction!r}.")
        self.size, self.fraction = (None if size is None else int(size)), float(fraction)
        self.fill = tuple(float(v) for v in np.atleast_1d(fill))

    def side(self, height: int, width: int) -> int:
        """The square's side on images of ``height`` x ``width``."""
        return self.size if self.size is not None else round(self.fraction * min(height, width))

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        return {"centre": (self.py_random.randint(0, height - 1), self.py_random.randint(0, width - 1))}

    def apply(self, img: np.ndarray, centre=(0, 0), **params) -> np.ndarray:
        height, width = img.shape[:2]
        side = self.side(height, width)
        top, left = centre[0] - side // 2, centre[1] - side // 2
        out = img.copy()
        fill = np.asarray(self.fill, dtype=img.dtype) if len(self.fill) > 1 else img.dtype.type(self.fill[0])
        out[max(top, 0):max(top + side, 0), max(left, 0):max(left + side, 0)] = fill
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "fraction", "fill")


#: Geometric transforms that keep depth values and normal directions right (flips are corrected).
_GEOMETRY_SAFE = {
    "HorizontalFlip", "VerticalFlip", "RandomCrop", "CenterCrop", "Crop", "PadIfNeeded",
    "RandomScaleCrop", "Resize",
}


class Transforms:
    """Resize, crop, augment (training only) and normalise images, with their dense labels aligned.

    Evaluation: ``Resize(resize)`` then ``CenterCrop(crop)``. Training: ``Resize(resize)``, a
    ``RandomCrop(crop)`` at a random place, then ``augment`` in order. Every output image is
    ``crop`` (or ``resize``, or the stored size) big; ``augment`` must keep that size. Pixels are
    then scaled to ``[0, 1]`` (uint8 images are divided by 255; float images are taken as they
    are) and standardised with ``mean`` and ``std`` per channel.

    Args:
        resize: ``(height, width)`` every image is first resized to (bilinear); None keeps it.
        crop: ``(height, width)`` cut from the middle at evaluation, at a random place in training.
        augment: albumentations transforms for training batches (``@albumentations.HorizontalFlip()``,
            ``@RandomScaleCrop()``, ...), applied after resizing and cropping.
        mean: per-channel mean of ``[0, 1]`` pixels (one value is used for every channel).
        std: per-channel standard deviation (one value is used for every channel).
        batched: for in-memory datasets, run the pipeline on whole batches on the training device
            (:meth:`batched`): ``'auto'`` where every step has a batched form (else image by image),
            True (an error names a step that has none), False (always image by image).

    Example:
        >>> t = Transforms(crop=(4, 4), augment=[A.HorizontalFlip(p=1.0)])
        >>> pipe = t.pipeline({"segmentation": "mask"})
        >>> image, dense = pipe(np.zeros((6, 6, 3), np.uint8), {"segmentation": np.zeros((6, 6), np.int64)}, train=True)
        >>> tuple(image.shape), tuple(dense["segmentation"].shape)
        ((3, 4, 4), (4, 4))
    """

    def __init__(
        self,
        resize: Sequence[int] | None = None,
        crop: Sequence[int] | None = None,
        augment: Sequence[A.BasicTransform] = (),
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        batched: bool | str = "auto",
    ):
        if batched not in ("auto", True, False):
            raise ConfigError(f"Transforms.batched must be 'auto', True or False, got {batched!r}.")
        self.batched_mode = batched
        self.resize = _size("resize", resize)
        self.crop = _size("crop", crop)
        self.augment = list(augment)
        for t in self.augment:
            if not isinstance(t, A.BasicTransform):
                raise ConfigError(
                    f"Transforms.augment holds {t!r}, not an albumentations transform; write "
                    f"`@albumentations.HorizontalFlip()` (with the parentheses)."
                )
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        if self.mean.ndim != 1 or self.std.ndim != 1 or np.any(self.std <= 0):
            raise ConfigError(f"Transforms.mean and std must be lists of numbers, std > 0; got {mean!r}, {std!r}.")

    def __repr__(self) -> str:
        return (f"Transforms(resize={self.resize}, crop={self.crop}, augment={[type(t).__name__ for t in self.augment]}, "
                f"mean={self.mean.tolist()}, std={self.std.tolist()})")

    def output_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of every output image, or None if it is the stored size."""
        return self.crop or self.resize

    def pipeline(self, dense: Mapping[str, str] | None = None) -> "AlignedPipeline":
        """The transform for images with the given dense label maps.

        Args:
            dense: dense field name -> role, one of :data:`ROLES`.

        Raises:
            ConfigError: an unknown role, or an augmentation that would move depth or normals
                in a way this module cannot correct.
        """
        return AlignedPipeline(self, dict(dense or {}))

    def batched(self, size: Sequence[int] | None = None, channels: int = 3) -> "BatchedTransforms | None":
        """This pipeline as tensor operations on whole batches, or None where it has no batched form.

        Args:
            size: ``(height, width)`` of the stored images (``PadIfNeeded`` needs it); None: the
                pipeline must not depend on it.
            channels: the images' channels (for fills given per channel).

        Returns:
            A :class:`~auxframe.data.batched.BatchedTransforms`, or None if ``batched`` is False or
            (with ``'auto'``) a step has no batched form; :meth:`batched_reason` says which.

        Raises:
            ConfigError: ``batched = True`` and a step has no batched form.
        """
        from auxframe.data.batched import BatchedTransforms

        if self.batched_mode is False:
            return None
        compiled = _compile_batched(self, size)
        if isinstance(compiled, str):
            if self.batched_mode is True:
                raise ConfigError(f"Transforms.batched = True, but {compiled}; set Transforms.batched = 'auto' "
                                  f"(or False) to run this pipeline image by image.")
            return None
        train, evaluation = compiled
        names = [type(t).__name__ for t in self.augment]
        out_size = self.output_size() or (tuple(size) if size is not None else None)
        return BatchedTransforms(train, evaluation, self.mean.tolist(), self.std.tolist(), out_size, names)

    def batched_reason(self, size: Sequence[int] | None = None) -> str | None:
        """Why :meth:`batched` gives None (a step without a batched form, or ``batched = False``); else None."""
        if self.batched_mode is False:
            return "Transforms.batched = False"
        compiled = _compile_batched(self, size)
        return compiled if isinstance(compiled, str) else None


class AlignedPipeline:
    """:class:`Transforms` bound to one set of dense label maps (made by :meth:`Transforms.pipeline`)."""

    def __init__(self, transforms: Transforms, dense: dict[str, str]):
        for name, role in dense.items():
            if role not in ROLES:
                raise ConfigError(f"dense field '{name}' has role {role!r}; roles are {ROLES}.")
        if any(role in ("depth", "normals") for role in dense.values()):
            for t in transforms.augment:
                if isinstance(t, A.DualTransform) and type(t).__name__ not in _GEOMETRY_SAFE:
                    raise ConfigError(
                        f"augmentation {type(t).__name__} would move depth or surface normals in a way that is not "
                        f"corrected; with depth or normal fields use flips, crops, pads and RandomScaleCrop "
                        f"({', '.join(sorted(_GEOMETRY_SAFE))}) or pixel-level transforms."
                    )
        self.t = transforms
        self.dense = dense
        self._keys = {name: f"label_{i}" for i, name in enumerate(dense)}
        targets = {key: "mask" for key in self._keys.values()}
        head = [A.Resize(*transforms.resize)] if transforms.resize else []
        eval_ops = head + ([A.CenterCrop(*transforms.crop)] if transforms.crop else [])
        train_ops = head + ([A.RandomCrop(*transforms.crop)] if transforms.crop else []) + transforms.augment
        self.eval = A.Compose(eval_ops, additional_targets=targets)
        self.train = A.Compose(train_ops, additional_targets=targets, save_applied_params=True, seed=0)

    def seed(self, seed: int) -> None:
        """Reseed the training augmentation (the examples that follow are then a function of it).

        Every transform draws from one shared stream (albumentations' ``set_random_seed`` would give
        each transform its own copy of the same stream, so that e.g. two flips always agree).
        """
        self.train.set_random_state(np.random.default_rng(int(seed)), random.Random(int(seed)))

    def __call__(
        self, image: np.ndarray, dense: Mapping[str, np.ndarray] | None = None, train: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Transform one example.

        Args:
            image: ``(H, W, C)`` uint8 (0..255) or float (``[0, 1]``) pixels, or ``(H, W)``.
            dense: field -> label map ``(H, W)`` (masks, depth) or ``(H, W, C)`` (normals, values).
            train: apply the random crop and ``augment``.

        Returns:
            The normalised image ``(C, H', W')`` float32 and the label maps: masks int64
            ``(H', W')``, real-valued maps float32 ``(C, H', W')``.
        """
        dense = dict(dense or {})
        if set(dense) - set(self._keys):
            raise DataError(f"label maps {sorted(set(dense) - set(self._keys))} were not declared to the transforms "
                            f"(declared: {sorted(self._keys)}); pass them to Transforms.pipeline().")
        image = image[:, :, None] if image.ndim == 2 else image
        kwargs = {self._keys[name]: np.ascontiguousarray(value) for name, value in dense.items()}
        out = (self.train if train else self.eval)(image=image, **kwargs)
        applied = out.get("applied_transforms", []) if train else []
        size = self.t.output_size() or image.shape[:2]
        if train and out["image"].shape[:2] != tuple(size):
            raise DataError(
                f"Transforms.augment {[type(t).__name__ for t in self.t.augment]} changed the image size to "
                f"{out['image'].shape[:2]} from {tuple(size)}; end it with a crop to that size."
            )
        labels = {name: self._finish(name, out[self._keys[name]], applied) for name in dense}
        return self._normalise(out["image"]), labels

    def _finish(self, name: str, value: np.ndarray, applied: list) -> torch.Tensor:
        role = self.dense[name]
        if role == "mask":
            return torch.from_numpy(np.ascontiguousarray(value).astype(np.int64))
        value = np.array(value, dtype=np.float32)  # a copy: the corrections below write into it
        value = value[:, :, None] if value.ndim == 2 else value
        for transform_name, params in applied:
            if role == "normals" and transform_name in ("HorizontalFlip", "VerticalFlip"):
                value[:, :, 0 if transform_name == "HorizontalFlip" else 1] *= -1.0
            if role == "depth" and transform_name == "RandomScaleCrop":
                value /= params["scale"]
        return torch.from_numpy(np.ascontiguousarray(value.transpose(2, 0, 1)))

    def _normalise(self, image: np.ndarray) -> torch.Tensor:
        pixels = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        channels = pixels.shape[2]
        if self.t.mean.size not in (1, channels) or self.t.std.size not in (1, channels):
            raise ConfigError(
                f"Transforms.mean/std have {self.t.mean.size}/{self.t.std.size} values for images with "
                f"{channels} channels; give one value or {channels}."
            )
        pixels = (pixels - self.t.mean) / self.t.std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _fill(value) -> tuple[float, ...]:
    return tuple(float(v) for v in np.atleast_1d(np.asarray(value if value is not None else 0.0, dtype=np.float64)))


def _compile_batched(t: Transforms, size: Sequence[int] | None):
    """The batched steps ``(train, eval)`` of a :class:`Transforms`, or a sentence saying why there are none.

    Numbers that depend on the image size (``PadIfNeeded``'s padding) are albumentations' own,
    computed for the size each step sees.
    """
    from auxframe.data import batched as B

    if t.resize is not None:
        return "Transforms.resize has no batched form (resampling is done image by image)"
    current = tuple(size) if size is not None else None
    evaluation = [B.Crop(*t.crop)] if t.crop else []
    train = [B.Crop(*t.crop, random=True)] if t.crop else []
    if t.crop:
        current = t.crop
    for op in t.augment:
        name = type(op).__name__
        p = float(op.p)
        if isinstance(op, (A.RandomCrop, A.CenterCrop, A.Crop, A.PadIfNeeded)) and p < 1.0:
            return f"{name} with p={p} (< 1) would give images of different sizes"
        if getattr(op, "pad_if_needed", False):
            return f"{name} with pad_if_needed=True has no batched form (pad with PadIfNeeded first)"
        if isinstance(op, A.PadIfNeeded):
            if op.position == "random":
                return "PadIfNeeded with position='random' has no batched form"
            if current is None:
                return "PadIfNeeded needs the image size"
            pads = op.get_params_dependent_on_data({"shape": (*current, 3)}, {})
            top, bottom, left, right = (int(pads[k]) for k in ("pad_top", "pad_bottom", "pad_left", "pad_right"))
            mode = B.BORDER_MODES.get(int(op.border_mode))
            if mode is None:
                return f"PadIfNeeded with border_mode={op.border_mode} has no batched form"
            train.append(B.Pad(top, bottom, left, right, mode, _fill(op.fill)))
            current = (current[0] + top + bottom, current[1] + left + right)
        elif isinstance(op, A.RandomCrop):
            train.append(B.Crop(int(op.height), int(op.width), random=True))
            current = (int(op.height), int(op.width))
        elif isinstance(op, A.CenterCrop):
            train.append(B.Crop(int(op.height), int(op.width)))
            current = (int(op.height), int(op.width))
        elif isinstance(op, A.Crop):
            height, width = int(op.y_max - op.y_min), int(op.x_max - op.x_min)
            train.append(B.Crop(height, width, at=(int(op.y_min), int(op.x_min))))
            current = (height, width)
        elif type(op) in (A.HorizontalFlip, A.VerticalFlip):
            train.append(B.Flip(p, rows=isinstance(op, A.VerticalFlip)))
        elif type(op) is A.GaussNoise:
            if float(op.noise_scale_factor) != 1.0:
                return "GaussNoise with noise_scale_factor != 1 has no batched form"
            train.append(B.Noise(tuple(map(float, op.std_range)), tuple(map(float, op.mean_range)),
                                 bool(op.per_channel), p))
        elif isinstance(op, Cutout):
            train.append(B.CutoutStep(op.size, op.fraction, op.fill, p))
        else:
            return f"{name} has no batched form"
    return train, evaluation


def _size(name: str, value: Sequence[int] | int | None) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(f"Transforms.{name} must be (height, width) in pixels, got {value!r}.")
    return value


gin.register(Transforms, module=None)
gin.register(RandomScaleCrop, module=None)
gin.register(Cutout, module=None)
for _name, _cls in inspect.getmembers(A, inspect.isclass):
    if issubclass(_cls, A.BasicTransform) and _name[0].isupper() and _cls is not A.BasicTransform:
        gin.external_configurable(_cls, module="albumentations")
