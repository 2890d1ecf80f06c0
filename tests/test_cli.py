"""The `auxframe` command: run (end to end), list, describe, and every bad input it must explain."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from auxframe.cli import main
from auxframe.rundir import RunDir
from helpers import GIN, REPO, quick_bindings

QUICKSTART = str(GIN / "quickstart.gin")


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def quick_params(steps=4, **extra):
    params = []
    for b in quick_bindings(steps=steps, **extra):
        params += ["--gin-param", b]
    return params


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom auxframe.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: auxframe" in out and "NO_TORCH" in out


def test_quickstart_end_to_end_with_wandb_offline(tmp_path):
    run_dir = tmp_path / "qs"
    env = {**os.environ, "WANDB_MODE": "offline"}
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", "auxframe", "run", "--gin", QUICKSTART, *quick_params(steps=20, **{"train.checkpoint_every": 10}),
         "--run-dir", str(run_dir)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "main task 'digit': test accuracy = " in proc.stdout
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.gin", "operative_config.gin", "metrics.json", "scalars.jsonl", "checkpoints", "wandb", "run.json"} <= names
    assert "LowDataSplit.labels_per_class = 10" in (run_dir / "operative_config.gin").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 20 and f"{metrics['test']:.4f}" in proc.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000010.pt", "step_00000020.pt"]
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].rglob("*.wandb"))
    assert json.loads((run_dir / "run.json").read_text())["wandb_id"] in offline_runs[0].name
    assert not (tmp_path / "wandb").exists()  # nothing outside the run directory


def test_list_shows_every_builtin_with_its_package(capsys):
    code, out, _ = cli(capsys, "list")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    by_name = {(r[1], r[0]): r for r in rows}
    for kind, name in [("backbones", "small_cnn"), ("weightings", "equal"), ("datasets", "digits"),
                       ("signals", "rotation"), ("losses", "cross_entropy"), ("metrics", "accuracy")]:
        assert by_name[(kind, name)][2] == "auxframe" and by_name[(kind, name)][4] == "ok"


def test_list_one_kind(capsys):
    code, out, _ = cli(capsys, "list", "weightings")
    kinds = {line.split()[1] for line in out.splitlines()[1:]}
    assert code == 0 and kinds == {"weightings"}


def test_list_unknown_kind(capsys):
    code, _, err = cli(capsys, "list", "weighting")
    assert code == 2 and "unknown plugin kind 'weighting'" in err and "Did you mean 'weightings'" in err


def test_describe_shows_doc_parameters_and_package(capsys):
    code, out, _ = cli(capsys, "describe", "weightings.fixed")
    assert code == 0
    assert "package auxframe" in out and "@weightings.fixed" in out
    assert "Fixed task weights" in out and "main_weight = 1.0" in out and "default = 1.0" in out


def test_describe_unknown_plugin(capsys):
    code, _, err = cli(capsys, "describe", "backbones.smallcnn")
    assert code == 2 and "Did you mean 'small_cnn'" in err


# -- bad input: one clear message, nothing half-written -------------------------------------------
BAD_BINDINGS = [
    (["train.backbone = @backbones.smal_cnn"], ["unknown backbones plugin 'smal_cnn'", "Did you mean 'small_cnn'", "--gin-param"]),
    (["train.stepz = 3"], ["doesn't have a parameter named 'stepz'"]),
    (["TaskGraph.tasks = [@digit/Task(), @parity/Task()]", "parity/Task.main = True"], ["exactly one main task", "digit, parity"]),
    (["digit/Task.main = False"], ["exactly one main task, found none"]),
    (["LowDataSplit.labels_per_class = 200"], ["labels_per_class=200", "lower labels_per_class"]),
    (["LowDataSplit.test_fraction = 0.0"], ["test", "empty", "test_fraction"]),
    (["LowDataSplit.aux_per_class = 500"], ["aux", "aux_per_class"]),
    (["train.steps = 0"], ["train.steps must be a positive integer"]),
    (["digit/Task.labels = 'digits'"], ["labels 'digits'", "digit, ge5, loops, parity"]),
]


@pytest.mark.parametrize("bindings, words", BAD_BINDINGS, ids=[b[0][0] for b in BAD_BINDINGS])
def test_bad_input_gets_one_clear_message_and_writes_nothing(capsys, tmp_path, bindings, words):
    params = quick_params()
    for b in bindings:
        params += ["--gin-param", b]
    code, _, err = cli(capsys, "run", "--gin", QUICKSTART, *params, "--run-dir", tmp_path / "run")
    assert code == 2
    assert err.startswith("auxframe: error: ") and "Traceback" not in err and "In call to configurable" not in err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "run").exists()


def test_unknown_parameter_in_a_file_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text(f"include '{QUICKSTART}'\n# a comment\ntrain.batchsize = 8\n")
    code, _, err = cli(capsys, "run", "--gin", bad, "--run-dir", tmp_path / "run")
    assert code == 2 and "bad.gin" in err and "line 3" in err and "batchsize" in err
    assert not (tmp_path / "run").exists()


def test_unknown_plugin_in_a_file_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text(f"include '{QUICKSTART}'\n\ntrain.weighting = @weightings.equall()\n")
    code, _, err = cli(capsys, "run", "--gin", bad, "--run-dir", tmp_path / "run")
    assert code == 2 and f"{bad}:3" in err and "Did you mean 'equal'" in err


def test_missing_gin_file(capsys, tmp_path):
    code, _, err = cli(capsys, "run", "--gin", tmp_path / "nope.gin")
    assert code == 2 and "nope.gin does not exist" in err


def test_run_directory_rules(capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert cli(capsys, "run", "--gin", QUICKSTART, *quick_params(2), "--run-dir", run_dir)[0] == 0
    # the same directory again, without --resume
    code, _, err = cli(capsys, "run", "--gin", QUICKSTART, *quick_params(2), "--run-dir", run_dir)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    # --resume with a different config
    code, _, err = cli(capsys, "run", "--gin", QUICKSTART, *quick_params(2, **{"train.seed": 5}), "--run-dir", run_dir, "--resume")
    assert code == 2 and "config differs" in err and "train.seed = 5" in err
    # --resume with more steps is allowed and continues from step 2
    code, out, _ = cli(capsys, "run", "--gin", QUICKSTART, *quick_params(3), "--run-dir", run_dir, "--resume")
    assert code == 0 and "after 3 steps" in out
    # a directory that is not a run directory
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "run", "--gin", QUICKSTART, *quick_params(2), "--run-dir", other)
    assert code == 2 and "not an auxframe run directory" in err
    # nothing to resume
    code, _, err = cli(capsys, "run", "--gin", QUICKSTART, "--run-dir", tmp_path / "fresh", "--resume")
    assert code == 2 and "nothing to resume" in err
    code, _, err = cli(capsys, "run", "--gin", QUICKSTART, "--resume")
    assert code == 2 and "--resume needs --run-dir" in err


def test_two_processes_in_one_run_directory(capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert cli(capsys, "run", "--gin", QUICKSTART, *quick_params(2), "--run-dir", run_dir)[0] == 0
    import gin

    holder = RunDir(run_dir, resume=True, config=(run_dir / "config.gin").read_text())  # holds the lock
    try:
        gin.clear_config()
        code, _, err = cli(capsys, "run", "--gin", QUICKSTART, *quick_params(3), "--run-dir", run_dir, "--resume")
        assert code == 2 and "another auxframe process is training" in err
    finally:
        holder.release()


def test_readme_commands_are_the_ones_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "auxframe run --gin quickstart.gin" in readme
    assert "pytest" in ci and "pip install -e" in ci


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resume_continues(tmp_path):
    import signal
    import time

    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "auxframe", "run", "--gin", QUICKSTART, *quick_params(steps=100_000), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (run_dir / "scalars.jsonl").is_file() or (run_dir / "scalars.jsonl").stat().st_size == 0:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped at step" in err and "--resume" in err
    step = int(err.split("stopped at step ")[1].split(";")[0])
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts[-1] == f"step_{step:08d}.pt"
    assert not (run_dir / "metrics.json").exists()
    done = subprocess.run(cmd[:-2 - 2 * len(quick_bindings())] + [*quick_params(steps=step + 2), "--run-dir", str(run_dir), "--resume"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"after {step + 2} steps" in done.stdout
