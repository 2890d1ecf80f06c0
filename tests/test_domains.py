"""The digits domains of few-shot domain adaptation (auxframe/data/domains.py): each transformation
by hand, determinism per seed, disjoint stratified parts, and the dataset plugin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from auxframe.data import domains
from auxframe.data.digits import DIGITS_MEAN, DIGITS_STD, load_digit_images
from auxframe.data.domains import DOMAINS, digits_domain, domain_parts, transform
from auxframe.errors import DataError
from auxframe.registry import registry

RANDOM = {"noisy", "elastic"}


@pytest.fixture(scope="module")
def images():
    x, _ = load_digit_images()
    return x[:40]


def test_registered_as_a_dataset_plugin():
    assert registry.get("datasets", "digits_domain") is digits_domain


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_domains_are_deterministic_per_seed(images, domain):
    a, b = transform(images, domain, seed=3), transform(images, domain, seed=3)
    assert a.shape == images.shape and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0
    other = transform(images, domain, seed=4)
    if domain in RANDOM:
        assert not np.array_equal(a, other)
    else:
        assert np.array_equal(a, other)


def test_each_random_domain_has_its_own_draws(images):
    # noise and displacement fields come from different streams for the same seed
    grey = np.full((2, 8, 8), 0.5, dtype=np.float32)
    noise = transform(grey, "noisy", seed=0) - 0.5
    field = transform(np.tile(np.linspace(0, 1, 8, dtype=np.float32), (2, 8, 1)), "elastic", seed=0)
    assert not np.allclose(noise[0], noise[1]) and not np.allclose(field[0], field[1])


def test_inverted_is_one_minus_the_image(images):
    assert np.allclose(transform(images, "inverted"), 1.0 - images)


def test_thick_grows_a_pixel_into_a_two_by_two_block_right_and_down():
    x = np.zeros((1, 8, 8), dtype=np.float32)
    x[0, 2, 3] = 0.75
    expected = np.zeros_like(x)
    expected[0, 2:4, 3:5] = 0.75
    assert np.array_equal(transform(x, "thick"), expected)


def test_noisy_adds_noise_of_the_documented_std():
    grey = np.full((400, 8, 8), 0.5, dtype=np.float32)
    noise = (transform(grey, "noisy", seed=1) - 0.5).ravel()
    # clipped at +-0.5 = +-c std (c = 0.5 / 0.3): the clipped normal's variance is
    # E[Z^2; |Z| < c] + 2 c^2 P(Z > c) = 0.9156^2 (scipy.stats.norm.expect), so its std is 0.9156 * NOISE_STD
    assert abs(noise.mean()) < 0.005
    assert abs(noise.std() - 0.9156 * domains.NOISE_STD) < 0.004


def test_elastic_without_displacement_is_the_identity(images, monkeypatch):
    monkeypatch.setattr(domains, "ELASTIC_ALPHA", 0.0)
    assert np.allclose(transform(images, "elastic", seed=0), images, atol=1e-6)


def test_elastic_moves_pixels_but_keeps_the_ink_roughly(images):
    out = transform(images, "elastic", seed=0)
    assert np.abs(out - images).mean() > 0.05
    ratio = out.sum(axis=(1, 2, 3)) / images.sum(axis=(1, 2, 3))
    assert 0.7 < np.median(ratio) < 1.2


def test_blurred_keeps_each_images_maximum(images):
    out = transform(images, "blurred")
    assert np.allclose(out.max(axis=(1, 2, 3)), images.max(axis=(1, 2, 3)), atol=1e-6)
    assert not np.allclose(out, images)


def test_unknown_domain_is_a_clear_error(images):
    with pytest.raises(DataError, match="unknown digits domain 'sepia'.*inverted"):
        transform(images, "sepia")


def test_parts_are_disjoint_stratified_and_seeded():
    _, y = load_digit_images()
    parts = domain_parts(y, 5, 0.5, seed=0)
    assert sum(len(p) for p in parts) == len(y)
    assert len(np.unique(np.concatenate(parts))) == len(y)
    for c in range(10):
        n = int((y == c).sum())
        assert int((y[parts[0]] == c).sum()) == int(np.floor(0.5 * n + 0.5))
        sources = [int((y[p] == c).sum()) for p in parts[1:]]
        assert max(sources) - min(sources) <= 1
    again = domain_parts(y, 5, 0.5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(domain_parts(y, 5, 0.5, seed=1)[0], parts[0])
    with pytest.raises(DataError, match="parts must be an integer >= 2"):
        domain_parts(y, 1, 0.5)
    with pytest.raises(DataError, match="target_fraction must be in"):
        domain_parts(y, 3, 1.0)


def test_digits_domain_gives_one_part_in_one_domain():
    x, y = load_digit_images()
    target = digits_domain("original", part=0)
    source = digits_domain("inverted", part=2)
    parts = domain_parts(y, 5, 0.5, seed=0)
    assert len(target) == len(parts[0]) and len(source) == len(parts[2])
    assert set(target.fields) == {"digit"} and target.main_field == "digit" and target.input_shape == (1, 8, 8)
    assert torch.equal(target.labels["digit"], torch.from_numpy(y[parts[0]]))
    expected = (torch.from_numpy(1.0 - x[parts[2]]) - DIGITS_MEAN) / DIGITS_STD
    assert torch.allclose(source.images, expected, atol=1e-6)
    with pytest.raises(DataError, match=r"part must be an integer in \[0, 5\)"):
        digits_domain("thick", part=5)
