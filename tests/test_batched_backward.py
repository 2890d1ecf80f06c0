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


def engine_step(backbone, batched, seed=0, k=2, classes=2):
    """A step with K + 1 tasks on one batch through ``backbone``, and one autograd.grad per task."""
    torch.manual_seed(seed)
    tasks = ["main", *[f"t{i}" for i in range(k)]]
    dim = backbone(torch.zeros(2, 1, 8, 8)).shape[1]
    model = MultiTaskModel(backbone, {t: ClassificationHead((dim,), classes) for t in tasks})
    x = torch.randn(6, 1, 8, 8)
    out, feats = model(x, tasks=tasks, return_features=True)
    ce = nn.CrossEntropyLoss(reduction="none")
    values = {t: ce(out[t], torch.randint(0, classes, (6,))) for t in tasks}
    losses = TaskLosses(values, "main", tasks[1:], [tuple(tasks)], features=feats, inputs={t: x for t in tasks})
    ctx = StepContext(step=0, model=model, shared_parameters=model.shared_parameters(), train_losses=None)
    explicit = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses.mean(t), ctx.shared_parameters, retain_graph=True)])
        for t in tasks
    ])
    return TaskGradients(losses, ctx, batched=batched), tasks, explicit


def test_engine_falls_back_to_the_public_path_with_one_warning_naming_the_op():
    backbone = TanhNet()
    engine, tasks, explicit = engine_step(backbone, batched="fold")
    with pytest.warns(RuntimeWarning, match="TanhBackward0") as record:
        jac = engine.jacobian(tasks)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(jac, explicit, rtol=1e-5, atol=1e-7)
    # The next step with the same backbone takes the public path directly, without a second warning.
    engine, tasks, explicit = engine_step(backbone, batched="fold", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(engine.jacobian(tasks), explicit, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batched", ["fold", True, "vmap", False, "loop", "auto"])
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
    engine, tasks, explicit = engine_step(backbone, batched="fold")
    with pytest.warns(RuntimeWarning, match="for this step"):
        torch.testing.assert_close(engine.jacobian(tasks), explicit, rtol=1e-5, atol=1e-7)
    engine, tasks, explicit = engine_step(backbone, batched="fold", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        torch.testing.assert_close(engine.jacobian(tasks), explicit, rtol=1e-5, atol=1e-7)
    assert len(calls) == 2  # the second step folded again


# -- the public path on layers the folded pass has no rule for; the fold's own checks -----------------
class TinyViT(nn.Module):
    """Patch embedding, a class token (cat), position embedding, pre-norm attention and a GELU MLP."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.1)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, 4, dim)
        h = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.norm3(h[:, 0])


class TinyUNet(nn.Module):
    """GroupNorm + SiLU blocks, a pooled path upsampled by interpolate and concatenated with the skip, Tanh."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU())
        self.mid = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU())
        self.up = nn.Conv2d(12, 4, 3, padding=1)

    def forward(self, x):
        skip = self.down(x)
        h = self.mid(nn.functional.avg_pool2d(skip, 2))
        h = nn.functional.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
        h = torch.tanh(self.up(torch.cat([h, skip], dim=1)))
        return h.mean(dim=(2, 3))


def layer_step(backbone, batched, seed=0):
    return engine_step(backbone, batched, seed=seed, k=5, classes=3)


@pytest.mark.parametrize("make", [TinyViT, TinyUNet])
@pytest.mark.parametrize("batched", ["vmap", "loop", "auto"])
def test_public_path_on_vit_and_unet_layers_equals_one_backward_per_task(make, batched):
    # GELU, SiLU, Tanh, LayerNorm, GroupNorm, attention, cat and interpolate: no rule needed.
    engine, tasks, explicit = layer_step(make(), batched)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: the batched pass itself
        jac = engine.jacobian(tasks)
    assert explicit.abs().max() > 0
    torch.testing.assert_close(jac, explicit, rtol=1e-5, atol=1e-6 * float(explicit.abs().max()))
    torch.testing.assert_close(engine.gramian(tasks), explicit @ explicit.T, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("make, op", [(TinyViT, "Backward0"), (TinyUNet, "Backward0")])
def test_the_fold_on_layers_without_rules_falls_back_once_to_the_public_path(make, op):
    backbone = make()
    engine, tasks, explicit = layer_step(backbone, "fold")
    with pytest.warns(RuntimeWarning, match=f"no folded rule for .*{op}.*public batched path") as record:
        jac = engine.jacobian(tasks)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(jac, explicit, rtol=1e-5, atol=1e-6 * float(explicit.abs().max()))
    engine, tasks, explicit = layer_step(backbone, "fold", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        torch.testing.assert_close(engine.jacobian(tasks), explicit, rtol=1e-5, atol=1e-6 * float(explicit.abs().max()))


def test_a_fold_rule_that_disagrees_with_autograd_is_caught_at_first_use(monkeypatch):
    # A rule whose meaning drifted (here: ReLU's mask applied twice as strongly) gives other
    # gradients; the first folded pass on a backbone is checked against the public path.
    import auxframe.weighting.batched_backward as bb

    real = bb.RULES["ReluBackward0"]
    monkeypatch.setitem(bb.RULES, "ReluBackward0", lambda node, grads, need, k: [2 * g for g in real(node, grads, need, k)])
    backbone = SmallCNN((1, 8, 8), channels=(4, 3))
    engine, tasks, explicit = engine_step(backbone, batched="fold")
    with pytest.warns(RuntimeWarning, match="folded backward differs from autograd's in SmallCNN") as record:
        jac = engine.jacobian(tasks)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(jac, explicit, rtol=1e-5, atol=1e-7)  # the public path's numbers
    calls = []
    monkeypatch.setattr(gradients_module(), "batched_vjp", lambda *a, **k: calls.append(1))
    engine, tasks, explicit = engine_step(backbone, batched="fold", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        torch.testing.assert_close(engine.jacobian(tasks), explicit, rtol=1e-5, atol=1e-7)
    assert not calls  # that backbone does not fold again


def test_a_correct_fold_is_checked_once_then_trusted(monkeypatch):
    gradients = gradients_module()
    backbone = SmallCNN((1, 8, 8), channels=(4, 3))
    checks = []
    real = gradients._disagreement
    monkeypatch.setattr(gradients, "_disagreement", lambda *a: checks.append(1) or real(*a))
    for seed in range(3):
        engine, tasks, explicit = engine_step(backbone, batched="fold", seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            torch.testing.assert_close(engine.jacobian(tasks), explicit, rtol=1e-5, atol=1e-7)
    assert len(checks) == 1
    backbone.eval()  # eval mode is another graph (BatchNorm's running statistics): checked again
    engine, tasks, explicit = engine_step(backbone, batched="fold", seed=3)
    torch.testing.assert_close(engine.jacobian(tasks), explicit, rtol=1e-5, atol=1e-7)
    assert len(checks) == 2


def test_the_fold_is_off_on_untested_torch_versions(monkeypatch):
    gradients = gradients_module()
    monkeypatch.setattr(gradients, "FOLD_TESTED_TORCH", ("1.13.",))
    monkeypatch.setattr(gradients, "_untested_torch_said", False)
    monkeypatch.setattr(gradients, "batched_vjp", lambda *a, **k: pytest.fail("folded on an untested torch"))
    engine, tasks, explicit = engine_step(SmallCNN((1, 8, 8), channels=(4, 3)), batched="fold")
    with pytest.warns(RuntimeWarning, match=r"tested on torch 1\.13\.x, not 2"):
        torch.testing.assert_close(engine.jacobian(tasks), explicit, rtol=1e-5, atol=1e-7)


def test_auto_folds_only_when_asked_by_the_environment(monkeypatch):
    gradients = gradients_module()
    monkeypatch.setitem(gradients.AUTO_BATCHED, "cpu", "vmap")  # as on a GPU
    assert engine_step(SmallCNN((1, 8, 8), channels=(4, 3)), batched="auto")[0].batched == "vmap"
    monkeypatch.setenv(gradients.FOLD_ENV, "1")
    assert engine_step(SmallCNN((1, 8, 8), channels=(4, 3)), batched="auto")[0].batched == "fold"


def gradients_module():
    import auxframe.weighting.gradients as module

    return module
