"""Generated auxiliary labels: the masked softmax, the hypergradient to the generator (against finite
differences), the trainer wiring, exact resume and the grid image of a run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from auxframe import config, hypergrad
from auxframe.checkpoint import latest_checkpoint, load_checkpoint
from auxframe.cli import main as cli_main
from auxframe.errors import ConfigError, TaskGraphError
from auxframe.experiment import train
from auxframe.labelgen import LabelGenerator, masked_softmax, negative_entropy_of_mean
from auxframe.metrics import Accuracy
from auxframe.tasks import Task, TaskGraph
from helpers import GIN, quick_bindings

RECIPE = GIN / "experiments/digits_generated_labels.gin"


def run(run_dir=None, steps=6, resume=False, **extra):
    b = {"weightings.auxilearn.outer_every": 2, "generator/backbones.small_cnn.channels": "(4, 4)",
         "labelgens.default.hidden": "(8,)"}
    b.update(extra)
    config.parse([RECIPE], quick_bindings(steps=steps, **b))
    return train(run_dir=run_dir, resume=resume)


def scalars(run_dir):
    return [json.loads(line) for line in (run_dir / "scalars.jsonl").read_text().splitlines()]


# -- the masked softmax --------------------------------------------------------------------------
def test_masked_softmax_rows_sum_to_one_inside_their_main_class_block():
    torch.manual_seed(0)
    logits = torch.randn(6, 3 * 4, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 2, -1, 0])
    soft = masked_softmax(logits, labels, classes_per_main=4)
    for b, y in enumerate(labels.tolist()):
        if y < 0:
            assert torch.equal(soft[b], torch.zeros(12))  # a missing label: zero row, zero loss
            continue
        block = slice(4 * y, 4 * y + 4)
        assert torch.allclose(soft[b].sum(), torch.tensor(1.0))
        outside = torch.ones(12, dtype=torch.bool)
        outside[block] = False
        assert torch.equal(soft[b][outside], torch.zeros(8))
        # MAXL's form: exp(x) * mask / sum(exp(x) * mask)
        expected = logits[b, block].exp() / logits[b, block].exp().sum()
        assert torch.allclose(soft[b, block], expected)
    grad, = torch.autograd.grad((soft * torch.randn(6, 12)).sum(), logits)
    assert torch.equal(grad[0, 4:], torch.zeros(8))  # only the block's logits get gradients
    assert bool((grad[0, :4] != 0).all())


def test_masked_softmax_rejects_a_label_beyond_the_generator_classes():
    with pytest.raises(Exception, match="main classes"):
        masked_softmax(torch.zeros(1, 6), torch.tensor([3]), classes_per_main=2)


def test_negative_entropy_of_the_mean_label_against_closed_forms():
    uniform = torch.full((4, 8), 1 / 8)
    assert torch.allclose(negative_entropy_of_mean(uniform), -torch.log(torch.tensor(8.0)))
    collapsed = F.one_hot(torch.zeros(5, dtype=torch.long), 8).float()
    assert abs(float(negative_entropy_of_mean(collapsed))) < 1e-6


def test_default_generator_masks_and_checks_its_settings():
    gen = LabelGenerator((1, 8, 8), num_classes=10, classes_per_main=3, backbone="mlp", hidden=(8,))
    y = torch.tensor([0, 9, 4])
    soft = gen(torch.rand(3, 1, 8, 8), y)
    assert soft.shape == (3, 30) and gen.num_outputs == 30
    assert torch.allclose(soft.sum(1), torch.ones(3))
    assert torch.allclose(soft.reshape(3, 10, 3)[torch.arange(3), y].sum(1), torch.ones(3))
    with pytest.raises(ConfigError, match="classes_per_main must be a positive integer"):
        LabelGenerator((1, 8, 8), num_classes=10, classes_per_main=0)


def test_soft_labels_count_their_most_likely_class_in_accuracy():
    acc = Accuracy()
    out = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    soft = torch.tensor([[0.6, 0.4, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 0.0]])  # last row: missing label
    acc.update(out, soft)
    assert acc.compute()["accuracy"] == 0.5


@pytest.mark.parametrize("kwargs, words", [
    (dict(labels="digit", generator=LabelGenerator), "both `labels` and `generator`"),
    (dict(generator=LabelGenerator, pool="train"), "pool 'labeled', not 'train'"),
])
def test_task_graph_names_misused_generators(kwargs, words):
    with pytest.raises(TaskGraphError, match=words):
        TaskGraph([Task("digit", labels="digit", main=True), Task("gen", **kwargs)])


def test_a_generated_task_takes_the_main_task_pool():
    g = TaskGraph([Task("digit", labels="digit", main=True, pool="labeled+aux"), Task("gen", generator=LabelGenerator)])
    assert g["gen"].pool == "labeled+aux"


# -- the hypergradient reaches the generator -----------------------------------------------------
def _tiny_problem():
    """Inner: a tanh layer shared by a main head and an auxiliary head trained on generated labels
    (a linear generator G with the masked softmax), plus ridge. Outer: main loss on held-out data."""
    g = torch.Generator().manual_seed(3)
    dt = torch.float64
    x, y = torch.randn(16, 3, generator=g, dtype=dt), torch.randint(0, 2, (16,), generator=g)
    xa, ya = torch.randn(10, 3, generator=g, dtype=dt), torch.randint(0, 2, (10,), generator=g)
    shapes = [(3, 3), (3, 2), (3, 4)]  # shared A, main head, auxiliary head (C = 2, k = 2)
    sizes = [a * b for a, b in shapes]

    def split(w):
        return [p.reshape(s) for p, s in zip(torch.split(w, sizes), shapes)]

    def train_loss(w, G):
        A, Wm, Wa = split(w)
        z = torch.tanh(x @ A)
        soft = masked_softmax(x @ G, y, 2)
        return (F.cross_entropy(z @ Wm, y) + F.cross_entropy(z @ Wa, soft) + 0.05 * w.pow(2).sum())

    def outer_loss(w):
        A, Wm, _ = split(w)
        return F.cross_entropy(torch.tanh(xa @ A) @ Wm, ya)

    def solve(G, w0):
        w = w0.clone()
        for _ in range(60):  # Newton's method to machine precision
            grad = torch.autograd.functional.jacobian(lambda v: train_loss(v, G), w)
            if float(grad.norm()) < 1e-13:
                break
            hess = torch.autograd.functional.hessian(lambda v: train_loss(v, G), w)
            w = w - torch.linalg.solve(hess, grad)
        return w

    G = torch.randn(3, 4, generator=g, dtype=dt)
    w0 = torch.randn(sum(sizes), generator=g, dtype=dt).requires_grad_(True)  # away from the saddle w = 0
    lbfgs = torch.optim.LBFGS([w0], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = train_loss(w0, G)
        loss.backward()
        return loss

    lbfgs.step(closure)
    return train_loss, outer_loss, solve, w0.detach(), G


def test_hypergradient_to_the_generator_matches_finite_differences():
    train_loss, outer_loss, solve, w0, G = _tiny_problem()
    w_star = solve(G, w0)
    hessian = torch.autograd.functional.hessian(lambda v: train_loss(v, G), w_star)
    assert float(torch.linalg.eigvalsh(hessian)[0]) > 1e-3  # a strict local minimum: W*(G) is smooth
    w = w_star.clone().requires_grad_(True)
    phi = G.clone().requires_grad_(True)
    result = hypergrad.hypergradient(train_loss(w, phi), outer_loss(w), [w], [phi], method="exact")
    assert float(result.grads[0].norm()) > 1e-4
    direction = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 1e-5
    plus, minus = (float(outer_loss(solve(G + s * eps * direction, w_star))) for s in (1, -1))
    numeric = (plus - minus) / (2 * eps)
    analytic = float((result.grads[0] * direction).sum())
    assert abs(analytic - numeric) <= 1e-5 * max(abs(numeric), 1e-3), (analytic, numeric)


def test_outer_step_moves_every_generator_parameter_through_the_mixed_term(tmp_path):
    # No entropy term: the generator's only route to the outer loss is the mixed term, through the
    # generated labels inside the training loss. With learning rate 0 the generator stays put.
    extra = {"labelgens.default.entropy_weight": 0.0, "train.checkpoint_every": 0}
    run(tmp_path / "moved", steps=2, **extra, **{"weightings.auxilearn.generator_lr": 0.01})
    run(tmp_path / "still", steps=2, **extra, **{"weightings.auxilearn.generator_lr": 0.0})
    moved, still = (load_checkpoint(latest_checkpoint(tmp_path / d))["label_generators"]["generated"]["generator"]
                    for d in ("moved", "still"))
    params = [k for k in moved if "running" not in k and "num_batches" not in k]
    assert params
    for k in params:
        assert not torch.equal(moved[k], still[k]), k


# -- the trainer, the logs, the checkpoint, the grid -------------------------------------------
def test_digits_recipe_trains_and_logs_entropy_and_classes_in_use(tmp_path):
    result = run(tmp_path / "r", steps=6)
    logged = {k for r in scalars(tmp_path / "r") for k in r}
    assert {"labelgen/generated/entropy", "labelgen/generated/classes_in_use",
            "labelgen/generated/regularizer", "auxilearn/hypergrad_norm"} <= logged
    assert any(k.startswith("labelgen/generated/classes_in_use/") for k in logged)
    rows = [r for r in scalars(tmp_path / "r") if "labelgen/generated/entropy" in r]
    assert all(0.0 <= r["labelgen/generated/entropy"] <= torch.log(torch.tensor(5.0)) + 1e-6 for r in rows)
    assert all(1 <= r["labelgen/generated/classes_in_use"] <= 5 for r in rows)
    assert set(result["weights"]) == {"digit", "generated"}
    assert "test/generated/accuracy" in result["metrics"]


def test_generator_state_resumes_exactly(tmp_path):
    run(tmp_path / "a", steps=8, **{"train.checkpoint_every": 4})
    run(tmp_path / "b", steps=4)
    run(tmp_path / "b", steps=8, resume=True)
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("a", "b"))
    gen_a, gen_b = a["label_generators"]["generated"], b["label_generators"]["generated"]
    for k in gen_a["generator"]:
        assert torch.equal(gen_a["generator"][k], gen_b["generator"][k]), k
    assert torch.equal(gen_a["usage"], gen_b["usage"]) and gen_a["rows"] == gen_b["rows"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    opt_a, opt_b = a["weighting"]["outer_optimizer"]["state"], b["weighting"]["outer_optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)


def test_labels_command_writes_a_png_grid(tmp_path, capsys):
    run(tmp_path / "r", steps=2)
    out = tmp_path / "grid.png"
    assert cli_main(["labels", str(tmp_path / "r"), "--out", str(out), "--per-class", "4"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(out).shape[:2]
    assert height > width  # ten main classes as rows, five auxiliary classes as columns
    assert "classes in use per main class" in capsys.readouterr().out


def test_labels_command_needs_a_run_with_a_generator(tmp_path, capsys):
    config.parse([GIN / "experiments/digits_equal_all.gin"], quick_bindings(steps=1))
    train(run_dir=tmp_path / "q")
    assert cli_main(["labels", str(tmp_path / "q"), "--out", str(tmp_path / "g.png")]) == 2
    assert "0 generated-label tasks" in capsys.readouterr().err


def test_learning_nothing_is_an_error():
    config.parse([GIN / "experiments/digits_equal_all.gin"], quick_bindings(
        steps=1, **{"train.weighting": "@weightings.auxilearn()", "weightings.auxilearn.learn_auxnet": False}))
    with pytest.raises(ConfigError, match="would learn nothing"):
        train(run_dir=None)
