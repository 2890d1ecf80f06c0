"""`auxframe sweep --search random|tpe`: the space's syntax, a search that scores each trial by its
points' validation metric, continues where it stopped (no finished trial trains again, an
interrupted one runs again with its values), refuses a second search in its directory, and its
command-line errors."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState

from auxframe.cli import main
from auxframe.errors import ConfigError, RunDirError
from auxframe.search import Dimension, _lock, make_sampler, parse_space, run_search, trial_points
from auxframe.sweep import parse_grid
from helpers import GIN, quick_bindings

FILES = [str(GIN / "experiments/digits_equal_all.gin")]
SPACE = [parse_space("torch.optim.Adam.lr=loguniform(1e-4, 1e-1)"), parse_space("train.batch_size=[8, 16]")]


def test_space_forms_and_their_errors():
    assert parse_space("torch.optim.Adam.lr = loguniform(1e-4, 0.1)") == Dimension("torch.optim.Adam.lr", "loguniform", 1e-4, 0.1)
    assert parse_space("backbones.mlp.width=logint(8, 64)") == Dimension("backbones.mlp.width", "logint", 8.0, 64.0)
    assert parse_space("train.backbone=[@backbones.mlp, @backbones.small_cnn]").choices == (
        "@backbones.mlp", "@backbones.small_cnn")
    for spec, words in [("x.y=normal(0, 1)", "unknown distribution 'normal'"), ("x.y=uniform(1)", "give two numbers"),
                        ("x.y=int(1.5, 4)", "integer bounds"), ("x.y=uniform(2, 1)", "must be below"),
                        ("x.y=loguniform(0, 1)", "positive bounds"), ("x.y=3", "not a list of values")]:
        with pytest.raises(ConfigError, match=words):
            parse_space(spec)
    with pytest.raises(ConfigError, match="cannot be searched"):
        from auxframe.search import axis_dimension
        from auxframe.sweep import seeds_axis

        axis_dimension(seeds_axis([0, 1]))
    assert isinstance(make_sampler("random", 0), optuna.samplers.RandomSampler)
    assert isinstance(make_sampler("tpe", 0), optuna.samplers.TPESampler)


def test_a_trial_is_one_configuration_trained_once_per_seed():
    points = trial_points({"torch.optim.Adam.lr": "0.01", "train.batch_size": "8"}, [0, 1],
                          ["torch.optim.Adam.lr", "train.batch_size"])
    assert [p.name for p in points] == ["lr=0.01,batch_size=8,seed=0", "lr=0.01,batch_size=8,seed=1"]
    assert points[1].bindings[-2:] == ("train.seed = 1", "LowDataSplit.seed = 1")
    assert points[0].configuration == points[1].configuration


def _search(sweep_dir, trials, method="random"):
    return run_search(FILES, quick_bindings(steps=2), SPACE, [], sweep_dir, trials, method, log=lambda line: None)


def test_search_scores_trials_continues_and_reruns_an_interrupted_trial(tmp_path):
    sweep_dir = tmp_path / "search"
    out = _search(sweep_dir, 2)
    study = out["study"]
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2 and len(out["configurations"]) == 2
    for t in trials:  # a trial's value is its (one) point's best validation metric
        (name,) = t.user_attrs["points"]
        assert t.value == json.loads((sweep_dir / name / "metrics.json").read_text())["best"]["val"]
        lr = float(dict(parse_grid(f"x=[{t.params['torch.optim.Adam.lr']!r}]").values[0].columns)["x"])
        assert 1e-4 <= lr <= 0.1 and t.params["train.batch_size"] in ("8", "16")
        assert f"batch_size={t.params['train.batch_size']}" in name
    spec = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["name"] for p in spec["points"]] == [t.user_attrs["points"][0] for t in trials]
    assert spec["search"]["method"] == "random" and spec["search"]["trials"] == 2

    # the same budget again: nothing trains
    stamps = {p.name: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.json")}
    out = _search(sweep_dir, 2)
    assert {p.name: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.json")} == stamps
    assert len(out["study"].get_trials()) == 2

    # a trial left running by an interrupted search here runs again with the same values
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    stale = study.ask()
    values = {d.key: d.suggest(stale) for d in SPACE}
    stale.set_user_attr("sweep_dir", str(sweep_dir.resolve()))
    out = _search(sweep_dir, 3)
    trials = out["study"].get_trials()
    assert trials[stale.number].state == TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == stale.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == trials[stale.number].params
    assert retry[0].user_attrs["points"] == [p.name for p in trial_points(values, [], [d.key for d in SPACE])]
    assert len(out["configurations"]) == 3


def test_one_search_per_directory_and_a_config_that_does_not_parse_stops_it(tmp_path):
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    fd = _lock(sweep_dir)
    try:
        with pytest.raises(RunDirError, match="another search runs in"):
            _search(sweep_dir, 1)
    finally:
        import os

        os.close(fd)
    with pytest.raises(ConfigError, match="sweep point .*Adam.lrr"):
        run_search(FILES, [], [parse_space("torch.optim.Adam.lrr=uniform(0.1, 0.2)")], [], tmp_path / "t", 1)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("args, words", [
    (["--search", "tpe", "--space", "torch.optim.Adam.lr=loguniform(1e-4, 1e-1)"], "needs --trials N"),
    (["--space", "torch.optim.Adam.lr=loguniform(1e-4, 1e-1)", "--trials", "3"], "add --search random"),
    (["--search", "random", "--trials", "3"], "needs a space"),
    (["--search", "random", "--trials", "0", "--grid", "train.batch_size=[8, 16]"], "--trials must be a positive"),
    (["--search", "tpe", "--trials", "2", "--grid", "train.batch_size=[8]", "--wandb-sweep", "x.yaml"], "grids only"),
])
def test_search_arguments_are_checked(capsys, tmp_path, args, words):
    assert main(["sweep", "--gin", FILES[0], "--sweep-dir", str(tmp_path / "s"), *args]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_search_dry_run_parses_and_lists_the_space(capsys):
    code = main(["sweep", "--gin", FILES[0], "--search", "tpe", "--trials", "20", "--seeds", "0", "1",
                 "--space", "torch.optim.Adam.lr=loguniform(1e-4, 1e-1)", "--grid", "train.batch_size=[8, 16]", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "torch.optim.Adam.lr: loguniform 0.0001 .. 0.1" in out and "train.batch_size: categorical 8, 16" in out
    assert "20 trials x 2 seed(s), tpe search" in out
