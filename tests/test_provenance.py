"""Provenance in run.json (command, git, versions, host, device) and the W&B conventions (group,
job type, tags), checked through real runs with ``wandb.init`` replaced by a recorder."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import gin
import pytest
import torch

from auxframe import config
from auxframe.cli import main
from auxframe.loggers import WandbLogger, run_tags
from auxframe.rundir import command_line, git_state, read_run_json
from auxframe.runconfig import configuration, group_name
from helpers import GIN, quick_bindings

QUICKSTART = str(GIN / "experiments/digits_equal_all.gin")


class _FakeRun:
    def __init__(self, kwargs):
        self.kwargs, self.id = kwargs, kwargs.get("id", "fake0001")
        self.summary = {}

    def log(self, scalars, step):
        pass

    def finish(self):
        pass


@pytest.fixture
def wandb_inits(monkeypatch):
    """Every ``wandb.init`` call's arguments, W&B itself replaced by a recorder."""
    import wandb

    calls = []
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or _FakeRun(kw))
    return calls


def _run(capsys, run_dir, *extra, steps=2):
    params = [a for b in quick_bindings(steps=steps) for a in ("--gin-param", b)]
    code = main(["run", "--gin", QUICKSTART, *params, *map(str, extra), "--run-dir", str(run_dir)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
                   check=True, capture_output=True)


def test_run_json_records_command_git_versions_host_and_device(capsys, tmp_path, monkeypatch, wandb_inits):
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "notes.txt").write_text("v1\n")
    _git(repo, "add", "notes.txt")
    _git(repo, "commit", "-q", "-m", "first")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/auxframe", "run", "--gin", "quickstart.gin"])
    _run(capsys, tmp_path / "run")

    info = read_run_json(tmp_path / "run")
    assert info["command"] == ["auxframe", "run", "--gin", "quickstart.gin"]
    assert info["cwd"] == str(repo)
    assert info["git"] == {"commit": head, "dirty": False, "root": str(repo)}
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["cuda"] == torch.version.cuda
    assert info["versions"]["auxframe"] == info["auxframe_version"] and info["host"] == socket.gethostname()
    assert info["device"]["type"] == "cpu" and info["device"]["processes"] == 1 and info["device"]["name"]
    assert info["group"] == group_name((tmp_path / "run" / "config.gin").read_text())

    (repo / "notes.txt").write_text("v2\n")  # a change to a tracked file: the resumed start is dirty
    gin.clear_config()
    _run(capsys, tmp_path / "run", "--resume", steps=3)
    info = read_run_json(tmp_path / "run")
    assert info["git"]["dirty"] is False and len(info["resumes"]) == 1
    assert info["resumes"][0]["git"] == {"commit": head, "dirty": True, "root": str(repo)}
    assert info["resumes"][0]["started"] >= info["started"]


def test_git_state_outside_a_repository(tmp_path):
    assert git_state(tmp_path) is None


def test_command_line_as_typed():
    assert command_line(["/x/auxframe/__main__.py", "run"]) == ["python", "-m", "auxframe", "run"]
    assert command_line(["/venv/bin/auxframe", "ls"]) == ["auxframe", "ls"]
    assert command_line(["train.py", "--lr", "1"]) == ["train.py", "--lr", "1"]


def test_wandb_group_job_type_tags_and_provenance(capsys, tmp_path, wandb_inits):
    _run(capsys, tmp_path / "a")
    (kw,) = wandb_inits
    info = read_run_json(tmp_path / "a")
    assert kw["group"] == info["group"] and kw["group"].startswith("digits-equal-")
    assert kw["job_type"] == "train"
    assert kw["tags"] == ["weighting:equal", "dataset:digits", "main:digit", "aux:rotation+parity+ge5"]
    assert "mode" not in kw  # WANDB_MODE decides
    assert kw["config"]["train.steps"] == "2" and kw["config"]["run"]["group"] == info["group"]
    assert kw["config"]["run"]["torch"] == torch.__version__ and kw["config"]["run"]["host"] == socket.gethostname()
    assert kw["config"]["run"]["command"] == " ".join(info["command"])

    # another seed: the same group; another setting: another group; a sweep's point: job type sweep
    gin.clear_config()
    _run(capsys, tmp_path / "b", "--gin-param", "train.seed=1", "--gin-param", "LowDataSplit.seed=1",
         "--gin-param", "train.weighting=@weightings.arml()", "--job-type", "sweep")
    gin.clear_config()
    _run(capsys, tmp_path / "c", "--gin-param", "train.weighting=@weightings.arml()")
    assert wandb_inits[1]["group"] == wandb_inits[2]["group"] != kw["group"]
    assert wandb_inits[1]["group"].startswith("digits-arml-") and wandb_inits[1]["job_type"] == "sweep"
    assert wandb_inits[2]["job_type"] == "train" and "weighting:arml" in wandb_inits[2]["tags"]


def test_a_wandb_sweep_agent_run_is_a_sweep_job(capsys, tmp_path, wandb_inits, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc")
    monkeypatch.setenv("WANDB_RUN_ID", "r1")
    _run(capsys, tmp_path / "a")
    assert wandb_inits[0]["job_type"] == "sweep"


def test_the_logger_settings_win_over_the_conventions(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    logger = WandbLogger(group="mine", job_type="probe", tags=("extra",))
    kw = logger.init_arguments(tmp_path, "n", {}, None, group="digits-equal-x", job_type="train", tags=["weighting:equal"])
    assert (kw["group"], kw["job_type"], kw["tags"]) == ("mine", "probe", ["weighting:equal", "extra"])
    assert kw["mode"] == "offline"  # offline unless asked for online and logged in


def _config_text(*bindings: str) -> str:
    config.parse([QUICKSTART], quick_bindings(steps=2) + list(bindings))
    return gin.config_str()


def test_the_group_ignores_seeds_and_logging_only():
    base = group_name(_config_text())
    assert group_name(_config_text("train.seed = 3", "LowDataSplit.seed = 3", "train.progress = True")) == base
    assert group_name(_config_text("LowDataSplit.labels_per_class = 5")) != base
    assert group_name(_config_text("train.steps = 3")) != base
    keys = dict(configuration({"train.seed": "1", "LowDataSplit.seed": "1", "WandbLogger.project": "'p'",
                               "train.steps": "2", "%MACRO": "1"}))
    assert keys == {"train.steps": "2"}


def test_run_tags_of_many_auxiliary_tasks():
    text = "train.weighting = @weightings.arml()\ntrain.dataset = @datasets.celeba()\n"
    tags = run_tags(text, "Attractive", [f"attribute_{i}" for i in range(39)])
    assert tags == ["weighting:arml", "dataset:celeba", "main:Attractive", "aux:39 tasks"]
    assert run_tags("", "digit", []) == ["weighting:equal", "dataset:none", "main:digit", "aux:none"]
    assert all(len(t) <= 64 for t in run_tags("", "m" * 80, ["a"]))
    assert json.dumps(tags)
