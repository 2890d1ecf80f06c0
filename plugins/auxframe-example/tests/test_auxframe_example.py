"""Tests of the example plugins; a plugin package's own tests can look like this.

The contract tests come from auxframe's kit: the conftest.py loads ``auxframe.testing.plugin`` and
the import below brings one test per entry point of this package (shapes, gradients, determinism,
device, exact resume); the tests here check what is particular to each plugin.
"""

from __future__ import annotations

from importlib import metadata

import pytest
import torch
import torch.nn as nn

from auxframe.errors import ConfigError
from auxframe.registry import Registry
from auxframe.testing import check_weighting
from auxframe.testing.contracts import *  # noqa: F401,F403 - one contract test per entry point
from auxframe.weighting import StepContext, TaskLosses, WeightingSetup
from auxframe_example.backbones import ExampleResNet
from auxframe_example.weighting import AuxAnneal


def _setup(total_steps: int) -> WeightingSetup:
    model = nn.Linear(2, 2)
    return WeightingSetup("digit", ["rotation", "parity"], model, list(model.parameters()),
                          torch.device("cpu"), total_steps=total_steps, steps_per_epoch=10)


def _ctx(step: int = 0) -> StepContext:
    return StepContext(step=step, model=nn.Linear(1, 1), shared_parameters=[], train_losses=lambda: None)


def _losses() -> TaskLosses:
    values = {"digit": torch.tensor([2.0, 2.0]), "rotation": torch.tensor([1.0, 3.0]), "parity": torch.tensor([4.0])}
    return TaskLosses(values, "digit", ["rotation", "parity"])


# -- backbones.example_resnet --------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_resnet_maps_images_to_width_features(shape):
    net = ExampleResNet(shape, width=16, blocks=3)
    assert net(torch.randn(5, *shape)).shape == (5, 16)
    assert len(net.blocks) == 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 1 + 2 * 3


def test_resnet_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="width"):
        ExampleResNet((1, 8, 8), width=0)
    with pytest.raises(ConfigError, match="blocks"):
        ExampleResNet((1, 8, 8), blocks=-1)


# -- weightings.aux_anneal ------------------------------------------------------------------------
def test_linear_goes_from_start_to_end():
    w = AuxAnneal(start=1.0, end=0.2)
    w.setup(_setup(total_steps=5))
    seen = []
    for step in range(5):
        seen.append(w.weights()["rotation"])
        w.after_step(_ctx(step))
    assert seen == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert w.weights() == {"digit": 1.0, "rotation": pytest.approx(0.2), "parity": pytest.approx(0.2)}


def test_cosine_halfway_is_the_midpoint_and_starts_slowly():
    w = AuxAnneal(start=1.0, end=0.0, schedule="cosine")
    w.setup(_setup(total_steps=101))
    assert w.aux_weight(50) == pytest.approx(0.5)
    assert 1.0 - w.aux_weight(10) < 10 / 100  # slower than linear at first
    assert w.aux_weight(100) == pytest.approx(0.0)


def test_combine_weights_the_mean_losses():
    w = AuxAnneal(start=0.5, end=0.0, main_weight=2.0)
    w.setup(_setup(total_steps=10))
    assert w.combine(_losses(), _ctx()).item() == pytest.approx(2.0 * 2 + 0.5 * (2 + 4))


def test_the_cosine_schedule_and_a_warm_up_keep_the_contract_too():
    check_weighting(AuxAnneal, schedule="cosine")
    check_weighting(AuxAnneal, start=0.0, end=1.0)


def test_rejects_unknown_schedule_and_negative_weights():
    with pytest.raises(ConfigError, match="'linear', 'cosine'"):
        AuxAnneal(schedule="step")
    with pytest.raises(ConfigError, match="end"):
        AuxAnneal(end=-0.1)


# -- the entry points, as auxframe sees them --------------------------------------------------------
def test_auxframe_finds_and_loads_the_entry_points():
    try:
        dist = metadata.distribution("auxframe-example")
    except metadata.PackageNotFoundError:
        pytest.skip("auxframe-example is not installed (pip install ./plugins/auxframe-example)")
    reg = Registry(entry_points=lambda group: dist.entry_points.select(group=group), register_in_gin=False)
    assert reg.get("backbones", "example_resnet") is ExampleResNet
    assert reg.get("weightings", "aux_anneal") is AuxAnneal
    assert {p.dist for p in reg.find()} == {"auxframe-example"}
