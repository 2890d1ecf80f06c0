"""Faults: exact resume for every weighting, signals, kill -9 mid-checkpoint, non-finite values."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import gin
import pytest
import torch

from auxframe import config, hypergrad
from auxframe.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from auxframe.errors import TrainingError
from auxframe.experiment import train
from auxframe.registry import registry
from auxframe.weighting.fixed import Equal
from helpers import GIN, quick_bindings

FILES = ("experiments/digits_equal_all.gin", "models/mlp.gin")
#: Every run here: a small MLP, 3 labels per class (one step per epoch, so per-epoch methods act).
FAST = {"backbones.mlp.hidden": "(16,)", "LowDataSplit.labels_per_class": 3}
#: Bindings some weightings need to act within a few steps (a weight update or outer step every 2).
METHOD_BINDINGS = {
    "auxilearn": {"weightings.auxilearn.outer_every": 2},
    "arml": {"weightings.arml.update_every": 2},
}
#: Every weighting auxframe itself ships, found in the registry (new methods are covered as they land).
BUILTIN_WEIGHTINGS = sorted({p.name for p in registry.find("weightings") if p.dist == "auxframe"})


def run(run_dir, steps, resume=False, files=FILES, **extra):
    gin.clear_config()
    config.parse([GIN / f for f in files], quick_bindings(steps=steps, **{**FAST, **extra}))
    return train(run_dir=run_dir, resume=resume)


def tensors(state, prefix=""):
    """``{path: value}`` for every tensor and number of a nested state dict."""
    if isinstance(state, dict):
        return {k: v for key, sub in state.items() for k, v in tensors(sub, f"{prefix}/{key}").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, sub in enumerate(state) for k, v in tensors(sub, f"{prefix}[{i}]").items()}
    return {prefix: state} if isinstance(state, (torch.Tensor, int, float)) else {}


# -- exact resume ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", BUILTIN_WEIGHTINGS)
def test_every_weighting_resumes_exactly(tmp_path, method):
    # A run of 2N steps against the same run pre-empted after its step-N checkpoint and resumed.
    n = 3
    extra = {"train.weighting": f"@weightings.{method}()", "train.checkpoint_every": n, **METHOD_BINDINGS.get(method, {})}
    run(tmp_path / "straight", 2 * n, **extra)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    (tmp_path / "resumed" / "metrics.json").unlink()
    list_checkpoints(tmp_path / "resumed")[-1].unlink()
    assert latest_checkpoint(tmp_path / "resumed").name == f"step_{n:08d}.pt"
    run(tmp_path / "resumed", 2 * n, resume=True, **extra)
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("straight", "resumed"))
    assert a["step"] == b["step"] == 2 * n
    for part in ("model", "optimizer", "weighting"):
        sa, sb = tensors(a[part]), tensors(b[part])
        assert sa.keys() == sb.keys(), part
        for key, value in sa.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[key])), f"{part}{key}"
    assert a["model"] != {} and any(not torch.equal(a["model"][k], load_checkpoint(
        list_checkpoints(tmp_path / "resumed")[0])["model"][k]) for k in a["model"])  # it did train


# -- signals and kill -9 --------------------------------------------------------------------------
def cli_command(run_dir, steps, *extra):
    params = [a for b in quick_bindings(steps=steps, **FAST) for a in ("--gin-param", b)]
    return [sys.executable, "-m", "auxframe", "run", *[a for f in FILES for a in ("--gin", str(GIN / f))],
            *params, *[a for b in extra for a in ("--gin-param", b)], "--run-dir", str(run_dir)]


ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def wait_for(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


class Interrupted(Equal):
    """Equal weights; sends this process ``signum`` during step 3, as a scheduler or Ctrl-C would."""

    def __init__(self, signum: int = int(signal.SIGINT)):
        super().__init__()
        self.signum = signum

    def combine(self, losses, ctx):
        if ctx.step == 2:
            os.kill(os.getpid(), self.signum)
        return super().combine(losses, ctx)


gin.register(Interrupted, module=None)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_exits_clearly(tmp_path, capsys, signum):
    from auxframe.cli import main

    run_dir = tmp_path / "run"
    # what was installed before (SIG_IGN for SIGINT in a job started in the background by a shell)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    code = main(cli_command(run_dir, 100, "train.weighting = @Interrupted()", f"Interrupted.signum = {int(signum)}")[3:])
    err = capsys.readouterr().err
    assert code == 130
    assert f"auxframe: stopped at step 3; checkpoint written to {run_dir / 'checkpoints' / 'step_00000003.pt'}. " \
           f"Continue with --resume." in err
    assert load_checkpoint(latest_checkpoint(run_dir))["step"] == 3
    assert not (run_dir / "metrics.json").exists() and not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are put back


#: Runs the real CLI with torch.save slowed down inside the 2nd checkpoint write: half the bytes are
#: written, a marker file appears, then the process sleeps there until it is killed.
SLOW_WRITER = """
import io, os, sys, time, torch
real_save, calls = torch.save, []
def slow_save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) < 2:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    open(os.environ["MARKER"], "w").close()
    time.sleep(600)
torch.save = slow_save
from auxframe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_inside_a_checkpoint_write_leaves_the_previous_one_loadable_and_resumable(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "in-write"
    command = cli_command(run_dir, 8, "train.checkpoint_every = 2")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, *command[3:]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "MARKER": str(marker)})
    try:
        wait_for(marker.exists, proc)
        proc.send_signal(signal.SIGKILL)  # certainly inside the write of step 4's checkpoint
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    half_written = list((run_dir / "checkpoints").glob(".tmp-*"))
    assert len(half_written) == 1 and half_written[0].stat().st_size > 0
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000002.pt"]
    assert load_checkpoint(latest_checkpoint(run_dir))["step"] == 2
    result = run(run_dir, 8, resume=True, **{"train.checkpoint_every": 2})
    assert result["steps"] == 8
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # cleared by the next write


# -- non-finite values ----------------------------------------------------------------------------
CALLS = {"n": 0}


@gin.register
def nan_on_calls_5_and_6(output, target):
    """Cross-entropy whose training-time values are NaN on its 5th and 6th calls (steps 5 and 6)."""
    loss = torch.nn.functional.cross_entropy(output, target, reduction="none")
    if output.requires_grad:
        CALLS["n"] += 1
        if CALLS["n"] in (5, 6):
            return loss * float("nan")
    return loss


def test_nan_loss_stops_naming_task_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    CALLS["n"] = 0
    with pytest.raises(TrainingError) as err:
        run(tmp_path / "r", 8, **{"parity/Task.loss": "@nan_on_calls_5_and_6", "train.checkpoint_every": 2})
    assert "the loss of task 'parity' (nan) is not finite at step 5." in str(err.value)
    assert "'digit'" not in str(err.value) and "last checkpoint is kept" in str(err.value)
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step_00000002.pt", "step_00000004.pt"]
    state = load_checkpoint(latest_checkpoint(tmp_path / "r"))
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_nan_loss_steps_are_skipped_and_counted_when_configured(tmp_path):
    CALLS["n"] = 0
    result = run(tmp_path / "s", 8, **{"parity/Task.loss": "@nan_on_calls_5_and_6", "train.nonfinite": "'skip'",
                                       "train.log_every": 1})
    assert result["skipped_steps"] == 2
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["skipped_steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "s" / "scalars.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r}
    assert skipped == {1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 2, 7: 2, 8: 2}
    state = load_checkpoint(latest_checkpoint(tmp_path / "s"))
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {6}  # 8 steps, 2 of them without an optimizer update
    assert all(torch.isfinite(v).all() for v in state["model"].values())


class NaNWeight(Equal):
    """Equal weights until step 3, then a NaN weight on the auxiliary task 'parity' (for the test)."""

    def combine(self, losses, ctx):
        self.nan = ctx.step >= 3
        return super().combine(losses, ctx)

    def weights(self):
        return {**super().weights(), "parity": float("nan") if getattr(self, "nan", False) else 1.0}


gin.register(NaNWeight, module=None)


def test_nan_weight_stops_naming_the_task_and_step(tmp_path):
    with pytest.raises(TrainingError, match=r"the weight of task 'parity' \(nan\) is not finite at step 4\."):
        run(tmp_path / "w", 8, **{"train.weighting": "@NaNWeight()", "train.log_every": 1})


def nan_hypergradient(real):
    def hypergradient(*args, **kwargs):
        result = real(*args, **kwargs)
        result.grads = [g * float("nan") for g in result.grads]
        return result

    return hypergradient


AUXILEARN = {"train.weighting": "@weightings.auxilearn()", "weightings.auxilearn.outer_every": 2}


def test_nan_hypergradient_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(hypergrad, "hypergradient", nan_hypergradient(hypergrad.hypergradient))
    with pytest.raises(TrainingError) as err:
        run(tmp_path / "h", 6, **AUXILEARN)
    assert "the outer step after step 2 left non-finite values" in str(err.value)
    assert "auxnet" in str(err.value) and "hypergradient" in str(err.value)


def test_nan_hypergradient_outer_steps_are_undone_and_counted_when_skipping(tmp_path, monkeypatch):
    monkeypatch.setattr(hypergrad, "hypergradient", nan_hypergradient(hypergrad.hypergradient))
    result = run(tmp_path / "h", 6, **{**AUXILEARN, "train.nonfinite": "'skip'"})
    assert result["skipped_steps"] == 3  # the outer steps after steps 2, 4 and 6
    state = load_checkpoint(latest_checkpoint(tmp_path / "h"))["weighting"]
    assert all(torch.isfinite(v).all() for v in state["auxnet"].values())
    assert state["outer_steps"] == 0 and result["weights"] == {t: 1.0 for t in result["weights"]}


def test_unknown_nonfinite_setting_is_named(tmp_path):
    with pytest.raises(TrainingError, match=r"train.nonfinite must be one of \('stop', 'skip'\), got 'ignore'"):
        run(None, 2, **{"train.nonfinite": "'ignore'"})
