"""scripts/planted.py (the planted benchmark's driver, docs/synthetic.md): the sweep command of
each method, reading finished points, the separation criterion and the report table."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "planted.py"


@pytest.fixture(scope="module")
def planted():
    spec = importlib.util.spec_from_file_location("planted", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["planted"] = module  # (its dataclasses look their module up there)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["planted"]


def write_point(out, method, seed, test, weights):
    point = out / method / f"seed={seed}"
    point.mkdir(parents=True)
    (point / "metrics.json").write_text(json.dumps({"best": {"test": test}, "weights": {"main": 1.0, **weights}}))


def test_sweep_command_runs_the_experiment_with_the_method_and_its_bindings(planted, tmp_path):
    cmd = planted.sweep_command("uncertainty_anchor", tmp_path, 3)
    assert cmd[:2] == ["auxframe", "sweep"]
    text = shlex.join(cmd)
    assert "--gin experiments/synthetic_equal.gin --gin weightings/uncertainty.gin" in text
    assert "--gin-param 'weightings.uncertainty.anchor_main = True'" in text
    assert cmd[cmd.index("--seeds") + 1:cmd.index("--sweep-dir")] == ["0", "1", "2"]
    assert cmd[-1] == str(tmp_path / "uncertainty_anchor")


def test_every_method_names_a_shipped_weighting_recipe(planted):
    gin = Path(__file__).resolve().parents[1] / "auxframe" / "configs"
    assert (gin / planted.EXPERIMENT).is_file()
    for method in planted.METHODS.values():
        assert (gin / method.gin).is_file(), method.gin


def test_separated_needs_noise_and_adversarial_below_both_useful_tasks(planted):
    w = {"helpful_0": 0.9, "redundant_0": 0.8, "noise_0": 0.1, "adversarial_0": 0.2}
    assert planted.separated(w)
    assert not planted.separated({**w, "noise_0": 0.85})  # above the redundant task
    assert not planted.separated({**w, "adversarial_0": 0.8})  # a tie is not below


def test_report_reads_the_points_by_seed_and_counts_the_separating_ones(planted, tmp_path):
    useful = {"helpful_0": 1.0, "redundant_0": 1.0}
    for seed, acc in enumerate([0.60, 0.62, 0.64]):
        write_point(tmp_path, "equal", seed, acc, {**useful, "noise_0": 1.0, "adversarial_0": 1.0})
        low = {"noise_0": 0.1, "adversarial_0": 0.0} if seed < 2 else {"noise_0": 1.5, "adversarial_0": 0.0}
        write_point(tmp_path, "arml", seed, acc + 0.01 * (seed + 1), {**useful, **low})
    assert sorted(planted.results("arml", tmp_path)) == [0, 1, 2]
    lines = planted.report(["equal", "arml", "gcs"], tmp_path).splitlines()
    assert len(lines) == 4  # header, rule, equal, arml: gcs has no points and no row
    cells = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert cells[0] == "ARML"
    # vs STL and STL+: no runs, no difference; vs Equal, paired on the same seeds: differences
    # 0.01, 0.02, 0.03, t(2, 0.975) * 0.01 / sqrt(3) = 0.025
    assert cells[2:5] == ["—", "—", "0.020 ± 0.025 (3/0/0)"]
    assert cells[5:10] == ["1.00", "1.00", "1.00", "0.57 (0.10-1.50)", "0.00"]
    assert cells[10] == "2/3"
    assert "--seeds 0 1 2" in cells[11]
    equal = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert equal[4] == "—" and equal[10] == "0/3"  # (Equal is not compared with itself)


def test_unknown_method_is_named(planted, capsys):
    with pytest.raises(SystemExit):
        planted.main(["report", "--methods", "arml,armll"])
    assert "unknown methods ['armll']" in capsys.readouterr().err


def test_per_seed_rows_carry_each_runs_diagnostics(planted, tmp_path):
    useful = {"helpful_0": 1.2, "redundant_0": 1.1}
    write_point(tmp_path, "arml", 0, 0.6, {**useful, "noise_0": 0.9, "adversarial_0": 0.8})
    # ARML: the noise weight's gradient 1, 3 (mean 2, sd sqrt(2)); the helpful one's -1, -1, -1 (sd 0)
    rows = [{"step": 1, "arml/weight_grad/noise_0": 1.0, "arml/weight_grad/helpful_0": -1.0,
             "arml/grad_norm/main": 0.5, "arml/grad_norm/noise_0": 2.0, "arml/cos/noise_0": 0.1},
            {"step": 21, "arml/weight_grad/noise_0": 3.0, "arml/weight_grad/helpful_0": -1.0,
             "arml/grad_norm/main": 0.1, "arml/grad_norm/noise_0": 4.0, "arml/cos/noise_0": -0.3}]
    (tmp_path / "arml" / "seed=0" / "scalars.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    write_point(tmp_path, "auxilearn_linear", 3, 0.6, {**useful, "noise_0": 1.5, "adversarial_0": 0.0})
    rows = [{"step": 20, "auxilearn/diverged_fraction": 0.5}, {"step": 40, "auxilearn/diverged_fraction": 0.25}]
    (tmp_path / "auxilearn_linear" / "seed=3" / "scalars.jsonl").write_text("\n".join(map(json.dumps, rows)))
    lines = planted.per_seed(["arml", "auxilearn_linear"], tmp_path).splitlines()
    arml = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert arml[:8] == ["ARML", "0", "1.00", "1.20", "1.10", "0.90", "0.80", "yes"]
    assert arml[8] == "dL/dw mean/sd: helpful +inf, noise +1.41; mean over updates: main ‖g‖ 0.30, noise ‖g‖ 3.00, cos -0.10"
    auxilearn = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert auxilearn[1] == "3" and auxilearn[7] == "no"  # noise above both useful tasks
    assert auxilearn[8] == "series diverged in 25% of outer steps"  # the last value logged
