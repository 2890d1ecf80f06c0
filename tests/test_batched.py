"""Batched augmentation (auxframe/data/batched.py) against albumentations' per-image pipeline.

Exactly, where the random parameters are given: the batched pipeline's draws are recomputed here from
its documented order, and albumentations is run image by image with those parameters. In
distribution otherwise (flip rate, crop offsets, noise), against albumentations' own draws.
"""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from auxframe.data.base import LabelField, TensorImageDataset
from auxframe.data.batched import BatchedTransforms
from auxframe.data.digits import digits
from auxframe.data.transforms import Cutout, Transforms, _compile_batched
from auxframe.errors import ConfigError, DataError

RECIPE = [A.PadIfNeeded(36, 36, border_mode=4), A.RandomCrop(32, 32), A.HorizontalFlip()]  # datasets/cifar10.gin


def images(n: int = 6, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def as_batch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 255.0


def per_image(transform, x: np.ndarray) -> torch.Tensor:
    return as_batch(np.stack([transform(image=i)["image"] for i in x]))


@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4], ids=["constant", "replicate", "reflect", "wrap", "reflect101"])
@pytest.mark.parametrize("fill", [7, (10, 20, 30)])
def test_padding_equals_albumentations_for_every_border_mode(mode, fill):
    x = images(4, 7, 9)
    pad = dict(min_height=12, min_width=20, border_mode=mode, fill=fill)  # pads larger than the image: wraps twice
    steps, _ = _compile_batched(Transforms(augment=[A.PadIfNeeded(**pad)]), (7, 9))  # the padding albumentations computes
    out = BatchedTransforms(steps, [], (0.0,), (1.0,))(torch.from_numpy(x), seed=0)  # (no size check: it grows)
    assert torch.equal(out, per_image(A.PadIfNeeded(**pad), x))


def test_recipe_equals_albumentations_with_the_drawn_offsets_and_flips():
    x = images(16)
    seed = 1234
    batched = Transforms(augment=RECIPE).batched((32, 32))
    out = batched(torch.from_numpy(x), seed=seed)
    # the batched pipeline's documented draws: crop tops, crop lefts, then one uniform per flip
    g = torch.Generator().manual_seed(seed)
    tops, lefts = torch.randint(0, 5, (16,), generator=g), torch.randint(0, 5, (16,), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    assert 0 < int(flips.sum()) < 16 and len(set(tops.tolist())) > 1
    for i in range(16):
        top, left = int(tops[i]), int(lefts[i])
        reference = A.Compose([A.PadIfNeeded(36, 36, border_mode=4),
                               A.Crop(x_min=left, y_min=top, x_max=left + 32, y_max=top + 32),
                               A.HorizontalFlip(p=1.0 if flips[i] else 0.0)])
        assert torch.equal(out[i], as_batch(reference(image=x[i])["image"][None])[0]), i


def test_evaluation_batches_equal_the_per_image_pipeline_exactly():
    x = images(5, 36, 34)
    t = Transforms(crop=(32, 30), augment=RECIPE[2:], mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    pipe = t.pipeline()
    reference = torch.stack([pipe(i)[0] for i in x])
    assert torch.equal(t.batched((36, 34))(torch.from_numpy(x)), reference)  # seed None: evaluation form
    assert t.batched((36, 34))(torch.from_numpy(x), seed=3).shape == (5, 3, 32, 30)


def test_fixed_crop_and_vertical_flip_equal_albumentations():
    x = images(3, 10, 12)
    ops = [A.Crop(x_min=2, y_min=1, x_max=10, y_max=8), A.VerticalFlip(p=1.0)]
    steps, _ = _compile_batched(Transforms(augment=ops), (10, 12))
    out = BatchedTransforms(steps, [], (0.0,), (1.0,))(torch.from_numpy(x), seed=0)
    assert torch.equal(out, per_image(A.Compose(ops), x))


def test_cutout_equals_its_per_image_form_at_the_drawn_centre():
    x = images(8, 16, 16)
    cut = Cutout(size=6, fill=(1, 2, 3), p=1.0)
    out = Transforms(augment=[cut]).batched((16, 16))(torch.from_numpy(x), seed=9)
    g = torch.Generator().manual_seed(9)
    rows, cols = torch.randint(0, 16, (8,), generator=g), torch.randint(0, 16, (8,), generator=g)
    for i in range(8):
        expected = cut.apply(x[i], centre=(int(rows[i]), int(cols[i])))
        assert torch.equal(out[i], as_batch(expected[None])[0]), i
    assert bool((out * 255 == torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)).any())  # the fill is there


def coordinates(n: int, size: int = 32) -> np.ndarray:
    """Images whose pixels hold their own row (channel 0) and column (channel 1)."""
    rows, cols = np.mgrid[0:size, 0:size]
    return np.broadcast_to(np.stack([rows, cols, np.zeros_like(rows)], axis=2), (n, size, size, 3)).astype(np.uint8)


def test_flip_rate_and_crop_offsets_match_albumentations_in_distribution():
    n = 3000
    x = coordinates(n)
    batched = Transforms(augment=RECIPE).batched((32, 32))
    out = (batched(torch.from_numpy(x), seed=5) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    pipe = Transforms(augment=RECIPE).pipeline()
    pipe.seed(5)
    ref = np.stack([(pipe(i, train=True)[0] * 255).round().byte().permute(1, 2, 0).numpy() for i in x])
    # Reflect-101 padding by 2, a 32 crop at (top, left): output pixel (16, 16) holds stored row
    # top + 14 and column left + 14; flipped, the columns run backwards and output column 15 holds it.
    for sample in (out, ref):
        tops = sample[:, 16, 16, 0].astype(int) - 14
        flipped = sample[:, 16, 17, 1].astype(int) < sample[:, 16, 16, 1].astype(int)
        lefts = np.where(flipped, sample[:, 16, 15, 1].astype(int) - 14, sample[:, 16, 16, 1].astype(int) - 14)
        assert abs(flipped.mean() - 0.5) < 4 * np.sqrt(0.25 / n)  # flip rate 1/2 (4 standard errors)
        for offsets in (tops, lefts):
            counts = np.bincount(offsets, minlength=5)
            assert offsets.min() == 0 and offsets.max() == 4 and counts.size == 5
            expected = n / 5  # uniform over 0..4
            assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected * 0.8)), counts


def test_gauss_noise_matches_albumentations_in_distribution():
    n, sigma = 400, 0.15
    x = np.full((n, 16, 16, 3), 128, np.uint8)
    noise = A.GaussNoise(std_range=(sigma, sigma), p=0.5)
    out = Transforms(augment=[noise]).batched((16, 16))(torch.from_numpy(x), seed=2) * 255 - 128
    ref = per_image(A.Compose([noise], seed=2), x) * 255 - 128
    for sample in (out, ref):
        noised = sample.flatten(1).abs().amax(1) > 0
        assert abs(float(noised.float().mean()) - 0.5) < 4 * np.sqrt(0.25 / n)  # p = 0.5 per image
        std = float(sample[noised].std())
        assert abs(std - sigma * 255) < 0.03 * sigma * 255, std  # 38.25 pixel levels, clipping aside
    assert torch.equal(out, out.round())  # uint8 sources stay on the 1/255 grid


def test_digits_augment_on_whole_batches_and_evaluation_is_untouched():
    t = Transforms(augment=[A.PadIfNeeded(10, 10, border_mode=0, fill=0), A.RandomCrop(8, 8)])
    plain, shifted = digits(), digits(transforms=t)
    idx = torch.arange(64)
    assert torch.equal(shifted.get_batch(idx)[0], plain.get_batch(idx)[0])
    a, b = shifted.get_train_batch(idx, seed=1)[0], shifted.get_train_batch(idx, seed=1)[0]
    assert torch.equal(a, b) and not torch.equal(a, plain.get_batch(idx)[0])
    moved = (a != plain.get_batch(idx)[0]).flatten(1).any(1).float().mean()
    assert 0.7 < float(moved) < 1.0  # 8 of 9 offsets move the image
    assert shifted.input_shape == (1, 8, 8)
    with pytest.raises(ConfigError, match="dense=True"):
        digits(dense=True, transforms=t)


def test_steps_without_a_batched_form_are_named():
    data = TensorImageDataset(torch.zeros(4, 3, 8, 8), {"y": torch.zeros(4)}, {"y": LabelField(1)}, "y")
    assert data.batched is None
    with pytest.raises(ConfigError, match="RandomRotate90 has no batched form"):
        TensorImageDataset(data.images, data.labels, data.fields, "y", transforms=Transforms(augment=[A.RandomRotate90()]))
    assert Transforms(augment=[A.RandomRotate90()]).batched((8, 8)) is None  # 'auto': image by image
    assert "resize" in Transforms(resize=(4, 4)).batched_reason((8, 8))
    with pytest.raises(ConfigError, match="Transforms.batched = True, but GaussNoise with noise_scale_factor"):
        Transforms(augment=[A.GaussNoise(noise_scale_factor=0.5)], batched=True).batched((8, 8))
    assert Transforms(augment=RECIPE, batched=False).batched((32, 32)) is None
    with pytest.raises(DataError, match="changed the image size"):
        Transforms(augment=[A.PadIfNeeded(40, 40)]).batched((32, 32))(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), seed=0)
