"""`auxframe report`: rows grouped by configuration over seeds, intervals and paired differences
checked against hand computations, baselines matched by setting, plain run directories, the
files it writes (markdown, CSV, PNGs), and its errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from auxframe.cli import main
from auxframe.errors import ConfigError, RunDirError
from auxframe.report import build_report, config_bindings
from auxframe.stats import mean_ci, paired
from auxframe.sweep import Point, write_sweep_file

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(path: Path, seed: int, best_test: float, weighting: str = "@weightings.equal()", n: int = 5,
             weights: dict | None = None, wall: float = 1.0, higher_is_better: bool = True) -> Path:
    """A finished run directory as auxframe writes it: config.gin, metrics.json, scalars.jsonl."""
    path.mkdir(parents=True)
    (path / "config.gin").write_text(
        "# Parameters for LowDataSplit:\n"
        f"LowDataSplit.labels_per_class = {n}\nLowDataSplit.seed = {seed}\n\n"
        f"train.progress = False\ntrain.seed = {seed}\ntrain.steps = 100\ntrain.weighting = {weighting}\n"
    )
    weights = weights or {"digit": 1.0, "rotation": 1.0}
    (path / "metrics.json").write_text(json.dumps({
        "main_task": "digit", "main_metric": "accuracy", "higher_is_better": higher_is_better,
        "val": 0.5, "test": best_test - 0.01, "steps": 100, "wall_time_s": wall, "weights": weights,
        "best": {"step": 50, "val": 0.5, "test": best_test}, "metrics": {"test/rotation/accuracy": 0.25}}))
    rows = [{"step": s, **{f"weight/{t}": w * (s / 100 if "arml" in weighting and t != "digit" else 1.0)
                           for t, w in weights.items()}} for s in (25, 50, 75, 100)]
    (path / "scalars.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_sweep(folder: Path, weighting: str, values: dict[int, dict[int, float]], **kw) -> Path:
    """A sweep over LowDataSplit.labels_per_class and seeds: values[n][seed] is each run's best test metric."""
    points = []
    for n, by_seed in values.items():
        for seed, v in by_seed.items():
            values_ = {"LowDataSplit.labels_per_class": str(n), "train.seed": str(seed), "LowDataSplit.seed": str(seed)}
            points.append(Point(f"labels_per_class={n},seed={seed}", tuple(f"{k} = {x}" for k, x in values_.items()),
                                {}, values_))
            make_run(folder / points[-1].name, seed, v, weighting, n, **kw)
    write_sweep_file(folder, ["experiments/x.gin"], ["train.steps = 100"], points, [])
    return folder


@pytest.fixture
def sweeps(tmp_path):
    stl = make_sweep(tmp_path / "stl", "@weightings.stl()",
                     {5: {0: 0.70, 1: 0.72, 2: 0.74}, 10: {0: 0.80, 1: 0.80, 2: 0.80}}, wall=2.0)
    arml = make_sweep(tmp_path / "arml", "@weightings.arml()",
                      {5: {0: 0.75, 1: 0.72, 2: 0.80, 3: 0.60}, 10: {0: 0.70, 1: 0.90, 2: 0.80}},
                      weights={"digit": 1.0, "rotation": 0.4, "parity": 0.8}, wall=5.0)
    return stl, arml


def test_intervals_and_paired_differences_match_a_hand_computation(capsys, sweeps, tmp_path):
    stl, arml = sweeps
    out = tmp_path / "out"
    assert main(["report", str(stl), str(arml), "--baseline", "stl", "--percent", "--out", str(out), "--name", "t"]) == 0
    printed = capsys.readouterr().out
    rows = {(r["method"], r["setting"]): r for r in csv.DictReader((out / "t.csv").open())}
    assert len(rows) == 4
    # arml at n = 5 over its four seeds: mean 0.7175, sample sd 0.085, t(0.975, 3) = 3.182446,
    # half width 3.182446 * 0.085 / 2 = 0.135254
    r = rows[("arml", "LowDataSplit.labels_per_class = 5")]
    assert r["seeds"] == "4" and float(r["mean"]) == pytest.approx(0.7175)
    assert float(r["ci_high"]) - 0.7175 == pytest.approx(0.135254, abs=1e-6)
    # paired with stl on the seeds both ran (0, 1, 2; seed 3 has no partner): d = 0.05, 0.00, 0.06,
    # mean 0.036667, sd 0.032146, t(0.975, 2) = 4.302653, half width 0.079854; 2 wins, 1 tie, 0 losses
    assert r["pairs_stl"] == "3" and (r["wins_stl"], r["ties_stl"], r["losses_stl"]) == ("2", "1", "0")
    assert float(r["diff_stl_mean"]) == pytest.approx(0.036667, abs=1e-6)
    assert float(r["diff_stl_ci_low"]) == pytest.approx(0.036667 - 0.079854, abs=1e-6)
    assert float(r["diff_stl_ci_high"]) == pytest.approx(0.036667 + 0.079854, abs=1e-6)
    assert json.loads(r["final_weights"]) == {"rotation": 0.4, "parity": 0.8}
    assert float(r["time_vs_stl"]) == pytest.approx(2.5)
    # n = 10 is compared with stl at n = 10 (0.80 every seed): d = -0.10, +0.10, 0.00
    r = rows[("arml", "LowDataSplit.labels_per_class = 10")]
    assert float(r["diff_stl_mean"]) == pytest.approx(0.0, abs=1e-12)
    assert (r["wins_stl"], r["ties_stl"], r["losses_stl"]) == ("1", "1", "1")
    # a baseline has no difference with itself; all three of its seeds equal: a zero-width interval
    r = rows[("stl", "LowDataSplit.labels_per_class = 10")]
    assert r["pairs_stl"] == "0" and (float(r["ci_low"]), float(r["ci_high"])) == pytest.approx((0.80, 0.80), abs=1e-12)

    md = (out / "t.md").read_text()
    assert md in printed
    assert ("| arml | labels_per_class=5 | 4/4 | 71.8 ± 13.5 | +3.7 [-4.3, +11.7] | 2/1/0 | rotation 0.40, parity 0.80 "
            "| 2.50x |") in md
    assert ('`auxframe sweep --gin experiments/x.gin --gin-param "train.steps = 100" '
            f'--gin-param "LowDataSplit.labels_per_class = 5" --seeds 0 1 2 3 --sweep-dir {arml}`') in md
    for png in ("t_accuracy.png", "t_weights.png"):
        assert (out / png).read_bytes()[:8] == PNG and (out / png).stat().st_size > 10_000


def test_weights_plot_only_when_weights_change_and_table_only_on_request(sweeps, tmp_path):
    stl, _ = sweeps
    assert main(["report", str(stl), "--out", str(tmp_path / "a")]) == 0
    written = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert written == ["report.csv", "report.md", "report_accuracy.png"]  # stl's weights never change
    assert main(["report", str(stl), "--out", str(tmp_path / "b"), "--no-plots"]) == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["report.csv", "report.md"]
    # by default a single sweep's report goes into the sweep directory
    assert main(["report", str(stl), "--no-plots", "--metric", "test/rotation/accuracy"]) == 0
    assert "| stl | labels_per_class=5 | 3/3 | 0.2500 ± 0.0000 |" in (stl / "report.md").read_text()


def test_plain_run_directories_group_by_configuration_and_take_labels(tmp_path):
    for seed, (a, b) in enumerate([(0.6, 0.7), (0.62, 0.75), (0.64, 0.71)]):
        make_run(tmp_path / "runs" / f"equal-{seed}", seed, a)
        make_run(tmp_path / "runs" / f"arml-{seed}", seed, b, "@weightings.arml()")
    make_run(tmp_path / "other" / "run", 0, 0.5, n=10)
    (tmp_path / "runs" / "unfinished").mkdir()
    (tmp_path / "runs" / "unfinished" / "config.gin").write_text((tmp_path / "runs" / "equal-0" / "config.gin").read_text()
                                                                 .replace("seed = 0", "seed = 9"))
    rep = build_report([str(tmp_path / "runs"), f"mine={tmp_path / 'other'}"], baselines=["mine"])
    rows = {(r.method, r.setting): r for r in rep.rows}
    equal = rows[("runs", (("train.weighting", "@weightings.equal()"),))]
    assert len(equal.runs) == 4 and len(equal.values) == 3 and equal.interval.mean == pytest.approx(0.62)
    arml = rows[("runs", (("train.weighting", "@weightings.arml()"),))]
    assert arml.interval.mean == pytest.approx(0.72)
    # the one 'mine' row is every row's baseline; it ran seed 0 only
    assert arml.versus["mine"].n == 1 and arml.versus["mine"].mean == pytest.approx(0.2)
    assert any("1 of 4 runs have not finished" in n for n in rep.notes)


def test_bad_arguments_are_one_line_errors(capsys, sweeps, tmp_path):
    stl, arml = sweeps
    with pytest.raises(ConfigError, match=r"--baseline 'stll' is not one of the methods: stl, arml"):
        build_report([stl, arml], baselines=["stll"])
    with pytest.raises(ConfigError, match="--metric 'tset' is in no finished run"):
        build_report([stl], metric="tset")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="holds no auxframe run"):
        build_report([tmp_path / "empty"])
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_lower_is_better_counts_wins_the_other_way():
    d = paired({0: 0.1, 1: 0.3, 2: 0.2}, {0: 0.2, 1: 0.2, 2: 0.2}, higher_is_better=False)
    assert (d.wins, d.ties, d.losses) == (1, 1, 1) and d.mean == pytest.approx(0.0)
    assert mean_ci([0.5]).format() == "0.5000" and mean_ci([]).format() == ""


def test_saved_configs_are_read_with_macros_resolved():
    text = "# Macros:\nSEED = 3\n\nLowDataSplit.seed = %SEED\nparity/Task.name = 'parity'\ntrain.tasks = @TaskGraph()\n"
    assert config_bindings(text) == {"%SEED": "3", "LowDataSplit.seed": "3", "parity/Task.name": "'parity'",
                                     "train.tasks": "@TaskGraph()"}
