"""The issue-15 methods under torchrun: 2 processes with half the batch each match 1 process with
the whole batch (the launch and driver of tests/test_distributed.py, on its MLP and attribute tasks)."""

from __future__ import annotations

import json
import subprocess
import sys

import gin
import pytest
import torch

from auxframe import config
from auxframe.checkpoint import latest_checkpoint, load_checkpoint
from auxframe.experiment import train
from helpers import quick_bindings
from test_distributed import DRIVER, FILES, torchrun_env

STEPS = 6
#: The methods whose rank averaging is their own (the TorchJD methods go through the engine's
#: averaged Gramian, which tests/test_distributed.py checks with PCGrad and GCS).
METHODS = {
    "famo": {"weightings.famo.weight_lr": 0.1},
    "rlw": {},
    "metabalance": {},
    "gradvac": {},
    "auto_lambda": {"weightings.auto_lambda.meta_lr": 0.05},
    "auxinash": {"weightings.auxinash.outer_every": 2, "weightings.auxinash.meta_lr": 0.5},
    "forkmerge": {"weightings.forkmerge.merge_every": 3},
}


def bindings(method: str) -> list[str]:
    return quick_bindings(steps=STEPS, **{"train.weighting": f"@weightings.{method}()", "backbones.mlp.hidden": "(32,)",
                                         **METHODS[method]})


def cli_args(method: str, run_dir) -> list[str]:
    args = ["run", *[a for f in FILES for a in ("--gin", str(f))]]
    for b in bindings(method):
        args += ["--gin-param", b]
    return args + ["--run-dir", str(run_dir)]


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_methods")
    runs = [(m, cli_args(m, root / m)) for m in METHODS]
    (root / "driver.py").write_text(DRIVER)
    procs = [subprocess.Popen([sys.executable, str(root / "driver.py"), json.dumps(runs), str(root / "codes.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for env in torchrun_env(world_size=2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][1][-5000:] + outputs[1][1][-5000:]
    return root, json.loads((root / "codes.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_with_half_batches_match_one_process(torchrun, tmp_path, method):
    root, codes = torchrun
    assert codes[method] == 0, codes[method]
    ddp = load_checkpoint(latest_checkpoint(root / method))
    gin.clear_config()
    config.parse(FILES, bindings(method))
    train(run_dir=tmp_path / "single")
    single = load_checkpoint(latest_checkpoint(tmp_path / "single"))
    assert ddp["step"] == single["step"] == STEPS
    for name, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    ddp_w = json.loads((root / method / "metrics.json").read_text())["weights"]
    single_w = json.loads((tmp_path / "single" / "metrics.json").read_text())["weights"]
    assert ddp_w == pytest.approx(single_w, rel=1e-4, abs=1e-6)
    assert any(abs(w - single_w["digit"]) > 1e-4 for t, w in single_w.items() if t != "digit") or method == "forkmerge"
