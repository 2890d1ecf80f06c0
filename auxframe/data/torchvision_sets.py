"""CIFAR-10/100, SVHN, CelebA and Oxford-IIIT Pet, read from the files torchvision downloads.

Each loader reads its data set's official on-disk format itself (so that a missing or malformed
file is named in the error, and large sets are read lazily) and uses torchvision only to download
(``download=True``, off by default). Every loader returns a
:class:`~auxframe.data.images.SampleDataset` whose ``official_test`` is the official test split,
which :class:`~auxframe.data.splits.LowDataSplit` uses as its test split.

Layouts under ``root`` (what ``torchvision.datasets.<Name>(root, download=True)`` writes):

- CIFAR-10: ``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5``, ``test_batch`` (pickled dicts
  with ``data`` ``(N, 3072)`` uint8, rows of R then G then B planes, and ``labels``).
- CIFAR-100: ``cifar-100-python/train``, ``test`` (``fine_labels`` and ``coarse_labels``).
- SVHN: ``train_32x32.mat``, ``test_32x32.mat`` (and ``extra_32x32.mat``): MATLAB files with
  ``X`` ``(32, 32, 3, N)`` uint8 and ``y`` ``(N, 1)``, digit 0 stored as 10.
- CelebA: ``celeba/list_attr_celeba.txt`` (a count line, the 40 attribute names, then one line per
  image: file name and 40 values of -1/1), ``celeba/list_eval_partition.txt`` (file name and
  0 train / 1 validation / 2 test) and ``celeba/img_align_celeba/*.jpg``.
- Oxford-IIIT Pet: ``oxford-iiit-pet/images/<name>.jpg``, ``oxford-iiit-pet/annotations/trainval.txt``
  and ``test.txt`` (lines ``<name> <class 1-37> <species 1 cat, 2 dog> <breed id>``) and
  ``annotations/trimaps/<name>.png`` (1 pet, 2 background, 3 border).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from auxframe.data.base import LabelField
from auxframe.data.images import SampleDataset, read_image, read_rows, require_dir, require_file, to_int
from auxframe.data.transforms import Transforms
from auxframe.errors import DataError


def _download(name: str, root: Path, **kwargs) -> None:
    """Fetch a data set with torchvision (which verifies the files' checksums)."""
    import torchvision.datasets as tvd

    getattr(tvd, name)(str(root), download=True, **kwargs)


class ArrayImages(SampleDataset):
    """Images held in memory as one ``(N, H, W, C)`` uint8 array (CIFAR, SVHN).

    Where its transforms have a batched form (:meth:`Transforms.batched
    <auxframe.data.transforms.Transforms.batched>`: pads, crops, flips, noise, Cutout), a batch is
    fetched as uint8 pixels and augmented as a whole on the training device (:meth:`finish_batch`);
    otherwise image by image through albumentations, in the DataLoader's workers.

    Args:
        images: ``(N, H, W, C)`` uint8.
        labels, fields, main_field, transforms, official_test: as :class:`SampleDataset`.

    Attributes:
        batched: the batched pipeline, or None (image by image).
    """

    def __init__(self, images: np.ndarray, labels, fields, main_field, transforms=None, official_test=None):
        self.images = images
        super().__init__(labels, fields, main_field, transforms, official_test=official_test)
        self.batched = self.transforms.batched(size=images.shape[1:3], channels=images.shape[3])

    def __len__(self) -> int:
        return self.images.shape[0]

    def read(self, index: int):
        return self.images[index], {}

    def fetch_batch(self, indices, seed=None):
        if self.batched is None:
            return super().fetch_batch(indices, seed)
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self.images[idx]), {k: torch.from_numpy(v[idx]) for k, v in self.labels.items()}

    def finish_batch(self, images, labels, seed=None):
        if self.batched is None:
            return images, labels
        return self.batched(images, seed), labels

    def get_batch(self, indices):
        if self.batched is None:
            return super().get_batch(indices)
        return self.finish_batch(*self.fetch_batch(indices))

    def get_train_batch(self, indices, seed):
        if self.batched is None:
            return super().get_train_batch(indices, seed)
        return self.finish_batch(*self.fetch_batch(indices, seed), seed)


# -- CIFAR ------------------------------------------------------------------------------------------
def _unpickle(path: Path, keys: Sequence[str]) -> dict:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        missing = [k for k in keys if k not in batch]
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{path} is not a CIFAR batch (a pickled dict): {exc}. Download the data again.") from exc
    if missing:
        raise DataError(f"{path} lacks the keys {missing}; it is not a CIFAR batch. Download the data again.")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or any(len(batch[k]) != data.shape[0] for k in keys[1:]):
        raise DataError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072) with N labels. Download the data again.")
    return batch


def _cifar(root: str, download: bool, transforms: Transforms | None, hundred: bool) -> ArrayImages:
    name, folder = ("CIFAR100", "cifar-100-python") if hundred else ("CIFAR10", "cifar-10-batches-py")
    files = (["train"], ["test"]) if hundred else ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])
    keys = ("data", "fine_labels", "coarse_labels") if hundred else ("data", "labels")
    root_ = Path(root).expanduser().absolute()
    if download:
        for train in (True, False):
            _download(name, root_, train=train)
    how = (f"Set `datasets.{name.lower()}.download = True` to fetch it with torchvision, or extract "
           f"https://www.cs.toronto.edu/~kriz/{'cifar-100' if hundred else 'cifar-10'}-python.tar.gz into {root_}.")
    base = require_dir(root_ / folder, name, how)
    parts = {"train": [], "test": []}
    for part, names in zip(("train", "test"), files):
        parts[part] = [_unpickle(require_file(base / n, name, how), keys) for n in names]
    batches = parts["train"] + parts["test"]
    images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    n_train = sum(len(b["data"]) for b in parts["train"])
    official_test = np.arange(n_train, images.shape[0])
    if hundred:
        labels = {"label": np.concatenate([b["fine_labels"] for b in batches]),
                  "coarse": np.concatenate([b["coarse_labels"] for b in batches])}
        fields = {"label": LabelField(100, "the object class (100 fine classes; main task)"),
                  "coarse": LabelField(20, "the superclass (20 coarse classes)")}
    else:
        labels = {"label": np.concatenate([b["labels"] for b in batches])}
        fields = {"label": LabelField(10, "the object class (main task)")}
    for field, values in labels.items():
        if values.min() < 0 or values.max() >= fields[field].num_classes:
            raise DataError(f"{name} labels '{field}' outside [0, {fields[field].num_classes}) in {base}; download the data again.")
    return ArrayImages(np.ascontiguousarray(images), labels, fields, "label", transforms, official_test)


def cifar10(root: str = "data", download: bool = False, transforms: Transforms | None = None) -> ArrayImages:
    """CIFAR-10: 50,000 training and 10,000 test images (32x32 RGB), field ``label`` (10 classes).

    Args:
        root: the folder holding ``cifar-10-batches-py``.
        download: fetch the data with torchvision first.
        transforms: augmentation and normalisation (:class:`~auxframe.data.transforms.Transforms`).

    Returns:
        The 60,000 images, training first; ``official_test`` is the 10,000 test images.

    Raises:
        DataError: the folder or a batch file is missing or malformed (the message says which).
    """
    return _cifar(root, download, transforms, hundred=False)


def cifar100(root: str = "data", download: bool = False, transforms: Transforms | None = None) -> ArrayImages:
    """CIFAR-100: fields ``label`` (100 fine classes) and ``coarse`` (20 superclasses).

    Args:
        root: the folder holding ``cifar-100-python``.
        download: fetch the data with torchvision first.
        transforms: augmentation and normalisation.

    Returns:
        The 60,000 images, training first; ``official_test`` is the 10,000 test images.
    """
    return _cifar(root, download, transforms, hundred=True)


# -- SVHN -------------------------------------------------------------------------------------------
def _load_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
        x, y = mat["X"], np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise DataError(f"{path} is not an SVHN .mat file with 'X' and 'y': {exc}. Download it again.") from exc
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.size or y.min() < 1 or y.max() > 10:
        raise DataError(f"{path}: 'X' has shape {x.shape} and 'y' {y.size} labels in [{y.min()}, {y.max()}]; expected "
                        f"(32, 32, 3, N) and N labels in 1..10. Download it again.")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), y % 10  # digit 0 is stored as 10


def svhn(root: str = "data/svhn", download: bool = False, include_extra: bool = False,
         transforms: Transforms | None = None) -> ArrayImages:
    """SVHN cropped digits (32x32 RGB), field ``label`` (the digit, 0-9).

    Args:
        root: the folder holding ``train_32x32.mat`` and ``test_32x32.mat``.
        download: fetch the data with torchvision first.
        include_extra: add the 531,131 ``extra`` training images (``extra_32x32.mat``).
        transforms: augmentation and normalisation.

    Returns:
        Training (then extra) then test images; ``official_test`` is the 26,032 test images.
    """
    root_ = Path(root).expanduser().absolute()
    splits = ["train"] + (["extra"] if include_extra else []) + ["test"]
    if download:
        for split in splits:
            _download("SVHN", root_, split=split)
    how = (f"Set `datasets.svhn.download = True` to fetch it with torchvision, or save "
           f"http://ufldl.stanford.edu/housenumbers/<split>_32x32.mat into {root_}.")
    require_dir(root_, "SVHN", how)
    loaded = [_load_mat(require_file(root_ / f"{s}_32x32.mat", "SVHN", how)) for s in splits]
    images = np.concatenate([x for x, _ in loaded])
    n_test = loaded[-1][0].shape[0]
    return ArrayImages(images, {"label": np.concatenate([y for _, y in loaded])},
                       {"label": LabelField(10, "the house-number digit, 0-9 (main task)")}, "label", transforms,
                       np.arange(images.shape[0] - n_test, images.shape[0]))


# -- CelebA -----------------------------------------------------------------------------------------
class CelebA(SampleDataset):
    """CelebA aligned faces with one binary field per attribute (0 absent, 1 present).

    Args:
        root: the folder holding ``celeba/`` (torchvision's layout).
        main_attribute: the attribute the main task predicts (and the splitter stratifies on).
        download: fetch the data with torchvision first (from Google Drive, which often refuses
            large downloads; the files can also be had from the CelebA site).
        transforms: resizing, augmentation and normalisation (the images are 178x218).

    Attributes:
        attributes: the 40 attribute names in file order; each is a field.
    """

    def __init__(self, root: str = "data", main_attribute: str = "Smiling", download: bool = False,
                 transforms: Transforms | None = None):
        root_ = Path(root).expanduser().absolute()
        if download:
            _download("CelebA", root_, split="all", target_type="attr")
        how = (f"Set `datasets.celeba.download = True` to fetch it with torchvision, or put the files of "
               f"https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Align&Cropped images, Anno, Eval) in {root_ / 'celeba'}.")
        base = require_dir(root_ / "celeba", "CelebA", how)
        self.image_dir = require_dir(base / "img_align_celeba", "CelebA images", how)
        names, files, values = self._read_attributes(require_file(base / "list_attr_celeba.txt", "CelebA", how))
        partition = self._read_partition(require_file(base / "list_eval_partition.txt", "CelebA", how), files)
        if main_attribute not in names:
            raise DataError(f"CelebA has no attribute '{main_attribute}'; its attributes are: {', '.join(names)}.")
        self.attributes = names
        self.files = files
        labels = {name: values[:, j] for j, name in enumerate(names)}
        fields = {name: LabelField(2, f"1 if the face has the attribute {name}, else 0") for name in names}
        super().__init__(labels, fields, main_attribute, transforms, official_test=np.flatnonzero(partition == 2))

    @staticmethod
    def _read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        if len(lines) < 2:
            raise DataError(f"{path} is malformed: expected a count line and a line of attribute names.")
        names = lines[1].split()
        rows = [line.split() for line in lines[2:]]
        for lineno, row in enumerate(rows, 3):
            if len(row) != len(names) + 1 or any(v not in ("1", "-1") for v in row[1:]):
                raise DataError(f"{path}:{lineno}: expected an image name and {len(names)} values of 1 or -1, "
                                f"got {' '.join(row)!r}. The file is malformed.")
        if to_int(lines[0].strip(), path, "image count on line 1") != len(rows):
            raise DataError(f"{path}: line 1 counts {lines[0].strip()} images but {len(rows)} follow. The file is malformed.")
        values = (np.array([row[1:] for row in rows], dtype=np.int64).reshape(len(rows), len(names)) > 0).astype(np.int64)
        return names, [row[0] for row in rows], values

    @staticmethod
    def _read_partition(path: Path, files: list[str]) -> np.ndarray:
        split = {row[0]: to_int(row[1], path, "partition (0, 1 or 2)") for row in read_rows(path, 2, "<image> <0|1|2>")}
        missing = [f for f in files if f not in split]
        if missing:
            raise DataError(f"{path} has no partition for {len(missing)} images (e.g. {missing[0]}). The file is malformed.")
        return np.array([split[f] for f in files], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int):
        return read_image(self.image_dir / self.files[index]), {}


def celeba(root: str = "data", main_attribute: str = "Smiling", download: bool = False,
           transforms: Transforms | None = None) -> CelebA:
    """CelebA: 202,599 aligned faces, one 0/1 field per attribute (40), read lazily.

    Args:
        root: the folder holding ``celeba/``.
        main_attribute: the main task's attribute (e.g. ``'Smiling'``); the others make
            auxiliary tasks.
        download: fetch the data with torchvision first.
        transforms: resizing, augmentation and normalisation.

    Returns:
        A :class:`CelebA`; ``official_test`` is the official test partition (2).
    """
    return CelebA(root, main_attribute, download, transforms)


# -- Oxford-IIIT Pet --------------------------------------------------------------------------------
class OxfordPet(SampleDataset):
    """Oxford-IIIT Pet: fields ``breed`` (37 classes, main) and ``species`` (cat 0, dog 1).

    Args:
        root: the folder holding ``oxford-iiit-pet/``.
        download: fetch the data with torchvision first.
        trimap: add the dense field ``trimap`` (per pixel: 0 pet, 1 background, 2 border).
        transforms: resizing, augmentation and normalisation.
    """

    def __init__(self, root: str = "data", download: bool = False, trimap: bool = False,
                 transforms: Transforms | None = None):
        root_ = Path(root).expanduser().absolute()
        if download:
            _download("OxfordIIITPet", root_, split="trainval", target_types=["category", "segmentation"])
            _download("OxfordIIITPet", root_, split="test", target_types=["category", "segmentation"])
        how = (f"Set `datasets.pet.download = True` to fetch it with torchvision, or extract "
               f"https://www.robots.ox.ac.uk/~vgg/data/pets/ images.tar.gz and annotations.tar.gz into "
               f"{root_ / 'oxford-iiit-pet'}.")
        base = require_dir(root_ / "oxford-iiit-pet", "Oxford-IIIT Pet", how)
        self.image_dir = require_dir(base / "images", "Oxford-IIIT Pet images", how)
        self.trimap_dir = require_dir(base / "annotations" / "trimaps", "Oxford-IIIT Pet trimaps", how) if trimap else None
        rows = {}
        for split in ("trainval", "test"):
            path = require_file(base / "annotations" / f"{split}.txt", "Oxford-IIIT Pet", how)
            rows[split] = [(r[0], to_int(r[1], path, "class id"), to_int(r[2], path, "species id"))
                           for r in read_rows(path, 3, "<image> <class 1-37> <species 1|2> <breed id>")]
            for name, cls, species in rows[split]:
                if not (1 <= cls <= 37 and species in (1, 2)):
                    raise DataError(f"{path}: '{name}' has class {cls} and species {species}; expected 1-37 and 1 or 2.")
        every = rows["trainval"] + rows["test"]
        self.names = [name for name, _, _ in every]
        labels = {"breed": np.array([c - 1 for _, c, _ in every]), "species": np.array([s - 1 for _, _, s in every])}
        fields = {"breed": LabelField(37, "the breed, 37 classes (main task)"),
                  "species": LabelField(2, "the species: 0 cat, 1 dog")}
        if trimap:
            fields["trimap"] = LabelField(3, "per pixel: 0 pet, 1 background, 2 border", kind="dense_class")
        super().__init__(labels, fields, "breed", transforms, {"trimap": "mask"} if trimap else None,
                         official_test=np.arange(len(rows["trainval"]), len(every)))

    def __len__(self) -> int:
        return len(self.names)

    def read(self, index: int):
        name = self.names[index]
        image = read_image(self.image_dir / f"{name}.jpg")
        if self.trimap_dir is None:
            return image, {}
        from PIL import Image

        path = self.trimap_dir / f"{name}.png"
        try:
            with Image.open(path) as img:
                trimap = np.asarray(img, dtype=np.int64) - 1
        except OSError as exc:
            raise DataError(f"cannot read the trimap {path}: {exc}.") from exc
        if trimap.shape != image.shape[:2] or trimap.min() < 0 or trimap.max() > 2:
            raise DataError(f"{path}: trimap of shape {trimap.shape} with values {np.unique(trimap + 1)}; expected "
                            f"{image.shape[:2]} with values 1, 2, 3.")
        return image, {"trimap": trimap}


def pet(root: str = "data", download: bool = False, trimap: bool = False,
        transforms: Transforms | None = None) -> OxfordPet:
    """Oxford-IIIT Pet: 7,349 images of 37 breeds, read lazily.

    Args:
        root: the folder holding ``oxford-iiit-pet/``.
        download: fetch the data with torchvision first.
        trimap: add the per-pixel field ``trimap`` (pet / background / border).
        transforms: resizing, augmentation and normalisation.

    Returns:
        An :class:`OxfordPet`; ``official_test`` is the images of ``test.txt``.
    """
    return OxfordPet(root, download, trimap, transforms)
