"""Every bad input a user can give, met as the user meets it (``auxframe run``): one exact, helpful
message, exit code 2, no traceback, and nothing half-written (no run directory for a new run; an
existing run directory unchanged and unlocked)."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest

from auxframe.checkpoint import latest_checkpoint
from auxframe.cli import main
from auxframe.registry import registry
from helpers import GIN, quick_bindings
from plugin_fixtures import make_dist, write_exploding_module

QUICKSTART = GIN / "experiments/digits_equal_all.gin"
FAST = {"backbones.small_cnn.channels": "(4,)"}


def params(*bindings: str, steps: int = 2) -> list[str]:
    out = []
    for b in [*quick_bindings(steps=steps, **FAST), *bindings]:
        out += ["--gin-param", b]
    return out


def auxframe_run(capsys, *args) -> tuple[int, str]:
    code = main(["run", *map(str, args)])
    return code, capsys.readouterr().err


def quickstart_with(capsys, tmp_path, binding: str) -> tuple[int, str]:
    """``auxframe run`` of the quickstart with one bad binding; checks that no run directory was made."""
    code, err = auxframe_run(capsys, "--gin", QUICKSTART, *params(binding), "--run-dir", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    return code, err


def assert_refused(code: int, err: str, message: str) -> None:
    """Exit code 2 and exactly ``auxframe: error: <message>`` on stderr."""
    assert code == 2
    assert err == f"auxframe: error: {message}\n"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (but the lock file, which
    holds the pid of the last process that took the lock)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_unlocked(run_dir: Path) -> None:
    fd = os.open(run_dir / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a lock was left held
    finally:
        os.close(fd)


# -- configuration ----------------------------------------------------------------------------------
def test_malformed_gin(capsys, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text(f"include '{QUICKSTART}'\ntrain.steps = = 3\n")
    code, err = auxframe_run(capsys, "--gin", bad, "--run-dir", tmp_path / "run")
    assert_refused(code, err, "Unable to parse value. (bad.gin, line 2)")
    assert not (tmp_path / "run").exists()


def test_unknown_parameter(capsys, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text(f"include '{QUICKSTART}'\n# batch size\ntrain.batchsize = 8\n")
    code, err = auxframe_run(capsys, "--gin", bad, "--run-dir", tmp_path / "run")
    assert code == 2 and "Traceback" not in err
    assert "Configurable 'train' doesn't have a parameter named 'batchsize'." in err
    assert f"{bad}" in err and "line 3" in err
    assert not (tmp_path / "run").exists()


def test_unknown_plugin(capsys, tmp_path):
    code, err = quickstart_with(capsys, tmp_path, "train.weighting = @weightings.equall()")
    assert_refused(code, err, (
        "--gin-param 'train.weighting = @weightings.equall()': unknown weightings plugin 'equall'. "
        "Did you mean 'equal'? Available weightings: " + ", ".join(registry.names("weightings")) + ". Run "
        "`auxframe list weightings` to see them with their packages."
    ))


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """A package 'auxframe-broken' whose weighting 'exploding' raises ImportError on import."""
    write_exploding_module(tmp_path, "exploding_weighting")
    monkeypatch.syspath_prepend(str(tmp_path))
    dist = make_dist(tmp_path / "site", "auxframe-broken", "0.1",
                     {"weightings": {"exploding": "exploding_weighting:Exploding"}})
    real = registry._entry_points
    monkeypatch.setattr(registry, "_entry_points", lambda group: [*real(group), *dist.entry_points.select(group=group)])
    registry.refresh()
    yield
    monkeypatch.undo()
    registry.refresh()


def test_broken_plugin(capsys, tmp_path, broken_plugin):
    code, err = quickstart_with(capsys, tmp_path, "train.weighting = @weightings.exploding()")
    assert_refused(code, err, (
        "plugin weightings.exploding (entry point 'exploding = exploding_weighting:Exploding' in group "
        "'auxframe.weightings' of package 'auxframe-broken') failed to load: ImportError: this plugin needs "
        "the package 'missing-dependency'. Fix or uninstall 'auxframe-broken'; the other plugins are unaffected."
    ))
    # the other plugins are unaffected: the same command with a working weighting trains
    assert main(["run", "--gin", str(QUICKSTART), *params(), "--run-dir", str(tmp_path / "ok")]) == 0


# -- tasks and data ---------------------------------------------------------------------------------
def test_wrong_label_shape_for_a_head(capsys, tmp_path):
    # A regression loss on class labels: the dry forward pass catches it before anything trains.
    code, err = quickstart_with(capsys, tmp_path, "parity/Task.loss = @losses.mse")
    assert code == 2 and "Traceback" not in err
    assert err.startswith("auxframe: error: task 'parity': its loss fails on the head output of shape (3, 2) "
                          "and labels of shape (3,) (int64): RuntimeError: The size of tensor a (2) must match "
                          "the size of tensor b (3) at non-singleton dimension 1. Make the head")
    assert err.endswith("Make the head's output match the loss and the labels (the head was asked for 2 outputs).\n")


def test_head_that_cannot_read_the_backbone_features(capsys, tmp_path):
    code, err = quickstart_with(capsys, tmp_path, "parity/Task.head = @heads.dense_classification")
    assert_refused(code, err, (
        "the head of task 'parity' cannot be built on the backbone's features (4,): heads.dense_classification "
        "needs feature maps (C, H, W), but the backbone gives (4,); use a backbone without global pooling "
        "(e.g. `backbones.small_cnn.global_pool = False`, or `backbones.segnet`)."
    ))


PACS_TASKS = """
include '{gin}/base/train.gin'
include '{gin}/models/mlp.gin'
train.dataset = @datasets.pacs()
datasets.pacs.root = '{root}'
main/Task.name = 'class'
main/Task.labels = 'class'
main/Task.main = True
TaskGraph.tasks = [@main/Task()]
train.tasks = @TaskGraph()
"""


def pacs_run(capsys, tmp_path, root: Path) -> tuple[int, str]:
    config = tmp_path / "pacs.gin"
    config.write_text(PACS_TASKS.format(gin=GIN, root=root))
    return auxframe_run(capsys, "--gin", config, *params(), "--run-dir", tmp_path / "run")


HOW = ("Download PACS (https://domaingeneralization.github.io/#data, the 'kfold' image folders) and point "
       "`datasets.pacs.root` at the folder holding the domain folders (art_painting, cartoon, photo, sketch).")


def test_dataset_directory_missing(capsys, tmp_path):
    root = tmp_path / "PACS" / "kfold"
    code, err = pacs_run(capsys, tmp_path, root)
    assert_refused(code, err, f"PACS-style domain folders not found: expected the directory {root}. {HOW}")
    assert not (tmp_path / "run").exists()


def test_dataset_directory_half_there(capsys, tmp_path):
    root = tmp_path / "PACS" / "kfold"
    (root / "photo" / "dog").mkdir(parents=True)  # an unpacked archive's folders, without the images
    code, err = pacs_run(capsys, tmp_path, root)
    assert_refused(code, err, f"no images (.jpg, .jpeg, .png, .bmp) under {root} for domains ['photo']. {HOW}")
    # a half-downloaded image file
    (root / "photo" / "dog" / "001.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code, err = pacs_run(capsys, tmp_path, root)
    assert code == 2 and err.startswith(f"auxframe: error: cannot read the image {root / 'photo' / 'dog' / '001.jpg'}: ")
    assert err.endswith(". Replace or remove the file.\n")
    assert not (tmp_path / "run").exists()


def test_more_labels_per_class_than_available(capsys, tmp_path):
    code, err = quickstart_with(capsys, tmp_path, "LowDataSplit.labels_per_class = 200")
    assert code == 2 and "Traceback" not in err
    assert "labels_per_class=200" in err and "lower labels_per_class" in err


def test_aux_set_larger_than_the_training_set(capsys, tmp_path):
    code, err = quickstart_with(capsys, tmp_path, "LowDataSplit.aux_per_class = 500")
    assert code == 2 and "Traceback" not in err
    assert "aux_per_class" in err


def test_batch_that_does_not_split_over_the_processes(capsys, tmp_path):
    # (Under torchrun; the check lives in the loader, so one process shows the same message.)
    from auxframe.data.digits import digits
    from auxframe.data.loader import PoolLoader
    from auxframe.errors import DataError

    with pytest.raises(DataError) as err:
        PoolLoader(digits(), list(range(30)), batch_size=32, seed=0, name="labeled", rank=0, world_size=4)
    assert str(err.value) == (
        "the 'labeled' pool's batch of 30 examples does not split evenly over 4 processes. The batch size is "
        "the global batch (each process gets batch / processes); make it a multiple of 4 (train.batch_size or "
        "train.pool_batch_sizes), or note that the pool has only 30 examples."
    )


# -- resuming --------------------------------------------------------------------------------------
def test_checkpoint_from_another_task_graph(capsys, tmp_path):
    attributes = GIN / "tasks" / "digits_attributes.gin"
    assert main(["run", "--gin", str(QUICKSTART), *params(), "--run-dir", str(tmp_path / "all")]) == 0
    assert main(["run", "--gin", str(QUICKSTART), "--gin", str(attributes), *params(),
                 "--run-dir", str(tmp_path / "attr")]) == 0
    capsys.readouterr()
    # a checkpoint of the first run copied into the second run's directory (a mix-up when moving files)
    shutil.copy(latest_checkpoint(tmp_path / "all"), tmp_path / "attr" / "checkpoints" / "step_00000099.pt")
    before = snapshot(tmp_path / "attr")
    code, err = auxframe_run(capsys, "--gin", QUICKSTART, "--gin", attributes, *params(steps=4),
                             "--run-dir", tmp_path / "attr", "--resume")
    assert_refused(code, err, (
        "the checkpoint was written for another task graph (tasks digit (main, labels 'digit', pool 'labeled'), "
        "rotation (labels 'Rotation', pool 'train'), parity (labels 'parity', pool 'labeled'), ge5 (labels 'ge5', "
        "pool 'labeled')); this run's graph is tasks digit (main, labels 'digit', pool 'labeled'), parity (labels "
        "'parity', pool 'labeled'), ge5 (labels 'ge5', pool 'labeled'), loops (labels 'loops', pool 'labeled'). "
        "Resume with the gin files of that run, or start a new run directory."
    ))
    assert snapshot(tmp_path / "attr") == before
    assert_unlocked(tmp_path / "attr")
