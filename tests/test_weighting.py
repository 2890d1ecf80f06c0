"""The Weighting protocol and the fixed baselines, against hand-computed values."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from auxframe.errors import ConfigError
from auxframe.weighting.base import StepContext, TaskLosses, Weighting, WeightingSetup
from auxframe.weighting.fixed import STL, Equal, Fixed

TASKS = ["main", "a", "b"]


def setup_info():
    model = nn.Linear(2, 2)
    return WeightingSetup("main", ["a", "b"], model, list(model.parameters()), torch.device("cpu"), 100, 10)


def losses():
    values = {
        "main": torch.tensor([1.0, 3.0], requires_grad=True),  # mean 2
        "a": torch.tensor([0.5, 1.5], requires_grad=True),  # mean 1
        "b": torch.tensor([4.0, 4.0, 4.0, 4.0], requires_grad=True),  # mean 4, another batch
    }
    return TaskLosses(values, "main", ["a", "b"], [["main", "a"], ["b"]])


def ctx():
    return StepContext(step=0, model=nn.Linear(1, 1), shared_parameters=[], train_losses=lambda: None)


def build(w: Weighting) -> Weighting:
    w.setup(setup_info())
    return w


def test_equal_is_the_plain_sum_of_means():
    total = build(Equal()).combine(losses(), ctx())
    assert total.item() == pytest.approx(2 + 1 + 4)


def test_fixed_weights_and_default():
    w = build(Fixed({"a": 0.25}, main_weight=2.0, default=0.5))
    assert w.combine(losses(), ctx()).item() == pytest.approx(2 * 2 + 0.25 * 1 + 0.5 * 4)
    assert w.weights() == {"main": 2.0, "a": 0.25, "b": 0.5}
    assert w.log_values() == {"weight/main": 2.0, "weight/a": 0.25, "weight/b": 0.5}


def test_fixed_rejects_unknown_task_names():
    with pytest.raises(ConfigError, match=r"unknown auxiliary task\(s\) \['c'\].*\['a', 'b'\]"):
        build(Fixed({"c": 1.0}))


def test_stl_uses_only_the_main_task_and_skips_computing_the_others():
    w = build(STL())
    assert w.tasks_needed() == ["main"]
    only_main = TaskLosses({"main": torch.tensor([1.0, 3.0])}, "main", ["a", "b"])
    assert w.combine(only_main, ctx()).item() == pytest.approx(2.0)
    assert only_main.names == ["main"]


def test_zero_weight_tasks_are_not_needed():
    assert build(Fixed({"a": 0.0})).tasks_needed() == ["main", "b"]


def test_backward_puts_the_weighted_gradient_in_place():
    l = losses()
    build(Fixed({"a": 3.0, "b": 0.0})).backward(l, ctx())
    # d/dx of mean(x) is 1/n per element
    assert torch.allclose(l["main"].grad, torch.tensor([0.5, 0.5]))
    assert torch.allclose(l["a"].grad, torch.tensor([1.5, 1.5]))
    assert l["b"].grad is None


def test_per_sample_losses_line_up_only_within_a_batch_group():
    l = losses()
    assert l.per_sample(["main", "a"]).tolist() == [[1.0, 0.5], [3.0, 1.5]]
    with pytest.raises(ValueError, match="different batches"):
        l.per_sample(["main", "b"])
    assert l.means().tolist() == [2.0, 1.0, 4.0]


def test_base_protocol_defaults():
    w = Weighting()
    w.setup(setup_info())
    assert w.tasks_needed() == TASKS
    assert w.inner_parameters() == [] and w.state_dict() == {} and w.outer_every == 0
    with pytest.raises(NotImplementedError):
        w.combine(losses(), ctx())
