"""`auxframe sweep`: grid parsing, a local sweep end to end (skip and resume on rerun), the summary's
choice of the best point, and the W&B sweep configuration (its command really runs a point)."""

from __future__ import annotations

import csv
import itertools
import json

import pytest
import yaml

from auxframe.cli import main
from auxframe.errors import ConfigError
from auxframe.sweep import Point, PointResult, grid_points, parse_grid, seeds_axis, write_summary
from helpers import GIN, quick_bindings

FILES = [str(GIN / "quickstart.gin"), str(GIN / "weightings/fixed.gin")]
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
    assert points[1].bindings == ("torch.optim.Adam.lr = 0.001", "torch.optim.SGD.lr = 0.1",
                                  "train.backbone = @backbones.small_cnn", "train.seed = 1")
    with pytest.raises(ConfigError, match="train.seed is swept more than once"):
        grid_points([parse_grid("train.seed=[1, 2]"), seeds_axis([3])])


def test_names_that_would_clash_are_told_apart():
    points = grid_points([parse_grid("train.device=['a b', 'a-b']")])
    assert len({p.name for p in points}) == 2 and all(p.name.startswith("device=a-b") for p in points)
    # nothing in a value or a dict key can make a subfolder
    points = grid_points([parse_grid("a.weights={'x/y': ['../z', 1]}")])
    assert [p.name for p in points] == ["x-y=..-z", "x-y=1"]


# -- the summary ----------------------------------------------------------------------------------
def _result(name, best_val, best_test=0.5, status="done"):
    metrics = None if best_val is None else {
        "main_task": "digit", "main_metric": "accuracy", "val": best_val - 0.1, "test": best_test - 0.1,
        "steps": 10, "wall_time_s": 1.0, "best": {"step": 5, "val": best_val, "test": best_test}}
    return PointResult(Point(name, (f"x.y = {name}",), {"x.y": name}, {"x.y": name}), status, metrics)


@pytest.mark.parametrize("higher, expected", [(True, "c"), (False, "a")])
def test_summary_marks_the_best_validation_point(tmp_path, higher, expected):
    results = [_result("a", 0.2), _result("b", None, status="failed: diverged"), _result("c", 0.9, 0.1), _result("d", 0.5)]
    out = write_summary(results, tmp_path, higher_is_better=higher)
    assert out["best"].point.name == expected
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["best"] for r in rows] == ["*" if r["point"] == expected else "" for r in rows]
    assert rows[1]["status"] == "failed: diverged" and rows[1]["best_val"] == ""
    assert f"Best point: `{expected}`" in (tmp_path / "summary.md").read_text()


def test_summary_over_seeds_picks_the_best_mean(tmp_path):
    def point(lr, seed, val):
        r = _result(f"{lr}-{seed}", val)
        r.point = Point(r.point.name, (), {}, {"lr": lr, "train.seed": seed})
        return r

    # the single best point (lr 0.1, seed 1) belongs to the configuration with the worse mean;
    # sample standard deviation of (0.1, 0.95): sqrt(2 * 0.425^2 / 1) = 0.60104
    results = [point("0.1", "0", 0.1), point("0.1", "1", 0.95), point("0.01", "0", 0.6), point("0.01", "1", 0.6)]
    text = write_summary(results, tmp_path, higher_is_better=True, seeded=True)["text"]
    assert "Best configuration: lr = 0.01: validation 0.6000 ± 0.0000" in text
    assert "| lr = 0.1 | 2/2 | 0.5250 ± 0.6010 |" in text


# -- a local sweep end to end ---------------------------------------------------------------------
def test_sweep_runs_every_point_writes_a_summary_and_skips_finished_points_on_rerun(capsys, tmp_path):
    sweep_dir = tmp_path / "sweep"
    code, out, err = sweep_cli(capsys, "--grid", WEIGHTS_GRID, "--grid", "train.batch_size=[16]", "--sweep-dir", sweep_dir)
    assert code == 0, err
    names = ["parity=0.0,batch_size=16", "parity=1.0,batch_size=16"]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == names
    metrics = {n: json.loads((sweep_dir / n / "metrics.json").read_text()) for n in names}
    assert metrics[names[1]]["weights"]["parity"] == 1.0 and metrics[names[0]]["weights"]["parity"] == 0.0

    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [r["point"] for r in rows] == names
    assert [float(r["best_val"]) for r in rows] == [metrics[n]["best"]["val"] for n in names]
    assert [float(r["test"]) for r in rows] == [metrics[n]["test"] for n in names]
    vals = [metrics[n]["best"]["val"] for n in names]
    best = names[vals.index(max(vals))]  # the first on ties
    assert [r["point"] for r in rows if r["best"] == "*"] == [best]
    assert f"Best point: `{best}`" in (sweep_dir / "summary.md").read_text() and f"Best point: `{best}`" in out

    # rerun: both finished points are skipped; an interrupted one (no metrics.json) resumes
    stamps = {n: (sweep_dir / n / "metrics.json").stat().st_mtime_ns for n in names}
    (sweep_dir / names[1] / "metrics.json").unlink()
    code, out, err = sweep_cli(capsys, "--grid", WEIGHTS_GRID, "--grid", "train.batch_size=[16]", "--sweep-dir", sweep_dir)
    assert code == 0, err
    assert f"[1/2] {names[0]}: finished earlier, skipped" in out and f"[2/2] {names[1]}: resuming" in out
    assert (sweep_dir / names[0] / "metrics.json").stat().st_mtime_ns == stamps[names[0]]
    assert json.loads((sweep_dir / names[1] / "metrics.json").read_text())["steps"] == 2

    # a changed experiment is refused rather than mixed into the old points
    code, _, err = sweep_cli(capsys, "--grid", WEIGHTS_GRID, "--grid", "train.batch_size=[16]", "--sweep-dir", sweep_dir,
                             "--gin-param", "torch.optim.Adam.lr=0.5")
    assert code == 2 and "config differs" in err and "new --sweep-dir" in err


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
    rows = {r["point"]: r for r in csv.DictReader((tmp_path / "s" / "summary.csv").open())}
    assert rows["weights=partiy-0.5"]["status"].startswith("failed: ") and rows["weights=partiy-0.5"]["best"] == ""
    assert rows["weights=parity-0.5"]["status"] == "done" and rows["weights=parity-0.5"]["best"] == "*"


def test_dry_run_lists_points(capsys):
    code, out, _ = sweep_cli(capsys, "--grid", WEIGHTS_GRID, "--seeds", "3", "4", "--dry-run")
    assert code == 0 and out.splitlines()[-1] == "4 points"
    assert "parity=1.0,seed=4: weightings.fixed.weights = {'parity': 1.0}; train.seed = 4" in out


# -- W&B ------------------------------------------------------------------------------------------
def test_wandb_sweep_yaml_round_trips_and_its_command_runs_a_point(capsys, tmp_path):
    path = tmp_path / "sweep.yaml"
    grid = ["--grid", "weightings.fixed.weights={'parity': [0.0, 1.0], 'ge5': [0.5]}", "--grid", "torch.optim.Adam.lr=[1e-3, 1e-2]"]
    code, out, err = sweep_cli(capsys, *grid, "--seeds", "0", "1", "--wandb-sweep", path)
    assert code == 0, err
    spec = yaml.safe_load(path.read_text())
    assert spec["method"] == "grid" and spec["metric"] == {"name": "val", "goal": "maximize"}
    params = spec["parameters"]
    assert list(params) == ["weightings.fixed.weights", "torch.optim.Adam.lr", "train.seed"]
    assert params["torch.optim.Adam.lr"] == {"values": [0.001, 0.01]} and params["train.seed"] == {"values": [0, 1]}
    assert params["weightings.fixed.weights"]["values"][1] == "{'parity': 1.0, 'ge5': 0.5}"
    cmd = spec["command"]
    assert cmd[:3] == ["${env}", "auxframe", "run"] and cmd[-1] == "${args_no_hyphens}"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--gin"] == FILES
    assert "train.steps = 2" in cmd

    # W&B's agent writes each parameter as KEY=str(value): the same bindings as the local points
    local = grid_points([parse_grid(g) for g in grid[1::2]] + [seeds_axis([0, 1])])
    wandb_points = [tuple(f"{k}={v}" for k, v in zip(params, combo))
                    for combo in itertools.product(*(p["values"] for p in params.values()))]
    assert wandb_points == [tuple(b.replace(" = ", "=", 1) for b in p.bindings) for p in local]

    # and the agent's command line runs (here the second point, without ${env})
    run_dir = tmp_path / "agent-run"
    argv = cmd[2:-1] + list(wandb_points[2]) + ["--run-dir", str(run_dir)]
    assert main(argv) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["weights"]["parity"] == 0.0 and metrics["weights"]["ge5"] == 0.5
    assert "Adam.lr = 0.01" in (run_dir / "operative_config.gin").read_text()
