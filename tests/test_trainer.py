"""Trainer: exact resume, checkpoints, data order, non-finite losses."""

from __future__ import annotations

import json

import gin
import numpy as np
import pytest
import torch

from auxframe import config
from auxframe.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from auxframe.data.digits import digits
from auxframe.data.loader import PoolLoader
from auxframe.errors import CheckpointError, TrainingError
from auxframe.experiment import train
from auxframe.weighting.base import Weighting
from helpers import GIN, quick_bindings


def run(run_dir, steps, resume=False, files=("experiments/digits_equal_all.gin",), **extra):
    gin.clear_config()
    config.parse([GIN / f for f in files], quick_bindings(steps=steps, **extra))
    return train(run_dir=run_dir, resume=resume)


def final_state(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir))


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


# Bit-identical resume is a CPU guarantee: some CUDA kernels are not deterministic, so these tests
# stay on the CPU even when AUXFRAME_TEST_DEVICE moves the others to a GPU.
CPU = {"train.device": "'cpu'"}


def test_resumed_run_ends_with_the_same_parameters(tmp_path):
    straight = run(tmp_path / "straight", steps=12, **{"train.checkpoint_every": 6}, **CPU)
    run(tmp_path / "split", steps=6, **CPU)
    resumed = run(tmp_path / "split", steps=12, resume=True, **CPU)
    assert_same_state(final_state(tmp_path / "straight"), final_state(tmp_path / "split"))
    assert resumed["test"] == straight["test"] and resumed["steps"] == 12


def test_resume_from_a_mid_run_checkpoint(tmp_path):
    # A run stopped after its step-6 checkpoint (we delete what came later) continues identically.
    run(tmp_path / "a", steps=10, **{"train.checkpoint_every": 6, "train.keep_checkpoints": 5}, **CPU)
    reference = final_state(tmp_path / "a")
    for ckpt in list_checkpoints(tmp_path / "a")[1:]:
        ckpt.unlink()
    assert latest_checkpoint(tmp_path / "a").name == "step_00000006.pt"
    run(tmp_path / "a", steps=10, resume=True, **{"train.checkpoint_every": 6, "train.keep_checkpoints": 5}, **CPU)
    assert_same_state(reference, final_state(tmp_path / "a"))


def test_different_seeds_train_differently(tmp_path):
    a = run(None, steps=3)
    b = run(None, steps=3, **{"train.seed": 1})
    assert a["metrics"] != b["metrics"]


def test_checkpoints_keep_the_last_n_and_write_atomically(tmp_path, monkeypatch):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"x": torch.tensor([step])}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003.pt", "step_00000004.pt"]

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 5, {"x": torch.tensor([5])}, keep=2)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step_00000004.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path))["x"].item() == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003.pt", "step_00000004.pt"]


class NotATensor:
    pass


def test_checkpoints_holding_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_from_another_task_graph_is_refused(tmp_path):
    run(tmp_path / "r", steps=2)
    gin.clear_config()
    # Same config text, but swap the task graph to the attributes-only graph.
    with pytest.raises(Exception) as err:
        run(tmp_path / "r", steps=4, resume=True, files=("experiments/digits_equal_all.gin", "tasks/digits_attributes.gin"))
    assert "config differs" in str(err.value) or "another task graph" in str(err.value)


def test_pool_loader_is_a_function_of_seed_and_position():
    data = digits()
    idx = np.arange(0, 50)
    a = PoolLoader(data, idx, batch_size=16, seed=3)
    first = [next(a)[0] for _ in range(7)]  # crosses two epoch boundaries (3 batches per epoch)
    b = PoolLoader(data, idx, batch_size=16, seed=3)
    for _ in range(4):
        next(b)
    c = PoolLoader(data, idx, batch_size=16, seed=3)
    c.load_state_dict(b.state_dict())
    assert torch.equal(next(c)[0], first[4])
    assert not torch.equal(next(PoolLoader(data, idx, 16, seed=4))[0], first[0])
    # every epoch is a permutation: 3 batches of 16 cover 48 distinct examples
    seen = torch.cat([labels["digit"] * 0 + torch.arange(16) for _, labels in [next(PoolLoader(data, idx, 16, 3))]])
    assert seen.numel() == 16


def test_pool_loader_epoch_covers_distinct_examples():
    images = torch.arange(40, dtype=torch.float32).reshape(40, 1, 1, 1)
    from auxframe.data.base import LabelField, TensorImageDataset

    data = TensorImageDataset(images, {"y": torch.zeros(40, dtype=torch.long)}, {"y": LabelField(1)}, "y")
    loader = PoolLoader(data, np.arange(40), batch_size=10, seed=0)
    values = torch.cat([next(loader)[0].flatten() for _ in range(4)])
    assert sorted(values.tolist()) == list(range(40))


@gin.register
def nan_after_first(output, target):
    """A loss that becomes NaN (to test the non-finite check)."""
    loss = torch.nn.functional.cross_entropy(output, target, reduction="none")
    return loss * float("nan") if output.requires_grad else loss


def test_non_finite_loss_stops_the_run_naming_task_and_step(tmp_path):
    with pytest.raises(TrainingError) as err:
        # On the CPU the check runs every step (on a GPU once per log interval, naming the interval).
        run(tmp_path / "nan", steps=6, **{"parity/Task.loss": "@nan_after_first"}, **CPU)
    assert "task 'parity' (nan)" in str(err.value) and "at step 1." in str(err.value)
    assert "'digit'" not in str(err.value)


def test_metrics_json_and_scalar_log(tmp_path):
    result = run(tmp_path / "m", steps=4)
    saved = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert saved["main_task"] == "digit" and saved["main_metric"] == "accuracy"
    assert 0.0 <= saved["test"] <= 1.0 and saved["test"] == result["test"]
    assert set(saved["weights"]) == {"digit", "rotation", "parity", "ge5"}
    rows = [json.loads(line) for line in (tmp_path / "m" / "scalars.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/digit/loss" in r] == [2, 4]
    assert any("test/rotation/accuracy" in r for r in rows)
    assert all(r.get("weight/parity", 1.0) == 1.0 for r in rows)


@gin.register
class OuterProbe(Weighting):
    """A toy bilevel weighting: records what its outer steps see (to test the outer-step hook)."""

    def __init__(self, outer_every: int = 3):
        self.outer_every = outer_every
        self.calls: list[tuple[int, tuple, bool]] = []
        self.scale = torch.ones(())

    def combine(self, losses, ctx):
        return self.scale * losses.means().sum()

    def outer_step(self, ctx):
        aux = ctx.aux_set_losses()
        train_losses = ctx.train_losses()
        grads = torch.autograd.grad(train_losses.mean("digit"), ctx.shared_parameters, allow_unused=True)
        self.calls.append((ctx.step, tuple(aux["digit"].shape), all(g is not None for g in grads)))
        self.scale = self.scale * 0.5

    def weights(self):
        return {t: float(self.scale) for t in [self.main_task, *self.aux_tasks]}

    def state_dict(self):
        return {"scale": self.scale, "calls": len(self.calls)}

    def load_state_dict(self, state):
        self.scale = state["scale"]


PROBES: list[OuterProbe] = []


@gin.register
def outer_probe(outer_every: int = 3) -> OuterProbe:
    PROBES.append(OuterProbe(outer_every))
    return PROBES[-1]


def test_outer_step_runs_every_outer_every_steps_on_the_aux_set(tmp_path):
    PROBES.clear()
    result = run(None, steps=10, **{"train.weighting": "@outer_probe()", "LowDataSplit.aux_per_class": 1})
    probe = PROBES[-1]
    # called after inner steps 3, 6, 9 (ctx.step is the last inner step taken, 0-based)
    assert [c[0] for c in probe.calls] == [2, 5, 8]
    assert all(shape == (10,) for _, shape, _ in probe.calls)  # the aux set: 1 image x 10 classes
    assert all(reached for *_, reached in probe.calls)
    assert result["weights"]["digit"] == pytest.approx(0.125)


def test_weighting_state_is_checkpointed_and_restored(tmp_path):
    PROBES.clear()
    run(tmp_path / "w", steps=4, **{"train.weighting": "@outer_probe()"})
    assert load_checkpoint(latest_checkpoint(tmp_path / "w"))["weighting"]["scale"].item() == pytest.approx(0.5)
    resumed = run(tmp_path / "w", steps=7, resume=True, **{"train.weighting": "@outer_probe()"})
    assert resumed["weights"]["digit"] == pytest.approx(0.25)  # restored 0.5, halved once more at step 6


def test_outer_step_without_an_aux_set_is_a_clear_error():
    with pytest.raises(Exception) as err:
        run(None, steps=2, **{"train.weighting": "@outer_probe()", "LowDataSplit.aux_per_class": 0})
    assert "needs" in str(err.value) or "auxiliary set" in str(err.value)
    assert "aux_per_class" in str(err.value)


def test_auxiliary_task_on_other_data_trains_and_reports_training_loss(tmp_path):
    extra = {
        "other/Task.name": "'other'",
        "other/Task.labels": "'loops'",
        "other/Task.data": "@datasets.digits()",
        "TaskGraph.tasks": "[@digit/Task(), @other/Task()]",
    }
    result = run(tmp_path / "o", steps=4, **extra)
    rows = [json.loads(line) for line in (tmp_path / "o" / "scalars.jsonl").read_text().splitlines()]
    assert any("train/other/loss" in r for r in rows)
    assert "test/digit/accuracy" in result["metrics"] and not any("/other/" in k for k in result["metrics"])


def test_best_on_validation_is_tracked_and_its_test_metric_reported(tmp_path):
    result = run(tmp_path / "b", steps=8, **{"train.eval_every": 2})
    best = result["best"]
    rows = [json.loads(line) for line in (tmp_path / "b" / "scalars.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val/digit/accuracy"] for r in rows if "val/digit/accuracy" in r}
    assert sorted(vals) == [2, 4, 6, 8]
    assert best["val"] == max(vals.values())
    assert best["step"] == min(s for s, v in vals.items() if v == best["val"])  # first of ties
    if best["step"] == 8:
        assert best["test"] == result["test"]
    assert 0.0 <= best["test"] <= 1.0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["best"] == best


@gin.register
class ErrorRate:
    """Classification error: lower is better (to test that the direction is honoured)."""

    higher_is_better = False

    def __init__(self):
        self.wrong, self.count = 0, 0

    def update(self, output, target):
        self.wrong += int((output.argmax(1) != target).sum())
        self.count += int(target.numel())

    def compute(self):
        return {"error": self.wrong / max(self.count, 1)}


def test_best_state_is_the_model_of_that_step(tmp_path):
    # With a lower-is-better metric, the best state is an early one; its reported test metric must
    # equal the final test metric of a run stopped at that step.
    extra = {"train.eval_every": 2, "digit/Task.metric": "@ErrorRate"}
    result = run(None, steps=12, **extra)
    best = result["best"]
    assert result["main_metric"] == "error" and best["val"] <= result["val"]
    assert best["step"] < 12
    short = run(None, steps=best["step"], **extra)
    assert best["test"] == short["test"]


# -- the protocol's update signal: after_step / outer_step return True on a periodic update ------
def _update_steps(weighting, steps, aux=("same", "noise")):
    """The 0-based steps at which ``after_step`` said a periodic update changed the weights."""
    from auxframe.weighting.base import StepContext
    from test_arml import LinearTasks, info

    problem = LinearTasks(list(aux))
    weighting.setup(info(problem.model, list(aux)))
    opt = torch.optim.SGD(problem.model.parameters(), lr=0.05)
    said = []
    for step in range(steps):
        ctx = StepContext(step, problem.model, problem.model.shared_parameters(), train_losses=None)
        opt.zero_grad()
        weighting.backward(problem.losses(), ctx)
        opt.step()
        before = dict(weighting.weights())
        answer = weighting.after_step(ctx)
        assert answer in (None, True, False)
        if answer:
            said.append(step)
        elif before != weighting.weights():  # a False/None answer must not hide a weight change
            assert type(weighting).__name__ == "ARML"  # ARML's weights change in backward (below)
    return said


def test_periodic_updates_are_reported_by_after_steps_return_value():
    from auxframe.weighting.arml import ARML
    from auxframe.weighting.gradient_based import OLAux
    from auxframe.weighting.loss_based import DWA, Uncertainty

    assert _update_steps(ARML(update_every=3), 9) == [0, 3, 6]  # the weight step is in backward
    assert _update_steps(OLAux(horizon=4), 12) == [3, 7, 11]
    assert _update_steps(DWA(epoch_steps=2), 8) == [3, 5, 7]  # from the end of the second epoch
    assert _update_steps(Uncertainty(), 4) == []  # trained with the model: no periodic update


def test_ol_aux_weights_change_only_at_the_steps_it_reports():
    from auxframe.weighting.base import StepContext
    from auxframe.weighting.gradient_based import OLAux
    from test_arml import LinearTasks, info

    problem = LinearTasks(["same", "noise"])
    ol = OLAux(horizon=3, weight_lr=0.5)
    ol.setup(info(problem.model, ["same", "noise"]))
    changed, said = [], []
    for step in range(9):
        ctx = StepContext(step, problem.model, problem.model.shared_parameters(), train_losses=None)
        w = ol.current().clone()
        ol.backward(problem.losses(), ctx)
        assert torch.equal(w, ol.current())  # the step's own update uses the weights it started with
        if ol.after_step(ctx):
            said.append(step)
        if not torch.equal(w, ol.current()):
            changed.append(step)
    assert said == changed == [2, 5, 8]


@gin.register
class UpdateEveryThird(Weighting):
    """A weighting whose after_step reports an update at steps 2, 5, 8 (0-based)."""

    def combine(self, losses, ctx):
        return losses.means().sum()

    def setup(self, info):
        super().setup(info)
        self.scale = 1.0

    def after_step(self, ctx):
        if ctx.step % 3 == 2:
            self.scale += 1.0
            return True
        return None

    def weights(self):
        return {self.main_task: self.scale}


def test_a_reported_update_gets_its_own_log_row(tmp_path):
    run(tmp_path / "r", steps=9, **{"train.weighting": "@UpdateEveryThird()", "train.log_every": 100}, **CPU)
    rows = [json.loads(line) for line in (tmp_path / "r" / "scalars.jsonl").read_text().splitlines()]
    updates = [(r["step"], r["weight/digit"]) for r in rows if "weight/digit" in r and "train/digit/loss" not in r]
    assert updates == [(3, 2.0), (6, 3.0)]  # after steps 2, 5 (1-based 3, 6); step 9 is a log_every row
    final = [r for r in rows if "train/digit/loss" in r]
    assert [r["step"] for r in final] == [9] and final[0]["weight/digit"] == 4.0


# -- callbacks ---------------------------------------------------------------------------------------
from auxframe.callbacks import Callback  # noqa: E402


@gin.register
class CountSteps(Callback):
    """A user callback with state: the steps it saw, and a running sum of the main loss."""

    name = "count_steps"

    def __init__(self):
        self.steps, self.loss_sum = 0, 0.0

    def on_step_end(self, trainer, record):
        self.steps += 1
        self.loss_sum += float(record.means["digit"])

    def state_dict(self):
        return {"steps": self.steps, "loss_sum": self.loss_sum}

    def load_state_dict(self, state):
        self.steps, self.loss_sum = state["steps"], state["loss_sum"]


def _preempt_after(run_dir, copy_dir, step):
    """A copy of a finished run as it was right after its checkpoint at ``step`` (later files dropped)."""
    import shutil

    shutil.copytree(run_dir, copy_dir)
    (copy_dir / "metrics.json").unlink()
    for ckpt in list_checkpoints(copy_dir):
        if load_checkpoint(ckpt)["step"] > step:
            ckpt.unlink()
    log = copy_dir / "scalars.jsonl"
    rows = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= step]
    log.write_text("".join(f"{r}\n" for r in rows))


def _training_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "scalars.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows if "train/digit/loss" in r]


def test_callbacks_state_and_the_log_interval_resume_exactly(tmp_path):
    # Checkpoint at step 6 in the middle of a log interval (steps 5-8): the resumed run's rows equal
    # the uninterrupted run's, and every callback's state (the best model state, a user callback's
    # counts) ends the same.
    extra = {"train.checkpoint_every": 6, "train.keep_checkpoints": 5, "train.log_every": 4, "train.eval_every": 3,
             "train.callbacks": "[@CountSteps()]", **CPU}
    run(tmp_path / "straight", steps=12, **extra)
    _preempt_after(tmp_path / "straight", tmp_path / "resumed", 6)
    middle = final_state(tmp_path / "resumed")
    assert middle["interval"]["steps"] == 2 and middle["callbacks"]["count_steps"]["steps"] == 6
    run(tmp_path / "resumed", steps=12, resume=True, **extra)
    assert _training_rows(tmp_path / "resumed") == _training_rows(tmp_path / "straight")
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert a["callbacks"].keys() == b["callbacks"].keys() >= {"evaluation", "logging", "count_steps"}
    assert a["callbacks"]["count_steps"] == b["callbacks"]["count_steps"] == {
        "steps": 12, "loss_sum": a["callbacks"]["count_steps"]["loss_sum"]}
    best_a, best_b = a["callbacks"]["evaluation"]["best"], b["callbacks"]["evaluation"]["best"]
    assert (best_a["step"], best_a["val"]) == (best_b["step"], best_b["val"])
    assert all(torch.equal(v, best_b["model"][k]) for k, v in best_a["model"].items())
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["best"] == \
        json.loads((tmp_path / "straight" / "metrics.json").read_text())["best"]


class Unnamed(Callback):
    pass


def test_callbacks_need_distinct_names():
    from auxframe.callbacks import check_callbacks
    from auxframe.errors import ConfigError

    with pytest.raises(ConfigError, match="callback Unnamed has no `name`"):
        check_callbacks([Unnamed()])
    with pytest.raises(ConfigError, match="callbacks CountSteps and CountSteps are both named 'count_steps'"):
        check_callbacks([CountSteps(), CountSteps()])


def test_fit_fits_on_one_screen():
    import inspect

    from auxframe.trainer import Trainer

    assert len(inspect.getsource(Trainer.fit).splitlines()) <= 25
