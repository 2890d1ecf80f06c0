"""The batched reverse pass (tasks folded into the batch) against one autograd backward per row."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from auxframe.errors import ConfigError
from auxframe.models.backbones import MLP, SmallCNN
from auxframe.models.heads import ClassificationHead
from auxframe.models.multitask import MultiTaskModel
from auxframe.models.resnet import ResNet18
from auxframe.models.segnet import SegNet
from auxframe.models.wrn import WideResNet
from auxframe.weighting.base import StepContext, TaskLosses
from auxframe.weighting.batched_backward import Unsupported, batched_vjp
from auxframe.weighting.gradients import TaskGradients


def per_row_gradients(z, rows, params):
    """The independent computation: one ``torch.autograd.grad`` per row."""
    out = []
    for r in rows:
        grads = torch.autograd.grad(z, params, grad_outputs=r, retain_graph=True, allow_unused=True)
        out.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(out)


def flat(grads, params, k):
    return torch.cat([(g if g is not None else p.new_zeros(k, *p.shape)).reshape(k, -1) for g, p in zip(grads, params)], 1)


def assert_batched_equals_loop(backbone, x, k=5, train=True, seed=0):
    backbone.train(train)
    torch.manual_seed(seed)
    for p in backbone.parameters():  # non-trivial BatchNorm affine parameters
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    z = backbone(x)
    params = [p for p in backbone.parameters() if p.requires_grad]
    rows = torch.randn(k, *z.shape).to(z.device)
    expected = per_row_gradients(z, rows, params)
    got = flat(batched_vjp(z, rows, params), params, k)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


class GroupedStrided(nn.Module):
    """Grouped, strided and dilated convolutions, BatchNorm without affine, LeakyReLU, average pools,
    a broadcasting bias add, flatten and a Linear layer without bias."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(6, affine=False)
        self.conv2 = nn.Conv2d(6, 9, 3, padding=2, dilation=2, groups=3, bias=False)
        self.shift = nn.Parameter(torch.randn(9, 1, 1))
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.fc = nn.Linear(9 * 4, 5, bias=False)

    def forward(self, x):
        h = nn.functional.leaky_relu(self.bn(self.conv1(x)), 0.2)
        h = self.pool(self.conv2(h) + self.shift)
        h = nn.functional.adaptive_avg_pool2d(h, (2, 2))
        return self.fc(torch.flatten(h, 1)) * 2.0


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_small_cnn(train, batch_norm):
    net = SmallCNN((2, 8, 8), channels=(4, 6, 5), pool_after=(0,), batch_norm=batch_norm)
    assert_batched_equals_loop(net, torch.randn(6, 2, 8, 8), train=train)


def test_small_cnn_maps_without_global_pool():
    net = SmallCNN((1, 8, 8), channels=(3, 4), pool_after=(), global_pool=False)
    assert_batched_equals_loop(net, torch.randn(4, 1, 8, 8), k=3)


@pytest.mark.parametrize("train", [True, False])
def test_mlp_with_dropout(train):
    # In train mode the graph holds the dropout mask that was drawn; the rule reuses it.
    assert_batched_equals_loop(MLP((1, 4, 4), hidden=(7, 5), dropout=0.3), torch.randn(6, 1, 4, 4), train=train)


class NativeDropout(nn.Module):
    """Dropout as F.dropout runs it on a GPU (``native_dropout``, the mask saved in the graph)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 6)

    def forward(self, x):
        return torch.native_dropout(self.fc(x.flatten(1)), 0.4, True)[0]


def test_native_dropout_mask_of_the_forward_pass():
    assert_batched_equals_loop(NativeDropout(), torch.randn(6, 1, 4, 4))


@pytest.mark.parametrize("small_images", [True, False])
def test_resnet18_skip_connections(small_images):
    # small_images=False: 7x7 stride-2 stem and overlapping 3x3 stride-2 max pooling.
    net = ResNet18((3, 8, 8) if small_images else (3, 16, 16), small_images=small_images)
    x = torch.randn(2, 3, 8, 8) if small_images else torch.randn(2, 3, 16, 16)
    assert_batched_equals_loop(net, x, k=3)


def test_wide_resnet_with_dropout_and_shortcuts():
    net = WideResNet((3, 8, 8), depth=10, widen_factor=1, dropout=0.2)
    assert_batched_equals_loop(net, torch.randn(3, 3, 8, 8), k=3)


def test_segnet_unpooling():
    assert_batched_equals_loop(SegNet((3, 8, 8), filters=(4, 6)), torch.randn(2, 3, 8, 8), k=3)


@pytest.mark.parametrize("train", [True, False])
def test_grouped_strided_dilated_convolutions(train):
    assert_batched_equals_loop(GroupedStrided(), torch.randn(5, 4, 8, 8), train=train)


def test_unreached_parameter_is_none_and_input_gradient_is_not_needed():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    unused = nn.Parameter(torch.ones(2))
    z = net(torch.randn(5, 3))
    grads = batched_vjp(z, torch.randn(2, 5, 4), [*net.parameters(), unused])
    assert grads[-1] is None and grads[0].shape == (2, 4, 3)


def test_node_without_rule_raises_unsupported_naming_it():
    lin = nn.Linear(3, 4)
    z = torch.tanh(lin(torch.randn(5, 3)))
    with pytest.raises(Unsupported, match="TanhBackward0"):
        batched_vjp(z, torch.randn(2, 5, 4), list(lin.parameters()))


def test_freed_graph_raises_unsupported():
    lin = nn.Linear(3, 4)
    z = torch.relu(lin(torch.randn(5, 3)))
    z.sum().backward()  # frees the saved tensors
    with pytest.raises(Unsupported, match="ReluBackward0") as info:
        batched_vjp(z, torch.randn(2, 5, 4), list(lin.parameters()))
    assert info.value.transient  # the graph's state: the model itself may fold on the next step


class TanhNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


def engine_step(backbone, batched, seed=0):
    torch.manual_seed(seed)
    tasks = ["main", "a", "b"]
    model = MultiTaskModel(backbone, {t: ClassificationHead((3,), 2) for t in tasks})
    x = torch.randn(6, 1, 8, 8)
    out, feats = model(x, tasks=tasks, return_features=True)
    ce = nn.CrossEntropyLoss(reduction="none")
    values = {t: ce(out[t], torch.randint(0, 2, (6,))) for t in tasks}
    losses = TaskLosses(values, "main", tasks[1:], [tuple(tasks)], features=feats, inputs={t: x for t in tasks})
    ctx = StepContext(step=0, model=model, shared_parameters=model.shared_parameters(), train_losses=None)
    explicit = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses.mean(t), ctx.shared_parameters, retain_graph=True)])
        for t in tasks
    ])
    return TaskGradients(losses, ctx, batched=batched), tasks, explicit


def test_engine_falls_back_to_the_loop_with_one_warning_naming_the_op():
    backbone = TanhNet()
    engine, tasks, explicit = engine_step(backbone, batched=True)
    with pytest.warns(RuntimeWarning, match="TanhBackward0") as record:
        jac = engine.jacobian(tasks)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(jac, explicit, rtol=1e-5, atol=1e-7)
    # The next step with the same backbone goes to the loop directly, without a second warning.
    engine, tasks, explicit = engine_step(backbone, batched=True, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(engine.jacobian(tasks), explicit, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batched", [True, "vmap", False, "auto"])
def test_engine_modes_agree_without_warnings(batched):
    engine, tasks, explicit = engine_step(SmallCNN((1, 8, 8), channels=(4, 3)), batched=batched)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        torch.testing.assert_close(engine.jacobian(tasks), explicit, rtol=1e-5, atol=1e-7)


def test_auto_loops_on_cpu_and_unknown_modes_are_refused():
    engine, _, _ = engine_step(SmallCNN((1, 8, 8), channels=(4, 3)), batched="auto")
    assert engine.batched is None  # the loop: faster than the folded pass on CPUs (bench/gradient_engine.py)
    with pytest.raises(ConfigError, match="batched must be one of"):
        engine_step(SmallCNN((1, 8, 8), channels=(4, 3)), batched="fast")


def test_chunks_of_rows_give_the_same_gradients():
    net = SmallCNN((1, 8, 8), channels=(3, 4))
    z = net(torch.randn(4, 1, 8, 8))
    rows, params = torch.randn(7, *z.shape), list(net.parameters())
    whole = flat(batched_vjp(z, rows, params), params, 7)
    expected = per_row_gradients(z, rows, params)
    tol = dict(rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    torch.testing.assert_close(flat(batched_vjp(z, rows, params, chunk=3), params, 7), expected, **tol)
    torch.testing.assert_close(whole, expected, **tol)


def test_a_transient_failure_does_not_send_the_backbone_to_the_loop_for_good(monkeypatch):
    import auxframe.weighting.gradients as gradients_module

    backbone = SmallCNN((1, 8, 8), channels=(4, 3))
    real = gradients_module.batched_vjp
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise Unsupported("ReluBackward0 (saved tensors freed)", transient=True)
        return real(*args, **kwargs)

    monkeypatch.setattr(gradients_module, "batched_vjp", fails_once)
    engine, tasks, explicit = engine_step(backbone, batched=True)
    with pytest.warns(RuntimeWarning, match="for this step"):
        torch.testing.assert_close(engine.jacobian(tasks), explicit, rtol=1e-5, atol=1e-7)
    engine, tasks, explicit = engine_step(backbone, batched=True, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        torch.testing.assert_close(engine.jacobian(tasks), explicit, rtol=1e-5, atol=1e-7)
    assert len(calls) == 2  # the second step folded again
