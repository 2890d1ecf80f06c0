"""Precision (train.precision) and the speed options against fp32, on the CPU's autocast.

The policy (auxframe/strategy.py): the inner step's forward, and every gradient through its graph,
in reduced precision; losses, forward-mode JVPs, outer steps and evaluation in fp32. Each path is
checked against the same computation in fp32 within a stated relative tolerance (the norm of the
difference over the norm of the fp32 value): bf16 keeps 8 bits of mantissa, fp16 11.
"""

from __future__ import annotations

import json
import warnings

import gin
import pytest
import torch
import torch.nn as nn

from auxframe import config, hypergrad
from auxframe.checkpoint import latest_checkpoint, load_checkpoint
from auxframe.errors import ConfigError
from auxframe.experiment import train
from auxframe.models.backbones import SmallCNN
from auxframe.models.heads import ClassificationHead
from auxframe.models.multitask import MultiTaskModel
from auxframe.strategy import Strategy, compile_applies
from auxframe.weighting.arml import ARML
from auxframe.weighting.base import StepContext, TaskLosses, WeightingSetup
from auxframe.weighting.fixed import Equal
from auxframe.weighting.gradients import TaskGradients
from helpers import GIN, quick_bindings

TASKS = ["main", "a", "b", "rot"]
#: Relative tolerance of each reduced precision against fp32 (measured: bf16 0.1-2.3 %, fp16 0.01-0.8 %).
TOL = {"bf16": 0.05, "fp16": 0.02}
CPU = {"train.device": "'cpu'"}


def rel(a, b) -> float:
    """``||a - b|| / ||b||`` over tensors or lists of tensors."""
    flat = lambda t: torch.cat([x.reshape(-1) for x in t]) if isinstance(t, (list, tuple)) else t.reshape(-1)  # noqa: E731
    a, b = flat(a).double(), flat(b).double()
    return float((a - b).norm() / b.norm())


def step(precision: str, loss_scale: float = 1.0, device: str = "cpu"):
    """One inner step's losses with the forward through the strategy's ``train_model``: a small
    CNN with BatchNorm and four heads, 'rot' on a batch of its own (drawn on the CPU, then moved)."""
    torch.manual_seed(0)
    backbone = SmallCNN(input_shape=(1, 8, 8), channels=(8, 16), batch_norm=True)
    model = MultiTaskModel(backbone, {t: ClassificationHead((backbone.out_features,), 5) for t in TASKS}).to(device)
    x1, x2 = torch.randn(32, 1, 8, 8).to(device), torch.randn(24, 1, 8, 8).to(device)
    y1 = {t: torch.randint(0, 5, (32,)).to(device) for t in TASKS}
    y2 = torch.randint(0, 5, (24,)).to(device)
    strategy = Strategy(torch.device(device), precision=precision, tf32=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy.setup(model, Equal(), optimizer)
    ce = nn.CrossEntropyLoss(reduction="none")
    out1, f1 = strategy.train_model(x1, tasks=TASKS[:3], return_features=True)
    out2, f2 = strategy.train_model(x2, tasks=["rot"], return_features=True)
    assert all(v.dtype == torch.float32 for v in [*out1.values(), *out2.values()])  # losses in fp32
    values = {t: loss_scale * ce(out1[t], y1[t]) for t in out1}
    values["rot"] = loss_scale * ce(out2["rot"], y2)
    losses = TaskLosses(values, "main", TASKS[1:], [tuple(TASKS[:3]), ("rot",)], features={**f1, **f2},
                        inputs={**{t: x1 for t in TASKS[:3]}, "rot": x2})
    ctx = StepContext(step=0, model=model, shared_parameters=model.shared_parameters(), train_losses=None,
                      backward=strategy.scaled_backward)
    return model, losses, ctx, strategy, optimizer


def reduced_precision_paths(precision: str, device: str = "cpu") -> dict[str, object]:
    """Every quantity the policy computes from the inner step's graph, at one precision."""
    model, losses, ctx, strategy, _ = step(precision, device=device)
    out = {"model gradient": torch.autograd.grad(losses.means().sum(), list(model.parameters()), retain_graph=True)}
    out["Gramian (public autograd)"] = TaskGradients(losses, ctx, batched=False).gramian(TASKS)
    with warnings.catch_warnings():  # the folded pass may decline reduced-precision graphs (one warning)
        warnings.simplefilter("ignore")
        out["Gramian (folded backward)"] = TaskGradients(losses, ctx, batched="fold").gramian(TASKS)
    out["representation Gramian"] = TaskGradients(losses, ctx, space="representation").gramian(TASKS[:3])
    c = {"main": 1.0, "a": -0.5, "b": -1.0, "rot": -1.0}
    for jvp in ("forward", "reverse"):  # forward mode runs in fp32; reverse differentiates the graph twice
        out[f"inner products (jvp={jvp})"] = TaskGradients(losses, ctx, jvp=jvp).gradient_and_inner_products(c, TASKS[1:])[1]
    out["inner products (fused)"] = TaskGradients(losses, ctx).gradient_and_inner_products(c, TASKS[1:], fused=True)[1]
    arml = ARML(update_every=1)
    arml.setup(WeightingSetup("main", TASKS[1:], model, model.shared_parameters(), torch.device(device), 10, 1))
    out["ARML weight gradient"] = arml.weight_gradient(losses, ctx)[0]
    strategy.close()
    return out


@pytest.fixture(scope="module")
def fp32_paths():
    return reduced_precision_paths("fp32")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_every_reduced_precision_path_matches_fp32_within_its_tolerance(fp32_paths, precision):
    low = reduced_precision_paths(precision)
    errors = {name: rel(low[name], ref) for name, ref in fp32_paths.items()}
    assert all(e < TOL[precision] for e in errors.values()), errors
    assert errors["model gradient"] > 1e-4, errors  # the forward did run in reduced precision


def equal(model) -> Equal:
    weighting = Equal()
    weighting.setup(WeightingSetup("main", TASKS[1:], model, model.shared_parameters(), torch.device("cpu"), 10, 1))
    return weighting


def test_fp16_loss_scale_keeps_small_gradients_that_fp16_would_flush_to_zero():
    # Losses 1e-6 of their size: their fp16 gradients underflow without a loss scale.
    model, losses, ctx, strategy, _ = step("fp32", loss_scale=1e-6)
    equal(model).backward(losses, ctx)
    reference = [p.grad.clone() for p in model.parameters()]
    errors = {}
    for scaled in (True, False):
        model, losses, ctx, strategy, _ = step("fp16", loss_scale=1e-6)
        if not scaled:
            ctx.backward = None  # loss.backward() without the scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            strategy.backward(equal(model), losses, ctx)
        errors[scaled] = rel([p.grad for p in model.parameters()], reference)
    assert errors[True] < TOL["fp16"] and errors[False] > 0.2, errors


def run(run_dir, steps, files=("experiments/digits_equal_all.gin",), resume=False, **extra):
    gin.clear_config()
    config.parse([GIN / f for f in files], quick_bindings(steps=steps, **{**CPU, **extra}))
    return train(run_dir=run_dir, resume=resume)


def test_outer_steps_run_in_fp32_whatever_the_precision(monkeypatch):
    # With the model's learning rate 0 every run takes its first outer step at the same parameters
    # (an MLP: no BatchNorm statistics either); the hypergradient must be fp32's, bit for bit,
    # while the inner step's forward (its logged loss) was in reduced precision.
    seen: dict[str, list] = {}
    real = hypergrad.hypergradient

    def capture(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.setdefault(precision, []).append([g.detach().clone() for g in result.grads])
        return result

    monkeypatch.setattr(hypergrad, "hypergradient", capture)
    losses = {}
    for precision in ("fp32", "bf16", "fp16"):
        result = run(None, 1, files=("experiments/digits_equal_all.gin", "models/mlp.gin"), **{
            "train.precision": f"'{precision}'", "train.weighting": "@weightings.auxilearn()",
            "weightings.auxilearn.outer_every": 1, "torch.optim.Adam.lr": 0.0, "backbones.mlp.hidden": "(16,)"})
        losses[precision] = result["metrics"]["test/digit/loss"]
    for precision in ("bf16", "fp16"):
        assert all(torch.equal(a, b) for a, b in zip(seen[precision][0], seen["fp32"][0])), precision
    assert seen["fp32"][0] and any(float(g.abs().max()) > 0 for g in seen["fp32"][0])


def test_quickstart_trains_in_bf16_and_fp16_to_within_a_tolerance_of_fp32():
    results = {p: run(None, 80, **{"train.precision": f"'{p}'"}) for p in ("fp32", "bf16", "fp16")}
    fp32 = results["fp32"]
    for precision in ("bf16", "fp16"):
        low = results[precision]
        assert abs(low["metrics"]["test/digit/loss"] - fp32["metrics"]["test/digit/loss"]) < 0.02, precision
        assert abs(low["test"] - fp32["test"]) <= 0.03, precision
        assert low["metrics"]["test/digit/loss"] != fp32["metrics"]["test/digit/loss"]  # it ran in reduced precision


@gin.register
def overflow_on_call_3(output, target):
    """Cross-entropy times 1e30 on its 3rd training call: finite, but its scaled gradients overflow."""
    loss = torch.nn.functional.cross_entropy(output, target, reduction="none")
    if output.requires_grad:
        OVERFLOW["calls"] += 1
        if OVERFLOW["calls"] == 3:
            return loss * 1e30
    return loss


OVERFLOW = {"calls": 0}


def test_fp16_skips_a_step_whose_scaled_gradients_overflow_and_halves_the_scale(tmp_path):
    OVERFLOW["calls"] = 0
    run(tmp_path / "r", 6, **{"train.precision": "'fp16'", "digit/Task.loss": "@overflow_on_call_3",
                              "train.log_every": 1})
    rows = [json.loads(line) for line in (tmp_path / "r" / "scalars.jsonl").read_text().splitlines()]
    scales = [r["train/loss_scale"] for r in rows if "train/loss_scale" in r]
    assert scales == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0, 32768.0]
    state = load_checkpoint(latest_checkpoint(tmp_path / "r"))
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {5}  # 6 steps, one not taken
    assert state["strategy"]["scaler"]["scale"] == 32768.0
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_fp16_resumes_exactly_with_its_loss_scale(tmp_path):
    extra = {"train.precision": "'fp16'", "train.checkpoint_every": 3}
    run(tmp_path / "straight", 6, **extra)
    run(tmp_path / "split", 3, **extra)
    run(tmp_path / "split", 6, resume=True, **extra)
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("straight", "split"))
    assert a["strategy"] == b["strategy"] and a["strategy"]["scaler"]["_growth_tracker"] == 6
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


def test_fp16_warns_once_for_a_weighting_that_writes_gradients_without_the_loss_scale():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(None, 3, **{"train.precision": "'fp16'", "train.weighting": "@weightings.pcgrad()"})
    said = [str(w.message) for w in record if "not loss-scaled" in str(w.message)]
    assert len(said) == 1 and "PCGrad" in said[0] and "'bf16'" in said[0]


def test_cuda_graph_auto_is_silent_where_it_does_not_apply_and_changes_nothing_there():
    extra = {"train.weighting": "@weightings.auxilearn()", "weightings.auxilearn.outer_every": 2}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        auto = run(None, 4, **{**extra, "weightings.auxilearn.cuda_graph": "'auto'"})
    assert not [w for w in record if "cuda_graph" in str(w.message)]
    assert auto["weights"] == run(None, 4, **{**extra, "weightings.auxilearn.cuda_graph": "False"})["weights"]
    with pytest.raises(ConfigError, match="cuda_graph must be True, False or 'auto', got 'on'"):
        run(None, 1, **{**extra, "weightings.auxilearn.cuda_graph": "'on'"})


def test_unknown_precision_is_named():
    with pytest.raises(ConfigError, match=r"train.precision must be one of \('fp32', 'bf16', 'fp16'\), got 'fp8'"):
        run(None, 1, **{"train.precision": "'fp8'"})


# -- speed options ---------------------------------------------------------------------------------
def test_compile_decision_follows_the_weighting_and_its_settings():
    model, *_ = step("fp32")
    info = WeightingSetup("main", TASKS[1:], model, model.shared_parameters(), torch.device("cpu"), 10, 1)
    decisions = {}
    for jvp in ("forward", "reverse", "fused"):
        arml = ARML(jvp=jvp)
        arml.setup(info)
        decisions[jvp] = compile_applies(arml)
    assert decisions == {"forward": True, "reverse": False, "fused": False}
    assert compile_applies(Equal())


def test_compiled_inner_steps_give_the_eager_losses_and_arml_reverse_falls_back_with_one_warning(tmp_path):
    # 'aot_eager' goes through dynamo and AOTAutograd (the graphs the decision is about) without
    # generating code, so it runs in seconds on the CPU.
    extra = {"train.log_every": 1, "train.weighting": "@weightings.arml()", "weightings.arml.update_every": 2}
    eager = run(tmp_path / "eager", 4, **extra)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled = run(tmp_path / "compiled", 4, **{**extra, "train.compile": "'aot_eager'"})
        fallback = run(None, 4, **{**extra, "train.compile": "'aot_eager'", "weightings.arml.jvp": "'reverse'"})
    rows = {d: [r for r in map(json.loads, (tmp_path / d / "scalars.jsonl").read_text().splitlines())
                if "train/digit/loss" in r] for d in ("eager", "compiled")}
    for a, b in zip(rows["eager"], rows["compiled"]):
        assert a["train/digit/loss"] == pytest.approx(b["train/digit/loss"], rel=1e-5, abs=1e-6)
    assert compiled["weights"] == pytest.approx(eager["weights"], rel=1e-4)
    said = [str(w.message) for w in record if str(w.message).startswith("train.compile")]
    assert len(said) == 1 and "ARML" in said[0] and "eagerly" in said[0]
    assert fallback["steps"] == 4


def test_channels_last_trains_like_the_default_layout():
    default = run(None, 4)
    nhwc = run(None, 4, **{"train.channels_last": "True"})
    assert nhwc["metrics"] == pytest.approx(default["metrics"], rel=1e-4, abs=1e-5)


def test_deterministic_mode_is_set_for_the_run_and_put_back_after_it(tmp_path):
    before = torch.are_deterministic_algorithms_enabled()
    seen = []

    class Probe(Equal):
        def combine(self, losses, ctx):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return super().combine(losses, ctx)

    gin.register(Probe, module="test_precision")
    run(None, 2, **{"train.deterministic": "True", "train.weighting": "@test_precision.Probe()"})
    # the dry pass's one combine before training (auxframe.testing.dry), then the two steps
    assert seen == [True, True, True] and torch.are_deterministic_algorithms_enabled() == before


class TwiceThrough(Equal):
    """Differentiates the step's graph twice without declaring it (``double_backward`` stays False)."""

    def backward(self, losses, ctx):
        total = self.combine(losses, ctx)
        (g,) = torch.autograd.grad(total, [ctx.shared_parameters[0]], create_graph=True)
        (g * g).sum().backward()
        return total.detach()


gin.register(TwiceThrough, module="test_precision")


def test_an_undeclared_double_backward_under_compile_is_a_clear_error():
    with pytest.raises(ConfigError, match="TwiceThrough differentiated the inner step's graph twice.*double_backward = True"):
        run(None, 1, files=("experiments/digits_equal_all.gin", "models/mlp.gin"), **{
            "train.compile": "'aot_eager'", "train.weighting": "@test_precision.TwiceThrough()",
            "backbones.mlp.hidden": "(16,)"})
