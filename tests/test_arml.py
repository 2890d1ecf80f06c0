"""ARML and the adaptive baselines against their formulas, closed forms and planted toy problems."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from auxframe.errors import ConfigError
from auxframe.models.multitask import MultiTaskModel
from auxframe.weighting.arml import ARML
from auxframe.weighting.base import StepContext, TaskLosses, WeightingSetup
from auxframe.weighting.gradient_based import GCS, PCGrad, GradNorm, OLAux
from auxframe.weighting.loss_based import DWA, AdaLoss, Uncertainty, dwa_weights
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


@pytest.mark.parametrize("kwargs, words", [
    ({"algorithm": "mcmc"}, "algorithm must be one of"),
    ({"burn_in": 10}, "belong to algorithm='langevin'"),
    ({"algorithm": "langevin"}, "needs burn_in > 0 and noise_std > 0"),
    ({"update_every": 0}, "update_every must be >= 1"),
    ({"space": "params"}, "space must be one of"),
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


# -- loss-based baselines ------------------------------------------------------------------------
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
    fixed = TaskLosses({t: torch.full((3,), v) for t, v in zip(TASKS, [0.5, 2.0, 4.0, 1.0])}, "main", TASKS[1:])
    opt = torch.optim.SGD([un.log_var], lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        un.combine(fixed, ctx).backward()
        opt.step()
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
        config.parse([GIN / "quickstart.gin", GIN / "models/mlp.gin"], quick_bindings(steps=4, **extra))
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
    config.parse([GIN / "quickstart.gin", GIN / "models/mlp.gin"], quick_bindings(steps=9, **{
        "train.weighting": "@weightings.arml()", "weightings.arml.update_every": 3, "train.log_every": 100,
        "backbones.mlp.hidden": "(16,)", "LowDataSplit.labels_per_class": 3}))
    train(run_dir=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    weight_steps = [r["step"] for r in rows if "weight/rotation" in r and "train/digit/loss" not in r]
    assert weight_steps == [1, 4, 7]  # updates before steps 0, 3, 6 (0-based) = after steps 1, 4, 7
    assert all("arml/objective" in r for r in rows if r["step"] in weight_steps)
