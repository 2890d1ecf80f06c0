"""Every shipped gin file parses and builds an experiment that trains."""

from __future__ import annotations

from pathlib import Path

import gin
import pytest

from auxframe import config
from auxframe.errors import ConfigError
from auxframe.experiment import train
from fixtures_data import data_recipe_files
from helpers import GIN, quick_bindings

ALL_FILES = sorted(GIN.rglob("*.gin"))
# Files that define a whole experiment; the others are pieces (base, dataset, model, tasks,
# weighting) checked by laying them over the quickstart.
WHOLE = {GIN / "experiments/digits_equal_all.gin", *GIN.glob("experiments/*.gin")}
# Pieces that need more than the quickstart under them.
UNDER = {GIN / "tasks/digits_dense.gin": [GIN / "experiments/digits_equal_all.gin", GIN / "models/small_cnn_dense.gin"],
         GIN / "weightings/auxilearn_generated.gin": [GIN / "experiments/digits_equal_all.gin", GIN / "tasks/digits_generated.gin"]}
# The synthetic dataset and its task graph need each other (the task graph reads its label fields).
UNDER[GIN / "datasets/synthetic.gin"] = [GIN / "experiments/digits_equal_all.gin", GIN / "tasks/synthetic_planted.gin"]
UNDER[GIN / "tasks/synthetic_planted.gin"] = [GIN / "experiments/digits_equal_all.gin", GIN / "datasets/synthetic.gin"]
# The minimum-data task graph reads the attributes of datasets.digits_attributes; the domain-adaptation
# dataset and task graph need each other (the target part and the source parts).
UNDER[GIN / "tasks/digits_min_data.gin"] = [GIN / "experiments/digits_equal_all.gin", GIN / "datasets/digits_attributes.gin"]
UNDER[GIN / "tasks/digits_domains.gin"] = [GIN / "experiments/digits_equal_all.gin", GIN / "datasets/digits_domains.gin"]
UNDER[GIN / "datasets/digits_domains.gin"] = [GIN / "experiments/digits_equal_all.gin", GIN / "tasks/digits_domains.gin"]


# Files that read a real data set train on fixtures of it in test_datasets.py instead.
TRAINED_HERE = [p for p in ALL_FILES if p.resolve() not in data_recipe_files(GIN)]


def test_there_are_shipped_configs():
    assert GIN / "experiments/digits_equal_all.gin" in ALL_FILES and len(WHOLE) >= 5


@pytest.mark.parametrize("path", TRAINED_HERE, ids=lambda p: str(p.relative_to(GIN)))
def test_gin_file_parses_builds_and_trains(path):
    files = [path] if path in WHOLE else [*UNDER.get(path, [GIN / "experiments/digits_equal_all.gin"]), path]
    config.parse(files, quick_bindings(steps=2))
    result = train(run_dir=None)
    assert result["steps"] == 2
    assert 0.0 <= result["test"] <= 1.0
    assert "train.steps = 2" in gin.operative_config_str()


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(GIN)))
def test_gin_file_opens_with_a_comment_on_what_it_is(path):
    assert path.read_text().lstrip().startswith("#"), f"{path} should open with a comment"


def test_stl_plus_trains_the_main_task_on_labels_and_aux_set():
    config.parse([GIN / "experiments/digits_stl_plus.gin"], quick_bindings(steps=1))
    graph = gin.query_parameter("train.tasks").scoped_configurable_fn()
    assert graph.main.pool == "labeled+aux" and graph.aux == []


def test_includes_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config.parse([GIN / "experiments/digits_equal_all.gin"], quick_bindings(steps=1))
    assert gin.query_parameter("LowDataSplit.labels_per_class") == 10


def test_a_gin_file_outside_the_package_includes_shipped_recipes(tmp_path, monkeypatch):
    """A user's own file, in a folder of its own, includes the recipes by their short names and by
    package path, as it would after `pip install auxframe`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.gin").write_text(
        "include 'base/train.gin'\n"
        "include 'auxframe/configs/datasets/digits.gin'\n"
        "include 'models/small_cnn.gin'\ninclude 'tasks/digits_all.gin'\n"
        "LowDataSplit.labels_per_class = 7\n"
    )
    config.parse([tmp_path / "mine.gin"], quick_bindings(steps=1))
    assert gin.query_parameter("LowDataSplit.labels_per_class") == 7
    assert gin.query_parameter("train.steps") == 1


def test_a_recipe_is_named_on_the_command_line_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config.resolve_gin_file("quickstart.gin") == config.CONFIGS / "quickstart.gin"
    assert config.resolve_gin_file("experiments/digits_arml") == config.CONFIGS / "experiments/digits_arml.gin"
    assert config.resolve_gin_file("gin_configs/quickstart.gin") == config.CONFIGS / "quickstart.gin"
    (tmp_path / "quickstart.gin").write_text("train.steps = 3\n")  # a local file wins over the recipe
    assert config.resolve_gin_file("quickstart.gin") == Path("quickstart.gin")
    with pytest.raises(ConfigError, match="auxframe ls"):
        config.resolve_gin_file("no_such_recipe.gin")


def test_an_include_reads_what_this_parse_finds_not_an_earlier_parse_folder(tmp_path, monkeypatch):
    """A folder searched by an earlier parse in the same process does not shadow the shipped recipe."""
    earlier = tmp_path / "earlier"
    (earlier / "base").mkdir(parents=True)
    (earlier / "base" / "train.gin").write_text("# not the shipped one\ntrain.steps = 7\n")
    (earlier / "exp.gin").write_text("include 'quickstart.gin'\ninclude 'base/train.gin'\n")
    config.parse([earlier / "exp.gin"], [])
    assert gin.query_parameter("train.steps") == 7  # its own folder's base/train.gin comes before the shipped one
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "exp.gin").write_text("include 'quickstart.gin'\n")
    monkeypatch.chdir(mine)
    config.parse([mine / "exp.gin"], [])
    assert gin.query_parameter("train.steps") == 1_500  # the shipped base/train.gin again


def test_a_runs_config_gin_parses_again_with_a_replaced_plugins_bindings(tmp_path):
    """gin's config_str keys a binding by the shortest unambiguous name (``arml.weight_lr``); a run of
    an ARML recipe with ``weightings/stl.gin`` on top keeps ARML's bindings so, and nothing in it
    references ``weightings.arml``. Parsing that config.gin again (``auxframe run --gin RUN/config.gin``)
    must load ARML from the bare name. A fresh process: in this one ARML is registered already."""
    import subprocess
    import sys

    from auxframe import config

    config.parse([GIN / "quickstart.gin", GIN / "weightings/stl.gin"], ["train.steps = 2"])
    saved = tmp_path / "config.gin"
    saved.write_text(gin.config_str())
    assert "\narml.weight_lr = " in "\n" + saved.read_text() and "weightings.arml" not in saved.read_text()
    code = ("import gin; from auxframe import config; config.parse([r'%s']); "
            "print(gin.query_parameter('weightings.arml.weight_lr'), gin.query_parameter('train.steps'))") % saved
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [repr(gin.query_parameter("weightings.arml.weight_lr")), "2"]
