"""Tiny data sets written in each real data set's on-disk format (importable as ``fixtures_data``).

Every maker writes under ``root`` exactly the files the loader reads (the same names, formats and
layouts as the official releases) with few, small images, and returns what it wrote so that tests
can compare what the loader reads. Sizes are chosen so that each recipe's low-data split fits.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np

#: CelebA's 40 attribute names, in the order of list_attr_celeba.txt.
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
#: The dataset plugins these fixtures stand in for.
DATASETS = ("cifar10", "cifar100", "svhn", "celeba", "pet", "cub", "pacs", "nyuv2")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _balanced(classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(classes), per_class))


def _save_jpg(path: Path, rng: np.random.Generator, size=(20, 24), smooth: bool = False) -> None:
    """A JPEG of random pixels, or (``smooth``) of a photo's statistics: a bicubic blow-up of a 7x6
    colour grid plus noise of 5 levels, about 10 KB at 218x178, as CelebA's aligned faces are."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if not smooth:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=90)
        return
    grid = Image.fromarray(rng.integers(0, 256, (7, 6, 3), dtype=np.uint8)).resize(size[::-1], Image.BICUBIC)
    pixels = np.asarray(grid, dtype=np.float32) + rng.normal(0.0, 5.0, (*size, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_cifar10(root: Path, train_per_class: int = 5, test_per_class: int = 2) -> dict:
    """``root/cifar-10-batches-py``: five training batches, a test batch and ``batches.meta``."""
    return _make_cifar(root, train_per_class, test_per_class, hundred=False)


def make_cifar100(root: Path, train_per_class: int = 4, test_per_class: int = 1) -> dict:
    """``root/cifar-100-python``: ``train``, ``test`` and ``meta``, fine and coarse labels."""
    return _make_cifar(root, train_per_class, test_per_class, hundred=True)


def _make_cifar(root: Path, train_per_class: int, test_per_class: int, hundred: bool) -> dict:
    rng = _rng(1)
    classes = 100 if hundred else 10
    folder = Path(root) / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    train_y = _balanced(classes, train_per_class, rng)
    test_y = _balanced(classes, test_per_class, rng)
    train_x = rng.integers(0, 256, (train_y.size, 3072), dtype=np.uint8)
    test_x = rng.integers(0, 256, (test_y.size, 3072), dtype=np.uint8)

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        batch = {"batch_label": name, "data": x, "filenames": [f"{i}.png" for i in range(len(y))]}
        if hundred:
            batch.update({"fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist()})
        else:
            batch["labels"] = y.tolist()
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)

    if hundred:
        dump("train", train_x, train_y)
        dump("test", test_x, test_y)
        meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}
        with open(folder / "meta", "wb") as f:
            pickle.dump(meta, f)
    else:
        for i, chunk in enumerate(np.array_split(np.arange(train_y.size), 5), 1):
            dump(f"data_batch_{i}", train_x[chunk], train_y[chunk])
        dump("test_batch", test_x, test_y)
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 10}, f)
    to_hwc = lambda x: x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # noqa: E731
    return {"train_x": to_hwc(train_x), "train_y": train_y, "test_x": to_hwc(test_x), "test_y": test_y}


def make_svhn(root: Path, train_per_class: int = 5, test_per_class: int = 2) -> dict:
    """``root/train_32x32.mat`` and ``test_32x32.mat``: ``X (32, 32, 3, N)`` uint8, ``y (N, 1)`` with 10 for 0."""
    import scipy.io

    rng = _rng(2)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        y = _balanced(10, per_class, rng)
        x = rng.integers(0, 256, (32, 32, 3, y.size), dtype=np.uint8)
        stored = np.where(y == 0, 10, y).reshape(-1, 1).astype(np.uint8)
        scipy.io.savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": stored})
        out[f"{split}_x"], out[f"{split}_y"] = x.transpose(3, 0, 1, 2), y
    return out


def make_celeba(root: Path, n: int = 48, size=(22, 18), smooth: bool = False) -> dict:
    """``root/celeba``: ``list_attr_celeba.txt``, ``list_eval_partition.txt``, ``img_align_celeba/*.jpg``.

    The first ``n // 2`` images are partition 0 (train), then a quarter 1 (val) and a quarter 2
    (test); attributes alternate, so that both values are present in each partition. ``size`` is
    ``(height, width)`` (CelebA's aligned faces: ``(218, 178)``); ``smooth``: photo-like JPEGs.
    """
    rng = _rng(3)
    base = Path(root) / "celeba"
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    grid = np.arange(n)[:, None] + np.arange(len(CELEBA_ATTRIBUTES))[None, :]
    values = np.where(grid % 2 == 0, 1, -1)  # alternating, so both values occur in every partition
    partition = np.repeat([0, 1, 2], [n // 2, n // 4, n - n // 2 - n // 4])
    lines = [str(n), " ".join(CELEBA_ATTRIBUTES)]
    lines += [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, values)]
    base.mkdir(parents=True, exist_ok=True)
    (base / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (base / "list_eval_partition.txt").write_text("".join(f"{a} {p}\n" for a, p in zip(names, partition)))
    for name in names:
        _save_jpg(base / "img_align_celeba" / name, rng, size, smooth)
    return {"names": names, "values": (values > 0).astype(np.int64), "partition": partition}


def make_pet(root: Path, trainval_per_class: int = 4, test_per_class: int = 1, size=(20, 24)) -> dict:
    """``root/oxford-iiit-pet``: ``images/*.jpg``, ``annotations/{trainval,test}.txt``, ``annotations/trimaps/*.png``."""
    from PIL import Image

    rng = _rng(4)
    base = Path(root) / "oxford-iiit-pet"
    (base / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    rows = {"trainval": [], "test": []}
    for split, per_class in (("trainval", trainval_per_class), ("test", test_per_class)):
        for cls in range(1, 38):
            species = 1 if cls <= 12 else 2  # 12 cat breeds, 25 dog breeds
            breed = f"Breed{cls}" if species == 1 else f"breed{cls}"  # cats capitalised, as in the release
            for k in range(per_class):
                name = f"{breed}_{split}{k}"
                rows[split].append((name, cls, species))
                _save_jpg(base / "images" / f"{name}.jpg", rng, size)
                trimap = rng.integers(1, 4, size, dtype=np.uint8)
                Image.fromarray(trimap).save(base / "annotations" / "trimaps" / f"{name}.png")
        text = "".join(f"{name} {cls} {species} {cls}\n" for name, cls, species in rows[split])
        (base / "annotations" / f"{split}.txt").write_text(text)
    return rows


def make_cub(root: Path, classes: int = 3, train_per_class: int = 16, test_per_class: int = 2, size=(20, 24)) -> dict:
    """``root/CUB_200_2011`` with the official text files, ``attributes/image_attribute_labels.txt``
    (a few lines with the extra column of the official file) and ``root/attributes.txt``."""
    rng = _rng(5)
    base = Path(root) / "CUB_200_2011"
    (base / "attributes").mkdir(parents=True, exist_ok=True)
    images, labels, split = [], [], []
    for cls in range(1, classes + 1):
        folder = f"{cls:03d}.Bird_{cls}"
        for k in range(train_per_class + test_per_class):
            path = f"{folder}/Bird_{cls}_{k:04d}.jpg"
            _save_jpg(base / "images" / path, rng, size)
            images.append(path)
            labels.append(cls)
            split.append(1 if k < train_per_class else 0)
    ids = np.arange(1, len(images) + 1)
    (base / "images.txt").write_text("".join(f"{i} {p}\n" for i, p in zip(ids, images)))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c in zip(ids, labels)))
    (base / "train_test_split.txt").write_text("".join(f"{i} {s}\n" for i, s in zip(ids, split)))
    (base / "classes.txt").write_text("".join(f"{c} {c:03d}.Bird_{c}\n" for c in range(1, classes + 1)))
    present = rng.integers(0, 2, (len(images), 312))
    lines = []
    for i in ids:
        for a in range(1, 313):
            extra = " 0" if (i, a) == (2, 7) else ""  # the official file has a few lines with 6 columns
            lines.append(f"{i} {a} {present[i - 1, a - 1]} {rng.integers(1, 5)} 3.5{extra}\n")
    (base / "attributes" / "image_attribute_labels.txt").write_text("".join(lines))
    (Path(root) / "attributes.txt").write_text("".join(f"{a} has_part::value_{a}\n" for a in range(1, 313)))
    return {"images": images, "labels": np.array(labels) - 1, "train": np.array(split), "present": present}


def make_pacs(root: Path, per_class: int = 6, size=(20, 24)) -> dict:
    """``root/<domain>/<class>/<image>.jpg`` (PACS's kfold layout), one PNG in each domain's first class."""
    from PIL import Image

    rng = _rng(6)
    counts = {}
    for d in PACS_DOMAINS:
        for c in PACS_CLASSES:
            for k in range(per_class):
                if k == 0 and c == PACS_CLASSES[0]:
                    path = Path(root) / d / c / f"pic_{k:03d}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
                else:
                    _save_jpg(Path(root) / d / c / f"pic_{k:03d}.jpg", rng, size)
            counts[d, c] = per_class
    return counts


def make_nyuv2(root: Path, n_train: int = 10, n_val: int = 3, size=(16, 24)) -> dict:
    """``root/{train,val}/{image,label,depth,normal}/<i>.npy`` as in MTAN's pre-processed NYUv2."""
    rng = _rng(7)
    h, w = size
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            image = rng.random((h, w, 3)).astype(np.float32)
            label = rng.integers(-1, 13, (h, w)).astype(np.float32)
            depth = (rng.random((h, w, 1)) * 5).astype(np.float32)
            depth[0, 0] = 0.0  # an invalid pixel
            normal = rng.normal(size=(h, w, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=2, keepdims=True)
            for folder, array in (("image", image), ("label", label), ("depth", depth), ("normal", normal)):
                (Path(root) / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(Path(root) / split / folder / f"{i}.npy", array)
            out[split, i] = {"image": image, "label": label, "depth": depth, "normal": normal}
    return out


def make_all(root: Path) -> dict[str, Path]:
    """Every fixture under ``root``; returns each dataset's ``root`` argument by dataset name."""
    root = Path(root)
    make_cifar10(root / "cifar")
    make_cifar100(root / "cifar")
    make_svhn(root / "svhn")
    make_celeba(root / "celeba_root")
    make_pet(root / "pet_root")
    make_cub(root / "cub_root")
    make_pacs(root / "pacs")
    make_nyuv2(root / "nyuv2")
    return {"cifar10": root / "cifar", "cifar100": root / "cifar", "svhn": root / "svhn",
            "celeba": root / "celeba_root", "pet": root / "pet_root", "cub": root / "cub_root",
            "pacs": root / "pacs", "nyuv2": root / "nyuv2"}


def _includes(path: Path, gin_dir: Path) -> set[Path]:
    """``path`` and every gin file it includes, transitively (includes resolved from ``gin_dir``)."""
    seen, todo = set(), [Path(path).resolve()]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for line in p.read_text().splitlines():
            m = re.match(r"\s*include\s+['\"]([^'\"]+)['\"]", line)
            if m:
                todo.append((gin_dir / m.group(1)).resolve())
    return seen


def reads_real_data(path: Path, gin_dir: Path) -> bool:
    """Whether a gin file, with what it includes, builds one of the real-data datasets."""
    return any(re.search(rf"datasets\.({'|'.join(DATASETS)})\b", p.read_text()) for p in _includes(path, gin_dir))


def data_recipe_files(gin_dir: Path) -> set[Path]:
    """The shipped gin files that need a real data set: the experiments that read one, and the
    pieces that only such experiments include. test_datasets.py trains these on the fixtures."""
    gin_dir = Path(gin_dir).resolve()
    whole = [gin_dir / "quickstart.gin", *sorted(gin_dir.glob("experiments/*.gin"))]
    data = {p.resolve() for p in whole if reads_real_data(p, gin_dir)}
    used_by_data = set().union(*(_includes(p, gin_dir) for p in data)) if data else set()
    used_by_others = set().union(*(_includes(p, gin_dir) for p in whole if p.resolve() not in data))
    return data | (used_by_data - used_by_others)
