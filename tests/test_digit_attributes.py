"""Visual attributes measured on each digit image (auxframe/data/digit_attributes.py): each measure on
hand-made images, and the claims the module makes about how much they say about the digit."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from auxframe.data.digit_attributes import ATTRIBUTE_FIELDS, count_closed_loops, digits_attributes, measure_attributes
from auxframe.data.digits import digit_attributes, digits
from auxframe.registry import registry


def _blank(n: int = 1) -> np.ndarray:
    return np.zeros((n, 8, 8))


def test_registered_as_a_dataset_plugin():
    assert registry.get("datasets", "digits_attributes") is digits_attributes


def test_closed_loops_counts_enclosed_background():
    ring = np.zeros((5, 5), dtype=bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    assert count_closed_loops(ring) == 1
    eight = np.zeros((7, 5), dtype=bool)
    eight[[0, 3, 6], :] = True
    eight[:, [0, 4]] = True
    assert count_closed_loops(eight) == 2
    open_ring = ring.copy()
    open_ring[0, 2] = False
    assert count_closed_loops(open_ring) == 0


def test_measures_on_hand_made_images():
    x = _blank(3)
    x[0, 1:7, 1] = x[0, 1:7, 6] = x[0, 1, 1:7] = x[0, 6, 1:7] = 16  # a square ring (a zero)
    x[1, :, 3] = 16  # a vertical bar (a one)
    x[2, 0, 1:7] = 16  # a bar along the top, and a stem down the middle (a seven-like T)
    x[2, 1:8, 3] = 16
    a = measure_attributes(x)
    assert a["closed_loops"].tolist() == [1, 0, 0]
    assert a["narrow"].tolist() == [0, 1, 0]
    assert a["top_bar"].tolist() == [1, 0, 1]
    assert a["bottom_bar"].tolist() == [1, 0, 0]


def test_every_field_is_described_and_in_range():
    a = measure_attributes(load_digits().images)
    assert set(a) == set(ATTRIBUTE_FIELDS)
    for name, values in a.items():
        assert values.dtype == np.int64 and values.min() >= 0 and values.max() < ATTRIBUTE_FIELDS[name].num_classes


def test_no_attribute_is_a_function_of_the_digit_and_jointly_they_do_not_give_it_away():
    bunch = load_digits()
    y, a = bunch.target, measure_attributes(bunch.images)
    for name, v in a.items():
        mixed = [d for d in range(10) if min(np.mean(v[y == d] == 0), np.mean(v[y == d] != 0)) >= 0.05]
        assert len(mixed) >= 3, name

    def lookup_accuracy(columns: np.ndarray) -> float:
        order = np.random.default_rng(0).permutation(len(y))
        fit, held = order[: len(y) // 2], order[len(y) // 2:]
        table: dict[tuple, Counter] = defaultdict(Counter)
        for i in fit:
            table[tuple(columns[i])][y[i]] += 1
        fallback = Counter(y[fit]).most_common(1)[0][0]
        guess = [table[tuple(columns[i])].most_common(1)[0][0] if table[tuple(columns[i])] else fallback for i in held]
        return float(np.mean(np.asarray(guess) == y[held]))

    assert lookup_accuracy(np.stack(list(a.values()), axis=1)) < 0.6
    by_class = digit_attributes(y)
    assert lookup_accuracy(np.stack([by_class[k] for k in ("parity", "ge5", "loops")], axis=1)) == pytest.approx(0.70, abs=0.02)


def test_the_dataset_is_digits_with_the_attributes():
    plain, ds = digits(), digits_attributes()
    assert torch.equal(ds.images, plain.images) and ds.main_field == "digit"
    assert set(ds.fields) == set(plain.fields) | set(ATTRIBUTE_FIELDS)
    assert torch.equal(ds.labels["closed_loops"], torch.from_numpy(measure_attributes(load_digits().images)["closed_loops"]))
