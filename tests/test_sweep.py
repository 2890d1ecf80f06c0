"""`auxframe sweep`: grid parsing, the seeds axis (it seeds the split too), the summary over seeds
(mean and t interval, checked by hand), a local sweep end to end (skip and resume on rerun), the same
sweep with --jobs 2 (identical results, resumable), --dry-run parsing every point, and the W&B sweep
configuration (its command really runs a point)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
import subprocess
import sys

import pytest
import yaml

from auxframe.cli import main
from auxframe.errors import ConfigError
from auxframe.sweep import (
    Point, PointResult, PointRunner, _child_error, grid_points, parse_grid, seeds_axis, threads_per_job, write_summary,
)
from helpers import GIN, quick_bindings

FILES = [str(GIN / "experiments/digits_equal_all.gin"), str(GIN / "weightings/fixed.gin")]
WEIGHTS_GRID = "weightings.fixed.weights={'parity': [0.0, 1.0]}"


def quick_params(steps=2):
    out = []
    for b in quick_bindings(steps=steps):
        out += ["--gin-param", b]
    return out


def sweep_cli(capsys, *args):
    code = main(["sweep", *(a for f in FILES for a in ("--gin", f)), *quick_params(), *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- grid parsing ---------------------------------------------------------------------------------
def test_list_axis_keeps_gin_values_as_text():
    axis = parse_grid("train.backbone = [@backbones.mlp, @backbones.small_cnn, @scope/backbones.mlp()]")
    assert axis.key == "train.backbone"
    assert [v.text for v in axis.values] == ["@backbones.mlp", "@backbones.small_cnn", "@scope/backbones.mlp()"]
    axis = parse_grid("torch.optim.Adam.lr=[1e-3, 20_000, 'x', (8, 8), None, True, %LR]")
    assert [v.text for v in axis.values] == ["0.001", "20000", "'x'", "(8, 8)", "None", "True", "%LR"]


def test_dict_axis_is_the_product_of_its_list_entries_in_order():
    axis = parse_grid("weightings.fixed.weights={'parity': [0.1, 0.3, 1.0], 'rotation': [0.0, 0.5], 'ge5': 0.2}")
    assert axis.entries == ("parity", "rotation")
    assert len(axis.values) == 6
    assert axis.values[0].text == "{'parity': 0.1, 'rotation': 0.0, 'ge5': 0.2}"
    assert axis.values[1].text == "{'parity': 0.1, 'rotation': 0.5, 'ge5': 0.2}"
    assert axis.values[5].text == "{'parity': 1.0, 'rotation': 0.5, 'ge5': 0.2}"
    assert dict(axis.values[3].columns) == {"weightings.fixed.weights['parity']": "0.3",
                                            "weightings.fixed.weights['rotation']": "0.5"}


BAD_GRIDS = [
    ("train.steps=3", ["not a list of values", "--gin-param"]),
    ("backbones.mlp.hidden=(8, 8)", ["a tuple is one value", "[(8, 8), ...]"]),
    ("weightings.fixed.weights={'parity': 0.3}", ["not a list of values"]),
    ("weightings.fixed.weights={'parity': [], 'ge5': [1.0]}", ["'parity' has an empty list"]),
    ("train.steps=[]", ["list of values is empty"]),
    ("train.steps=[1, 2, 1]", ["1 appear more than once"]),
    ("train.steps", ["expected ':' or '='", "KEY=[v1, v2, ...]"]),
    ("train.steps=[1, 2", ["cannot parse", "brackets"]),
    ("train.steps=[1]\ntrain.seed=[2]", ["exactly one binding"]),
    ("train.steps=[1] 2", ["Expected newline"]),
]


@pytest.mark.parametrize("spec, words", BAD_GRIDS, ids=[s for s, _ in BAD_GRIDS])
def test_bad_grid_gets_a_clear_error(spec, words):
    with pytest.raises(ConfigError) as err:
        parse_grid(spec)
    assert str(err.value).startswith(f"--grid {spec!r}")
    for w in words:
        assert w in str(err.value)


def test_points_are_the_cartesian_product_first_axis_slowest_with_readable_names():
    axes = [parse_grid("torch.optim.Adam.lr=[1e-3, 1e-2]"), parse_grid("torch.optim.SGD.lr=[0.1]"),
            parse_grid("train.backbone=[@backbones.small_cnn]"), seeds_axis([0, 1])]
    points = grid_points(axes)
    assert [p.name for p in points] == [
        "Adam.lr=0.001,SGD.lr=0.1,backbone=small_cnn,seed=0", "Adam.lr=0.001,SGD.lr=0.1,backbone=small_cnn,seed=1",
        "Adam.lr=0.01,SGD.lr=0.1,backbone=small_cnn,seed=0", "Adam.lr=0.01,SGD.lr=0.1,backbone=small_cnn,seed=1",
    ]
    # a seed seeds the model, the data order and the split alike
    assert points[1].bindings == ("torch.optim.Adam.lr = 0.001", "torch.optim.SGD.lr = 0.1",
                                  "train.backbone = @backbones.small_cnn", "train.seed = 1", "LowDataSplit.seed = 1")
    assert points[1].seed == (("train.seed", "1"), ("LowDataSplit.seed", "1"))
    assert points[1].configuration == points[0].configuration != points[2].configuration
    for clash in ("train.seed=[1, 2]", "LowDataSplit.seed=[1, 2]"):
        with pytest.raises(ConfigError, match=r"\.seed is swept more than once.*drop --seeds"):
            grid_points([parse_grid(clash), seeds_axis([3])])


def test_names_that_would_clash_are_told_apart():
    points = grid_points([parse_grid("train.device=['a b', 'a-b']")])
    assert len({p.name for p in points}) == 2 and all(p.name.startswith("device=a-b") for p in points)
    # nothing in a value or a dict key can make a subfolder
    points = grid_points([parse_grid("a.weights={'x/y': ['../z', 1]}")])
    assert [p.name for p in points] == ["x-y=..-z", "x-y=1"]


# -- the summary ----------------------------------------------------------------------------------
def _result(lr, seed, best_val, best_test=0.5, status="done"):
    metrics = None if best_val is None else {
        "main_task": "digit", "main_metric": "accuracy", "val": best_val - 0.1, "test": best_test - 0.1,
        "steps": 10, "wall_time_s": 1.0, "best": {"step": 5, "val": best_val, "test": best_test}}
    values = {"x.lr": lr, "train.seed": seed, "LowDataSplit.seed": seed}
    return PointResult(Point(f"lr={lr},seed={seed}", (), {"x.lr": lr}, values), status, metrics)


@pytest.mark.parametrize("higher, expected", [(True, "x.lr = c"), (False, "x.lr = a")])
def test_summary_marks_the_best_validation_configuration(tmp_path, higher, expected):
    results = [_result("a", "0", 0.2), _result("b", "0", None, status="failed: diverged"), _result("c", "0", 0.9, 0.1),
               _result("d", "0", 0.5)]
    out = write_summary(results, tmp_path, higher_is_better=higher)
    assert out["best"].label == expected
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["best"] for r in rows] == ["*" if r["configuration"] == expected else "" for r in rows]
    assert rows[1]["seeds"] == "0/1" and rows[1]["best_val_mean"] == ""
    points = list(csv.DictReader((tmp_path / "points.csv").open()))
    assert points[1]["status"] == "failed: diverged" and points[1]["best_val"] == ""
    assert f"Best configuration: {expected}" in (tmp_path / "summary.md").read_text()


def test_summary_groups_over_seeds_with_t_intervals_not_the_best_single_seed(tmp_path):
    # the single best point (lr 0.1, seed 1) belongs to the configuration with the worse mean
    results = [_result("0.1", "0", 0.1, 0.3), _result("0.1", "1", 0.95, 0.5),
               _result("0.01", "0", 0.6, 0.7), _result("0.01", "1", 0.6, 0.8), _result("0.01", "2", 0.63, 0.9)]
    out = write_summary(results, tmp_path, higher_is_better=True)
    assert out["best"].label == "x.lr = 0.01"
    rows = {r["configuration"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    # by hand: two seeds, mean 0.525, sample sd 0.425 * sqrt(2) = 0.601041, t(0.975, 1) = 12.706205,
    # half width 12.706205 * 0.601041 / sqrt(2) = 5.400138
    r = rows["x.lr = 0.1"]
    assert float(r["best_val_mean"]) == pytest.approx(0.525)
    assert float(r["best_val_ci_high"]) - 0.525 == pytest.approx(5.400138, abs=1e-5)
    # three seeds of best_test 0.7, 0.8, 0.9: sd 0.1, t(0.975, 2) = 4.302653, half 0.248414
    r = rows["x.lr = 0.01"]
    assert r["seeds"] == "3/3" and r["best"] == "*"
    assert (float(r["best_test_ci_low"]), float(r["best_test_ci_high"])) == pytest.approx((0.8 - 0.248414, 0.8 + 0.248414), abs=1e-6)
    assert "Best configuration: x.lr = 0.01: validation 0.6100 ± 0.0430, test 0.8000 ± 0.2484 (3/3 seeds)" in out["text"]


# -- a local sweep end to end ---------------------------------------------------------------------
SEEDS_GRID = ("--grid", WEIGHTS_GRID, "--seeds", "0", "1")
NAMES = ["parity=0.0,seed=0", "parity=0.0,seed=1", "parity=1.0,seed=0", "parity=1.0,seed=1"]


def _metrics(sweep_dir, names=NAMES):
    return {n: json.loads((sweep_dir / n / "metrics.json").read_text()) for n in names}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """A four-point sweep (two weights x two seeds) trained one point at a time, in this process."""
    import gin

    sweep_dir = tmp_path_factory.mktemp("sweeps") / "sequential"
    gin.clear_config()
    code = main(["sweep", *(a for f in FILES for a in ("--gin", f)), *quick_params(), *SEEDS_GRID, "--sweep-dir", str(sweep_dir)])
    gin.clear_config()
    assert code == 0
    return sweep_dir


def test_sweep_runs_every_point_seeds_the_split_and_writes_the_summary(sequential):
    assert sorted(p.name for p in sequential.iterdir() if p.is_dir()) == NAMES
    metrics = _metrics(sequential)
    assert metrics[NAMES[2]]["weights"]["parity"] == 1.0 and metrics[NAMES[0]]["weights"]["parity"] == 0.0
    # the seed reached the split: the run used LowDataSplit.seed = 1
    assert "LowDataSplit.seed = 1" in (sequential / NAMES[1] / "operative_config.gin").read_text()

    points = list(csv.DictReader((sequential / "points.csv").open()))
    assert [r["point"] for r in points] == NAMES
    assert [float(r["best_val"]) for r in points] == [metrics[n]["best"]["val"] for n in NAMES]
    rows = list(csv.DictReader((sequential / "summary.csv").open()))
    assert [r["configuration"] for r in rows] == [f"weightings.fixed.weights = {{'parity': {w}}}" for w in ("0.0", "1.0")]
    means = [(metrics[a]["best"]["val"] + metrics[b]["best"]["val"]) / 2 for a, b in (NAMES[:2], NAMES[2:])]
    assert [float(r["best_val_mean"]) for r in rows] == pytest.approx(means)
    assert [r["best"] for r in rows] == (["*", ""] if means[0] >= means[1] else ["", "*"])


def test_report_reads_the_sweep_as_the_summary_groups_it(sequential):
    from auxframe.report import build_report

    rep = build_report([sequential])
    summary = list(csv.DictReader((sequential / "summary.csv").open()))
    assert [r.setting for r in rep.rows] == [(("weightings.fixed.weights", f"{{'parity': {w}}}"),) for w in ("0.0", "1.0")]
    assert [r.interval.mean for r in rep.rows] == pytest.approx([float(r["best_test_mean"]) for r in summary])
    assert [sorted(dict(s)["train.seed"] for s in r.values) for r in rep.rows] == [["0", "1"], ["0", "1"]]
    assert rep.rows[0].command.endswith(f"--gin-param \"weightings.fixed.weights = {{'parity': 0.0}}\" "
                                        f"--seeds 0 1 --sweep-dir {sequential}")


def test_rerun_skips_finished_points_resumes_interrupted_ones_and_refuses_a_changed_config(capsys, sequential, tmp_path):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(sequential, sweep_dir)
    stamps = {n: (sweep_dir / n / "metrics.json").stat().st_mtime_ns for n in NAMES}
    (sweep_dir / NAMES[3] / "metrics.json").unlink()  # as if interrupted after its last checkpoint
    code, out, err = sweep_cli(capsys, *SEEDS_GRID, "--sweep-dir", sweep_dir)
    assert code == 0, err
    assert f"[1/4] {NAMES[0]}: finished earlier, skipped" in out and f"[4/4] {NAMES[3]}: resuming" in out
    assert (sweep_dir / NAMES[0] / "metrics.json").stat().st_mtime_ns == stamps[NAMES[0]]
    assert json.loads((sweep_dir / NAMES[3] / "metrics.json").read_text())["steps"] == 2

    # a changed experiment is refused rather than mixed into the old points
    code, _, err = sweep_cli(capsys, *SEEDS_GRID, "--sweep-dir", sweep_dir, "--gin-param", "torch.optim.Adam.lr=0.5")
    assert code == 2 and "config differs" in err and "new --sweep-dir" in err


def test_jobs_2_gives_the_results_of_sequential_runs_new_and_resumed(capsys, sequential, tmp_path):
    sweep_dir = tmp_path / "parallel"
    shutil.copytree(sequential, sweep_dir)
    shutil.rmtree(sweep_dir / NAMES[0])  # never ran
    (sweep_dir / NAMES[3] / "metrics.json").unlink()  # interrupted after its last checkpoint
    code, out, err = sweep_cli(capsys, *SEEDS_GRID, "--sweep-dir", sweep_dir, "--jobs", "2")
    assert code == 0, err + out
    assert f"{NAMES[0]}: training" in out and f"{NAMES[3]}: resuming" in out and out.count("finished earlier, skipped") == 2
    parallel, reference = _metrics(sweep_dir), _metrics(sequential)
    for n in (NAMES[0], NAMES[3]):  # trained side by side, each in its own process
        for key in ("val", "test", "best", "weights", "metrics", "steps"):
            assert parallel[n][key] == reference[n][key], (n, key)
        assert (sweep_dir / n / "config.gin").read_text() == (sequential / n / "config.gin").read_text()
        log = (sweep_dir / "logs" / f"{n}.log").read_text()
        assert log.startswith(f"$ {sys.executable} -m auxframe run") and f"--run-dir {sweep_dir / n}" in log
        assert log.splitlines()[0].endswith("--resume") == (n == NAMES[3])
    assert (sweep_dir / "summary.csv").read_text() == (sequential / "summary.csv").read_text()


def test_each_child_gets_cores_over_jobs_threads(tmp_path):
    runner = PointRunner(FILES, [], tmp_path, jobs=2)
    assert runner.threads == threads_per_job(2) == max(1, len(__import__("os").sched_getaffinity(0)) // 2)
    env = runner.child_env()
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(runner.threads)
    torch_threads = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                   env=env, capture_output=True, text=True, check=True).stdout
    assert int(torch_threads) == runner.threads
    with pytest.raises(ConfigError, match="--jobs must be a positive integer, got 0"):
        PointRunner(FILES, [], tmp_path, jobs=0)


def test_a_failed_child_is_reported_by_its_one_line_error(tmp_path):
    log = tmp_path / "p.log"
    log.write_text("$ auxframe run ...\nsome output\nauxframe: error: weighting Fixed: unknown auxiliary\n  task(s) ['partiy'].\n")
    assert _child_error(log, 2) == "weighting Fixed: unknown auxiliary task(s) ['partiy']."
    log.write_text("Traceback (most recent call last):\n  ...\nMemoryError\n")
    assert _child_error(log, 1) == f"exit status 1: MemoryError (see {log})"


def test_a_bad_binding_stops_the_sweep_before_anything_trains(capsys, tmp_path):
    code, _, err = sweep_cli(capsys, "--grid", "weightings.fixed.wieghts=[{'parity': 1.0}]", "--sweep-dir", tmp_path / "s")
    assert code == 2 and "sweep point wieghts={'parity': 1.0}" not in err  # names are slugs
    assert "sweep point wieghts=parity-1.0" in err and "wieghts" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()
    code, _, err = sweep_cli(capsys, "--sweep-dir", tmp_path / "s")
    assert code == 2 and "nothing to sweep" in err


def test_a_point_that_fails_to_build_is_reported_and_the_others_still_run(capsys, tmp_path):
    code, out, _ = sweep_cli(capsys, "--grid", "weightings.fixed.weights=[{'partiy': 0.5}, {'parity': 0.5}]",
                             "--sweep-dir", tmp_path / "s")
    assert code == 1 and "unknown auxiliary task(s) ['partiy']" in out
    rows = {r["point"]: r for r in csv.DictReader((tmp_path / "s" / "points.csv").open())}
    assert rows["weights=partiy-0.5"]["status"].startswith("failed: ")
    assert rows["weights=parity-0.5"]["status"] == "done"
    best = [r["configuration"] for r in csv.DictReader((tmp_path / "s" / "summary.csv").open()) if r["best"] == "*"]
    assert best == ["weightings.fixed.weights = {'parity': 0.5}"]


def test_dry_run_parses_every_point_and_lists_it(capsys, tmp_path):
    code, out, _ = sweep_cli(capsys, *SEEDS_GRID[:2], "--seeds", "3", "4", "--dry-run")
    assert code == 0 and out.splitlines()[-1] == "4 points"
    assert ("parity=1.0,seed=4: weightings.fixed.weights = {'parity': 1.0}; train.seed = 4; LowDataSplit.seed = 4"
            in out)
    broken = tmp_path / "broken.gin"
    broken.write_text(f"include '{GIN / 'experiments/digits_equal_all.gin'}'\ninclude 'base/no_such_file.gin'\n")
    code = main(["sweep", "--gin", str(broken), "--seeds", "0", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "no_such_file.gin" in err and "Traceback" not in err


# -- W&B ------------------------------------------------------------------------------------------
def test_wandb_sweep_yaml_round_trips_and_its_command_runs_a_point(capsys, tmp_path):
    path = tmp_path / "sweep.yaml"
    grid = ["--grid", "weightings.fixed.weights={'parity': [0.0, 1.0], 'ge5': [0.5]}", "--grid", "torch.optim.Adam.lr=[1e-3, 1e-2]"]
    code, out, err = sweep_cli(capsys, *grid, "--seeds", "0", "1", "--wandb-sweep", path)
    assert code == 0, err
    spec = yaml.safe_load(path.read_text())
    assert spec["method"] == "grid" and spec["metric"] == {"name": "val", "goal": "maximize"}
    params = spec["parameters"]
    # the seeds axis is one W&B parameter, a macro bound to both seeds
    assert list(params) == ["weightings.fixed.weights", "torch.optim.Adam.lr", "train_seed"]
    assert params["torch.optim.Adam.lr"] == {"values": [0.001, 0.01]} and params["train_seed"] == {"values": [0, 1]}
    assert params["weightings.fixed.weights"]["values"][1] == "{'parity': 1.0, 'ge5': 0.5}"
    cmd = spec["command"]
    assert cmd[:3] == ["${env}", "auxframe", "run"] and cmd[-1] == "${args_no_hyphens}"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--gin"] == FILES
    assert "train.steps = 2" in cmd and "train.seed = %train_seed" in cmd and "LowDataSplit.seed = %train_seed" in cmd

    # W&B's agent writes each parameter as KEY=str(value): one per point of the local grid
    local = grid_points([parse_grid(g) for g in grid[1::2]] + [seeds_axis([0, 1])])
    wandb_points = [tuple(f"{k}={v}" for k, v in zip(params, combo))
                    for combo in itertools.product(*(p["values"] for p in params.values()))]
    assert [p[:2] for p in wandb_points] == [tuple(b.replace(" = ", "=", 1) for b in p.bindings[:2]) for p in local]
    assert [p[2] for p in wandb_points] == [f"train_seed={p.values['train.seed']}" for p in local]

    # and the agent's command line runs (here the fourth point: lr 0.01, seed 1, without ${env})
    run_dir = tmp_path / "agent-run"
    argv = cmd[2:-1] + list(wandb_points[3]) + ["--run-dir", str(run_dir)]
    assert main(argv) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["weights"]["parity"] == 0.0 and metrics["weights"]["ge5"] == 0.5
    operative = (run_dir / "operative_config.gin").read_text()
    assert "Adam.lr = 0.01" in operative and "train_seed = 1" in operative
    assert "train.seed = %train_seed" in operative and "LowDataSplit.seed = %train_seed" in operative
