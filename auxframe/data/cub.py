"""CUB-200-2011 in its official folder layout, with the 312 per-image attributes as label fields.

Layout under ``root`` (the extracted ``CUB_200_2011.tgz``)::

    CUB_200_2011/images.txt                              <image_id> <relative path>
    CUB_200_2011/image_class_labels.txt                  <image_id> <class_id 1-200>
    CUB_200_2011/train_test_split.txt                    <image_id> <1 train | 0 test>
    CUB_200_2011/attributes/image_attribute_labels.txt   <image_id> <attribute_id 1-312> <is_present 0|1> <certainty> <time>
    CUB_200_2011/images/<relative path>
    attributes.txt (beside CUB_200_2011/, or inside it)  <attribute_id> <name>, optional

Fields: ``species`` (200 classes, the main task) and ``attr_1`` .. ``attr_312``, 1 if the annotator
marked the attribute present, else 0 (the attribute names of ``attributes.txt`` are their
descriptions). A few lines of the official ``image_attribute_labels.txt`` carry an extra column;
only the first three columns are read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from auxframe.data.base import LabelField
from auxframe.data.images import SampleDataset, read_image, read_rows, require_dir, require_file, to_int
from auxframe.data.transforms import Transforms
from auxframe.errors import DataError

NUM_CLASSES = 200
NUM_ATTRIBUTES = 312
URL = "https://data.caltech.edu/records/65de6-vp158 (CUB_200_2011.tgz)"


class CUB(SampleDataset):
    """CUB-200-2011 birds, read lazily: ``species`` plus 312 binary attribute fields.

    Args:
        root: the folder holding ``CUB_200_2011/``.
        attributes: include the ``attr_<id>`` fields.
        transforms: resizing, augmentation and normalisation (the images vary in size).
    """

    def __init__(self, root: str = "data", attributes: bool = True, transforms: Transforms | None = None):
        root_ = Path(root).expanduser().absolute()
        how = f"Download {URL} and extract it into {root_}."
        base = require_dir(root_ / "CUB_200_2011", "CUB-200-2011", how)
        self.image_dir = require_dir(base / "images", "CUB-200-2011 images", how)
        paths = self._table(require_file(base / "images.txt", "CUB-200-2011", how), "<image_id> <path>")
        ids = sorted(paths)
        classes = self._table(require_file(base / "image_class_labels.txt", "CUB-200-2011", how), "<image_id> <class_id>")
        train = self._table(require_file(base / "train_test_split.txt", "CUB-200-2011", how), "<image_id> <0|1>")
        species = np.array([to_int(self._get(classes, i, base / "image_class_labels.txt"), base, "class id") - 1 for i in ids])
        if species.min() < 0 or species.max() >= NUM_CLASSES:
            raise DataError(f"{base / 'image_class_labels.txt'}: class ids must be 1-{NUM_CLASSES}.")
        is_train = np.array([self._get(train, i, base / "train_test_split.txt") == "1" for i in ids])
        self.files = [paths[i] for i in ids]
        labels = {"species": species}
        fields = {"species": LabelField(NUM_CLASSES, "the bird species, 200 classes (main task)")}
        if attributes:
            path = require_file(base / "attributes" / "image_attribute_labels.txt", "CUB-200-2011 attributes", how)
            values = _read_attribute_labels(path, {image_id: row for row, image_id in enumerate(ids)})
            names = _attribute_names(base)
            for a in range(NUM_ATTRIBUTES):
                labels[f"attr_{a + 1}"] = values[:, a]
                fields[f"attr_{a + 1}"] = LabelField(2, f"1 if present: {names.get(a + 1, f'attribute {a + 1}')}")
        super().__init__(labels, fields, "species", transforms, official_test=np.flatnonzero(~is_train))

    @staticmethod
    def _table(path: Path, what: str) -> dict[int, str]:
        return {to_int(row[0], path, "image id"): row[1] for row in read_rows(path, 2, what)}

    @staticmethod
    def _get(table: dict[int, str], image_id: int, path: Path) -> str:
        if image_id not in table:
            raise DataError(f"{path} has no line for image {image_id} (listed in images.txt). The file is malformed.")
        return table[image_id]

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int):
        return read_image(self.image_dir / self.files[index]), {}


def _read_attribute_labels(path: Path, rows: dict[int, int]) -> np.ndarray:
    """``(N, 312)`` int64 is-present values; unlisted pairs stay -1 (missing)."""
    values = np.full((len(rows), NUM_ATTRIBUTES), -1, dtype=np.int64)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                image_id, attribute, present = int(parts[0]), int(parts[1]), int(parts[2])
            except (ValueError, IndexError):
                raise DataError(f"{path}:{lineno}: expected '<image_id> <attribute_id> <is_present> ...', "
                                f"got {line.strip()!r}. The file is malformed.") from None
            if image_id not in rows or not 1 <= attribute <= NUM_ATTRIBUTES or present not in (0, 1):
                raise DataError(f"{path}:{lineno}: image {image_id}, attribute {attribute}, is_present {present} "
                                f"out of range (images of images.txt, attributes 1-{NUM_ATTRIBUTES}, 0 or 1).")
            values[rows[image_id], attribute - 1] = present
    return values


def _attribute_names(base: Path) -> dict[int, str]:
    for path in (base.parent / "attributes.txt", base / "attributes.txt", base / "attributes" / "attributes.txt"):
        if path.is_file():
            return {to_int(row[0], path, "attribute id"): row[1] for row in read_rows(path, 2, "<id> <name>")}
    return {}


def cub(root: str = "data", attributes: bool = True, transforms: Transforms | None = None) -> CUB:
    """CUB-200-2011: 11,788 bird images of 200 species, with 312 binary attributes per image.

    Args:
        root: the folder holding ``CUB_200_2011/``.
        attributes: add the fields ``attr_1`` .. ``attr_312`` (auxiliary tasks).
        transforms: resizing, augmentation and normalisation.

    Returns:
        A :class:`CUB`; ``official_test`` is the official test half (``train_test_split.txt``).
    """
    return CUB(root, attributes, transforms)
