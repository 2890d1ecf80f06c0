"""The planted synthetic dataset: determinism, the label statistics each kind promises, and a short
training check that the helpful task helps and the adversarial one hurts the main task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from auxframe import config
from auxframe.data.synthetic import sector, synthetic
from auxframe.errors import DataError
from auxframe.experiment import train
from auxframe.registry import registry
from helpers import GIN


def test_registered_as_a_dataset_plugin():
    assert registry.get("datasets", "synthetic") is synthetic


def test_fields_shapes_and_determinism():
    ds = synthetic(num_examples=500, num_helpful=2, num_redundant=1, num_noise=3, num_adversarial=2, seed=3)
    assert set(ds.fields) == {"main", "helpful_0", "helpful_1", "redundant_0", "noise_0", "noise_1", "noise_2",
                              "adversarial_0", "adversarial_1"}
    assert ds.main_field == "main" and ds.input_shape == (1, 8, 8) and len(ds) == 500
    for name, f in ds.fields.items():
        labels = ds.targets(name)
        assert labels.min() >= 0 and labels.max() < f.num_classes
    again = synthetic(num_examples=500, num_helpful=2, num_redundant=1, num_noise=3, num_adversarial=2, seed=3)
    assert torch.equal(ds.images, again.images) and all(torch.equal(ds.labels[k], again.labels[k]) for k in ds.fields)
    other = synthetic(num_examples=500, num_helpful=2, num_redundant=1, num_noise=3, num_adversarial=2, seed=4)
    assert not torch.equal(ds.images, other.images) and not torch.equal(ds.labels["noise_0"], other.labels["noise_0"])
    assert synthetic(num_examples=10, image_shape=(3, 4, 4)).images.shape == (10, 3, 4, 4)


def test_sector_matches_the_angle_by_hand():
    # angles 45, 135, 225, 315 and 5.7 degrees
    points = np.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [1.0, 0.1]])
    assert sector(points, 4).tolist() == [0, 1, 2, 3, 0]
    # a phase of pi/2 makes sector 0 start on the positive y axis
    assert sector(points, 4, np.pi / 2).tolist() == [3, 0, 1, 2, 3]
    assert sector(points, 8).tolist() == [1, 3, 5, 7, 0]


def test_main_classes_are_balanced():
    ds = synthetic(num_examples=20_000, main_classes=5, seed=1)
    freq = np.bincount(ds.targets("main"), minlength=5) / 20_000
    assert np.all(np.abs(freq - 0.2) < 4 * np.sqrt(0.2 * 0.8 / 20_000))  # binomial, 4 standard deviations


@pytest.mark.parametrize("flip", [0.0, 0.3])
def test_redundant_labels_agree_with_main_at_the_configured_rate(flip):
    n = 20_000
    ds = synthetic(num_examples=n, num_redundant=2, redundant_noise=flip, seed=2)
    main = ds.targets("main")
    for name in ("redundant_0", "redundant_1"):
        agree = (ds.targets(name) == main).mean()
        assert abs(agree - (1 - flip)) <= 4 * np.sqrt(flip * (1 - flip) / n) + 1e-12
    # the two redundant tasks' noise is independent: both wrong at rate flip^2
    both_wrong = ((ds.targets("redundant_0") != main) & (ds.targets("redundant_1") != main)).mean()
    assert abs(both_wrong - flip**2) <= 4 * np.sqrt(flip**2 * (1 - flip**2) / n) + 1e-12


def _held_out_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    half = len(y) // 2
    clf = LogisticRegression(max_iter=500).fit(x[:half], y[:half])
    return float((clf.predict(x[half:]) == y[half:]).mean())


def test_noise_labels_cannot_be_predicted_from_inputs_but_the_others_can():
    n = 6_000
    ds = synthetic(num_examples=n, seed=5, noise_classes=4)
    x = ds.images.reshape(n, -1).numpy()
    test_n = n - n // 2
    chance_bound = 0.25 + 4 * np.sqrt(0.25 * 0.75 / test_n)
    assert _held_out_accuracy(x, ds.targets("noise_0")) < chance_bound
    # the same classifier does learn the labels that depend on the input
    assert _held_out_accuracy(x, ds.targets("main")) > 0.5
    assert _held_out_accuracy(x, ds.targets("adversarial_0")) > 0.3  # 16 classes: chance 1/16


def test_helpful_and_main_share_the_latent_and_adversarial_does_not():
    """Without pixel noise, the main label is a function of the helpful labels' latent and not of the
    adversarial latent: mutual information between main and adversarial labels is near zero."""
    n = 20_000
    ds = synthetic(num_examples=n, seed=6, noise_std=0.0, helpful_classes=16)
    main, helpful, adv = (ds.targets(k) for k in ("main", "helpful_0", "adversarial_0"))

    def mutual_information(a, b):
        joint = np.histogram2d(a, b, bins=(a.max() + 1, b.max() + 1))[0] / len(a)
        outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
        nz = joint > 0
        return float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())

    assert mutual_information(main, helpful) > 0.5  # nats; H(main) = log 4 = 1.39
    # plug-in bias of MI for independent labels is about (4 - 1) * (16 - 1) / (2 n) = 0.001 nats
    assert mutual_information(main, adv) < 0.005
    assert mutual_information(main, ds.targets("noise_0")) < 0.005


@pytest.mark.parametrize("kwargs, words", [
    ({"latent_dim": 1}, ["latent_dim", ">= 2"]),
    ({"redundant_noise": 1.0}, ["redundant_noise", "[0.0, 1.0)"]),
    ({"image_shape": (1, 2, 2), "num_adversarial": 2}, ["4 pixels", "6 orthogonal directions", "enlarge image_shape"]),
    ({"num_noise": -1}, ["num_noise", ">= 0"]),
    ({"image_shape": (8, 8)}, ["(C, H, W)"]),
])
def test_bad_parameters_get_clear_errors(kwargs, words):
    with pytest.raises(DataError) as err:
        synthetic(num_examples=10, **kwargs)
    for w in words:
        assert w in str(err.value)


# -- training: the planted tasks do what they are planted for -------------------------------------
def _main_test_accuracy(tasks: list[str], weighting: str, seed: int) -> float:
    bindings = [
        "train.steps = 100", "train.eval_every = 0", "train.log_every = 50", "train.progress = False",
        "train.device = 'cpu'", f"train.seed = {seed}", f"datasets.synthetic.seed = {seed}", f"LowDataSplit.seed = {seed}",
        f"TaskGraph.tasks = [{', '.join(f'@{t}/Task()' for t in tasks)}]", f"train.weighting = @weightings.{weighting}()",
    ]
    config.parse([GIN / "experiments/synthetic_equal.gin"], bindings)
    return train(run_dir=None)["test"]


def test_helpful_task_helps_and_adversarial_task_hurts_the_main_task():
    # Measured on seeds 0-7 (100 steps): helpful - STL in [0.073, 0.111], STL - adversarial in
    # [0.037, 0.101] test accuracy (at 150 steps: [0.089, 0.158] and [0.055, 0.103]).
    gains, losses = [], []
    for seed in range(3):
        stl = _main_test_accuracy(["main"], "stl", seed)
        gains.append(_main_test_accuracy(["main", "helpful"], "equal", seed) - stl)
        losses.append(stl - _main_test_accuracy(["main", "adversarial"], "equal", seed))
    assert min(gains) >= 0.0 and np.mean(gains) > 0.03, gains
    assert min(losses) > 0.0 and np.mean(losses) > 0.03, losses
