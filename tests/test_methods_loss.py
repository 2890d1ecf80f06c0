"""FAMO, MetaBalance, RLW, Auto-λ and ForkMerge against their authors' code on identical inputs
(numbers written here, with the command that produced them) and against their papers' formulas."""

from __future__ import annotations

import copy
import json

import gin
import pytest
import torch
import torch.nn as nn

from auxframe import config
from auxframe.errors import ConfigError
from auxframe.experiment import train
from auxframe.weighting.base import WeightingSetup
from auxframe.weighting.famo import FAMO
from auxframe.weighting.metabalance import MetaBalance, metabalance_coefficients
from auxframe.weighting.rlw import DISTRIBUTIONS, RLW, draw_weights
from helpers import GIN, quick_bindings


def info(names, model=None):
    model = model or nn.Linear(1, 1)
    return WeightingSetup(names[0], list(names[1:]), model, list(model.parameters()), torch.device("cpu"), 100, 10,
                          has_aux_set=True)


# -- FAMO --------------------------------------------------------------------------------------------
#: The official FAMO (Cranial-XIX/FAMO@0a6ad06, famo.py: FAMO(n_tasks=2, device='cpu', max_norm=0), its
#: backward() then update() on the new losses, as in its __main__) on the toy below, 5 SGD steps.
FAMO_OFFICIAL = {
    "logits": [-0.07903449237346649, 0.0790344849228859],
    "weight": [-0.4648241698741913, 0.2009221911430359, 0.10783187299966812, -0.3576836884021759,
               -0.06624627858400345, -0.29199865460395813],
    "bias": [-0.11711598187685013, 0.034041695296764374],
}


def test_famo_matches_the_official_code():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    famo = FAMO()
    famo.setup(info(["a", "b"]))
    for _ in range(5):
        losses = (y - model(x)).pow(2).mean(0)
        w = famo.current_weights(losses.detach())
        opt.zero_grad()
        (w * losses).sum().backward()  # the gradient of FAMO's sum_i z_i/c log(L_i)
        opt.step()
        with torch.no_grad():
            famo.update_logits(losses.detach(), (y - model(x)).pow(2).mean(0))
    torch.testing.assert_close(famo.logits.detach(), torch.tensor(FAMO_OFFICIAL["logits"]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.weight.detach().flatten(), torch.tensor(FAMO_OFFICIAL["weight"]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.bias.detach(), torch.tensor(FAMO_OFFICIAL["bias"]), rtol=1e-5, atol=1e-7)


def test_famo_weights_are_the_gradient_of_its_log_objective():
    famo = FAMO()
    famo.setup(info(["a", "b", "c"]))
    with torch.no_grad():
        famo.logits.copy_(torch.tensor([0.3, -0.2, 0.1]))
    losses = torch.tensor([0.5, 2.0, 1.2], requires_grad=True)
    z = torch.softmax(famo.logits.detach(), 0)
    c = (z / losses).sum().detach()
    (grad,) = torch.autograd.grad((z / c * losses.log()).sum(), losses)
    torch.testing.assert_close(famo.current_weights(losses.detach()), grad)
    assert float(famo.current_weights(losses.detach()).sum()) == pytest.approx(1.0)


# -- MetaBalance -------------------------------------------------------------------------------------
#: The official MetaBalance (facebookresearch/MetaBalance@1c342a9, metabalance.py: MetaBalance(trunk
#: params, relax_factor=0.7, beta=0.9).step(losses) then SGD(lr 0.1).step(); .cuda() made a no-op) on
#: the toy below, 4 steps.
MB_OFFICIAL = {
    "weight": [0.3743787705898285, 0.21163664758205414, -0.35232287645339966, -0.41212591528892517,
               0.5120370388031006, 0.36143410205841064, -0.28317055106163025, -0.1459663212299347,
               -0.4451954662799835, -0.05017651617527008, -0.29749399423599243, -0.5603737235069275],
    "bias": [0.025307267904281616, 0.08798056095838547, -0.18573373556137085, 0.2249360978603363],
}


def test_metabalance_matches_the_official_code():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randn(16, 3)
    trunk, heads = nn.Linear(3, 4), nn.ModuleList([nn.Linear(4, 1) for _ in range(3)])
    shared = list(trunk.parameters())
    opt = torch.optim.SGD(shared + list(heads.parameters()), lr=0.1)
    averages = torch.zeros(3, 2)
    for _ in range(4):
        z = torch.tanh(trunk(x))
        losses = [((h(z).squeeze(1) - y[:, i]) * (i + 1)).pow(2).mean() for i, h in enumerate(heads)]
        grads = [torch.autograd.grad(l, shared, retain_graph=True) for l in losses]
        norms = torch.tensor([[float(g.norm()) for g in task] for task in grads])
        coefficients, averages = metabalance_coefficients(norms, averages, beta=0.9, relax=0.7)
        opt.zero_grad()
        sum(losses).backward()  # the heads: each its own loss
        for j, p in enumerate(shared):
            p.grad = sum(coefficients[i, j] * grads[i][j] for i in range(3))
        opt.step()
    torch.testing.assert_close(trunk.weight.detach().flatten(), torch.tensor(MB_OFFICIAL["weight"]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(trunk.bias.detach(), torch.tensor(MB_OFFICIAL["bias"]), rtol=1e-5, atol=1e-7)


def test_metabalance_strategies_and_the_relax_factor():
    norms = torch.tensor([[1.0, 2.0], [4.0, 1.0], [0.5, 2.0]])
    c, avg = metabalance_coefficients(norms, torch.zeros(3, 2), beta=0.0, relax=1.0)
    torch.testing.assert_close(avg, norms)
    torch.testing.assert_close(c * norms, norms[:1].expand(3, 2))  # r = 1: every magnitude becomes the main one
    c, _ = metabalance_coefficients(norms, torch.zeros(3, 2), beta=0.0, relax=0.0)
    assert c.eq(1).all()  # r = 0: Equal
    down, _ = metabalance_coefficients(norms, torch.zeros(3, 2), beta=0.0, relax=1.0, strategy="decrease")
    assert down.tolist() == [[1.0, 1.0], [0.25, 1.0], [1.0, 1.0]]
    up, _ = metabalance_coefficients(norms, torch.zeros(3, 2), beta=0.0, relax=1.0, strategy="increase")
    assert up.tolist() == [[1.0, 1.0], [1.0, 2.0], [2.0, 1.0]]
    with pytest.raises(ConfigError, match="relax_factor"):
        MetaBalance(relax_factor=1.0)


# -- RLW ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_rlw_draws_weights_on_the_simplex_with_the_papers_means(distribution):
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([draw_weights(distribution, 4, g) for _ in range(4000)])
    torch.testing.assert_close(draws.sum(1), torch.ones(4000))
    assert (draws >= 0).all()
    torch.testing.assert_close(draws.mean(0), torch.full((4,), 0.25), atol=0.02, rtol=0)  # exchangeable: mean 1/T
    if distribution == "constrained_bernoulli":
        assert set(draws.flatten().tolist()) == {0.0, 1.0}
    if distribution == "dirichlet":  # Dir(1,1,1,1): Var = (1/4)(3/4)/5
        assert float(draws[:, 0].var()) == pytest.approx(0.0375, rel=0.1)


def test_rlw_is_seeded_and_resumes_its_draws():
    a, b = RLW(seed=5), RLW(seed=5)
    a.setup(info(["m", "x"]))
    b.setup(info(["m", "x"]))
    first = draw_weights("normal", 2, a.generator)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(draw_weights("normal", 2, a.generator), draw_weights("normal", 2, b.generator))
    assert not torch.equal(first, draw_weights("normal", 2, a.generator))


# -- Auto-λ and ForkMerge in a real trainer ------------------------------------------------------------
FILES = [GIN / "experiments/digits_equal_all.gin", GIN / "models/mlp.gin"]
SMALL = {"backbones.mlp.hidden": "(16,)", "LowDataSplit.labels_per_class": 3}


def inside_trainer(monkeypatch, check, weighting: str, **extra):
    """``check(trainer)`` on the trainer the gin files build (in place of its ``fit``)."""
    from auxframe.trainer import Trainer

    done = []
    monkeypatch.setattr(Trainer, "fit", lambda self: done.append(check(self)) or {})
    gin.clear_config()
    config.parse(FILES, quick_bindings(steps=4, **{"train.weighting": weighting, **SMALL, **extra}))
    train()
    assert done


def test_auto_lambda_meta_gradient_is_the_papers_finite_difference(monkeypatch):
    inside_trainer(monkeypatch, check_auto_lambda, "@weightings.auto_lambda()", **{"weightings.auto_lambda.virtual_lr": 0.5})


def check_auto_lambda(trainer):
    # The official code's form: -eta (L_i(theta + eps d) - L_i(theta - eps d)) / (2 eps), d the meta
    # loss's gradient at the virtual step theta' = theta - eta sum_i lambda_i grad L_i.
    w, model, ctx = trainer.weighting, trainer.model, trainer.ctx
    model.train()
    ctx.extras.clear()
    losses = trainer._next_train_losses()
    params = [p for p in model.parameters() if p.requires_grad]
    names = w.names
    x, y = w.meta_batch(ctx)
    w.meta_batch = lambda ctx: (x, y)  # the same meta batch for both
    got = w.meta_gradient(losses, ctx)
    # The reference, by hand in float64 (a step small enough to cross no ReLU kink).
    model64 = copy.deepcopy(model).double()
    p64 = [p for p in model64.parameters() if p.requires_grad]

    def task_losses():
        outputs = {t: model64(losses.inputs[t].double(), tasks=[t])[t] for t in names}
        return losses.from_outputs(outputs).means(names)

    grads = torch.autograd.grad(w.w.detach().double() @ task_losses(), p64)
    with torch.no_grad():
        saved = [p.clone() for p in p64]
        for p, g in zip(p64, grads):
            p.sub_(0.5 * g)
    out = model64(x.double(), tasks=[w.main_task])[w.main_task]
    d = torch.autograd.grad(ctx.make_losses({w.main_task: out}, {w.main_task: y}).mean(w.main_task), p64, allow_unused=True)
    d = [g if g is not None else torch.zeros_like(p) for g, p in zip(d, p64)]
    eps = 1e-5 / float(torch.cat([g.reshape(-1) for g in d]).norm())

    def loss_at(sign):
        with torch.no_grad():
            for p, s, g in zip(p64, saved, d):
                p.copy_(s + sign * eps * g)
            return task_losses()

    fd = -0.5 * (loss_at(1) - loss_at(-1)) / (2 * eps)
    torch.testing.assert_close(got.double(), fd, rtol=1e-3, atol=1e-6)
    assert float(got.abs().max()) > 0
    return True


def run_digits(tmp_path, name, weighting, steps=6, **extra):
    gin.clear_config()
    config.parse(FILES, quick_bindings(steps=steps, **{"train.weighting": weighting, **SMALL, **extra}))
    train(run_dir=tmp_path / name)
    from auxframe.checkpoint import latest_checkpoint, load_checkpoint

    return json.loads((tmp_path / name / "metrics.json").read_text()), load_checkpoint(latest_checkpoint(tmp_path / name))


def test_forkmerge_with_alpha_one_is_equal(tmp_path):
    extra = {"train.checkpoint_every": 6}
    _, fm = run_digits(tmp_path, "fm", "@weightings.forkmerge()", **extra,
                       **{"weightings.forkmerge.merge_every": 2, "weightings.forkmerge.alphas": "(1.0,)"})
    _, eq = run_digits(tmp_path, "eq", "@weightings.equal()", **extra)
    for name, value in eq["model"].items():
        torch.testing.assert_close(fm["model"][name], value, msg=name)


def test_forkmerge_with_alpha_zero_keeps_the_target_branch(tmp_path):
    # lambda = 0 at every merge: the live backbone and main head are the target branch's, which
    # trains on the main loss alone; the auxiliary heads are not merged.
    _, fm = run_digits(tmp_path, "fm", "@weightings.forkmerge()", **{"train.checkpoint_every": 6},
                       **{"weightings.forkmerge.merge_every": 3, "weightings.forkmerge.alphas": "(0.0,)"})
    branch = fm["weighting"]["branch"]
    assert branch and all(not n.startswith(("heads.rotation", "heads.parity", "heads.ge5")) for n in branch)
    for name, value in branch.items():
        torch.testing.assert_close(fm["model"][name], value, msg=name)
    metrics = json.loads((tmp_path / "fm" / "metrics.json").read_text())
    assert metrics["weights"] == {"digit": 1.0, "rotation": 0.0, "parity": 0.0, "ge5": 0.0}


def test_forkmerge_needs_an_aux_set():
    from auxframe.weighting.forkmerge import ForkMerge

    model = nn.Linear(1, 1)
    with pytest.raises(ConfigError, match="auxiliary set"):
        ForkMerge().setup(WeightingSetup("m", ["a"], model, [], torch.device("cpu"), 10, 1, has_aux_set=False))


# -- exact resume across outer steps (the generic resume test runs every method at its defaults) ------
@pytest.mark.parametrize("method, bindings", [
    ("auxinash", {"weightings.auxinash.outer_every": 2}),
    ("forkmerge", {"weightings.forkmerge.merge_every": 2}),
])
def test_resume_is_exact_across_outer_steps(tmp_path, monkeypatch, method, bindings):
    import test_reliability

    monkeypatch.setitem(test_reliability.METHOD_BINDINGS, method, bindings)
    test_reliability.test_every_weighting_resumes_exactly(tmp_path, method)
