"""Task-graph validation, batch grouping, and the checks made before anything trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from auxframe.data.digits import digits
from auxframe.data.signals import Rotation
from auxframe.errors import TaskGraphError
from auxframe.experiment import build_model, resolve_tasks
from auxframe.losses import cross_entropy
from auxframe.models.backbones import SmallCNN
from auxframe.tasks import Task, TaskGraph, batch_groups


def graph(*tasks):
    return TaskGraph(list(tasks))


def test_one_main_task_and_k_aux():
    g = graph(Task("digit", labels="digit", main=True), Task("parity", labels="parity"), Task("rot", signal=Rotation()))
    assert g.main.name == "digit"
    assert [t.name for t in g.aux] == ["parity", "rot"]
    assert g.names == ["digit", "parity", "rot"]


def test_k_zero_is_single_task():
    g = graph(Task("digit", labels="digit", main=True))
    assert g.aux == [] and g.names == ["digit"]


@pytest.mark.parametrize(
    "tasks, words",
    [
        ([Task("a", labels="digit"), Task("b", labels="parity")], ["exactly one main task", "found none"]),
        ([Task("a", labels="digit", main=True), Task("b", labels="parity", main=True)], ["exactly one main", "a, b"]),
        ([Task("a", labels="digit", main=True), Task("a", labels="parity")], ["two tasks are named 'a'"]),
        ([Task("a", labels="digit", main=True, signal=Rotation())], ["both `labels` and `signal`"]),
        ([Task("a", main=True)], ["neither `labels` and `signal`"]),
        ([Task("a b", labels="digit", main=True)], ["task name 'a b' is not valid"]),
        ([Task("a", labels="digit", main=True), "parity"], ["not a Task", "@name/Task()"]),
        ([], ["task graph is empty"]),
    ],
)
def test_invalid_graphs_name_the_problem(tasks, words):
    with pytest.raises(TaskGraphError) as err:
        TaskGraph(tasks)
    for w in words:
        assert w in str(err.value)


def test_main_task_cannot_be_self_supervised():
    with pytest.raises(TaskGraphError, match="main task 'r' uses a self-supervised signal"):
        graph(Task("r", signal=Rotation(), main=True))


def test_labelled_tasks_on_one_pool_share_a_batch_signal_tasks_do_not():
    g = graph(
        Task("digit", labels="digit", main=True),
        Task("rot", signal=Rotation()),
        Task("parity", labels="parity"),
        Task("extra", labels="ge5", pool="labeled+aux"),
    )
    groups = batch_groups(g)
    assert [(gr.pool, gr.tasks) for gr in groups] == [
        ("labeled", ["digit", "parity"]),
        ("train", ["rot"]),
        ("labeled+aux", ["extra"]),
    ]
    assert [gr.tasks for gr in batch_groups(g, ["digit"])] == [["digit"]]


def test_unknown_label_field_lists_the_fields():
    g = graph(Task("digit", labels="digits", main=True))
    with pytest.raises(TaskGraphError) as err:
        resolve_tasks(g, digits())
    assert "'digits'" in str(err.value) and "digit, ge5, loops, parity" in str(err.value)


def test_output_sizes_come_from_fields_and_signals():
    g = graph(Task("digit", labels="digit", main=True), Task("loops", labels="loops"), Task("rot", signal=Rotation()))
    resolved = resolve_tasks(g, digits())
    assert {k: v.num_outputs for k, v in resolved.items()} == {"digit": 10, "loops": 3, "rot": 4}


class WrongHead(nn.Module):
    """A head that ignores num_outputs and always predicts 3 classes."""

    def __init__(self, feature_shape, num_outputs):
        super().__init__()
        self.fc = nn.Linear(feature_shape[0], 3)

    def forward(self, x):
        return self.fc(x)


def test_head_incompatible_with_labels_is_caught_before_training():
    torch.manual_seed(0)
    g = graph(Task("digit", labels="digit", main=True, head=WrongHead))
    data = digits()
    with pytest.raises(TaskGraphError) as err:
        build_model(lambda input_shape: SmallCNN(input_shape, channels=(4,)), g, resolve_tasks(g, data), data)
    msg = str(err.value)
    assert "task 'digit'" in msg and "(3, 3)" in msg and "10 outputs" in msg


def test_reduced_loss_is_rejected():
    g = graph(Task("digit", labels="digit", main=True, loss=lambda out, y: cross_entropy(out, y).mean()))
    data = digits()
    with pytest.raises(TaskGraphError, match="losses must be unreduced"):
        build_model(lambda input_shape: SmallCNN(input_shape, channels=(4,)), g, resolve_tasks(g, data), data)


def test_model_returns_one_output_per_task():
    g = graph(Task("digit", labels="digit", main=True), Task("rot", signal=Rotation()))
    data = digits()
    model = build_model(lambda input_shape: SmallCNN(input_shape, channels=(4,)), g, resolve_tasks(g, data), data)
    out = model(torch.zeros(5, 1, 8, 8))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"digit": (5, 10), "rot": (5, 4)}
    assert len(model.shared_parameters()) == len(list(model.backbone.parameters()))


def small_other_data(n=40, shape=(1, 8, 8)):
    from auxframe.data.base import LabelField, TensorImageDataset

    g = torch.Generator().manual_seed(0)
    return TensorImageDataset(
        torch.randn(n, *shape, generator=g),
        {"shade": torch.randint(0, 3, (n,), generator=g)},
        {"shade": LabelField(3, "a made-up label")},
        "shade",
    )


def test_auxiliary_task_on_other_data_gets_its_own_batch_and_outputs():
    other = small_other_data()
    g = graph(Task("digit", labels="digit", main=True), Task("shade", labels="shade", data=other))
    groups = batch_groups(g)
    assert [(gr.key, gr.data is other) for gr in groups] == [("labels@labeled", False), ("shade@data", True)]
    data = digits()
    resolved = resolve_tasks(g, data)
    assert resolved["shade"].num_outputs == 3
    model = build_model(lambda input_shape: SmallCNN(input_shape, channels=(4,)), g, resolved, data)
    assert tuple(model(torch.zeros(2, 1, 8, 8))["shade"].shape) == (2, 3)


def test_other_data_must_match_the_image_shape_and_not_be_the_main_task():
    g = graph(Task("digit", labels="digit", main=True), Task("shade", labels="shade", data=small_other_data(shape=(3, 8, 8))))
    with pytest.raises(TaskGraphError, match=r"image shape \(3, 8, 8\).*\(1, 8, 8\)"):
        resolve_tasks(g, digits())
    with pytest.raises(TaskGraphError, match="main task 'digit' has its own `data`"):
        graph(Task("digit", labels="shade", main=True, data=small_other_data()))


def test_pixel_accuracy_and_dense_head():
    from auxframe.metrics import Accuracy
    from auxframe.models.heads import DenseClassificationHead

    out = torch.zeros(1, 3, 2, 2)
    out[0, 0, 0, 0] = out[0, 1, 0, 1] = out[0, 2, 1, 0] = out[0, 2, 1, 1] = 1.0  # argmax [[0,1],[2,2]]
    target = torch.tensor([[[0, 2], [2, -1]]])  # 2 right of 3 labelled pixels
    acc = Accuracy()
    acc.update(out, target)
    assert acc.compute() == {"accuracy": pytest.approx(2 / 3)}
    head = DenseClassificationHead((4, 8, 8), 11)
    assert tuple(head(torch.zeros(2, 4, 8, 8)).shape) == (2, 11, 8, 8)
    up = DenseClassificationHead((4, 4, 4), 2, hidden=3, output_size=(8, 8))
    assert tuple(up(torch.zeros(2, 4, 4, 4)).shape) == (2, 2, 8, 8)
    with pytest.raises(ValueError, match="global_pool = False"):
        DenseClassificationHead((64,), 2)
