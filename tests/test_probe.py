"""The task probe (auxframe/probe.py): lookahead transference and gradient cosine against hand
computations on a tiny linear model, its bookkeeping, and its ranking of the planted tasks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from auxframe.errors import ConfigError
from auxframe.probe import (Measurement, TaskProbe, gradient_cosine, kept_buffers, lookahead_transference, measure,
                            summarise, write_probe)

# A linear model theta = (1, -1). Auxiliary task k: X_k = [[1, 0], [0, 2]], targets (0, 1), mean squared
# error; its residual X_k theta - t = (1, -3), so g_k = 2 X_k^T r / 2 = (1, -6). The main task on the
# auxiliary set: X_a = [[1, 1]], target 1, loss (theta_1 + theta_2 - 1)^2 = 1 at theta.
# A step of lr = 0.1 on g_k: theta' = (0.9, -0.4), main loss (0.5 - 1)^2 = 0.25, so
# Z = (1 - 0.25 / 1) / 0.1 = 7.5. The main task's gradient on the auxiliary set is
# 2 X_a^T (X_a theta - 1) = (-2, -2); cos(g_k, g_a) = (-2 + 12) / (sqrt(37) sqrt(8)) = 10 / sqrt(296).
THETA = (1.0, -1.0)
XK, TK = [[1.0, 0.0], [0.0, 2.0]], [0.0, 1.0]
XA, TA = [[1.0, 1.0]], [1.0]
HAND_Z, HAND_COS = 7.5, 10 / math.sqrt(296)


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(THETA, dtype=torch.float64))

    def forward(self, x):
        return x @ self.theta


def _mse(model, x, t):
    return (model(torch.tensor(x, dtype=torch.float64)) - torch.tensor(t, dtype=torch.float64)) ** 2


def test_transference_matches_the_hand_computation():
    model = Linear()
    g = torch.autograd.grad(_mse(model, XK, TK).mean(), [model.theta])
    assert g[0].tolist() == [1.0, -6.0]
    z = lookahead_transference([model.theta], g, 0.1, lambda: _mse(model, XA, TA).mean())
    assert z == pytest.approx(HAND_Z, rel=1e-12)
    assert model.theta.tolist() == list(THETA)  # put back


def test_transference_is_restored_bitwise_and_rejects_a_bad_step():
    model = Linear()
    with torch.no_grad():
        model.theta.copy_(torch.tensor([0.1 + 0.2, 1e-17], dtype=torch.float64))
    before = model.theta.detach().clone()
    lookahead_transference([model.theta], [torch.tensor([0.3, 0.7], dtype=torch.float64)], 1e-3,
                           lambda: _mse(model, XA, TA).mean())
    assert torch.equal(model.theta.detach(), before)
    with pytest.raises(ConfigError, match="lookahead learning rate must be > 0"):
        lookahead_transference([model.theta], [None], 0.0, lambda: _mse(model, XA, TA).mean())


def test_cosine_by_hand_and_with_missing_parts():
    a = [torch.tensor([1.0, -6.0]), None]
    b = [torch.tensor([-2.0, -2.0]), torch.tensor([3.0])]
    # the missing part counts as zeros: <a, b> = 10, |a| = sqrt(37), |b| = sqrt(8 + 9)
    assert gradient_cosine(a, b) == pytest.approx(10 / math.sqrt(37 * 17))
    assert gradient_cosine([torch.zeros(2)], [torch.ones(2)]) == 0.0


def test_measure_gives_every_tasks_transference_and_cosine():
    model = Linear()
    losses = {"k": _mse(model, XK, TK), "main": _mse(model, [[2.0, 0.0]], [0.0])}
    m = measure(model, [model.theta], losses, lambda: _mse(model, XA, TA).mean(), lr=0.1, step=7)
    assert m.step == 7
    assert m.transference["k"] == pytest.approx(HAND_Z, rel=1e-12)
    assert m.cosine["k"] == pytest.approx(HAND_COS, rel=1e-12)
    # main: residual 2, g = 2 * (2, 0) * 2 = (8, 0); theta' = (0.2, -1), main loss (-0.8 - 1)^2 = 3.24
    assert m.transference["main"] == pytest.approx((1 - 3.24) / 0.1, rel=1e-12)
    assert m.cosine["main"] == pytest.approx(-16 / (8 * math.sqrt(8)), rel=1e-12)


def test_kept_buffers_puts_batchnorm_statistics_back():
    bn = nn.BatchNorm1d(3)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with kept_buffers(bn):
        bn(torch.randn(8, 3) + 5.0)
        assert not torch.equal(bn.running_mean, before["running_mean"])
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())


def test_summary_ranks_by_mean_transference_with_t_intervals(tmp_path):
    ms = [Measurement(5, {"main": 1.0, "a": 0.1, "b": 0.3}, {"main": 0.5, "a": 0.0, "b": 0.2}),
          Measurement(10, {"main": 3.0, "a": 0.3, "b": 0.5}, {"main": 0.7, "a": 0.2, "b": 0.4})]
    r = summarise("main", ms, {"every": 5})
    assert r.ranking == ["b", "a"] and r.scores[-1].task == "main" and r.scores[-1].main
    b = r.scores[0].transference
    # two values 0.3 and 0.5: mean 0.4, sd 0.1414, t(0.975, 1) = 12.706
    assert b.mean == pytest.approx(0.4) and b.half_width == pytest.approx(12.7062 * 0.1 * math.sqrt(2) / math.sqrt(2), rel=1e-4)
    paths = write_probe(r, tmp_path / "out", plot=False)
    saved = json.loads(paths["json"].read_text())
    assert saved["ranking"] == ["b", "a"] and len(saved["measurements"]) == 2
    assert "| 1 | b |" in paths["markdown"].read_text()


def test_probe_settings_are_checked():
    with pytest.raises(ConfigError, match="interval must be a positive integer"):
        TaskProbe(every=0)
    with pytest.raises(ConfigError, match="first measured step must be a whole number >= 1"):
        TaskProbe(start=0)
    with pytest.raises(ConfigError, match="head warm-up must be a whole number"):
        TaskProbe(head_warmup=-1)
    with pytest.raises(ConfigError, match="head learning rate must be > 0"):
        TaskProbe(head_lr=0.0)
    with pytest.raises(ConfigError, match="positive whole number of batches"):
        TaskProbe(batches=0)
    with pytest.raises(ConfigError, match="no measurement"):
        TaskProbe(every=5).result()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probe_ranks_the_planted_tasks_as_their_ablations_do(seed):
    # With its defaults, as docs/probe.md measured them: helpful and redundant above noise, noise
    # above adversarial (5 of 5 seeds there; the one-at-a-time ablations order the kinds so).
    from auxframe.probe import HEAD_WARMUP, WINDOW, run_probe
    from helpers import GIN

    result = run_probe([GIN / "experiments/synthetic_equal.gin"],
                       ["train.progress = False", f"train.seed = {seed}", f"LowDataSplit.seed = {seed}"])
    z = {s.task: s.transference.mean for s in result.scores}
    assert min(z["helpful_0"], z["redundant_0"]) > z["noise_0"] > z["adversarial_0"], z
    assert result.settings["measurements"] == 4 and result.settings["window"] == WINDOW
    assert result.settings["head_warmup"] == HEAD_WARMUP
    assert result.scores[-1].task == "main" and set(result.ranking) == {"helpful_0", "redundant_0", "noise_0", "adversarial_0"}


def test_the_commands_help_states_the_probes_defaults():
    # the command names the defaults without importing auxframe.probe (commands import only the stdlib)
    import argparse

    from auxframe import probe
    from auxframe.commands import probe as command

    p = argparse.ArgumentParser()
    command.add_arguments(p)
    helps = {a.dest: a.help for a in p._actions}
    for dest, value in (("steps", probe.WINDOW), ("every", probe.EVERY), ("start", probe.START),
                        ("head_warmup", probe.HEAD_WARMUP), ("head_lr", probe.HEAD_LR), ("batches", probe.BATCHES)):
        assert f"(default: {value}" in helps[dest], (dest, helps[dest])


def test_auxframe_probe_writes_the_table_json_and_png(tmp_path, capsys):
    from auxframe.cli import main as cli
    from helpers import GIN

    out = tmp_path / "probe"
    code = cli(["probe", "--gin", str(GIN / "experiments/synthetic_equal.gin"), "--gin-param", "train.progress = False",
                "--seed", "1", "--out", str(out), "--steps", "4", "--head-warmup", "5"])
    printed = capsys.readouterr().out
    assert code == 0 and "RANK" in printed and "main (main)" in printed
    saved = json.loads((out / "probe.json").read_text())
    assert saved["settings"]["window"] == 4 and saved["settings"]["head_warmup"] == 5 and saved["settings"]["measurements"] == 2
    assert sorted(saved["ranking"]) == ["adversarial_0", "helpful_0", "noise_0", "redundant_0"]
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1 |" in (out / "probe.md").read_text()


def _probes_and_ablation():
    """Two seeds' probes of tasks a-d, an ablation's effects and their agreement, each checked by hand."""
    from auxframe.ablation import TaskEffect
    from auxframe.probe import agreement, markdown_seeds, over_seeds
    from auxframe.stats import Paired

    def result(z):
        ms = [Measurement(s, {**z, "main": 1.0}, {**{t: v / 10 for t, v in z.items()}, "main": 1.0}) for s in (2, 4)]
        return summarise("main", ms)

    probes = over_seeds([0, 1], [result({"a": 0.3, "b": 0.2, "c": 0.1, "d": 0.0}),
                                 result({"a": 0.1, "b": 0.4, "c": 0.2, "d": 0.0})])
    assert probes.transference["a"].mean == pytest.approx(0.2) and probes.ranking == ["b", "a", "c", "d"]

    def effect(task, mean, higher=True):
        return TaskEffect(task, "one-at-a-time", Paired(mean, mean - 0.01, mean + 0.01, 5, 5, 0, 0), higher)

    effects = [effect("a", 0.05), effect("b", 0.04), effect("c", 0.01), effect("d", -0.02)]
    agreed = agreement(probes, effects)
    # seed 0 ranks a > b > c > d, as the ablation: rho = 1; seed 1 ranks b > c > a > d: d^2 = 4 + 1 + 1 = 6,
    # rho = 1 - 6 * 6 / (4 * 15) = 0.4; the means (0.2, 0.3, 0.15, 0): b > a > c > d, rho = 1 - 6 * 2 / 60 = 0.8
    assert [(s, round(a, 6)) for s, a, _ in agreed.per_seed] == [(0, 1.0), (1, 0.4)]
    assert agreed.of_means[0] == pytest.approx(0.8) and agreed.of_means[1] == pytest.approx(0.8)
    # a lower-is-better metric: a negative effect is a benefit, so the ranking flips
    flipped = agreement(probes, [effect(e.task, -e.effect.mean, higher=False) for e in effects])
    assert flipped.of_means[0] == pytest.approx(0.8)
    text = markdown_seeds(probes, effects, agreed)
    assert "| 1 | b |" in text and "| 1 | b > c > a > d | +0.40 |" in text and "transference +0.80" in text
    return probes, effects, agreed


def test_probes_over_seeds_and_their_spearman_with_an_ablation():
    _probes_and_ablation()  # its assertions: the means, the per-seed and of-means Spearman, the table


def test_probes_over_seeds_are_written_with_a_plot_against_the_ablation(tmp_path):
    from auxframe.probe import write_seeds

    probes, effects, agreed = _probes_and_ablation()
    paths = write_seeds(probes, tmp_path, effects, agreed)
    saved = json.loads(paths["json"].read_text())
    assert saved["spearman"]["of_means"]["transference"] == pytest.approx(0.8)
    assert saved["per_seed_ranking"]["1"] == ["b", "c", "a", "d"] and saved["ablation"]["effects"]["d"]["mean"] == -0.02
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake_ablation(path, effects: dict[str, float], seeds=(0, 1)):
    """A finished one-at-a-time sweep folder as auxframe sweep writes it (sweep.json, metrics.json per point)."""
    points = []
    for label, effect in {"main-only": 0.0, **{f"only-{t}": e for t, e in effects.items()}}.items():
        for seed in seeds:
            name = f"tasks={label},seed={seed}"
            (path / name).mkdir(parents=True)
            value = 0.5 + effect + 0.01 * seed
            (path / name / "metrics.json").write_text(json.dumps({"best": {"test": value, "val": value}, "test": value,
                                                                  "val": value, "higher_is_better": True}))
            points.append({"name": name, "values": {"train.seed": str(seed), "LowDataSplit.seed": str(seed)},
                           "columns": {"ablation": label}})
    (path / "sweep.json").write_text(json.dumps({"points": points}))
    return path


def test_auxframe_probe_over_seeds_against_an_ablation(tmp_path, capsys):
    from auxframe.cli import main as cli
    from helpers import GIN

    # the planted kinds' one-at-a-time effects as docs/probe.md measured them
    sweep = _fake_ablation(tmp_path / "ablation", {"helpful_0": 0.135, "redundant_0": 0.087, "noise_0": 0.011,
                                                   "adversarial_0": -0.075})
    gin = str(GIN / "experiments/synthetic_equal.gin")
    code = cli(["probe", "--gin", gin, "--seeds", "0", "--against", str(sweep), "--ablation", "leave-one-out"])
    assert code == 2 and "has no finished leave-one-out ablation (it has: one-at-a-time)" in capsys.readouterr().err
    out = tmp_path / "probes"
    code = cli(["probe", "--gin", gin, "--gin-param", "train.progress = False", "--seeds", "0", "1",
                "--against", str(sweep), "--out", str(out), "--no-plot"])
    printed = capsys.readouterr().out
    assert code == 0 and "Spearman of the mean over seeds" in printed
    saved = json.loads((out / "probes.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["ablation"]["mode"] == "one-at-a-time"
    assert saved["ablation"]["effects"]["helpful_0"]["mean"] == pytest.approx(0.135)
    # seeds 0 and 1 rank the planted tasks exactly as their ablation (docs/probe.md)
    assert [row["transference"] for row in saved["spearman"]["per_seed"]] == [pytest.approx(1.0)] * 2
    assert (out / "seed-0" / "probe.json").is_file() and (out / "seed-1" / "probe.md").is_file()
