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

QUICKSTART = str(GIN / "experiments/digits_equal_all.gin")


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
        [sys.executable, "-m", "auxframe", "run", "--gin", str(GIN / "quickstart.gin"),
         *quick_params(steps=20, **{"train.checkpoint_every": 10}),
         "--run-dir", str(run_dir)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "main task 'digit': test accuracy = " in proc.stdout
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.gin", "operative_config.gin", "metrics.json", "scalars.jsonl", "checkpoints", "wandb", "run.json"} <= names
    operative = (run_dir / "operative_config.gin").read_text()
    assert "LowDataSplit.labels_per_class = 5" in operative and "train.weighting = @weightings.arml()" in operative
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 20 and f"{metrics['test']:.4f}" in proc.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000010.pt", "step_00000020.pt"]
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].rglob("*.wandb"))
    assert json.loads((run_dir / "run.json").read_text())["wandb_id"] in offline_runs[0].name
    assert not (tmp_path / "wandb").exists()  # nothing outside the run directory


def test_list_shows_every_builtin_with_its_package_and_target(capsys):
    code, out, _ = cli(capsys, "list")
    assert code == 0
    assert out.splitlines()[0].split() == ["NAME", "KIND", "PACKAGE", "VERSION", "TARGET"]
    by_name = {(r[1], r[0]): r for r in (line.split() for line in out.splitlines()[1:])}
    for kind, name, target in [("backbones", "small_cnn", "auxframe.models.backbones:SmallCNN"),
                               ("weightings", "equal", "auxframe.weighting.fixed:Equal"),
                               ("datasets", "digits", "auxframe.data.digits:digits"),
                               ("signals", "rotation", "auxframe.data.signals:Rotation")]:
        assert by_name[(kind, name)][2:] == ["auxframe", auxframe_version(), target]


def auxframe_version():
    from auxframe import __version__

    return __version__


def test_list_check_loads_every_plugin_and_shows_its_status(capsys):
    code, out, _ = cli(capsys, "list", "--check")
    assert code == 0
    assert out.splitlines()[0].split() == ["NAME", "KIND", "PACKAGE", "VERSION", "STATUS"]
    rows = [line.split() for line in out.splitlines()[1:]]
    assert len(rows) >= 50 and all(r[4] == "ok" for r in rows if r[2] == "auxframe")


def test_list_one_kind(capsys):
    code, out, _ = cli(capsys, "list", "weightings")
    kinds = {line.split()[1] for line in out.splitlines()[1:]}
    assert code == 0 and kinds == {"weightings"}


def test_list_unknown_kind(capsys):
    code, _, err = cli(capsys, "list", "weighting")
    assert code == 2 and "unknown plugin kind 'weighting'" in err and "Did you mean 'weightings'" in err


def _modules_after(*args: str) -> set[str]:
    """The modules a fresh interpreter holds after ``auxframe ARGS``."""
    code = ("import sys, json\nfrom auxframe.cli import main\n"
            f"main({list(args)!r})\nprint(json.dumps(sorted(sys.modules)))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_list_and_ls_import_no_torch_no_gin_no_plugin():
    for command in (["list"], ["ls"]):
        modules = _modules_after(*command)
        assert not {"torch", "gin", "numpy"} & modules, command
        assert not any(m.startswith(("auxframe.models", "auxframe.weighting", "auxframe.data")) for m in modules)


def test_describe_imports_only_the_plugin_asked_for():
    modules = _modules_after("describe", "weightings.arml")
    assert "auxframe.weighting.arml" in modules and "torch" in modules
    others = {"auxframe.weighting.auxilearn", "auxframe.weighting.loss_based", "auxframe.experiment",
              "auxframe.trainer", "auxframe.models.backbones", "auxframe.data.digits", "torchvision"}
    assert not others & modules


def test_describe_shows_doc_parameters_and_package(capsys):
    code, out, _ = cli(capsys, "describe", "weightings.fixed")
    assert code == 0
    assert "package auxframe" in out and "@weightings.fixed" in out
    assert "Fixed task weights" in out and "main_weight = 1.0" in out and "default = 1.0" in out


def test_describe_unknown_plugin(capsys):
    code, _, err = cli(capsys, "describe", "backbones.smallcnn")
    assert code == 2 and "Did you mean 'small_cnn'" in err


@pytest.mark.parametrize("name, words", [
    ("train", ["Build the experiment", "  steps = 1000", "  seed = 0", "train.PARAMETER = VALUE"]),
    ("Task", ["One task of the task graph", "  name (required)", "  head = 'classification'"]),
    ("TaskGraph", ["  tasks (required)"]),
    ("LowDataSplit", ["  labels_per_class = 10", "  test_fraction = 0.3", "  seed = 0"]),
    ("torch.optim.Adam", ["  lr = 0.001", "torch.optim.Adam.PARAMETER"]),
])
def test_describe_covers_the_core_configurables(capsys, name, words):
    code, out, _ = cli(capsys, "describe", name)
    assert code == 0
    for w in words:
        assert w in out, out
    params = out.split("Parameters:")[1]
    assert "run_dir" not in params and "dry_run" not in params  # set by the command, not in gin


def test_describe_a_kind_lists_its_contract_and_plugins(capsys):
    code, out, _ = cli(capsys, "describe", "weightings")
    assert code == 0 and "subclasses of auxframe.weighting.Weighting" in out and "auxframe.weighting.arml:ARML" in out


def test_describe_a_misspelt_configurable(capsys):
    code, _, err = cli(capsys, "describe", "TaskGrap")
    assert code == 2 and "Did you mean 'TaskGraph'?" in err and "LowDataSplit" in err


def test_describe_dataset_fields(capsys):
    code, out, _ = cli(capsys, "describe", "datasets.digits", "--fields")
    assert code == 0
    assert "1797 images of shape (1, 8, 8); the split stratifies on 'digit'" in out
    rows = {line.split()[0]: line.split() for line in out.split("FIELD")[1].splitlines()[1:]}
    assert rows["digit"][1:6] == ["class", "10", "classes", "()", "int64"]
    assert rows["loops"][1:3] == ["class", "3"]
    code, out, _ = cli(capsys, "describe", "datasets.digits", "--fields", "--gin-param", "datasets.digits.dense=True")
    rows = {line.split()[0]: line.split() for line in out.split("FIELD")[1].splitlines()[1:]}
    assert rows["digit_map"][2:7] == ["11", "classes", "(8,", "8)", "int64"]  # a label per pixel


def test_describe_fields_of_a_dataset_without_its_data(capsys, tmp_path):
    code, out, err = cli(capsys, "describe", "datasets.cifar10", "--fields", "--gin-param", f"datasets.cifar10.root='{tmp_path}'")
    assert code == 2 and "Parameters:" in out  # the documentation first, then why no fields
    assert "cannot list the label fields of datasets.cifar10 without building it" in err and "cifar-10-batches-py" in err
    code, _, err = cli(capsys, "describe", "weightings.arml", "--fields")
    assert code == 2 and "name one as datasets.NAME" in err


def test_run_dry_run_and_validate_build_check_print_and_write_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (["run", "--dry-run"], ["validate"]):
        code, out, err = cli(capsys, *command, "--gin", "experiments/digits_equal_all.gin", *quick_params(3))
        assert code == 0, err
        assert "train.steps = 3" in out and "LowDataSplit.labels_per_class = 10" in out  # the operative config
        assert "main task 'digit', auxiliary tasks: rotation, parity, ge5" in out
        assert "split: labeled 100, aux " in out and "Nothing was written." in out
        assert list(tmp_path.iterdir()) == []
    # a bad binding is found by the dry run, with the usual message
    code, _, err = cli(capsys, "validate", "--gin", "experiments/digits_equal_all.gin", *quick_params(3), "--gin-param", "digit/Task.labels = 'digits'")
    assert code == 2 and "labels 'digits'" in err
    # a named run directory is checked, and still not created
    code, out, _ = cli(capsys, "validate", "--gin", "experiments/digits_equal_all.gin", *quick_params(3), "--run-dir", tmp_path / "r")
    assert code == 0 and "run directory" in out and not (tmp_path / "r").exists()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.gin").write_text("train.steps = 1\n")
    code, _, err = cli(capsys, "validate", "--gin", "experiments/digits_equal_all.gin", *quick_params(3), "--run-dir", tmp_path / "r")
    assert code == 2 and "already holds a run" in err


# -- bad input: one clear message, nothing half-written -------------------------------------------
BAD_BINDINGS = [
    (["train.backbone = @backbones.smal_cnn"], ["unknown backbones plugin 'smal_cnn'", "Did you mean 'small_cnn'", "--gin-param"]),
    (["train.stepz = 3"], ["doesn't have a parameter named 'stepz'. Did you mean 'train.steps'?"]),
    (["weightings.equal.weight = 1"], ["weightings.equal takes no parameters"]),
    (["train.qqq = 1"], ["Its parameters: dataset, tasks, backbone,"]),
    (["LowDataSplit.label_per_class = 3"], ["Did you mean 'LowDataSplit.labels_per_class'?"]),
    (["trian.steps = 3"], ["No configurable matching 'trian'. Did you mean 'train'?"]),
    (["train.run_dir = 'x'"], ["'run_dir' cannot be set in gin (`auxframe run` sets it from its command line)"]),
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
    assert code == 2 and "bad.gin" in err and "line 3" in err and "Did you mean 'train.batch_size'?" in err
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
    # the quickstart's output is shown beside the main task alone on the same split
    shown = readme.split("## What a run gives you", 1)[1].split("The run directory holds", 1)[0]
    assert "main task 'digit': test accuracy = " in shown and "--gin quickstart.gin --gin weightings/stl.gin" in shown
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
