"""The Exemplar signal: layout, determinism, each augmentation as documented; signal tasks end to end."""

from __future__ import annotations

import gin
import pytest
import torch

from auxframe import config
from auxframe.data.digits import digits
from auxframe.data.signals import Exemplar, Rotation
from auxframe.errors import ConfigError, DataError
from auxframe.experiment import build_model, resolve_tasks, train
from auxframe.registry import registry
from auxframe.tasks import Task, TaskGraph
from helpers import GIN, quick_bindings


def batch(b: int = 3, c: int = 2, h: int = 6, w: int = 5) -> torch.Tensor:
    return torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)


def test_views_are_the_batch_repeated_view_by_view_with_instance_ids():
    images = batch()
    views, ids = Exemplar(n_views=4, noise_std=0.0, cutout_fraction=0.0, flip_prob=0.0)(images, torch.Generator().manual_seed(0))
    assert views.shape == (12, 2, 6, 5) and ids.dtype == torch.int64
    assert ids.tolist() == [0, 1, 2] * 4
    assert torch.equal(views, images.repeat(4, 1, 1, 1))  # every augmentation off: exact copies


def test_same_seed_same_views_other_seed_other_views_and_evaluation_is_fixed():
    images = batch()
    signal = Exemplar(n_views=3)
    a = signal(images, torch.Generator().manual_seed(5))[0]
    b = signal(images, torch.Generator().manual_seed(5))[0]
    c = signal(images, torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    e1 = signal(images, torch.Generator().manual_seed(1), train=False)[0]
    e2 = signal(images, None, train=False)[0]
    assert torch.equal(e1, e2)  # evaluation ignores the generator: same views every time


def test_flip_is_horizontal_and_drawn_per_copy():
    images = batch()
    always, _ = Exemplar(n_views=2, flip_prob=1.0, noise_std=0.0, cutout_fraction=0.0)(images)
    assert torch.equal(always, images.flip(-1).repeat(2, 1, 1, 1))
    views, _ = Exemplar(n_views=8, flip_prob=0.5, noise_std=0.0, cutout_fraction=0.0)(images, torch.Generator().manual_seed(0))
    expected = torch.rand(24, generator=torch.Generator().manual_seed(0)) < 0.5  # the first draw: one uniform per copy
    for k in range(24):
        source = images[k % 3]
        assert torch.equal(views[k], source.flip(-1) if expected[k] else source)
    assert 0 < int(expected.sum()) < 24


def test_noise_is_gaussian_with_the_given_deviation_from_the_generator():
    images = torch.zeros(4, 3, 16, 16)
    views, _ = Exemplar(n_views=8, flip_prob=0.0, noise_std=0.2, cutout_fraction=0.0)(images, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    torch.rand(32, generator=g)  # flip draws come first
    assert torch.allclose(views, 0.2 * torch.randn(32, 3, 16, 16, generator=g))
    assert abs(float(views.std()) - 0.2) < 0.01 and abs(float(views.mean())) < 0.01


def test_cutout_is_one_clipped_square_at_the_drawn_centre():
    images = torch.ones(5, 1, 16, 16)
    views, _ = Exemplar(n_views=4, flip_prob=0.0, noise_std=0.0, cutout_fraction=0.25, cutout_fill=-1.0)(
        images, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    torch.rand(20, generator=g)
    rows, cols = torch.randint(0, 16, (20,), generator=g), torch.randint(0, 16, (20,), generator=g)
    side = 4  # 0.25 * 16
    for k in range(20):
        expected = torch.ones(16, 16)
        top, left = int(rows[k]) - side // 2, int(cols[k]) - side // 2
        expected[max(top, 0):max(top + side, 0), max(left, 0):max(left + side, 0)] = -1.0
        assert torch.equal(views[k, 0], expected), k
        cut = int((views[k, 0] == -1).sum())
        assert cut <= side * side and (cut == side * side or not (2 <= rows[k] <= 13 and 2 <= cols[k] <= 13))


def test_bad_settings_and_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match=r"signals.exemplar.n_views = 1: it must be an integer >= 2"):
        Exemplar(n_views=1)
    with pytest.raises(ConfigError, match="cutout_fraction"):
        Exemplar(cutout_fraction=1.5)
    with pytest.raises(DataError, match=r"Exemplar needs a batch of images \(B, C, H, W\)"):
        Exemplar()(torch.zeros(3, 8, 8))


# -- heads sized by the signals, end to end -----------------------------------------------------------
def test_rotation_gets_a_four_class_head_and_exemplar_an_embedding_head():
    data = digits()
    graph = TaskGraph([
        Task("digit", labels="digit", main=True),
        Task("rot", signal=Rotation()),
        Task("ex", signal=Exemplar(n_views=2, embedding_dim=12), head="embedding", loss="triplet", metric="retrieval"),
    ])
    resolved = resolve_tasks(graph, data)
    assert resolved["rot"].num_outputs == 4 and resolved["ex"].num_outputs == 12
    model = build_model(registry.get("backbones", "small_cnn"), graph, resolved, data)  # dry-runs losses and metrics
    x = torch.zeros(3, *data.input_shape)
    assert model(x, tasks=["rot"])["rot"].shape == (3, 4)
    assert model(x, tasks=["ex"])["ex"].shape == (3, 12)


def test_digits_with_an_exemplar_auxiliary_task_trains_two_steps(tmp_path):
    gin.clear_config()
    files = [GIN / f for f in ("base/train.gin", "datasets/digits.gin", "models/small_cnn.gin",
                                "tasks/digits_main.gin", "weightings/equal.gin")]
    config.parse(files, quick_bindings(steps=2) + [
        "exemplar/Task.name = 'exemplar'",
        "exemplar/Task.signal = @signals.exemplar()",
        "exemplar/Task.head = @heads.embedding",
        "exemplar/Task.loss = @losses.triplet",
        "exemplar/Task.metric = @metrics.retrieval",
        "signals.exemplar.n_views = 4",
        "signals.exemplar.embedding_dim = 16",
        "TaskGraph.tasks = [@digit/Task(), @exemplar/Task()]",
        "train.pool_batch_sizes = {'train': 8}",
        "train.eval_batch_size = 64",
    ])
    result = train(run_dir=tmp_path / "run")
    assert result["steps"] == 2 and result["main_task"] == "digit"
    assert 0.0 <= result["metrics"]["test/exemplar/retrieval_accuracy"] <= 1.0
    assert result["metrics"]["test/exemplar/loss"] > 0.0
    assert set(result["weights"]) == {"digit", "exemplar"}
