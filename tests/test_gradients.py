"""The per-task gradient engine against explicit per-task backward passes, and the simplex projection."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn as nn

from auxframe.errors import ConfigError
from auxframe.models.backbones import SmallCNN
from auxframe.models.heads import ClassificationHead
from auxframe.models.multitask import MultiTaskModel
from auxframe.weighting.base import StepContext, TaskLosses
from auxframe.weighting.gradients import TaskGradients, last_shared_layer, project_to_simplex

TASKS = ["main", "a", "b", "rot"]


def make_step(seed: int = 0, two_batches: bool = True, batch_norm: bool = True, device: str = "cpu"):
    """A small CNN with four heads; 'rot' on a batch of its own when ``two_batches``.

    Weights and data are drawn on the CPU from ``seed``, then moved to ``device``: the same step
    on any device.
    """
    torch.manual_seed(seed)
    backbone = SmallCNN(input_shape=(1, 8, 8), channels=(4, 6), batch_norm=batch_norm)
    heads = {t: ClassificationHead((backbone.out_features,), 3) for t in TASKS}
    model = MultiTaskModel(backbone, heads).to(device)
    x1, x2 = torch.randn(6, 1, 8, 8).to(device), torch.randn(5, 1, 8, 8).to(device)
    y1, y2 = {t: torch.randint(0, 3, (6,)).to(device) for t in TASKS}, torch.randint(0, 3, (5,)).to(device)
    ce = nn.CrossEntropyLoss(reduction="none")
    out1, f1 = model(x1, tasks=TASKS[:3] + ([] if two_batches else ["rot"]), return_features=True)
    values = {t: ce(out1[t], y1[t]) for t in out1}
    features, inputs = dict(f1), {t: x1 for t in out1}
    groups = [tuple(out1)]
    if two_batches:
        out2, f2 = model(x2, tasks=["rot"], return_features=True)
        values["rot"] = ce(out2["rot"], y2)
        features.update(f2)
        inputs["rot"] = x2
        groups.append(("rot",))
    losses = TaskLosses(values, "main", TASKS[1:], groups, features=features, inputs=inputs)
    ctx = StepContext(step=0, model=model, shared_parameters=model.shared_parameters(), train_losses=None)
    return model, losses, ctx


def explicit_jacobian(losses, params):
    rows = []
    for t in TASKS:
        grads = torch.autograd.grad(losses.mean(t), params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("batched", [True, False])
def test_gramian_matches_explicit_per_task_gradients(batched):
    model, losses, ctx = make_step()
    jac = explicit_jacobian(losses, ctx.shared_parameters)
    engine = TaskGradients(losses, ctx, batched=batched)
    torch.testing.assert_close(engine.jacobian(TASKS), jac, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(engine.gramian(TASKS), jac @ jac.T, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(engine.norms(TASKS), jac.norm(dim=1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("jvp", ["forward", "reverse"])
def test_inner_products_match_explicit(jvp):
    model, losses, ctx = make_step(seed=1)
    jac = explicit_jacobian(losses, ctx.shared_parameters)
    v = [torch.randn_like(p) for p in ctx.shared_parameters]
    got = TaskGradients(losses, ctx, jvp=jvp).inner_products(TASKS, v)
    torch.testing.assert_close(got, jac @ torch.cat([x.reshape(-1) for x in v]), rtol=1e-4, atol=1e-6)


def test_forward_mode_leaves_batchnorm_statistics_alone():
    model, losses, ctx = make_step(seed=2)
    before = {k: b.clone() for k, b in model.backbone.named_buffers()}
    TaskGradients(losses, ctx, jvp="forward").inner_products(TASKS, [torch.ones_like(p) for p in ctx.shared_parameters])
    for k, b in model.backbone.named_buffers():
        assert torch.equal(b, before[k]), k


@pytest.mark.parametrize("batched", [False, True, "vmap"])
def test_last_shared_layer_space_is_the_last_layer(batched):
    model, losses, ctx = make_step(seed=3)
    last = last_shared_layer(model.backbone)
    # The small CNN ends conv -> BatchNorm -> ReLU -> pool: the last weight layer is the conv, not the norm.
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert [p for p in last] == [p for p in convs[-1].parameters()] and last[0].dim() == 4
    assert last and all(any(p is q for q in ctx.shared_parameters) for p in last)
    assert len(last) < len(ctx.shared_parameters)
    jac = explicit_jacobian(losses, last)
    engine = TaskGradients(losses, ctx, space="last_shared", batched=batched)
    torch.testing.assert_close(engine.gramian(TASKS), jac @ jac.T, rtol=1e-5, atol=1e-6)


def test_last_shared_layer_skips_every_normalisation_layer():
    mlp = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3), nn.GroupNorm(1, 3), nn.BatchNorm1d(3))
    assert [tuple(p.shape) for p in last_shared_layer(mlp)] == [(3, 5), (3,)]  # the second Linear
    only_norms = nn.Sequential(nn.BatchNorm1d(3), nn.LayerNorm(3))
    assert last_shared_layer(only_norms) == list(only_norms[1].parameters())


def test_representation_space_is_the_gradient_wrt_the_features():
    model, losses, ctx = make_step(seed=4, two_batches=False)
    z = losses.features["main"]._base
    rows = [torch.autograd.grad(losses.mean(t), z, retain_graph=True)[0].reshape(-1) for t in TASKS]
    torch.testing.assert_close(TaskGradients(losses, ctx, space="representation").jacobian(TASKS), torch.stack(rows))


def test_representation_space_refuses_tasks_on_different_batches():
    model, losses, ctx = make_step(seed=4, two_batches=True)
    with pytest.raises(ConfigError, match="different batches.*space = 'shared'"):
        TaskGradients(losses, ctx, space="representation").gramian(TASKS)


def test_backward_writes_coefficient_sum_to_backbone_and_weighted_losses_to_heads():
    model, losses, ctx = make_step(seed=5)
    shared = {"main": 1.0, "a": 0.5, "b": 0.0, "rot": -2.0}
    heads = {"main": 1.0, "a": 1.0, "b": 1.0, "rot": 0.25}
    jac = explicit_jacobian(losses, ctx.shared_parameters)
    expected_shared = torch.tensor([shared[t] for t in TASKS]) @ jac
    expected_head = torch.autograd.grad(0.25 * losses.mean("rot"), model.head_parameters("rot"), retain_graph=True)
    TaskGradients(losses, ctx).backward(shared, heads)
    got = torch.cat([p.grad.reshape(-1) for p in ctx.shared_parameters])
    torch.testing.assert_close(got, expected_shared, rtol=1e-5, atol=1e-7)
    for g, p in zip(expected_head, model.head_parameters("rot")):
        torch.testing.assert_close(p.grad, g)
    assert all(p.grad is not None for p in model.head_parameters("b"))  # head of a dropped task still trains


def test_engine_is_shared_within_a_step():
    model, losses, ctx = make_step()
    assert TaskGradients.of(losses, ctx) is TaskGradients.of(losses, ctx)
    assert TaskGradients.of(losses, ctx) is not TaskGradients.of(losses, ctx, space="last_shared")


# -- the simplex projection ------------------------------------------------------------------------
def brute_force_projection(v, total):
    """Reference: the closest point of the simplex, by trying every support (exhaustive KKT)."""
    n = v.numel()
    best, best_d = None, float("inf")
    for k in range(1, n + 1):
        for support in itertools.combinations(range(n), k):
            idx = torch.tensor(support)
            w = torch.zeros(n, dtype=torch.float64)
            theta = (v[idx].sum() - total) / k
            w[idx] = v[idx] - theta
            if (w >= -1e-12).all() and abs(float(w.sum()) - total) < 1e-9:
                d = float(((w - v) ** 2).sum())
                if d < best_d:
                    best, best_d = w.clamp_min(0), d
    return best


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-50, 50, allow_nan=False, allow_subnormal=False), min_size=1, max_size=6),
    total=st.floats(0.1, 10),
)
def test_projection_on_set_idempotent_and_equal_to_brute_force(values, total):
    v = torch.tensor(values, dtype=torch.float64)
    w = project_to_simplex(v, total)
    assert (w >= 0).all() and abs(float(w.sum()) - total) < 1e-9 * max(1.0, total)
    torch.testing.assert_close(project_to_simplex(w, total), w)
    torch.testing.assert_close(w, brute_force_projection(v, total))
    # The optimality (KKT) condition: no feasible direction lowers ||w - v||^2.
    support = w > 0
    if support.any():
        shift = (v - w)[support]
        assert float(shift.max() - shift.min()) < 1e-9 * max(1.0, float(v.abs().max()))
        assert ((v - w)[~support] <= shift.mean() + 1e-9).all()


def test_projection_differs_from_shift_then_clamp():
    v = torch.tensor([3.0, -4.0, 0.0])
    shifted = (v - (v.sum() - 3) / 3).clamp_min(0)  # the reference code's shift-then-clamp
    assert abs(float(shifted.sum()) - 3) > 0.1  # leaves the set
    w = project_to_simplex(v, 3.0)
    torch.testing.assert_close(w, torch.tensor([3.0, 0.0, 0.0]))


@pytest.mark.parametrize("jvp, fused", [("forward", True), ("forward", False), ("reverse", False)])
def test_gradient_and_inner_products_together_match_explicit(jvp, fused):
    model, losses, ctx = make_step(seed=6)
    jac = explicit_jacobian(losses, ctx.shared_parameters)
    c = torch.tensor([1.0, -0.5, 2.0, -1.5])
    engine = TaskGradients(losses, ctx, jvp=jvp)
    d, inner = engine.gradient_and_inner_products(dict(zip(TASKS, c)), TASKS[1:], fused=fused)
    expected_d = c @ jac
    torch.testing.assert_close(torch.cat([x.reshape(-1) for x in d]), expected_d, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(inner, jac[1:] @ expected_d, rtol=1e-4, atol=1e-6)


def test_backward_from_a_computed_jacobian_equals_the_backward_pass():
    shared = {"main": 1.0, "a": 0.3, "b": 0.0, "rot": 2.0}
    grads = []
    for read_gramian_first in (False, True):
        model, losses, ctx = make_step(seed=13)
        engine = TaskGradients(losses, ctx)
        if read_gramian_first:
            engine.gramian(TASKS)
            assert engine._cached_jacobian_tasks(shared) == tuple(TASKS)
        engine.backward(shared)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# -- the "Gramian -> weights" step -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["MGDA", "IMTLG", "AlignedMTL"])
def test_a_torchjd_gramian_weighting_plugs_into_the_engine_as_torchjd_aggregates(method):
    # The reference is TorchJD's own aggregator on the explicit Jacobian (one autograd.grad per
    # task): e.g. MGDA()(J) = MGDAWeighting()(J J^T) @ J. The engine computes J J^T, TorchJD maps
    # it to weights, the engine writes w @ J into the backbone.
    aggregation = pytest.importorskip("torchjd.aggregation")
    aggregator, weighting = getattr(aggregation, method), getattr(aggregation, f"{method}Weighting")
    from auxframe.weighting.gramian import GramianWeighting

    model, losses, ctx = make_step(seed=7)
    jac = explicit_jacobian(losses, ctx.shared_parameters)
    expected = aggregator()(jac)
    expected_head = torch.autograd.grad(losses.mean("rot"), model.head_parameters("rot"), retain_graph=True)
    weights, total = TaskGradients(losses, ctx).gramian_backward(TASKS, weighting())
    got = torch.cat([p.grad.reshape(-1) for p in ctx.shared_parameters])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert weights.shape == (4,) and not weights.requires_grad
    for g, p in zip(expected_head, model.head_parameters("rot")):  # each head on its own loss
        torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(total, losses.means(TASKS).sum().detach())

    # the same through a weighting plugin built on the seam, in the trainer's protocol
    from auxframe.weighting.base import WeightingSetup

    model, losses, ctx = make_step(seed=7)
    plugin = GramianWeighting(weighting())
    plugin.setup(WeightingSetup("main", TASKS[1:], model, ctx.shared_parameters, torch.device("cpu"), 1, 1))
    plugin.backward(losses, ctx)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in ctx.shared_parameters]), got)
    torch.testing.assert_close(plugin.w, weights)


def test_a_gramian_weighting_of_the_wrong_shape_is_named():
    model, losses, ctx = make_step(seed=8)

    def first_row(gramian):
        return gramian[0, 1:]

    with pytest.raises(ConfigError, match=r"first_row returned \(3,\) for a \(4, 4\) Gramian.*shape \(4,\)"):
        TaskGradients(losses, ctx).gramian_backward(TASKS, first_row)


# -- one Gramian row (OL_AUX) and the update that reuses it; GradNorm's update -------------------
@pytest.mark.parametrize("jvp, forward_min", [("forward", 1), ("forward", 4), ("reverse", 1)])
def test_one_gramian_row_and_the_update_equal_the_full_gramians_numbers(jvp, forward_min, monkeypatch):
    # main, a, b share a batch (one forward-mode pass along g_main where at least forward_min of
    # the row's tasks share it, else one backward each); rot is alone on its own batch (its
    # gradient by the backward that the update then reuses).
    import auxframe.weighting.gradients as gradients

    monkeypatch.setattr(gradients, "ROW_FORWARD_MIN", forward_min)
    model, losses, ctx = make_step(seed=9)
    jac = explicit_jacobian(losses, ctx.shared_parameters)
    engine = TaskGradients(losses, ctx, jvp=jvp)
    row = engine.gramian_row("main", TASKS[1:])
    torch.testing.assert_close(row, jac[1:] @ jac[0], rtol=1e-4, atol=1e-6 * float((jac @ jac.T).abs().max()))
    assert not engine._jacobians  # no Jacobian, no T x T Gramian
    assert "rot" in engine._rows and ("a" in engine._rows) == (jvp == "reverse" or forward_min > 2)  # (a, b: 2 tasks)
    shared = {"main": 1.0, "a": 0.5, "b": 0.0, "rot": torch.tensor(2.0)}
    engine.backward(shared, shared)
    got = torch.cat([p.grad.reshape(-1) for p in ctx.shared_parameters])
    torch.testing.assert_close(got, torch.tensor([1.0, 0.5, 0.0, 2.0]) @ jac, rtol=1e-5, atol=1e-7)
    expected_head = torch.autograd.grad(2.0 * losses.mean("rot"), model.head_parameters("rot"), retain_graph=True)
    for g, p in zip(expected_head, model.head_parameters("rot")):
        torch.testing.assert_close(p.grad, g)


def test_a_gramian_row_with_dropout_takes_one_backward_per_task():
    from auxframe.models.backbones import MLP

    torch.manual_seed(0)
    backbone = MLP((1, 4, 4), hidden=(7,), dropout=0.3)
    model = MultiTaskModel(backbone, {t: ClassificationHead((7,), 3) for t in TASKS})
    x = torch.randn(8, 1, 4, 4)
    out, feats = model(x, tasks=TASKS, return_features=True)
    values = {t: nn.functional.cross_entropy(out[t], torch.randint(0, 3, (8,)), reduction="none") for t in TASKS}
    losses = TaskLosses(values, "main", TASKS[1:], [tuple(TASKS)], features=feats, inputs={t: x for t in TASKS})
    ctx = StepContext(step=0, model=model, shared_parameters=model.shared_parameters(), train_losses=None)
    jac = explicit_jacobian(losses, ctx.shared_parameters)  # with the masks this forward pass drew
    engine = TaskGradients(losses, ctx)
    torch.testing.assert_close(engine.gramian_row("main", TASKS[1:]), jac[1:] @ jac[0], rtol=1e-5, atol=1e-8)
    assert set(engine._rows) == set(TASKS)


def test_ol_aux_accumulates_the_main_row_and_updates_like_the_old_computation():
    from auxframe.weighting.base import WeightingSetup
    from auxframe.weighting.gradient_based import OLAux

    model, losses, ctx = make_step(seed=10)
    jac = explicit_jacobian(losses, ctx.shared_parameters)
    heads = {t: torch.autograd.grad(losses.mean(t), model.head_parameters(t), retain_graph=True) for t in TASKS}
    method = OLAux(horizon=3)
    method.setup(WeightingSetup("main", TASKS[1:], model, ctx.shared_parameters, torch.device("cpu"), 10, 1))
    method.w = torch.tensor([1.0, 0.5, 2.0, 0.25])
    method.backward(losses, ctx)
    # the old computation: the Gramian's first row, and sum_k w_k g_k
    gram = jac @ jac.T
    torch.testing.assert_close(method.acc, gram[0, 1:], rtol=1e-4, atol=1e-6 * float(gram.abs().max()))
    got = torch.cat([p.grad.reshape(-1) for p in ctx.shared_parameters])
    torch.testing.assert_close(got, method.w @ jac, rtol=1e-5, atol=1e-7)
    for t, w in zip(TASKS, method.w):
        for g, p in zip(heads[t], model.head_parameters(t)):
            torch.testing.assert_close(p.grad, w * g)


@pytest.mark.parametrize("space", ["shared", "last_shared"])
def test_gradnorm_updates_the_model_as_the_backward_of_its_weighted_loss(space):
    # The reference is the old computation: autograd of sum_t w_t L_t for the model, and the
    # weights' step from the per-task gradient norms of explicit autograd.grad calls.
    from auxframe.weighting.base import WeightingSetup
    from auxframe.weighting.gradient_based import GradNorm

    model, losses, ctx = make_step(seed=11)
    method = GradNorm(space=space)
    method.setup(WeightingSetup("main", TASKS[1:], model, ctx.shared_parameters, torch.device("cpu"), 10, 1))
    with torch.no_grad():
        method.w.copy_(torch.tensor([1.2, 0.8, 1.5, 0.5]))
    w = method.w.detach().clone()
    space_params = ctx.shared_parameters if space == "shared" else last_shared_layer(model.backbone)
    norms = explicit_jacobian(losses, space_params).norm(dim=1)
    params = list(model.parameters())
    expected = torch.autograd.grad(sum(w[i] * losses.mean(t) for i, t in enumerate(TASKS)), params, retain_graph=True)
    reference = GradNorm(space=space)
    reference.setup(WeightingSetup("main", TASKS[1:], model, ctx.shared_parameters, torch.device("cpu"), 10, 1))
    with torch.no_grad():
        reference.w.copy_(w)
    expected_w_grad = reference.weight_gradient(losses, norms)
    total = method.backward(losses, ctx)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    reference.optimizer.zero_grad()
    reference.w.grad = expected_w_grad
    reference.optimizer.step()
    with torch.no_grad():
        reference.w.clamp_(min=0).mul_(4 / reference.w.sum())
    torch.testing.assert_close(method.w, reference.w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total, (w @ losses.means(TASKS)).detach())
