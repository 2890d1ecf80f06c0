"""Real-data loaders on fixtures in each data set's own format, aligned transforms, and the recipes.

Fixtures (tests/fixtures_data.py) are written once per module into a temporary folder. Every
recipe that reads a real data set parses, builds and trains two steps on them, with a tiny backbone.
"""

from __future__ import annotations

import pickle

import albumentations as A
import gin
import numpy as np
import pytest
import torch

import fixtures_data as fx
from auxframe import config
from auxframe.data.base import LabelField, TensorImageDataset
from auxframe.data.cub import cub
from auxframe.data.field_tasks import field_tasks, task_name
from auxframe.data.loader import PoolLoader
from auxframe.data.nyuv2 import nyuv2
from auxframe.data.pacs import pacs
from auxframe.data.splits import LowDataSplit
from auxframe.data.torchvision_sets import celeba, cifar10, cifar100, pet, svhn
from auxframe.data.transforms import RandomScaleCrop, Transforms
from auxframe.errors import ConfigError, DataError
from auxframe.experiment import train
from auxframe.tasks import Task
from helpers import GIN, quick_bindings


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return fx.make_all(tmp_path_factory.mktemp("data"))


def batch(ds, n=None):
    return ds.get_batch(torch.arange(len(ds) if n is None else n))


# -------------------------------------------------------------------------------------- loaders
def test_cifar10_reads_pickled_batches(roots):
    written = fx._make_cifar(roots["cifar10"] / "again", 5, 2, hundred=False)
    ds = cifar10(str(roots["cifar10"] / "again"))
    images, labels = batch(ds)
    n_train = written["train_y"].size
    assert len(ds) == n_train + written["test_y"].size and ds.input_shape == (3, 32, 32)
    expected = np.concatenate([written["train_x"], written["test_x"]]).transpose(0, 3, 1, 2) / 255.0
    assert torch.allclose(images, torch.from_numpy(expected).float(), atol=1e-6)
    assert np.array_equal(labels["label"].numpy(), np.concatenate([written["train_y"], written["test_y"]]))
    assert np.array_equal(ds.official_test, np.arange(n_train, len(ds)))


def test_cifar100_has_fine_and_coarse_labels(roots):
    ds = cifar100(str(roots["cifar100"]))
    assert ds.fields["label"].num_classes == 100 and ds.fields["coarse"].num_classes == 20
    assert np.array_equal(ds.targets("coarse"), ds.targets("label") // 5)  # as the fixture wrote them


def test_svhn_maps_label_10_to_digit_0(roots):
    written = fx.make_svhn(roots["svhn"] / "again")
    ds = svhn(str(roots["svhn"] / "again"))
    images, labels = batch(ds)
    assert np.array_equal(labels["label"].numpy(), np.concatenate([written["train_y"], written["test_y"]]))
    assert (labels["label"] == 0).sum() > 0
    first = torch.from_numpy(written["train_x"][0].transpose(2, 0, 1) / 255.0).float()
    assert torch.allclose(images[0], first, atol=1e-6)
    assert ds.official_test.size == written["test_y"].size


def test_celeba_attributes_partition_and_lazy_images(roots):
    written = fx.make_celeba(roots["celeba"] / "again")
    ds = celeba(str(roots["celeba"] / "again"), main_attribute="Male", transforms=Transforms(resize=(16, 16)))
    assert ds.attributes == fx.CELEBA_ATTRIBUTES and ds.main_field == "Male"
    assert set(ds.fields) == set(fx.CELEBA_ATTRIBUTES)
    assert np.array_equal(ds.targets("Smiling"), written["values"][:, fx.CELEBA_ATTRIBUTES.index("Smiling")])
    assert np.array_equal(ds.official_test, np.flatnonzero(written["partition"] == 2))
    images, labels = batch(ds, 4)
    assert images.shape == (4, 3, 16, 16) and labels["Male"].dtype == torch.int64


def test_celeba_unknown_main_attribute_lists_the_attributes(roots):
    with pytest.raises(DataError, match="no attribute 'Happy'.*Smiling"):
        celeba(str(roots["celeba"]), main_attribute="Happy")


def test_pet_breed_species_and_trimap(roots):
    ds = pet(str(roots["pet"]), trimap=True, transforms=Transforms(resize=(12, 12)))
    rows = fx.make_pet(roots["pet"] / "unused")  # same seed and layout: what make_all wrote
    every = rows["trainval"] + rows["test"]
    assert np.array_equal(ds.targets("breed"), [cls - 1 for _, cls, _ in every])
    assert np.array_equal(ds.targets("species"), [s - 1 for _, _, s in every])
    images, labels = batch(ds, 3)
    assert labels["trimap"].shape == (3, 12, 12) and labels["trimap"].dtype == torch.int64
    assert set(labels["trimap"].unique().tolist()) <= {0, 1, 2}
    assert ds.official_test.size == len(rows["test"]) and ds.fields["trimap"].kind == "dense_class"


def test_cub_species_attributes_and_official_split(roots):
    written = fx.make_cub(roots["cub"] / "again")
    ds = cub(str(roots["cub"] / "again"), transforms=Transforms(resize=(16, 16)))
    assert np.array_equal(ds.targets("species"), written["labels"])
    assert len(ds.fields) == 1 + 312
    for a in (1, 7, 312):  # attribute 7 of image 2 sits on a line with an extra column
        assert np.array_equal(ds.targets(f"attr_{a}"), written["present"][:, a - 1])
    assert "has_part::value_7" in ds.fields["attr_7"].description
    assert np.array_equal(ds.official_test, np.flatnonzero(written["train"] == 0))


def test_pacs_domains_share_class_numbering(roots):
    photo = pacs(str(roots["pacs"]), domains=["photo"], transforms=Transforms(resize=(16, 16)))
    every = pacs(str(roots["pacs"]), transforms=Transforms(resize=(16, 16)))
    assert photo.classes == list(fx.PACS_CLASSES) and every.domains == list(fx.PACS_DOMAINS)
    assert len(photo) == 7 * 6 and len(every) == 4 * 7 * 6
    assert set(photo.targets("domain")) == {fx.PACS_DOMAINS.index("photo")}
    assert np.array_equal(np.bincount(photo.targets("class")), np.full(7, 6))  # the PNGs are read too
    with pytest.raises(DataError, match="domains \\['clipart'\\].*art_painting, cartoon, photo, sketch"):
        pacs(str(roots["pacs"]), domains=["clipart"])


def test_nyuv2_reads_npy_samples_with_dense_dtypes(roots):
    written = fx.make_nyuv2(roots["nyuv2"] / "again")
    ds = nyuv2(str(roots["nyuv2"] / "again"))
    assert len(ds) == 13 and np.array_equal(ds.official_test, np.arange(10, 13))
    images, labels = batch(ds)
    sample = written["val", 1]
    assert torch.allclose(images[11], torch.from_numpy(sample["image"].transpose(2, 0, 1)))
    assert labels["segmentation"].dtype == torch.int64 and labels["segmentation"].shape == (13, 16, 24)
    assert torch.equal(labels["segmentation"][11], torch.from_numpy(sample["label"]).long())
    assert labels["depth"].dtype == torch.float32 and labels["depth"].shape == (13, 1, 16, 24)
    assert torch.equal(labels["normals"][11], torch.from_numpy(sample["normal"].transpose(2, 0, 1)))
    assert {k: f.num_outputs for k, f in ds.fields.items()} == {"segmentation": 13, "depth": 1, "normals": 3}


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("loader, where, how", [
    (cifar10, "cifar-10-batches-py", "download = True"),
    (cifar100, "cifar-100-python", "download = True"),
    (svhn, "", "download = True"),
    (celeba, "celeba", "download = True"),
    (pet, "oxford-iiit-pet", "download = True"),
    (cub, "CUB_200_2011", "data.caltech.edu"),
    (pacs, "", "domaingeneralization"),
    (nyuv2, "", "mtan"),
])
def test_missing_data_directory_names_it_and_how_to_get_it(tmp_path, loader, where, how):
    root = tmp_path / "nothing"
    with pytest.raises(DataError, match="expected the directory") as err:
        loader(str(root))
    assert str(root / where).rstrip("/") in str(err.value) and how in str(err.value)


def test_malformed_files_are_named(tmp_path):
    fx.make_cifar10(tmp_path / "c")
    bad = tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({"data": np.zeros((2, 5), np.uint8), "labels": [0, 1]}))
    with pytest.raises(DataError, match="data_batch_3"):
        cifar10(str(tmp_path / "c"))

    fx.make_celeba(tmp_path / "f", n=8)
    attr = tmp_path / "f" / "celeba" / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0]  # an image line one value short
    attr.write_text("\n".join(lines))
    with pytest.raises(DataError, match="list_attr_celeba.txt:5"):
        celeba(str(tmp_path / "f"))

    fx.make_cub(tmp_path / "b", classes=1, train_per_class=2, test_per_class=1)
    labels_file = tmp_path / "b" / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt"
    labels_file.write_text(labels_file.read_text() + "3 999 1 1 0\n")
    with pytest.raises(DataError, match="image_attribute_labels.txt:937"):
        cub(str(tmp_path / "b"))

    fx.make_nyuv2(tmp_path / "n", n_train=2, n_val=1)
    np.save(tmp_path / "n" / "train" / "depth" / "1.npy", np.zeros((3, 3, 1), np.float32))
    with pytest.raises(DataError, match="train/depth/1.npy has shape"):
        batch(nyuv2(str(tmp_path / "n")))


# ------------------------------------------------------------------------------------ transforms
def coordinate_example(h=12, w=10):
    """An image whose pixels encode their own (row, column), and label maps that do too."""
    rows, cols = np.mgrid[0:h, 0:w]
    image = np.stack([rows, cols, np.zeros_like(rows)], axis=2).astype(np.uint8)
    dense = {"seg": (rows * w + cols).astype(np.int64), "depth": (rows * w + cols + 1).astype(np.float32),
             "normals": np.tile(np.array([0.6, 0.8, 0.0], np.float32), (h, w, 1))}
    return image, dense


def test_mask_depth_and_normals_follow_the_image_under_flip_and_crop():
    image, dense = coordinate_example()
    pipe = Transforms(crop=(6, 5), augment=[A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]).pipeline(
        {"seg": "mask", "depth": "depth", "normals": "normals"})
    flips = set()
    for seed in range(12):
        pipe.seed(seed)
        x, labels = pipe(image, dense, train=True)
        row, col = (x[0] * 255).round().long(), (x[1] * 255).round().long()
        assert torch.equal(labels["seg"], row * 10 + col)  # every pixel's label came with it
        assert torch.equal(labels["depth"][0], (row * 10 + col + 1).float())
        h_flip, v_flip = bool(col[0, 0] > col[0, 1]), bool(row[0, 0] > row[1, 0])
        flips.add((h_flip, v_flip))
        expected = torch.tensor([-0.6 if h_flip else 0.6, -0.8 if v_flip else 0.8, 0.0])
        assert torch.allclose(labels["normals"][:, 2, 3], expected)
    assert len(flips) == 4  # every combination of flips was drawn


def test_random_scale_crop_zooms_and_divides_depth_by_the_zoom():
    image, dense = coordinate_example(h=8, w=8)
    dense = {"seg": dense["seg"], "depth": np.full((8, 8), 3.0, np.float32)}
    pipe = Transforms(augment=[RandomScaleCrop(scales=(2.0,))]).pipeline({"seg": "mask", "depth": "depth"})
    pipe.seed(0)
    x, labels = pipe(image, dense, train=True)
    assert x.shape == (3, 8, 8) and torch.allclose(labels["depth"], torch.full((1, 8, 8), 1.5))
    rows = torch.unique(labels["seg"] // 8)
    assert len(rows) == 4 and int(rows.max() - rows.min()) == 3  # a 4x4 window, blown up to 8x8


def test_unsupported_geometry_with_normals_is_refused():
    with pytest.raises(ConfigError, match="RandomRotate90 would move depth or surface normals"):
        Transforms(augment=[A.RandomRotate90()]).pipeline({"normals": "normals"})
    Transforms(augment=[A.RandomRotate90()]).pipeline({"seg": "mask"})  # masks rotate fine


def test_augmentation_only_in_training_batches_seeded_and_resumable(roots):
    flip = Transforms(augment=[A.HorizontalFlip(p=1.0)])
    ds = cifar10(str(roots["cifar10"]), transforms=flip)
    idx = torch.arange(4)
    plain, _ = ds.get_batch(idx)
    flipped, _ = ds.get_train_batch(idx, seed=0)
    assert torch.equal(flipped, plain.flip(-1))

    crops = cifar10(str(roots["cifar10"]), transforms=Transforms(augment=[
        A.PadIfNeeded(min_height=40, min_width=40), A.RandomCrop(height=32, width=32)]))
    a, b, c = (crops.get_train_batch(idx, seed=s)[0] for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)

    loader = PoolLoader(crops, np.arange(len(crops)), batch_size=8, seed=1)
    next(loader)
    state = loader.state_dict()
    expected = [next(loader)[0] for _ in range(3)]
    resumed = PoolLoader(crops, np.arange(len(crops)), batch_size=8, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(e, next(resumed)[0]) for e in expected)


def test_augmentation_must_keep_the_image_size(roots):
    ds = cifar10(str(roots["cifar10"]), transforms=Transforms(augment=[A.PadIfNeeded(min_height=40, min_width=40)]))
    with pytest.raises(DataError, match="changed the image size"):
        ds.get_train_batch(torch.arange(2), seed=0)


def test_normalisation_uses_mean_and_std_per_channel(roots):
    ds = cifar10(str(roots["cifar10"]))
    norm = cifar10(str(roots["cifar10"]), transforms=Transforms(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0)))
    x, y = ds.get_batch(torch.arange(3))[0], norm.get_batch(torch.arange(3))[0]
    mean, std = torch.tensor([0.5, 0.25, 0.0]).view(3, 1, 1), torch.tensor([0.5, 0.25, 2.0]).view(3, 1, 1)
    assert torch.allclose(y, (x - mean) / std, atol=1e-6)


# ----------------------------------------------------------------------- fields, splits, tasks
def test_label_field_kinds_and_float_labels():
    depth = LabelField(kind="regression", channels=1)
    ds = TensorImageDataset(torch.zeros(4, 1, 2, 2), {"d": torch.ones(4, 1, 2, 2, dtype=torch.float64), "y": torch.arange(4.0)},
                            {"d": depth, "y": LabelField(4)}, main_field="y")
    assert ds.labels["d"].dtype == torch.float32 and ds.labels["y"].dtype == torch.int64
    assert depth.num_outputs == 1 and LabelField(13, kind="dense_class").num_outputs == 13
    with pytest.raises(ValueError, match="kind must be one of"):
        LabelField(2, kind="boxes")
    with pytest.raises(DataError, match="per-pixel labels"):
        ds.targets("d")


def test_split_uses_official_test_and_labels_fraction(roots):
    ds = celeba(str(roots["celeba"]), transforms=Transforms(resize=(8, 8)))
    split = LowDataSplit(labels_per_class=None, labels_fraction=0.5, val_per_class=1, aux_per_class=1)(ds)
    assert np.array_equal(split.test, ds.official_test)
    assert split.sizes()["labeled"] == 2 * round(0.5 * (18 - 2))  # 36 non-test images, 18 per class
    cut = LowDataSplit(labels_per_class=2, val_per_class=1, official_test=False, test_fraction=0.25)(ds)
    assert not np.array_equal(cut.test, ds.official_test) and cut.test.size == 12
    with pytest.raises(DataError, match="labels_per_class=2 and labels_fraction=0.5 are both set"):
        LowDataSplit(labels_per_class=2, labels_fraction=0.5)


def test_split_of_a_dense_main_field_is_drawn_at_random(roots):
    ds = nyuv2(str(roots["nyuv2"]))
    split = LowDataSplit(labels_per_class=None, val_per_class=2, aux_per_class=1, seed=3)(ds)
    assert split.sizes() == {"labeled": 7, "aux": 1, "unlabeled": 0, "val": 2, "test": 3}
    other = LowDataSplit(labels_per_class=None, val_per_class=2, aux_per_class=1, seed=4)(ds)
    assert not np.array_equal(split.val, other.val)


def test_field_tasks_makes_one_auxiliary_task_per_matching_field(roots):
    ds = celeba(str(roots["celeba"]), transforms=Transforms(resize=(8, 8)))
    main = Task("main", labels="Smiling", main=True)
    tasks = field_tasks(main, ds, fields="*")
    assert tasks[0] is main and len(tasks) == 40
    assert [t.labels for t in tasks[1:]] == [a for a in fx.CELEBA_ATTRIBUTES if a != "Smiling"]
    assert tasks[1].name == "_5_o_Clock_Shadow" and task_name("has::x(y)") == "has__x_y_"
    assert [t.labels for t in field_tasks(main, ds, fields="Wearing_*", exclude=["Wearing_Hat"])[1:]] == [
        "Wearing_Earrings", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie"]
    with pytest.raises(ConfigError, match="'Happy'"):
        field_tasks(main, ds, fields=["Happy"])


# --------------------------------------------------------------------------------------- recipes
DATA_RECIPES = sorted(p for p in fx.data_recipe_files(GIN) if p.parent.name == "experiments")
SMALL_SPLIT = {"LowDataSplit.val_per_class": 1, "LowDataSplit.labels_per_class": 2, "LowDataSplit.aux_per_class": 1}
SMALL = {  # per dataset: splits that fit the fixtures, small images (the backbone is small_cnn or a tiny SegNet)
    "cifar10": {**SMALL_SPLIT, "signals.exemplar.n_views": 2},
    "cifar100": SMALL_SPLIT,
    "svhn": {**SMALL_SPLIT, "signals.exemplar.n_views": 2},
    "celeba": {"LowDataSplit.val_per_class": 2, "LowDataSplit.labels_fraction": 0.5, "LowDataSplit.aux_fraction": 0.2,
               "celeba/Transforms.resize": (16, 16)},
    "pet": {"LowDataSplit.labels_per_class": 2, "pet/Transforms.resize": (20, 20), "pet/Transforms.crop": (16, 16)},
    "cub": {"cub/Transforms.resize": (20, 20), "cub/Transforms.crop": (16, 16)},
    "pacs": {**SMALL_SPLIT, "pacs/Transforms.resize": (16, 16)},
    "nyuv2": {"backbones.segnet.filters": (4, 8)},
}
#: Auxiliary tasks of the seed-paper recipes.
AUX_TASKS = {"s4l_cifar10": 2, "s4l_svhn": 2, "celeba_1pct": 39, "pet": 1, "cub_5shot": 312, "cub_10shot": 312,
             "pacs_art_painting": 3, "pacs_cartoon": 3, "pacs_photo": 3, "pacs_sketch": 3, "nyuv2_segmentation": 2}


def dataset_of(path) -> str:
    """The real-data dataset a recipe trains on (the last one ``train.dataset`` names in its includes)."""
    text = "\n".join(p.read_text() for p in sorted(fx._includes(path, GIN.resolve())))
    found = [name for name in fx.DATASETS if f"@datasets.{name}" in text or f"@target/datasets.{name}" in text]
    return found[-1]


def recipe_bindings(path, roots, steps=2) -> list[str]:
    name = dataset_of(path)
    extra = {f"datasets.{n}.root": repr(str(root)) for n, root in roots.items()}
    if name != "nyuv2":
        extra["train.backbone"] = "@backbones.small_cnn"
    extra.update({k: repr(v) for k, v in SMALL[name].items()})
    return quick_bindings(steps=steps, **extra)


def test_every_data_recipe_is_covered():
    assert {p.stem for p in DATA_RECIPES} >= set(AUX_TASKS)
    pieces = fx.data_recipe_files(GIN) - set(DATA_RECIPES)
    covered = set().union(*(fx._includes(p, GIN.resolve()) for p in DATA_RECIPES))
    assert pieces <= covered


@pytest.mark.parametrize("path", DATA_RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_builds_and_trains_on_fixtures(path, roots):
    config.parse([path], recipe_bindings(path, roots))
    result = train(run_dir=None)
    assert result["steps"] == 2 and 0.0 <= result["test"] <= 1.0
    if path.stem in AUX_TASKS:
        graph = gin.query_parameter("train.tasks").scoped_configurable_fn()
        assert len(graph.aux) == AUX_TASKS[path.stem]


def test_a_recipe_takes_another_weighting_with_one_flag(roots):
    path = GIN / "experiments/pet.gin"
    config.parse([path], recipe_bindings(path, roots) + ["include 'weightings/auxilearn_linear.gin'"])
    assert "auxilearn" in gin.config_str()
    assert train(run_dir=None)["steps"] == 2
