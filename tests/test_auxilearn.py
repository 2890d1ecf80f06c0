"""The AuxiLearn weighting: wiring into the trainer, what it learns, its constraints and its state."""

from __future__ import annotations

import json

import gin
import pytest
import torch

from auxframe import config
from auxframe.checkpoint import latest_checkpoint, load_checkpoint
from auxframe.data.base import LabelField, TensorImageDataset
from auxframe.data.digits import digits
from auxframe.errors import ConfigError
from auxframe.experiment import train
from auxframe.weighting.auxilearn import AuxiLearn
from auxframe.weighting.base import TaskLosses
from helpers import GIN, quick_bindings


def run(run_dir=None, steps=6, resume=False, files=("quickstart.gin",), **extra):
    b = {"train.weighting": "@weightings.auxilearn()", "weightings.auxilearn.outer_every": 2}
    b.update(extra)
    config.parse([GIN / f for f in files], quick_bindings(steps=steps, **b))
    return train(run_dir=run_dir, resume=resume)


def scalars(run_dir):
    return [json.loads(line) for line in (run_dir / "scalars.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("auxnet", ["@auxnets.linear", "@auxnets.nonlinear"])
def test_trains_on_digits_and_logs_what_users_see(tmp_path, auxnet):
    result = run(tmp_path / "r", **{"weightings.auxilearn.auxnet": auxnet})
    rows = scalars(tmp_path / "r")
    logged = {k for r in rows for k in r}
    assert {"auxilearn/hypergrad_norm", "auxilearn/outer_loss", "auxilearn/alpha", "weight/rotation"} <= logged
    assert set(result["weights"]) == {"digit", "rotation", "parity", "ge5"}
    state = load_checkpoint(latest_checkpoint(tmp_path / "r"))["weighting"]
    assert state["outer_steps"] == 3 and state["auxnet"]  # outer steps after inner steps 2, 4, 6


def test_resumes_exactly(tmp_path):
    cpu = {"train.device": "'cpu'"}  # bit-identical resume is a CPU guarantee (see test_trainer.py)
    run(tmp_path / "a", steps=8, **{"train.checkpoint_every": 4}, **cpu)
    run(tmp_path / "b", steps=4, **cpu)
    run(tmp_path / "b", steps=8, resume=True, **cpu)
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("a", "b"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["weighting"]["auxnet"]:
        assert torch.equal(a["weighting"]["auxnet"][k], b["weighting"]["auxnet"][k]), k


def test_monotone_weights_stay_non_negative_after_every_outer_step(tmp_path):
    run(tmp_path / "m", steps=12, **{
        "weightings.auxilearn.outer_every": 1, "weightings.auxilearn.outer_lr": 0.5,
        "weightings.auxilearn.auxnet": "@auxnets.linear", "auxnets.linear.monotone": "'projection'",
        "train.log_every": 1,
    })
    weights = [v for r in scalars(tmp_path / "m") for k, v in r.items() if k.startswith("weight/")]
    assert len(weights) == 12 * 4
    assert min(weights) >= 0.0
    assert min(weights) < 0.9  # the large outer learning rate did move the weights


def test_gauss_newton_curvature_runs(tmp_path):
    result = run(tmp_path / "g", steps=4, **{"weightings.auxilearn.curvature": "'gauss_newton'"})
    rows = scalars(tmp_path / "g")
    norms = [r["auxilearn/hypergrad_norm"] for r in rows if "auxilearn/hypergrad_norm" in r]
    assert norms and all(n > 0 for n in norms)
    assert result["steps"] == 4


def test_needs_an_aux_set():
    with pytest.raises(ConfigError, match="aux_per_class"):
        run(**{"LowDataSplit.aux_per_class": 0})


@pytest.mark.parametrize("kwargs, words", [
    ({"inner_params": "heads"}, "inner_params must be one of 'shared', 'all'"),
    ({"outer_bn_mode": "frozen"}, "outer_bn_mode must be one of"),
    ({"outer_every": 0}, "outer_every must be a positive integer"),
    ({"alpha": -1.0}, "alpha must be 'auto' or a positive number"),
])
def test_bad_settings_are_named(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        AuxiLearn(**kwargs)


def test_loss_matrix_keeps_rows_of_one_batch_and_broadcasts_other_batches():
    w = AuxiLearn()
    w.main_task, w.aux_tasks, w.tasks = "m", ["a", "r"], ["m", "a", "r"]
    w.auxnet = torch.nn.Identity()
    losses = TaskLosses(
        {"m": torch.tensor([1.0, 2.0]), "a": torch.tensor([3.0, 4.0]), "r": torch.tensor([1.0, 2.0, 3.0, 6.0])},
        "m", ["a", "r"], [["m", "a"], ["r"]],
    )
    assert w.loss_matrix(losses).tolist() == [[1.0, 3.0, 3.0], [2.0, 4.0, 3.0]]


# -- what it learns ------------------------------------------------------------------------------
@gin.register
def helpful_and_noise_digits() -> TensorImageDataset:
    """Digits with two auxiliary label fields: the digit itself (helpful) and random labels (noise)."""
    base = digits()
    g = torch.Generator().manual_seed(0)
    labels = {
        "digit": base.labels["digit"],
        "helpful": base.labels["digit"].clone(),
        "noise": torch.randint(0, 10, (len(base),), generator=g),
    }
    fields = {"digit": LabelField(10), "helpful": LabelField(10, "a copy of the digit"),
              "noise": LabelField(10, "uniformly random labels")}
    return TensorImageDataset(base.images, labels, fields, "digit")


def test_helpful_task_ends_with_a_larger_weight_than_a_noise_task(tmp_path):
    extra = {
        "train.dataset": "@helpful_and_noise_digits()",
        "helpful/Task.name": "'helpful'", "helpful/Task.labels": "'helpful'",
        "noise/Task.name": "'noise'", "noise/Task.labels": "'noise'",
        "TaskGraph.tasks": "[@digit/Task(), @helpful/Task(), @noise/Task()]",
        "weightings.auxilearn.outer_every": 3, "weightings.auxilearn.outer_lr": 0.05,
        "LowDataSplit.labels_per_class": 20, "backbones.small_cnn.channels": "(16, 16)",
    }
    result = run(None, steps=90, **extra)
    w = result["weights"]
    assert w["helpful"] > w["noise"] + 0.2, w


def test_loss_matrix_for_per_pixel_networks():
    from auxframe.auxnets import ConvAuxNet

    w = AuxiLearn()
    w.main_task, w.aux_tasks, w.tasks = "seg", ["edge", "rot"], ["seg", "edge", "rot"]
    w.auxnet = ConvAuxNet(3)
    seg, edge = torch.rand(2, 4, 4), torch.rand(2, 4, 4)
    losses = TaskLosses({"seg": seg, "edge": edge, "rot": torch.tensor([1.0, 3.0, 5.0])},
                        "seg", ["edge", "rot"], [["seg", "edge"], ["rot"]])
    m = w.loss_matrix(losses)
    assert m.shape == (2, 3, 4, 4)
    assert torch.equal(m[:, 0], seg) and torch.equal(m[:, 1], edge) and bool((m[:, 2] == 3.0).all())


def test_outer_step_leaves_batchnorm_statistics_alone():
    # With an outer step after every inner step, the running statistics must equal those of the
    # same training without the outer steps' extra forward passes (which would differ).

    from auxframe.experiment import train as train_fn

    def bn_state(weighting_binding):
        config.parse([GIN / "quickstart.gin"], quick_bindings(steps=1, **{
            "train.weighting": weighting_binding, "weightings.auxilearn.outer_every": 1,
            "weightings.auxilearn.outer_lr": 0.0}))
        import auxframe.trainer as trainer_module

        captured = {}
        original = trainer_module.Trainer._finish

        def capture(self, wall):
            captured.update({k: v.clone() for k, v in self.model.state_dict().items() if "running" in k})
            return original(self, wall)

        trainer_module.Trainer._finish = capture
        try:
            train_fn(run_dir=None)
        finally:
            trainer_module.Trainer._finish = original
        return captured

    with_outer = bn_state("@weightings.auxilearn()")
    assert with_outer and all(isinstance(v, torch.Tensor) for v in with_outer.values())
    without = bn_state("@weightings.equal()")
    # the linear net starts at weight 1 for every task, so the one inner step is Equal's step
    for k in without:
        assert torch.allclose(with_outer[k], without[k]), k


@pytest.mark.parametrize("method, mixed, curvature", [
    ("first_order", "jacobian", "hessian"),
    ("cg", "vjp", "gauss_newton"),  # CG needs positive curvature; early in training the Hessian is not
    ("neumann", "jacobian", "hessian"),
])
def test_other_solvers_and_mixed_terms_run_in_the_weighting(tmp_path, method, mixed, curvature):
    result = run(tmp_path / "s", steps=4, **{
        "weightings.auxilearn.method": f"'{method}'", "weightings.auxilearn.mixed": f"'{mixed}'",
        "weightings.auxilearn.curvature": f"'{curvature}'", "weightings.auxilearn.auxnet": "@auxnets.linear",
    })
    rows = scalars(tmp_path / "s")
    norms = [r["auxilearn/hypergrad_norm"] for r in rows if "auxilearn/hypergrad_norm" in r]
    assert norms and all(n > 0 for n in norms)
    assert any("auxilearn/top_eigenvalue" in r for r in rows) == (method == "neumann")
    assert result["steps"] == 4


def test_first_order_with_the_jacobian_mixed_term_equals_minus_the_gradient_alignment():
    # J = 0, unscaled: dL_A/dw_k = -<grad_W l_k, grad_W L_A> for the linear net's weight of task k.
    torch.manual_seed(0)
    W = torch.randn(5, requires_grad=True)
    x, xa = torch.randn(8, 5), torch.randn(6, 5)
    l_main, l_aux = (x @ W - 1).pow(2), (x @ W + 2).pow(2)
    from auxframe import hypergrad
    from auxframe.auxnets import LinearAuxNet

    net = LinearAuxNet(2)
    train_loss = net(torch.stack([l_main, l_aux], 1))
    outer = (xa @ W).pow(2).mean()
    res = hypergrad.hypergradient(train_loss, outer, [W], list(net.parameters()), method="first_order", mixed="jacobian")
    g_outer = torch.autograd.grad(outer, W, retain_graph=True)[0]
    expected = [-(torch.autograd.grad(l.mean(), W, retain_graph=True)[0] @ g_outer) for l in (l_main, l_aux)]
    assert torch.allclose(res.grads[0].flatten(), torch.stack(expected), rtol=1e-5)
