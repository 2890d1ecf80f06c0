"""NYUv2 in the pre-processed multi-task layout of MTAN (Liu et al., CVPR 2019), used by AuxiLearn.

Layout under ``root`` (the extracted ``nyuv2.zip`` of MTAN's README)::

    train/image/<i>.npy    (H, W, 3) float, RGB in [0, 1]     i = 0 .. 794
    train/label/<i>.npy    (H, W) 13-class segmentation, -1 = unlabelled pixel
    train/depth/<i>.npy    (H, W, 1) depth, 0 = no measurement
    train/normal/<i>.npy   (H, W, 3) unit surface normals, all zero = no measurement
    val/...                the same for the 654 test images

(H, W) is (288, 384) in MTAN's files. Fields: ``segmentation`` (dense classes, main),
``depth`` (regression, 1 channel) and ``normals`` (regression, 3 channels). There is no per-image
class, so the splitter draws the validation and auxiliary sets at random (see
:mod:`auxframe.data.splits`); ``official_test`` is the ``val`` folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from auxframe.data.base import LabelField
from auxframe.data.images import SampleDataset, require_dir
from auxframe.data.transforms import Transforms
from auxframe.errors import DataError

NUM_CLASSES = 13
FOLDERS = {"image": "image", "segmentation": "label", "depth": "depth", "normals": "normal"}
HOW = ("Download MTAN's pre-processed NYUv2 (the nyuv2.zip linked from https://github.com/lorenmt/mtan) and "
       "extract it so that this folder holds train/ and val/.")


class NYUv2(SampleDataset):
    """NYUv2 with per-pixel segmentation, depth and surface normals, read lazily from ``.npy`` files.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        transforms: augmentation and normalisation (MTAN: ``@RandomScaleCrop()`` and a horizontal flip).
    """

    def __init__(self, root: str = "data/nyuv2", transforms: Transforms | None = None):
        root_ = require_dir(root, "NYUv2", HOW)
        self.samples: list[tuple[Path, int]] = []
        for split in ("train", "val"):
            counts = {}
            for folder in FOLDERS.values():
                path = require_dir(root_ / split / folder, "NYUv2", HOW)
                counts[folder] = len(list(path.glob("*.npy")))
            if len(set(counts.values())) != 1 or counts["image"] == 0:
                raise DataError(f"NYUv2 folders of {root_ / split} hold different numbers of .npy files {counts}; "
                                f"every sample needs an image, label, depth and normal file. {HOW}")
            self.samples += [(root_ / split, i) for i in range(counts["image"])]
        n_test = sum(1 for base, _ in self.samples if base.name == "val")
        fields = {
            "segmentation": LabelField(NUM_CLASSES, "13-class semantic segmentation per pixel (main task)", kind="dense_class"),
            "depth": LabelField(kind="regression", channels=1, description="depth per pixel, 0 = invalid"),
            "normals": LabelField(kind="regression", channels=3, description="unit surface normal per pixel, 0 = invalid"),
        }
        roles = {"segmentation": "mask", "depth": "depth", "normals": "normals"}
        super().__init__({}, fields, "segmentation", transforms, roles,
                         official_test=np.arange(len(self.samples) - n_test, len(self.samples)))

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int):
        base, i = self.samples[index]
        arrays = {}
        for name, folder in FOLDERS.items():
            path = base / folder / f"{i}.npy"
            try:
                arrays[name] = np.load(path)
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read NYUv2 file {path}: {exc}.") from exc
        image, seg = arrays["image"], arrays["segmentation"]
        shape = image.shape[:2]
        expected = {"image": (*shape, 3), "segmentation": shape, "depth": (*shape, 1), "normals": (*shape, 3)}
        for name, want in expected.items():
            if arrays[name].shape != want:
                raise DataError(f"NYUv2 file {base / FOLDERS[name] / f'{i}.npy'} has shape {arrays[name].shape}, "
                                f"expected {want} (matching its image).")
        seg = np.rint(seg).astype(np.int64)
        if seg.min() < -1 or seg.max() >= NUM_CLASSES:
            raise DataError(f"NYUv2 file {base / 'label' / f'{i}.npy'} has classes outside -1..{NUM_CLASSES - 1}.")
        dense = {"segmentation": seg, "depth": arrays["depth"].astype(np.float32),
                 "normals": arrays["normals"].astype(np.float32)}
        return image.astype(np.float32), dense


def nyuv2(root: str = "data/nyuv2", transforms: Transforms | None = None) -> NYUv2:
    """NYUv2 (795 training, 654 test images): segmentation, depth and surface normals per pixel.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        transforms: augmentation and normalisation.

    Returns:
        An :class:`NYUv2`; ``official_test`` is the 654 images of ``val/``.
    """
    return NYUv2(root, transforms)
