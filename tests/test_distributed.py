"""torchrun (PyTorch DDP) on the CPU with gloo: 2 processes with B/2 each train like 1 process with B.

One launch of 2 processes, with the environment ``torchrun --nproc_per_node=2`` gives them, runs
every case through the real ``auxframe run`` command (``auxframe.cli.main``; a launch costs
seconds of start-up on 2 cores, so the cases share it); the single-process references run in the
test process. The model is an MLP on the digits'
attribute tasks: no BatchNorm (per-rank batch statistics would differ from the global batch's) and
no self-supervised signal (its random draws are per rank by design).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import gin
import numpy as np
import pytest
import torch

from auxframe import config
from auxframe.checkpoint import latest_checkpoint, load_checkpoint
from auxframe.data.base import LabelField, TensorImageDataset
from auxframe.data.loader import PoolLoader
from auxframe.errors import DataError
from auxframe.experiment import train
from auxframe.registry import registry
from helpers import GIN, quick_bindings

FILES = [GIN / "experiments/digits_equal_all.gin", GIN / "models/mlp.gin", GIN / "tasks/digits_attributes.gin"]
STEPS = 8
#: Per method: bindings that make it act within a few steps (an outer step / weight update every 2).
METHOD_BINDINGS = {
    "equal": {},
    "auxilearn": {"weightings.auxilearn.outer_every": 2, "weightings.auxilearn.outer_lr": 0.1},
    "arml": {"weightings.arml.update_every": 2, "weightings.arml.weight_lr": 0.1},
    "gcs": {}, "pcgrad": {}, "gradnorm": {}, "uncertainty": {},
    "ol_aux": {"weightings.ol_aux.horizon": 2},
    "adaloss": {}, "dwa": {"weightings.dwa.epoch_steps": 2},
}
METHODS = [m for m in METHOD_BINDINGS if m in registry.names("weightings")]

DRIVER = """
import json, os, sys, traceback
from auxframe.cli import main
codes = {}
for label, args in json.loads(sys.argv[1]):  # each case on its own: one failing method hides no other
    try:
        codes[label] = main(args)
    except Exception:
        codes[label] = traceback.format_exc()
if os.environ["RANK"] == "0":
    with open(sys.argv[2], "w") as f:
        json.dump(codes, f)
"""


def bindings(method: str, steps: int) -> list[str]:
    extra = {"train.weighting": f"@weightings.{method}()", "backbones.mlp.hidden": "(32,)",
             **METHOD_BINDINGS[method]}
    return quick_bindings(steps=steps, **extra)


def cli_args(method: str, steps: int, run_dir, resume: bool = False) -> list[str]:
    args = ["run", *[a for f in FILES for a in ("--gin", str(f))]]
    for b in bindings(method, steps):
        args += ["--gin-param", b]
    return args + ["--run-dir", str(run_dir)] + (["--resume"] if resume else [])


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory):
    """One 2-process launch: Equal as 4 steps + a resume to 8, every other method 8 steps straight."""
    root = tmp_path_factory.mktemp("ddp")
    runs = [("equal", cli_args("equal", STEPS // 2, root / "equal")),
            ("equal_resumed", cli_args("equal", STEPS, root / "equal", resume=True))]
    runs += [(m, cli_args(m, STEPS, root / m)) for m in METHODS if m != "equal"]
    # an error rank 0 finds (the run directory holds a run) must end every rank, not leave one waiting
    runs += [("equal_again", cli_args("equal", STEPS, root / "equal"))]
    (root / "driver.py").write_text(DRIVER)
    procs = [subprocess.Popen([sys.executable, str(root / "driver.py"), json.dumps(runs), str(root / "codes.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for env in torchrun_env(world_size=2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][1][-5000:] + outputs[1][1][-5000:]
    stdout = "".join(out for out, _ in outputs)
    return root, stdout, json.loads((root / "codes.json").read_text())


def torchrun_env(world_size: int) -> list[dict[str, str]]:
    """The environment ``torchrun --standalone --nproc_per_node=world_size`` gives each process.

    The processes are started directly (torchrun's agent would add seconds to the test); what
    auxframe reads is the same: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)}
    return [{**base, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(world_size)]


def single_process_state(method: str, run_dir) -> dict:
    gin.clear_config()
    config.parse(FILES, bindings(method, STEPS))
    train(run_dir=run_dir)
    return load_checkpoint(latest_checkpoint(run_dir))


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_with_half_batches_match_one_process(torchrun, tmp_path, method):
    root, _, codes = torchrun
    assert codes[method] == 0 and codes.get(f"{method}_resumed", 0) == 0, codes
    ddp = load_checkpoint(latest_checkpoint(root / method))
    single = single_process_state(method, tmp_path / "single")
    assert ddp["step"] == single["step"] == STEPS
    for name, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    moved = sum(float((value - ddp["model"][name]).abs().max()) for name, value in single["model"].items())
    assert moved < 1e-4
    ddp_w = json.loads((root / method / "metrics.json").read_text())["weights"]
    single_w = json.loads((tmp_path / "single" / "metrics.json").read_text())["weights"]
    assert ddp_w == pytest.approx(single_w, rel=1e-4, abs=1e-6)
    if method != "equal":  # the weights did move, so the comparison above says something
        assert any(abs(w - 1.0) > 1e-4 for t, w in single_w.items() if t != "digit")


def test_rank_zero_alone_writes_and_prints_and_resume_continues(torchrun):
    root, stdout, codes = torchrun
    assert codes["equal"] == codes["equal_resumed"] == 0, codes
    assert codes["equal_again"] == 2  # and the launch ended: rank 1 got the same error
    # each run printed its results once (rank 1's stdout is silenced)
    assert stdout.count(f"after {STEPS} steps") == sum(code == 0 for code in codes.values()) - 1
    assert stdout.count(f"after {STEPS // 2} steps") == 1
    rows = [json.loads(line) for line in (root / "equal" / "scalars.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/digit/loss" in r]
    assert steps == [2, 4, 6, 8]  # one writer: no line twice
    state = load_checkpoint(latest_checkpoint(root / "equal"))
    assert len(state["signal_rngs_by_rank"]) == 2  # every rank's randomness is resumable
    assert not list((root / "equal" / "checkpoints").glob(".tmp-*"))


def test_each_rank_gets_a_disjoint_shard_of_the_same_global_batch():
    images = torch.arange(24, dtype=torch.float32).reshape(24, 1, 1, 1)
    data = TensorImageDataset(images, {"y": torch.zeros(24, dtype=torch.long)}, {"y": LabelField(1)}, "y")
    whole = PoolLoader(data, np.arange(24), batch_size=8, seed=5)
    shards = [PoolLoader(data, np.arange(24), batch_size=8, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):  # crosses an epoch boundary
        batch = next(whole)[0].flatten()
        parts = [next(s)[0].flatten() for s in shards]
        assert torch.equal(torch.cat(parts), batch) and len(parts[0]) == 4
    with pytest.raises(DataError, match="does not split evenly over 3 processes"):
        PoolLoader(data, np.arange(24), batch_size=8, seed=5, rank=0, world_size=3)
