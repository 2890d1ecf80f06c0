"""ARML and the adaptive baselines against their formulas, closed forms and planted toy problems."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from auxframe.errors import ConfigError
from auxframe.models.multitask import MultiTaskModel
from auxframe.weighting.arml import ARML
from auxframe.weighting.base import StepContext, TaskLosses, WeightingSetup
from auxframe.weighting.gradient_based import GCS, PCGrad, GradNorm, OLAux
from auxframe.weighting.loss_based import DWA, AdaLoss, Uncertainty, dwa_weights
from auxframe.weighting.gradients import last_shared_layer
from test_gradients import TASKS, explicit_jacobian, make_step


def info(model, aux, steps_per_epoch=10):
    return WeightingSetup("main", aux, model, model.shared_parameters(), torch.device("cpu"), 1000, steps_per_epoch)


# -- a linear-regression task graph where every task reads the same shared weights --------------
class LinearTasks:
    """``x ~ N(0, I_d)``; every task predicts its target with the shared linear map (identity heads).

    Targets: main ``y = x . theta* + 0.1 eps``; 'same' = y; 'noise' independent N(0, 1);
    'negated' = -y; 'other' = x . theta2 (an unrelated direction).
    """

    def __init__(self, aux, seed=0, d=8, batch=32):
        g = torch.Generator().manual_seed(seed)
        self.theta, self.theta2 = torch.randn(d, generator=g), torch.randn(d, generator=g)
        self.g, self.d, self.batch, self.aux = g, d, batch, aux
        backbone = nn.Linear(d, 1, bias=False)
        nn.init.zeros_(backbone.weight)
        self.model = MultiTaskModel(backbone, {t: nn.Flatten(0) for t in ["main", *aux]})

    def losses(self):
        x = torch.randn(self.batch, self.d, generator=self.g)
        y = x @ self.theta + 0.1 * torch.randn(self.batch, generator=self.g)
        targets = {"main": y, "same": y, "negated": -y, "other": x @ self.theta2,
                   "noise": torch.randn(self.batch, generator=self.g)}
        names = ["main", *self.aux]
        out, feats = self.model(x, tasks=names, return_features=True)
        values = {t: (out[t] - targets[t]) ** 2 for t in names}
        return TaskLosses(values, "main", self.aux, [names], features=feats, inputs={t: x for t in names})

    def train(self, weighting, steps, lr=0.05):
        weighting.setup(info(self.model, self.aux))
        opt = torch.optim.SGD(list(self.model.parameters()) + weighting.inner_parameters(), lr=lr)
        for step in range(steps):
            ctx = StepContext(step, self.model, self.model.shared_parameters(), train_losses=None)
            opt.zero_grad()
            weighting.backward(self.losses(), ctx)
            opt.step()
            weighting.after_step(ctx)
        return weighting


# -- ARML -----------------------------------------------------------------------------------------
def test_arml_weight_gradient_equals_autograd_of_the_objective():
    model, losses, ctx = make_step(seed=7)
    arml = ARML(update_every=1)
    arml.setup(info(model, TASKS[1:]))
    with torch.no_grad():
        arml.w.copy_(torch.tensor([0.3, 1.7, 1.0]))
    w = arml.w.detach().clone().requires_grad_(True)
    params = ctx.shared_parameters
    # The reference code's form: the objective built with a double backward, differentiated in w.
    combined = losses.mean("main") - sum(w[i] * losses.mean(t) for i, t in enumerate(TASKS[1:]))
    d = torch.autograd.grad(combined, params, create_graph=True, allow_unused=True)
    objective = sum((g * g).sum() for g in d if g is not None)
    (expected,) = torch.autograd.grad(objective, w, retain_graph=True)
    for jvp in ("forward", "reverse", "fused"):
        arml.jvp = jvp
        ctx.extras.clear()
        got, value = arml.weight_gradient(losses, ctx)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        assert float(value) == pytest.approx(float(objective), rel=1e-5)


def test_arml_weights_stay_on_the_simplex_and_find_the_identical_task():
    problem = LinearTasks(["same", "noise", "negated"], seed=1)
    arml = problem.train(ARML(update_every=1, weight_lr=0.05), steps=300)
    w = arml.weights()
    assert sum(w[t] for t in ["same", "noise", "negated"]) == pytest.approx(3.0, abs=1e-5)
    assert min(w.values()) >= 0
    assert w["same"] > 2.7, w
    assert w["noise"] < 0.2 and w["negated"] < 0.2, w


def test_arml_langevin_noise_only_during_burn_in():
    problem = LinearTasks(["same"], seed=2)
    arml = ARML(algorithm="langevin", burn_in=3, noise_std=0.5, update_every=100)
    arml.setup(info(problem.model, ["same"]))
    weight = problem.model.backbone.weight
    for step in range(5):
        before = weight.detach().clone()
        arml.after_step(StepContext(step, problem.model, problem.model.shared_parameters(), None))
        moved = not torch.equal(before, weight)
        assert moved == (step < 3)


def test_arml_first_update_follows_the_official_schedule():
    # SSL/train.py of the official code: `iteration += 1` (1-based), weight step iff iteration % 20 == 0.
    arml = ARML(update_every=20, first_update=19)
    official = [iteration % 20 == 0 for iteration in range(1, 201)]
    assert [arml.is_update_step(step) for step in range(200)] == official
    assert [s for s in range(50) if ARML(update_every=20).is_update_step(s)] == [0, 20, 40]  # the default
    assert [s for s in range(20) if ARML(update_every=4, first_update=6).is_update_step(s)] == [6, 10, 14, 18]


def test_arml_freeze_model_on_update_steps_only_the_weights_there():
    problem = LinearTasks(["same", "noise"], seed=6)
    arml = ARML(update_every=3, first_update=2, freeze_model_on_update=True,
                weight_optimizer=torch.optim.SGD, weight_lr=0.01)
    arml.setup(info(problem.model, ["same", "noise"]))
    opt = torch.optim.SGD(problem.model.parameters(), lr=0.05)
    weight = problem.model.backbone.weight
    for step in range(9):
        ctx = StepContext(step, problem.model, problem.model.shared_parameters(), train_losses=None)
        before, w_before = weight.detach().clone(), arml.w.detach().clone()
        opt.zero_grad(set_to_none=True)
        losses = problem.losses()
        expected = torch.autograd.grad(arml.combine(losses, ctx), weight, retain_graph=True)[0]
        arml.backward(losses, ctx)
        opt.step()
        assert arml.after_step(ctx) == (step % 3 == 2)
        if step % 3 == 2:  # a weight step and no model step: no gradient reached the model
            assert weight.grad is None and torch.equal(weight, before)
            assert not torch.equal(arml.w, w_before)
        else:  # a model step on L_main + sum_k w_k L_k, with the weights unchanged
            torch.testing.assert_close(weight.grad, expected)
            assert not torch.equal(weight, before) and torch.equal(arml.w, w_before)


def test_arml_official_recipe_takes_the_reference_sgd_step():
    """One weight step of weightings/arml_official.gin against the official update on the same inputs:
    SGD on ||g_main - sum_k w_k g_k||^2 (built by a double backward, as SSL/lib/task_weighter.py does),
    then the shift `w + (K - sum w) / K` and the clamp at 0 (here the shift leaves no weight below 0,
    so the exact projection auxframe uses gives the same point)."""
    import gin

    from auxframe import config
    from helpers import GIN

    config.parse([GIN / "weightings/arml_official.gin"], [])
    arml = gin.get_configurable("weightings.arml")()
    gin.clear_config()
    assert (arml.update_every, arml.first_update, arml.freeze_model_on_update) == (20, 19, True)
    model, losses, ctx = make_step(seed=13)
    arml.setup(info(model, TASKS[1:]))
    assert isinstance(arml.optimizer, torch.optim.SGD)
    assert arml.optimizer.param_groups[0]["lr"] == 0.05 and arml.optimizer.param_groups[0]["momentum"] == 0.0
    alpha = torch.ones(3, requires_grad=True)
    gap = torch.autograd.grad(losses.mean("main") - sum(alpha[i] * losses.mean(t) for i, t in enumerate(TASKS[1:])),
                              ctx.shared_parameters, create_graph=True, allow_unused=True)
    (grad,) = torch.autograd.grad(sum((g ** 2).sum() for g in gap if g is not None), alpha, retain_graph=True)
    stepped = alpha.detach() - 0.05 * grad
    expected = (stepped + (3 - stepped.sum()) / 3).clamp(min=0)
    assert expected.min() > 0  # (the case where shift-then-clamp and the exact projection agree)
    ctx.step = 19
    arml.backward(losses, ctx)
    torch.testing.assert_close(arml.w.detach(), expected, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # the model is not stepped on this iteration


@pytest.mark.parametrize("kwargs, words", [
    ({"algorithm": "mcmc"}, "algorithm must be one of"),
    ({"burn_in": 10}, "belong to algorithm='langevin'"),
    ({"algorithm": "langevin"}, "needs burn_in > 0 and noise_std > 0"),
    ({"update_every": 0}, "update_every must be >= 1"),
    ({"space": "params"}, "space must be one of"),
    ({"first_update": -1}, "first_update must be a step >= 0"),
])
def test_arml_bad_settings_are_named(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        ARML(**kwargs)


# -- gradient-based baselines --------------------------------------------------------------------
def test_gcs_drops_an_auxiliary_gradient_that_points_against_the_main_one():
    problem = LinearTasks(["same", "negated"], seed=3)  # at theta = 0: g_negated = -g_main
    losses = problem.losses()
    ctx = StepContext(0, problem.model, problem.model.shared_parameters(), None)
    gcs = GCS()
    gcs.setup(info(problem.model, ["same", "negated"]))
    jac = explicit_jacobian_of(losses, ctx.shared_parameters, ["main", "same", "negated"])
    assert float(jac[0] @ jac[2]) < 0 < float(jac[0] @ jac[1])
    gcs.backward(losses, ctx)
    assert gcs.weights() == {"main": 1.0, "same": 1.0, "negated": 0.0}
    torch.testing.assert_close(problem.model.backbone.weight.grad.reshape(-1), jac[0] + jac[1])


def test_gcs_reports_the_mean_of_its_per_step_coefficients():
    problem = LinearTasks(["same", "negated", "other"], seed=7)
    gcs = GCS()
    gcs.setup(info(problem.model, problem.aux))
    opt = torch.optim.SGD(problem.model.parameters(), lr=0.05)
    masks = []
    for step in range(12):
        ctx = StepContext(step, problem.model, problem.model.shared_parameters(), None)
        losses = problem.losses()
        jac = explicit_jacobian_of(losses, ctx.shared_parameters, ["main", *problem.aux])
        cos = (jac[1:] @ jac[0]) / (jac[1:].norm(dim=1) * jac[0].norm())
        masks.append([1.0, *(cos >= 0).double().tolist()])
        opt.zero_grad()
        gcs.backward(losses, ctx)
        opt.step()
    expected = torch.tensor(masks, dtype=torch.float64).mean(0)
    got = torch.tensor([gcs.weights()[t] for t in ["main", *problem.aux]], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    assert 0 < expected[1:].sum() < 3  # the run used some gradients and dropped others
    logs = gcs.log_values()
    assert logs["weight/same"] == pytest.approx(float(expected[1]))
    assert logs["gcs/last/negated"] == masks[-1][2]
    again = GCS()
    again.setup(info(problem.model, problem.aux))
    again.load_state_dict(gcs.state_dict())
    assert again.weights() == gcs.weights()


def explicit_jacobian_of(losses, params, tasks):
    return torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses.mean(t), params, retain_graph=True)])
        for t in tasks
    ])


def test_soft_gcs_scales_by_the_cosine():
    gram = torch.tensor([[4.0, 2.0, -1.0], [2.0, 4.0, 0.0], [-1.0, 0.0, 1.0]])
    gcs = GCS(mode="soft")
    torch.testing.assert_close(gcs.coefficients(gram), torch.tensor([1.0, 0.5, 0.0]))


def pcgrad_reference(grads, order):
    """PCGrad on explicit vectors (Yu et al. 2020, Algorithm 1) with a given order per task."""
    out = []
    for i, g in enumerate(grads):
        g = g.clone()
        for j in order[i]:
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        out.append(g)
    return out


def test_pcgrad_matches_the_algorithm_on_explicit_vectors_and_leaves_no_conflict_with_main():
    model, losses, ctx = make_step(seed=8)
    jac = explicit_jacobian(losses, ctx.shared_parameters).double()
    pc = PCGrad(aux_only=True)
    pc.setup(info(model, TASKS[1:]))
    a = pc.projection(jac @ jac.T)
    projected = a @ jac
    expected = [jac[0]] + pcgrad_reference(list(jac), {i: [0] for i in range(4)})[1:]
    torch.testing.assert_close(projected, torch.stack(expected))
    assert all(float(projected[k] @ jac[0]) >= -1e-10 for k in range(1, 4))
    # The full form: with two tasks the order does not matter and no conflict is left.
    full = PCGrad()
    full.setup(info(model, TASKS[1:2]))
    two = jac[:2].clone()
    two[1] = -two[0] + 0.1 * two[1]  # make them conflict
    proj2 = full.projection(two @ two.T) @ two
    torch.testing.assert_close(proj2, torch.stack(pcgrad_reference(list(two), {0: [1], 1: [0]})))
    assert float(proj2[1] @ two[0]) >= -1e-10 and float(proj2[0] @ two[1]) >= -1e-10


def test_pcgrad_update_equals_the_sum_of_projected_gradients():
    model, losses, ctx = make_step(seed=9)
    jac = explicit_jacobian(losses, ctx.shared_parameters)
    pc = PCGrad(aux_only=True)
    pc.setup(info(model, TASKS[1:]))
    expected = (pc.projection((jac @ jac.T).double()).sum(0).float() @ jac)
    pc.backward(losses, ctx)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in ctx.shared_parameters]), expected,
                               rtol=1e-4, atol=1e-6)


def test_gradnorm_drives_gradient_norms_toward_their_targets():
    # Two copies of one regression task, one scaled by 25: equal training rates, so GradNorm's
    # target is equal weighted gradient norms, i.e. w_big / w_small -> 1/25.
    problem = LinearTasks(["same"], seed=4)
    big = problem.losses

    def scaled():
        losses = big()
        losses.values["same"] = 25.0 * losses.values["same"]
        return losses

    problem.losses = scaled
    gn = problem.train(GradNorm(alpha=0.0, weight_lr=0.02, space="shared"), steps=300, lr=0.002)
    w = gn.weights()
    assert w["main"] + w["same"] == pytest.approx(2.0, abs=1e-4)
    assert w["main"] / w["same"] > 10, w  # from 1 at the start toward 25


def test_ol_aux_raises_the_weight_of_an_aligned_task():
    problem = LinearTasks(["same", "other"], seed=5)
    ol = problem.train(OLAux(horizon=5, weight_lr=0.5), steps=60)
    w = ol.weights()
    assert w["same"] > 1.2 and w["same"] > w["other"], w


def _ol_aux_run(ol, problem, steps):
    """Train OL_AUX and return the mean <g_main, g_k> of each horizon, computed explicitly."""
    ol.setup(info(problem.model, problem.aux))
    opt = torch.optim.SGD(problem.model.parameters(), lr=0.05)
    rows, means = [], []
    for step in range(steps):
        ctx = StepContext(step, problem.model, problem.model.shared_parameters(), None)
        losses = problem.losses()
        jac = explicit_jacobian_of(losses, ctx.shared_parameters, ["main", *problem.aux])
        rows.append(jac[1:] @ jac[0])
        opt.zero_grad()
        ol.backward(losses, ctx)
        opt.step()
        if ol.after_step(ctx):
            means.append(torch.stack(rows).mean(0))
            rows = []
    return means


def test_ol_aux_max_weight_clips_the_paper_update():
    problem = LinearTasks(["same", "other"], seed=5)
    ol = OLAux(horizon=5, weight_lr=0.5, max_weight=1.3)
    means = _ol_aux_run(ol, problem, 20)
    w = torch.ones(2)
    for m in means:  # w <- clip(w + lr * mean <g_main, g_k>, 0, max_weight)
        w = (w + 0.5 * m).clamp(0.0, 1.3)
    torch.testing.assert_close(ol.w[1:], w, rtol=1e-5, atol=1e-6)
    assert float(ol.w[1]) == pytest.approx(1.3) and ol.weights()["main"] == 1.0  # 'same' hit the bound


def test_ol_aux_normalize_keeps_the_weights_on_the_simplex():
    problem = LinearTasks(["same", "other"], seed=5)
    ol = OLAux(horizon=5, weight_lr=0.5, normalize=True)
    means = _ol_aux_run(ol, problem, 20)
    w = torch.ones(2)
    for m in means:  # Euclidean projection onto {w >= 0, w_1 + w_2 = 2}, by hand for two weights
        v = w + 0.5 * m
        w = (v - (v.sum() - 2.0) / 2).clamp(0.0, 2.0)  # (one below 0 means the other above 2)
    torch.testing.assert_close(ol.w[1:], w, rtol=1e-5, atol=1e-6)
    assert float(ol.w[1:].sum()) == pytest.approx(2.0) and float(ol.w[1]) > float(ol.w[2])


@pytest.mark.parametrize("kwargs, words", [
    ({"max_weight": 0.0}, "max_weight must be a positive number"),
    ({"normalize": True, "max_weight": 2.0}, "drop max_weight"),
])
def test_ol_aux_bad_bounds_are_named(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        OLAux(**kwargs)


def test_gradnorm_anchor_main_divides_by_the_main_weight():
    model, losses, ctx = make_step(seed=14)
    gn = GradNorm(alpha=1.5, weight_optimizer=torch.optim.SGD, weight_lr=0.3, space="last_shared", anchor_main=True)
    gn.setup(info(model, TASKS[1:]))
    last = last_shared_layer(model.backbone)
    norms = explicit_jacobian(losses, last).norm(dim=1)
    # The first step: L_t / L_t(0) = 1 for every task, so the target is mean_t(w_t ||g_t||) = mean(norms).
    grad = torch.sign(norms - norms.mean()) * norms
    stepped = (torch.ones(4) - 0.3 * grad).clamp(min=0)
    gn.backward(losses, ctx)
    torch.testing.assert_close(gn.w.detach(), stepped / stepped[0], rtol=1e-5, atol=1e-6)
    assert gn.weights()["main"] == pytest.approx(1.0)


# -- loss-based baselines ------------------------------------------------------------------------
def fit_on_fixed_losses(un, ctx, values):
    """300 SGD steps of Uncertainty's log-variances on constant task losses ``values``."""
    fixed = TaskLosses({t: torch.full((3,), v) for t, v in zip(TASKS, values)}, "main", TASKS[1:])
    opt = torch.optim.SGD([un.log_var], lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        un.combine(fixed, ctx).backward()
        opt.step()


def test_uncertainty_loss_and_its_minimiser():
    model, losses, ctx = make_step(seed=10)
    un = Uncertainty()
    un.setup(info(model, TASKS[1:]))
    with torch.no_grad():
        un.log_var.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    means = torch.stack([losses.mean(t) for t in TASKS]).detach()
    s = un.log_var.detach()
    expected = (0.5 * torch.exp(-s) * means + 0.5 * s).sum()
    assert float(un.combine(losses, ctx)) == pytest.approx(float(expected), rel=1e-6)
    # On fixed losses L_t the minimiser is s_t = log L_t, i.e. weight 1 / (2 L_t).
    fit_on_fixed_losses(un, ctx, [0.5, 2.0, 4.0, 1.0])
    torch.testing.assert_close(un.log_var.detach(), torch.log(torch.tensor([0.5, 2.0, 4.0, 1.0])), atol=1e-3, rtol=0)


def test_adaloss_weights_are_inverse_running_losses_summing_to_t():
    model, losses, ctx = make_step(seed=11)
    ada = AdaLoss(beta=0.5)
    ada.setup(info(model, TASKS[1:]))
    seq = [[1.0, 2.0, 4.0, 8.0], [3.0, 2.0, 4.0, 8.0]]
    for values in seq:
        step = TaskLosses({t: torch.full((2,), v, requires_grad=True) for t, v in zip(TASKS, values)}, "main", TASKS[1:])
        ada.backward(step, ctx)
    avg = torch.tensor([2.0, 2.0, 4.0, 8.0])  # 0.5 * first + 0.5 * second
    torch.testing.assert_close(ada.current(), 4 * (1 / avg) / (1 / avg).sum())


def test_uncertainty_anchor_main_learns_only_the_auxiliary_variances():
    model, losses, ctx = make_step(seed=10)
    un = Uncertainty(anchor_main=True)
    un.setup(info(model, TASKS[1:]))
    with torch.no_grad():
        un.log_var.copy_(torch.tensor([3.0, 1.0, -1.0, 0.5]))  # s_main is not used
    means = torch.stack([losses.mean(t) for t in TASKS]).detach()
    s = un.log_var.detach()[1:]
    expected = means[0] + (0.5 * torch.exp(-s) * means[1:] + 0.5 * s).sum()
    assert float(un.combine(losses, ctx)) == pytest.approx(float(expected), rel=1e-6)
    assert un.weights()["main"] == 1.0
    fit_on_fixed_losses(un, ctx, [0.5, 2.0, 4.0, 1.0])
    # The auxiliary minimisers s_k = log L_k (weight 1 / (2 L_k)); the main task's entry never moves.
    torch.testing.assert_close(un.log_var.detach(), torch.log(torch.tensor([math.e ** 3, 2.0, 4.0, 1.0])), atol=1e-3, rtol=0)


def test_adaloss_anchor_main_weights_are_relative_to_the_main_loss():
    model, losses, ctx = make_step(seed=11)
    ada = AdaLoss(beta=0.5, anchor_main=True)
    ada.setup(info(model, TASKS[1:]))
    for values in [[1.0, 2.0, 4.0, 8.0], [3.0, 2.0, 4.0, 8.0]]:
        step = TaskLosses({t: torch.full((2,), v, requires_grad=True) for t, v in zip(TASKS, values)}, "main", TASKS[1:])
        ada.backward(step, ctx)
    torch.testing.assert_close(ada.current(), torch.tensor([1.0, 1.0, 0.5, 0.25]))  # m_main / m_t, m = [2, 2, 4, 8]


def test_dwa_anchor_main_matches_its_formula():
    last, before = torch.tensor([2.0, 2.0, 0.5, 2.0]), torch.tensor([4.0, 2.0, 1.0, 1.0])
    r = last / before
    torch.testing.assert_close(dwa_weights(last, before, 2.0, anchor_main=True), torch.exp((r - r[0]) / 2))
    dwa = DWA(temperature=2.0, epoch_steps=1, anchor_main=True)
    model, _, ctx = make_step(seed=12)
    dwa.setup(info(model, TASKS[1:]))
    for values in (before.tolist(), last.tolist()):
        dwa.backward(TaskLosses({t: torch.full((2,), v, requires_grad=True) for t, v in zip(TASKS, values)},
                                "main", TASKS[1:]), ctx)
        dwa.after_step(ctx)
    torch.testing.assert_close(dwa.current(), torch.exp((r - r[0]) / 2))


def test_dwa_matches_its_formula_per_epoch():
    model, losses, ctx = make_step(seed=12)
    dwa = DWA(temperature=2.0, epoch_steps=2)
    dwa.setup(info(model, TASKS[1:]))
    epochs = [[4.0, 2.0, 1.0, 1.0], [2.0, 2.0, 0.5, 2.0], [1.0, 1.0, 1.0, 1.0]]
    seen = []
    for e, values in enumerate(epochs):
        for _ in range(2):
            seen.append(dwa.current().clone())
            step = TaskLosses({t: torch.full((2,), v, requires_grad=True) for t, v in zip(TASKS, values)}, "main", TASKS[1:])
            dwa.backward(step, ctx)
            dwa.after_step(ctx)
    assert all(torch.equal(w, torch.ones(4)) for w in seen[:4])  # the first two epochs
    ratio = torch.tensor([2.0, 2.0, 0.5, 2.0]) / torch.tensor([4.0, 2.0, 1.0, 1.0])
    expected = 4 * torch.exp(ratio / 2) / torch.exp(ratio / 2).sum()
    torch.testing.assert_close(seen[4], expected)
    torch.testing.assert_close(dwa_weights(torch.tensor([2.0, 2.0, 0.5, 2.0]), torch.tensor([4.0, 2.0, 1.0, 1.0]), 2.0), expected)


# -- determinism -----------------------------------------------------------------------------------
ADAPTIVE = ["arml", "uncertainty", "adaloss", "dwa", "gradnorm", "gcs", "cosine_sim", "ol_aux", "pcgrad"]


@pytest.mark.parametrize("name", ADAPTIVE)
def test_every_adaptive_method_is_deterministic_for_a_seed(tmp_path, name):
    import gin

    from auxframe import config
    from auxframe.checkpoint import latest_checkpoint, load_checkpoint
    from auxframe.experiment import train
    from helpers import GIN, quick_bindings

    extra = {"train.weighting": f"@weightings.{name}()", "backbones.mlp.hidden": "(16,)",
             "LowDataSplit.labels_per_class": 3, "train.checkpoint_every": 4}
    states = []
    for i in range(2):
        gin.clear_config()
        config.parse([GIN / "experiments/digits_equal_all.gin", GIN / "models/mlp.gin"], quick_bindings(steps=4, **extra))
        result = train(run_dir=tmp_path / f"run{i}")
        states.append((result["weights"], load_checkpoint(latest_checkpoint(tmp_path / f"run{i}"))["model"]))
    assert states[0][0] == states[1][0]
    for k, v in states[0][1].items():
        assert torch.equal(v, states[1][1][k]), k


def test_every_arml_update_gets_a_log_row_between_log_intervals(tmp_path):
    import json

    import gin

    from auxframe import config
    from auxframe.experiment import train
    from helpers import GIN, quick_bindings

    gin.clear_config()
    config.parse([GIN / "experiments/digits_equal_all.gin", GIN / "models/mlp.gin"], quick_bindings(steps=9, **{
        "train.weighting": "@weightings.arml()", "weightings.arml.update_every": 3, "train.log_every": 100,
        "backbones.mlp.hidden": "(16,)", "LowDataSplit.labels_per_class": 3}))
    train(run_dir=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    weight_steps = [r["step"] for r in rows if "weight/rotation" in r and "train/digit/loss" not in r]
    assert weight_steps == [1, 4, 7]  # updates before steps 0, 3, 6 (0-based) = after steps 1, 4, 7
    assert all("arml/objective" in r for r in rows if r["step"] in weight_steps)
    for r in (r for r in rows if r["step"] in weight_steps):  # df/dw_k per task, their norm the one logged
        per_task = [r[f"arml/weight_grad/{t}"] for t in ("rotation", "parity", "ge5")]
        assert sum(g * g for g in per_task) ** 0.5 == pytest.approx(r["arml/weight_grad_norm"], rel=1e-5)


def test_log_gramian_logs_norms_and_cosines_that_make_the_weight_gradient(tmp_path):
    """With one auxiliary task at the first update (w = 1), df/dw = -2 <g_main - g_aux, g_aux>
    = -2 (cos ||g_main|| ||g_aux|| - ||g_aux||^2): the logged norms and cosine give it back. The
    diagnostic does not change what is trained."""
    import json

    import gin

    from auxframe import config
    from auxframe.experiment import train
    from helpers import GIN, quick_bindings

    def go(name, **extra):
        gin.clear_config()
        config.parse([GIN / "quickstart.gin", GIN / "models/mlp.gin"], quick_bindings(steps=4, **{
            "train.weighting": "@weightings.arml()", "weightings.arml.update_every": 2, "train.log_every": 100,
            "backbones.mlp.hidden": "(16,)", "LowDataSplit.labels_per_class": 3,
            "TaskGraph.tasks": "[@digit/Task(), @parity/Task()]", **extra}))
        result = train(run_dir=tmp_path / name)
        rows = [json.loads(line) for line in (tmp_path / name / "scalars.jsonl").read_text().splitlines()]
        return result, [r for r in rows if "arml/weight_grad/parity" in r]

    plain, _ = go("plain")
    logged, rows = go("logged", **{"weightings.arml.log_gramian": True})
    assert logged["weights"] == plain["weights"] and logged["test"] == plain["test"]
    first = rows[0]
    n_main, n_aux, cos = first["arml/grad_norm/digit"], first["arml/grad_norm/parity"], first["arml/cos/parity"]
    assert n_main > 0 and n_aux > 0 and -1 <= cos <= 1
    assert first["arml/weight_grad/parity"] == pytest.approx(-2 * (cos * n_main * n_aux - n_aux ** 2), rel=1e-4)
