"""Tests of the digits dataset, the low-data splitter and the rotation signal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from auxframe.data.base import LabelField, TensorImageDataset
from auxframe.data.digits import DIGITS_MEAN, DIGITS_STD, digits
from auxframe.data.signals import Rotation
from auxframe.data.splits import LowDataSplit, Split
from auxframe.errors import DataError

# ----------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digit_data() -> TensorImageDataset:
    return digits()


def test_digits_shapes_dtypes_and_fields(digit_data):
    assert len(digit_data) == 1797
    assert digit_data.images.shape == (1797, 1, 8, 8)
    assert digit_data.images.dtype == torch.float32
    assert digit_data.input_shape == (1, 8, 8)
    assert digit_data.main_field == "digit"
    expected = {"digit": 10, "parity": 2, "ge5": 2, "loops": 3}
    assert {k: f.num_classes for k, f in digit_data.fields.items()} == expected
    for name, field in digit_data.fields.items():
        assert field.description, name
        labels = digit_data.labels[name]
        assert labels.dtype == torch.int64
        assert labels.min() >= 0 and labels.max() == field.num_classes - 1


def test_digits_attributes_match_digit_for_every_example(digit_data):
    d = digit_data.targets("digit")
    assert np.array_equal(digit_data.targets("parity"), d % 2)
    assert np.array_equal(digit_data.targets("ge5"), (d >= 5).astype(np.int64))
    loops = {0: 1, 6: 1, 9: 1, 8: 2, 4: 0, 1: 0, 2: 0, 3: 0, 5: 0, 7: 0}
    assert np.array_equal(digit_data.targets("loops"), np.array([loops[int(x)] for x in d]))


def test_digits_scaling_and_normalisation(digit_data):
    raw = digits(normalize=False).images
    assert raw.min() == 0.0 and raw.max() == 1.0
    assert raw.mean().item() == pytest.approx(DIGITS_MEAN, abs=1e-5)
    assert raw.std(unbiased=False).item() == pytest.approx(DIGITS_STD, abs=1e-5)
    norm = digit_data.images
    assert norm.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert norm.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(norm * DIGITS_STD + DIGITS_MEAN, raw, atol=1e-6)


# -------------------------------------------------------------------------------------- splitter


def make_dataset(counts: list[int], extra_field: bool = False) -> TensorImageDataset:
    """A tiny dataset with ``counts[c]`` examples of class c, classes interleaved."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    labels = np.random.default_rng(123).permutation(labels)
    n = labels.size
    fields = {"y": LabelField(len(counts))}
    tensors = {"y": torch.from_numpy(labels).long()}
    if extra_field:
        fields["half"] = LabelField(2)
        tensors["half"] = (torch.arange(n) % 2).long()
    return TensorImageDataset(torch.zeros(n, 1, 2, 2), tensors, fields, main_field="y")


def per_class(indices: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(targets[indices], minlength=num_classes)


COUNTS = [50, 40, 61, 33]


@pytest.fixture
def data():
    return make_dataset(COUNTS)


def test_exact_per_class_counts(data):
    split = LowDataSplit(labels_per_class=5, aux_per_class=2, val_per_class=3, seed=1)(data)
    y = data.targets("y")
    assert per_class(split.labeled, y, 4).tolist() == [5, 5, 5, 5]
    assert per_class(split.aux, y, 4).tolist() == [2, 2, 2, 2]
    assert per_class(split.val, y, 4).tolist() == [3, 3, 3, 3]
    assert split.sizes() == {
        "labeled": 20, "aux": 8, "val": 12, "test": split.test.size,
        "unlabeled": len(data) - 40 - split.test.size,
    }


def test_test_split_is_stratified(data):
    split = LowDataSplit(test_fraction=0.3)(data)
    got = per_class(split.test, data.targets("y"), 4)
    for c, n in enumerate(COUNTS):
        assert abs(got[c] - 0.3 * n) <= 1, (c, got[c], n)


def test_parts_partition_the_dataset(data):
    split = LowDataSplit(labels_per_class=4, aux_per_class=1, seed=5)(data)
    parts = [split.labeled, split.aux, split.unlabeled, split.val, split.test]
    for part in parts:
        assert part.dtype == np.int64
        assert np.array_equal(part, np.sort(part))
    joined = np.concatenate(parts)
    assert joined.size == len(data)  # disjoint ...
    assert np.array_equal(np.sort(joined), np.arange(len(data)))  # ... and covering
    assert all(part.size > 0 for part in parts)


def test_deterministic_for_a_seed_and_different_across_seeds(data):
    a = LowDataSplit(seed=3)(data)
    b = LowDataSplit(seed=3)(data)
    c = LowDataSplit(seed=4)(data)
    for name in ("labeled", "aux", "unlabeled", "val", "test"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.labeled, c.labeled)
    assert not np.array_equal(a.test, c.test)


def test_pool_unions(data):
    split = LowDataSplit(labels_per_class=3, aux_per_class=2)(data)
    train = split.pool("train")
    assert np.array_equal(train, np.union1d(split.labeled, split.unlabeled))
    assert np.intersect1d(train, split.aux).size == 0
    both = split.pool("labeled+aux")
    assert np.array_equal(both, np.sort(np.concatenate([split.labeled, split.aux])))
    assert np.array_equal(split.pool(" aux + labeled "), both)
    assert np.array_equal(split.pool("labeled+labeled"), split.labeled)
    assert np.array_equal(split.pool("all"), np.arange(len(data)))
    assert set(Split.POOLS) == {"labeled", "aux", "unlabeled", "val", "test", "train", "all"}


def test_unknown_pool_lists_valid_names(data):
    split = LowDataSplit(labels_per_class=3)(data)
    with pytest.raises(DataError, match="unknown split pool 'lab'") as err:
        split.pool("lab+aux")
    for name in Split.POOLS:
        assert name in str(err.value)


def test_labels_none_takes_the_whole_training_pool(data):
    split = LowDataSplit(labels_per_class=None, aux_per_class=2)(data)
    assert split.unlabeled.size == 0
    assert per_class(split.aux, data.targets("y"), 4).tolist() == [2, 2, 2, 2]
    assert split.labeled.size == len(data) - split.val.size - split.test.size - 8


def test_fraction_variants():
    data = make_dataset([100, 100])
    split = LowDataSplit(labels_per_class=10, aux_fraction=0.25, val_fraction=0.2,
                         test_fraction=0.4)(data)
    y = data.targets("y")
    # per class: test 40, val 20% of 60 = 12, pool 48, aux 25% of 48 = 12, labeled 10, rest 26
    assert per_class(split.test, y, 2).tolist() == [40, 40]
    assert per_class(split.val, y, 2).tolist() == [12, 12]
    assert per_class(split.aux, y, 2).tolist() == [12, 12]
    assert per_class(split.labeled, y, 2).tolist() == [10, 10]
    assert per_class(split.unlabeled, y, 2).tolist() == [26, 26]


def test_val_per_class_wins_over_val_fraction():
    data = make_dataset([100, 100])
    split = LowDataSplit(val_per_class=7, val_fraction=0.5)(data)
    assert per_class(split.val, data.targets("y"), 2).tolist() == [7, 7]


def test_stratify_on_another_field():
    data = make_dataset([30, 30, 30], extra_field=True)
    split = LowDataSplit(labels_per_class=4, stratify_on="half")(data)
    assert per_class(split.labeled, data.targets("half"), 2).tolist() == [4, 4]
    with pytest.raises(DataError, match="no label field 'nope'"):
        LowDataSplit(stratify_on="nope")(data)


def test_missing_labels_go_to_unlabeled():
    y = torch.tensor([0] * 20 + [1] * 20 + [-1] * 5)
    data = TensorImageDataset(torch.zeros(45, 1, 2, 2), {"y": y}, {"y": LabelField(2)}, "y")
    split = LowDataSplit(labels_per_class=3)(data)
    assert set(range(40, 45)) <= set(split.unlabeled.tolist())
    assert np.all(y.numpy()[split.pool("labeled+val+test")] >= 0)


def test_error_class_too_small_for_labels():
    data = make_dataset([50, 12, 50])
    # class 1: 12 -> test round(3.6)=4 -> 8 -> val round(0.8)=1 -> 7 training images
    with pytest.raises(DataError) as err:
        LowDataSplit(labels_per_class=10)(data)
    msg = str(err.value)
    assert "class 1" in msg and "has 7 training images" in msg
    assert "labels_per_class=10" in msg and "lower labels_per_class" in msg


def test_error_class_too_small_for_labels_plus_aux():
    data = make_dataset([50, 12, 50])
    with pytest.raises(DataError) as err:
        LowDataSplit(labels_per_class=5, aux_per_class=3)(data)
    msg = str(err.value)
    assert "class 1" in msg and "7 training images" in msg and "asks for 8" in msg
    assert "labels_per_class=5" in msg and "aux_per_class" in msg


def test_error_aux_larger_than_training_set():
    data = make_dataset([50, 12, 50])
    with pytest.raises(DataError) as err:
        LowDataSplit(labels_per_class=1, aux_per_class=9)(data)
    msg = str(err.value)
    assert "auxiliary set is larger than the training set" in msg
    assert "class 1" in msg and "7 training images" in msg
    assert "aux_per_class=9" in msg and "lower aux_per_class" in msg


def test_error_val_per_class_too_large():
    data = make_dataset([50, 10])
    with pytest.raises(DataError) as err:
        LowDataSplit(val_per_class=8)(data)
    msg = str(err.value)
    assert "class 1" in msg and "has 7 images after the test split" in msg
    assert "val_per_class=8" in msg


@pytest.mark.parametrize(
    "kwargs, part, parameter",
    [
        ({"test_fraction": 0.0}, "test", "test_fraction"),
        ({"val_fraction": 0.0}, "val", "val_fraction"),
        ({"val_fraction": None}, "val", "val_per_class"),
        ({"labels_per_class": 0}, "labeled", "labels_per_class"),
    ],
)
def test_error_empty_split(data, kwargs, part, parameter):
    with pytest.raises(DataError, match=f"the {part} split is empty") as err:
        LowDataSplit(**kwargs)(data)
    assert parameter in str(err.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"labels_per_class": -1}, ["labels_per_class", ">= 0", "-1"]),
        ({"aux_per_class": -2}, ["aux_per_class", "-2"]),
        ({"val_per_class": 2.5}, ["val_per_class", "whole number"]),
        ({"test_fraction": 1.0}, ["test_fraction", "[0, 1)"]),
        ({"val_fraction": -0.1}, ["val_fraction", "[0, 1)"]),
        ({"aux_fraction": 1.5}, ["aux_fraction", "[0, 1)"]),
        ({"aux_per_class": 2, "aux_fraction": 0.1},
         ["aux_per_class=2", "aux_fraction=0.1", "None"]),
        ({"seed": "x"}, ["seed"]),
    ],
)
def test_invalid_arguments(kwargs, words):
    with pytest.raises(DataError) as err:
        LowDataSplit(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_digits_protocol_split(digit_data):
    split = LowDataSplit(labels_per_class=5, aux_per_class=2, seed=0)(digit_data)
    y = digit_data.targets("digit")
    assert per_class(split.labeled, y, 10).tolist() == [5] * 10
    assert per_class(split.aux, y, 10).tolist() == [2] * 10
    assert abs(split.test.size - 0.3 * 1797) <= 10
    assert sum(split.sizes().values()) == 1797


# -------------------------------------------------------------------------------------- rotation


@pytest.fixture
def batch():
    return torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("train", [True, False])
def test_all_rotations_labels_and_inverse(batch, train):
    signal = Rotation()
    assert signal.num_classes == 4
    images, labels = signal(batch, train=train)
    assert images.shape == (24, 3, 5, 5)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 6
    for i in range(24):
        back = torch.rot90(images[i], -int(labels[i]), dims=(1, 2))
        assert torch.equal(back, batch[i % 6])
    assert not torch.equal(images[6], batch[0])  # 90 degrees really rotates


def test_random_rotation_labels_and_inverse(batch):
    images, labels = Rotation(all_rotations=False)(batch, torch.Generator().manual_seed(1))
    assert images.shape == batch.shape
    assert labels.shape == (6,) and labels.dtype == torch.int64
    assert ((labels >= 0) & (labels < 4)).all()
    for i in range(6):
        back = torch.rot90(images[i], -int(labels[i]), dims=(1, 2))
        assert torch.equal(back, batch[i])


def test_random_rotation_uses_the_generator():
    signal = Rotation(all_rotations=False)
    x = torch.randn(64, 1, 4, 4)
    _, a = signal(x, torch.Generator().manual_seed(7))
    _, b = signal(x, torch.Generator().manual_seed(7))
    _, c = signal(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(set(a.tolist())) == 4


def test_random_mode_gives_all_four_at_evaluation(batch):
    images, labels = Rotation(all_rotations=False)(batch, train=False)
    assert images.shape[0] == 24
    assert torch.bincount(labels).tolist() == [6, 6, 6, 6]


def test_non_square_images_are_refused():
    with pytest.raises(DataError) as err:
        Rotation()(torch.zeros(2, 3, 4, 6))
    msg = str(err.value)
    assert "square" in msg and "(3, 4, 6)" in msg and "crop" in msg


def test_dense_digits_fields_follow_the_pixels():
    from auxframe.data.digits import STROKE_THRESHOLD, digits, load_digit_images

    data = digits(dense=True)
    raw, labels = load_digit_images()
    stroke = data.labels["stroke"]
    assert stroke.shape == (1797, 8, 8) and data.fields["digit_map"].num_classes == 11
    assert torch.equal(stroke, torch.from_numpy((raw[:, 0] * 16 >= STROKE_THRESHOLD).astype("int64")))
    dmap = data.labels["digit_map"]
    assert torch.equal(dmap[stroke == 0], torch.zeros_like(dmap[stroke == 0]))
    expected = (torch.from_numpy(labels) + 1)[:, None, None].expand(-1, 8, 8)
    assert torch.equal(dmap[stroke == 1], expected[stroke == 1])
    assert "stroke" not in digits().fields


def test_dense_field_cannot_be_stratified_on():
    from auxframe.data.digits import digits

    with pytest.raises(DataError, match="per-pixel labels.*stratify_on = 'digit'"):
        digits(dense=True).targets("stroke")
