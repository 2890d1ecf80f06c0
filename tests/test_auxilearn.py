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


def run(run_dir=None, steps=6, resume=False, files=("experiments/digits_equal_all.gin",), **extra):
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
    ({"curvature_fraction": 0.0}, r"curvature_fraction must be a number in \(0, 1\]"),
    ({"curvature_fraction": 1.5}, r"curvature_fraction must be a number in \(0, 1\]"),
    ({"curvature_fraction": 0.5, "method": "first_order"}, "has no effect with method='first_order'"),
    ({"mixed": "fd"}, "mixed must be one of 'auto', 'forward', 'vjp', 'jacobian'"),
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
        config.parse([GIN / "experiments/digits_equal_all.gin"], quick_bindings(steps=1, **{
            "train.weighting": weighting_binding, "weightings.auxilearn.outer_every": 1,
            "weightings.auxilearn.outer_lr": 0.0}))
        import auxframe.trainer as trainer_module

        captured = {}
        original = trainer_module.Trainer.finish

        def capture(self, wall):
            captured.update({k: v.clone() for k, v in self.model.state_dict().items() if "running" in k})
            return original(self, wall)

        trainer_module.Trainer.finish = capture
        try:
            train_fn(run_dir=None)
        finally:
            trainer_module.Trainer.finish = original
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


# -- the forward-mode mixed term and the curvature mini-batch, on a hand-built step ------------------
class _NoForwardAD(torch.autograd.Function):
    """The identity, with a backward but no forward-mode derivative."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


class _Step:
    """A tiny model, one batch shared by 'main' and 'parity' and another batch for 'rotation'."""

    def __init__(self, no_forward_ad: bool = False, seed: int = 0):
        from auxframe.models.backbones import SmallCNN
        from auxframe.models.heads import ClassificationHead
        from auxframe.models.multitask import MultiTaskModel
        from auxframe.weighting.base import StepContext

        torch.manual_seed(seed)
        backbone = SmallCNN(input_shape=(1, 8, 8), channels=(4, 6), pool_after=(0,))
        heads = {n: ClassificationHead((backbone.out_features,), c) for n, c in [("main", 10), ("parity", 2), ("rotation", 4)]}
        self.model = MultiTaskModel(backbone, heads).double()
        g = torch.Generator().manual_seed(seed + 1)
        self.x = {"a": torch.randn(12, 1, 8, 8, generator=g, dtype=torch.float64),
                  "b": torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64)}
        self.targets = {"main": torch.randint(0, 10, (12,), generator=g), "parity": torch.randint(0, 2, (12,), generator=g),
                        "rotation": torch.randint(0, 4, (16,), generator=g)}
        self.x_aux = torch.randn(10, 1, 8, 8, generator=g, dtype=torch.float64)
        self.y_aux = torch.randint(0, 10, (10,), generator=g)
        self.no_forward_ad = no_forward_ad
        self.ctx = StepContext(0, self.model, self.model.shared_parameters(), train_losses=self.losses,
                               aux_set_losses=self.aux_losses)

    def from_outputs(self, outputs, targets=None):
        targets = self.targets if targets is None else targets
        if self.no_forward_ad:
            outputs = {t: _NoForwardAD.apply(o) for t, o in outputs.items()}
        values = {t: torch.nn.functional.cross_entropy(o, targets[t], reduction="none") for t, o in outputs.items()}
        return TaskLosses(values, "main", ["parity", "rotation"], [("main", "parity"), ("rotation",)],
                          outputs=outputs, from_outputs=self.from_outputs, targets=targets)

    def losses(self):
        outputs = {**self.model(self.x["a"], tasks=["main", "parity"]), **self.model(self.x["b"], tasks=["rotation"])}
        losses = self.from_outputs(outputs)
        losses.inputs = {"main": self.x["a"], "parity": self.x["a"], "rotation": self.x["b"]}
        return losses

    def aux_losses(self):
        out = self.model(self.x_aux, tasks=["main"])["main"]
        return TaskLosses({"main": torch.nn.functional.cross_entropy(out, self.y_aux, reduction="none")}, "main", [], [["main"]])

    def weighting(self, **kwargs) -> AuxiLearn:
        from auxframe.weighting.base import WeightingSetup

        torch.manual_seed(3)
        w = AuxiLearn(alpha=0.05, **kwargs)
        w.setup(WeightingSetup("main", ["parity", "rotation"], self.model, self.model.shared_parameters(),
                               torch.device("cpu"), total_steps=10, steps_per_epoch=1, has_aux_set=True))
        w.auxnet.double()
        return w

    def hypergradient(self, w: AuxiLearn) -> torch.Tensor:
        result, _ = w.hypergradient(self.ctx, self.losses(), self.aux_losses().mean("main"))
        return torch.cat([g.reshape(-1) for g in result.grads])


@pytest.mark.parametrize("auxnet", ["linear", "nonlinear"])
def test_forward_mode_mixed_term_equals_the_backward_one(auxnet):
    step = _Step()
    forward = step.hypergradient(step.weighting(auxnet=auxnet, mixed="forward"))
    backward = step.hypergradient(step.weighting(auxnet=auxnet, mixed="vjp"))
    assert backward.norm() > 1e-6
    assert ((forward - backward).norm() / backward.norm()).item() < 1e-8
    assert step.weighting(auxnet=auxnet).path.mixed == "forward"  # what 'auto' picks


def test_an_op_without_forward_mode_falls_back_to_the_backward_mixed_term():
    step = _Step(no_forward_ad=True)
    w = step.weighting(auxnet="linear")
    with pytest.warns(RuntimeWarning, match="forward-mode pass through the model failed"):
        fallback = step.hypergradient(w)
    assert w.path.mixed == "vjp" and not w.path.uses_forward_mode  # from then on
    expected = step.hypergradient(step.weighting(auxnet="linear", mixed="vjp"))
    assert torch.allclose(fallback, expected, rtol=1e-10, atol=0)


def test_curvature_fraction_uses_the_hessian_of_a_random_part_of_each_batch():
    # Against an independent computation: the dense Hessian of the loss on the chosen rows, by
    # torch.autograd.functional.hessian over the flattened backbone, and the mixed term from the
    # whole batch: hypergradient = -(d2 L_T / dW dphi)^T H_sub^-1 v.
    from torch.func import functional_call

    step = _Step()
    w = step.weighting(auxnet="linear", method="exact", mixed="vjp", curvature_fraction=0.5)
    got = step.hypergradient(w)
    index = w.curvature_index
    assert [len(i) for i in index.values()] == [6, 8]  # ceil(0.5 n) rows of each group
    assert all(len(set(i.tolist())) == len(i) for i in index.values())
    assert index[("main", "parity")].tolist() != list(range(6))  # random rows, not the first ones

    backbone = step.model.backbone
    names = [n for n, p in backbone.named_parameters()]
    shapes = [p.shape for p in backbone.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in backbone.parameters()])

    def unflatten(flat):
        return dict(zip(names, [c.reshape(s) for c, s in zip(flat.split([s.numel() for s in shapes]), shapes)]))

    def loss_on(flat, rows):
        buffers = {n: b.clone() for n, b in backbone.named_buffers()}
        outputs = {}
        for group, x_key in ((("main", "parity"), "a"), (("rotation",), "b")):
            x = step.x[x_key] if rows is None else step.x[x_key][rows[group]]
            z = functional_call(backbone, {**unflatten(flat), **buffers}, (x,))
            outputs.update({t: step.model.heads[t](z) for t in group})
        targets = step.targets if rows is None else {t: step.targets[t][rows[g]] for g in rows for t in g}
        return w.auxnet(w.loss_matrix(step.from_outputs(outputs, targets)))

    hessian = torch.autograd.functional.hessian(lambda f: loss_on(f, index), flat0)
    flat = flat0.clone().requires_grad_()
    out = functional_call(backbone, {**unflatten(flat), **{n: b.clone() for n, b in backbone.named_buffers()}}, (step.x_aux,))
    v = torch.autograd.grad(torch.nn.functional.cross_entropy(step.model.heads["main"](out), step.y_aux), flat)[0]
    p = torch.linalg.solve(hessian, v)
    phi = list(w.auxnet.parameters())
    g = torch.autograd.grad(loss_on(flat, None), flat, create_graph=True)[0]
    expected = -torch.cat([t.reshape(-1) for t in torch.autograd.grad(g @ p, phi)])
    assert ((got - expected).norm() / expected.norm()).item() < 1e-6
    # and the whole batch's curvature gives another answer
    whole = step.hypergradient(step.weighting(auxnet="linear", method="exact", mixed="vjp"))
    assert ((whole - expected).norm() / expected.norm()).item() > 1e-3


def test_curvature_subsets_are_drawn_afresh_each_outer_step_and_repeat_for_a_seed():
    step = _Step()
    w1, w2 = (step.weighting(curvature_fraction=0.25) for _ in range(2))
    rows = []
    for w in (w1, w2):
        w._curvature_subset(step.ctx, step.losses())
        first = {k: v.clone() for k, v in w.curvature_index.items()}
        w.outer_steps += 1
        w._curvature_subset(step.ctx, step.losses())
        rows.append((first, w.curvature_index))
    assert all(torch.equal(rows[0][0][k], rows[1][0][k]) for k in rows[0][0])  # same seed: same rows
    assert any(not torch.equal(rows[0][0][k], rows[0][1][k]) for k in rows[0][0])  # next step: others


def test_gauss_newton_products_by_forward_mode_equal_the_double_vjp_ones():
    step = _Step()
    fast = step.hypergradient(step.weighting(auxnet="nonlinear", curvature="gauss_newton"))
    w = step.weighting(auxnet="nonlinear", curvature="gauss_newton")
    assert "output_jvp" in w._curvature_args(step.losses(), step.ctx, w._inner_parameters(step.ctx))
    w._forward_mode_off(None)  # what a model without forward-mode support gets
    assert "output_jvp" not in w._curvature_args(step.losses(), step.ctx, w._inner_parameters(step.ctx))
    slow = step.hypergradient(w)
    assert slow.norm() > 1e-6
    assert ((fast - slow).norm() / slow.norm()).item() < 1e-8


# -- the outer step captured in a CUDA graph (the captured function, checked here on the CPU) -------
def test_the_graphed_hypergradient_computes_what_hypergradient_computes():
    step = _Step()
    for scale in (False, True):
        w = step.weighting(auxnet="nonlinear", mixed="vjp", scale_by_alpha=scale)
        batch = {("main", "parity"): (step.x["a"], {t: step.targets[t] for t in ("main", "parity")}),
                 ("rotation",): (step.x["b"], {"rotation": step.targets["rotation"]})}
        inner = w._inner_parameters(step.ctx)
        graphed = w.graph(step.model, inner, step.from_outputs, batch, (step.x_aux, step.y_aux), capture=False)
        result, matrix, outer = graphed(batch, (step.x_aux, step.y_aux), 0.05)
        expected = hypergrad_of(step, w)
        got = torch.cat([g.reshape(-1) for g in result.grads])
        assert ((got - torch.cat([g.reshape(-1) for g in expected.grads])).norm() / got.norm()).item() < 1e-10
        assert result.term_norms == pytest.approx(expected.term_norms, rel=1e-10)
        assert result.outer_grad_norm == pytest.approx(expected.outer_grad_norm, rel=1e-10)
        assert result.diverging == expected.diverging
        assert torch.allclose(outer, step.aux_losses().mean("main"))
        assert graphed.fits(batch, (step.x_aux, step.y_aux))
        assert not graphed.fits(batch, (step.x_aux[:5], step.y_aux[:5]))  # another shape: eager instead


def hypergrad_of(step, w):
    from auxframe import hypergrad

    losses = step.losses()
    return hypergrad.hypergradient(w.auxnet(w.loss_matrix(losses)), step.aux_losses().mean("main"),
                                   w._inner_parameters(step.ctx), w.outer_params, neumann_terms=w.neumann_terms,
                                   alpha=0.05, scale_by_alpha=w.scale_by_alpha, mixed="vjp")


def test_cuda_graph_where_it_does_not_apply_says_why_once_and_trains_eagerly(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"cuda_graph=True does not apply here \(the model is not on a CUDA") as record:
        result = run(tmp_path / "s", steps=6, **{"weightings.auxilearn.cuda_graph": "True", "train.device": "'cpu'"})
    assert len([w for w in record if "cuda_graph" in str(w.message)]) == 1
    assert result["steps"] == 6


def test_the_execution_path_is_chosen_at_setup():
    from auxframe.models.backbones import MLP
    from auxframe.models.heads import ClassificationHead
    from auxframe.models.multitask import MultiTaskModel
    from auxframe.weighting.base import WeightingSetup

    def setup(model, **kwargs):
        w = AuxiLearn(**kwargs)
        w.setup(WeightingSetup("main", ["a"], model, model.shared_parameters(), torch.device("cpu"),
                               total_steps=10, steps_per_epoch=1, has_aux_set=True))
        return w.path

    def model(dropout):
        backbone = MLP((1, 4, 4), hidden=(6,), dropout=dropout)
        return MultiTaskModel(backbone, {t: ClassificationHead((6,), 2) for t in ("main", "a")})

    assert setup(model(0.0)).mixed == "forward" and not setup(model(0.0)).light
    assert setup(model(0.0), curvature_fraction=0.5).light  # no graph through the training batch's forward
    assert setup(model(0.3)).mixed == "vjp"  # dropout: a forward-mode re-run would draw other masks
    assert not setup(model(0.3), curvature="gauss_newton").forward_gauss_newton
    assert setup(model(0.0), curvature="gauss_newton").forward_gauss_newton
    assert setup(model(0.0), mixed="jacobian").mixed == "jacobian"
    with pytest.raises(ConfigError, match="mixed = 'forward' re-runs the model.*active dropout"):
        setup(model(0.3), mixed="forward")

    # after setup the path's settings change only through reconfigure, which chooses again
    w = AuxiLearn()
    net = model(0.0)
    w.setup(WeightingSetup("main", ["a"], net, net.shared_parameters(), torch.device("cpu"),
                           total_steps=10, steps_per_epoch=1, has_aux_set=True))
    with pytest.raises(ConfigError, match=r"curvature_fraction decides how outer steps run.*reconfigure"):
        w.curvature_fraction = 0.5
    assert not w.path.curvature_subset
    w.reconfigure(curvature_fraction=0.5, mixed="vjp")
    assert w.path.curvature_subset and w.path.mixed == "vjp" and w.curvature_fraction == 0.5
    with pytest.raises(ConfigError, match=r"curvature_fraction must be a number in \(0, 1\]"):
        w.reconfigure(curvature_fraction=2.0)
    with pytest.raises(ConfigError, match="reconfigure takes"):
        w.reconfigure(neumann_terms=5)
