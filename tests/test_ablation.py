"""Ablations of the auxiliary tasks as sweep axes (auxframe/ablation.py, ``auxframe sweep --ablate``):
the task lists, their point names, the effects read back from a sweep, and the rank correlation."""

from __future__ import annotations

import json

import pytest

from auxframe import ablation
from auxframe.cli import main as cli
from auxframe.errors import ConfigError
from auxframe.sweep import grid_points, seeds_axis
from helpers import GIN

PLANTED = [str(GIN / "experiments/synthetic_equal.gin")]


def test_task_refs_read_the_task_list_without_building_it():
    refs = ablation.task_refs(PLANTED, [])
    assert [r.name for r in refs] == ["main", "helpful_0", "redundant_0", "noise_0", "adversarial_0"]
    assert [r.main for r in refs] == [True, False, False, False, False]
    assert refs[1].text == "@helpful/Task()"


def test_task_refs_need_a_list_of_scoped_tasks():
    with pytest.raises(ConfigError, match="needs `TaskGraph.tasks` as a list of tasks"):
        ablation.task_refs(PLANTED, ["TaskGraph.tasks = @field_tasks()"])


def test_the_ablations_task_lists_and_point_names():
    refs = ablation.task_refs(PLANTED, [])
    values = ablation.ablation_values(refs, ["one-at-a-time", "leave-one-out"])
    labels = [label for label, _ in values]
    assert labels == ["main-only", "only-helpful_0", "only-redundant_0", "only-noise_0", "only-adversarial_0",
                      "all", "without-helpful_0", "without-redundant_0", "without-noise_0", "without-adversarial_0"]
    lists = dict(values)
    assert [t.name for t in lists["only-noise_0"]] == ["main", "noise_0"]
    assert [t.name for t in lists["without-noise_0"]] == ["main", "helpful_0", "redundant_0", "adversarial_0"]
    axis = ablation.ablation_axis(PLANTED, [], ["one-at-a-time"])
    points = grid_points([axis, seeds_axis([0])])
    assert points[1].name == "tasks=only-helpful_0,seed=0"
    assert points[1].bindings[0] == "TaskGraph.tasks = [@main/Task(), @helpful/Task()]"
    assert points[1].columns["ablation"] == "only-helpful_0"


def test_one_auxiliary_task_gives_each_list_once_and_bad_modes_are_refused():
    refs = ablation.task_refs(PLANTED, ["TaskGraph.tasks = [@main/Task(), @noise/Task()]"])
    values = ablation.ablation_values(refs, ["one-at-a-time", "leave-one-out"])
    assert [label for label, _ in values] == ["main-only", "only-noise_0"]  # 'all' and 'without-noise_0' repeat them
    with pytest.raises(ConfigError, match="unknown ablation 'two-at-a-time'"):
        ablation.ablation_values(refs, ["two-at-a-time"])
    with pytest.raises(ConfigError, match="no auxiliary task"):
        ablation.ablation_values(refs[:1], ["one-at-a-time"])


def _fake_sweep(tmp_path, results: dict[str, list[float]]):
    points = []
    for label, values in results.items():
        for seed, value in enumerate(values):
            name = f"tasks={label},seed={seed}"
            (tmp_path / name).mkdir()
            (tmp_path / name / "metrics.json").write_text(json.dumps(
                {"best": {"test": value, "val": value}, "test": value, "val": value, "higher_is_better": True}))
            points.append({"name": name, "values": {"TaskGraph.tasks": "[...]", "train.seed": str(seed),
                                                    "LowDataSplit.seed": str(seed)}, "columns": {"ablation": label}})
    (tmp_path / "sweep.json").write_text(json.dumps({"points": points}))
    return tmp_path


def test_effects_are_paired_differences_to_the_reference(tmp_path):
    sweep = _fake_sweep(tmp_path, {"main-only": [0.80, 0.70, 0.75], "only-a": [0.85, 0.80, 0.75],
                                   "only-b": [0.70, 0.70, 0.70], "all": [0.90, 0.80, 0.85],
                                   "without-a": [0.80, 0.80, 0.80], "without-b": [0.95, 0.80, 0.90]})
    effects = ablation.ablation_effects(sweep)
    one = {e.task: e.effect for e in effects["one-at-a-time"]}
    assert [e.task for e in effects["one-at-a-time"]] == ["a", "b"]
    assert one["a"].mean == pytest.approx((0.05 + 0.10 + 0.0) / 3)
    assert (one["a"].wins, one["a"].ties, one["a"].losses) == (2, 1, 0)
    assert one["b"].mean == pytest.approx((-0.10 + 0.0 - 0.05) / 3)
    loo = {e.task: e.effect for e in effects["leave-one-out"]}
    assert loo["a"].mean == pytest.approx((0.10 + 0.0 + 0.05) / 3)  # all - without-a
    assert loo["b"].mean == pytest.approx((-0.05 + 0.0 - 0.05) / 3)


def test_the_effects_table(tmp_path):
    sweep = _fake_sweep(tmp_path, {"main-only": [0.80, 0.70, 0.75], "only-a": [0.85, 0.80, 0.75],
                                   "only-b": [0.70, 0.70, 0.70]})
    path, text = ablation.write_effects(sweep)
    assert path.read_text() == text and "leave-one-out" not in text
    # a: differences 0.05, 0.10, 0.00: mean 0.05, sd 0.05, t(0.975, 2) = 4.3027, half width 0.1242
    assert "| a | +0.0500 [-0.0742, +0.1742] | 3 | 2/1/0 |" in text
    assert text.index("| a |") < text.index("| b |")


def test_effects_need_an_ablation_sweep(tmp_path):
    with pytest.raises(ConfigError, match="not a sweep directory"):
        ablation.ablation_effects(tmp_path)


def test_spearman_by_hand():
    # ranks (1, 2, 3, 4) against (2, 1, 3, 4): d^2 = 1 + 1, rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert ablation.spearman({"a": 1, "b": 2, "c": 3, "d": 4}, {"a": 20, "b": 10, "c": 30, "d": 40}) == pytest.approx(0.8)
    with pytest.raises(ConfigError, match="at least 3 tasks"):
        ablation.spearman({"a": 1, "b": 2}, {"a": 1, "b": 2})


def test_sweep_ablate_lists_the_points(capsys):
    code = cli(["sweep", "--gin", PLANTED[0], "--ablate", "leave-one-out", "--seeds", "0", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "tasks=without-adversarial_0,seed=0: TaskGraph.tasks = [@main/Task(), @helpful/Task()" in out
    assert "5 points" in out


def test_sweep_ablate_trains_the_points_and_writes_the_effects(tmp_path, capsys):
    code = cli(["sweep", "--gin", PLANTED[0], "--ablate", "one-at-a-time", "--seeds", "0", "--sweep-dir", str(tmp_path),
                "--gin-param", "TaskGraph.tasks = [@main/Task(), @helpful/Task(), @noise/Task()]",
                "--gin-param", "train.steps = 20", "--gin-param", "train.eval_every = 10",
                "--gin-param", "train.progress = False"])
    out = capsys.readouterr().out
    assert code == 0 and "ablation effects:" in out
    text = (tmp_path / ablation.ABLATION_MD).read_text()
    assert "## one-at-a-time" in text and "| helpful_0 |" in text and "| noise_0 |" in text
    assert {e.task for e in ablation.ablation_effects(tmp_path)["one-at-a-time"]} == {"helpful_0", "noise_0"}
