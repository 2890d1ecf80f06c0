"""AuxiLearn's outer step on the planted problem's failure modes: alpha kept up to date with the
curvature (``alpha_refresh='on_divergence'``), and a run whose Neumann series diverges in most outer
steps saying so once, with the fix."""

from __future__ import annotations

import warnings

import pytest

from auxframe import hypergrad
from auxframe.errors import ConfigError
from auxframe.weighting.auxilearn import AuxiLearn
from test_auxilearn import run, scalars

TINY = 1e-3  # a top-eigenvalue estimate far below the truth: alpha = 1 / TINY makes the series diverge
PLANTED = ("experiments/synthetic_equal.gin", "weightings/auxilearn_linear.gin")


def outer_rows(run_dir, every=1):
    """The log rows of the steps after which an outer step ran (one row a step)."""
    rows = [r for r in scalars(run_dir) if "auxilearn/diverging" in r and r["step"] % every == 0]
    assert len({r["step"] for r in rows}) == len(rows)
    return rows


def test_on_divergence_reestimates_then_halves_alpha(tmp_path, monkeypatch):
    estimates, true_top = [], hypergrad.top_eigenvalue

    def too_small(*args, **kwargs):  # 1/16 of the estimate: alpha 16 times too large at first
        estimates.append(true_top(*args, **kwargs) / 16)
        return estimates[-1]

    monkeypatch.setattr(hypergrad, "top_eigenvalue", too_small)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run(tmp_path / "r", steps=24, files=PLANTED, **{"weightings.auxilearn.outer_every": 1,
                                                         "train.log_every": 100, "train.device": "'cpu'"})
    rows = outer_rows(tmp_path / "r")
    alphas = [r["auxilearn/alpha"] for r in rows]
    diverging = [bool(r["auxilearn/diverging"]) for r in rows]
    assert len(rows) == 24 and diverging[0] and not diverging[-1]
    # The rule, step by step: a series that diverges right after an estimate halves alpha for the
    # next step; one that diverges with an older alpha has it estimated again (1 / TINY times the
    # halvings so far) at the next step; a converging series keeps alpha.
    fresh, scale, expected, used = True, 1.0, [1 / estimates[0]], 1
    for i in range(23):
        if diverging[i] and fresh:
            scale /= 2
            expected.append(expected[-1] / 2)
            fresh = False
        elif diverging[i]:
            expected.append(scale / estimates[used])
            used += 1
            fresh = True
        else:
            expected.append(expected[-1])
            fresh = False
    assert alphas == pytest.approx(expected, rel=1e-6)
    assert used == len(estimates) > 1 and scale < 1
    assert rows[-1]["auxilearn/alpha_scale"] == pytest.approx(scale)
    assert rows[-1]["auxilearn/diverged_fraction"] == pytest.approx(sum(diverging) / 24)


@pytest.mark.parametrize("extra, fix", [
    ({"weightings.auxilearn.alpha_refresh": 0}, "alpha_refresh = 'on_divergence'"),
    ({"weightings.auxilearn.alpha": 1000.0}, "alpha = 1000.0 is too large"),
])
def test_a_run_that_diverges_in_most_outer_steps_says_so_once_with_the_fix(tmp_path, monkeypatch, extra, fix):
    monkeypatch.setattr(hypergrad, "top_eigenvalue", lambda *a, **k: TINY)
    with pytest.warns(RuntimeWarning) as caught:
        run(tmp_path / "r", steps=22, files=PLANTED,
            **{"weightings.auxilearn.outer_every": 1, "train.device": "'cpu'", **extra})
    said = [str(w.message) for w in caught if "Neumann series diverged" in str(w.message)]
    assert len(said) == 1, said
    assert "of 20 outer steps" in said[0] and "Fix:" in said[0] and fix in said[0]
    assert all(r["auxilearn/diverging"] == 1.0 for r in outer_rows(tmp_path / "r"))


def test_a_run_whose_series_converges_says_nothing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run(tmp_path / "r", steps=100, files=PLANTED, **{"weightings.auxilearn.outer_every": 4, "train.device": "'cpu'"})
    rows = outer_rows(tmp_path / "r", every=4)
    assert len(rows) == 25 and rows[-1]["auxilearn/diverged_fraction"] <= 0.5


@pytest.mark.parametrize("value", ["sometimes", -1, True, 1.5])
def test_bad_alpha_refresh_is_named(value):
    with pytest.raises(ConfigError, match="alpha_refresh must be 'on_divergence' or an integer >= 0"):
        AuxiLearn(alpha_refresh=value)


@pytest.mark.parametrize("normalize", ["main", "sum"])
def test_normalize_rescales_the_linear_weights_after_the_outer_step(tmp_path, normalize):
    """The outer step is the same, then the weights are rescaled: W* is the same for c * w and w."""
    common = {"weightings.auxilearn.auxnet": "@auxnets.linear", "weightings.auxilearn.outer_lr": 0.3,
              "train.device": "'cpu'"}
    free = run(tmp_path / "free", steps=2, **common)["weights"]
    fixed = run(tmp_path / "fixed", steps=2, **common, **{"weightings.auxilearn.normalize": f"'{normalize}'"})["weights"]
    scale = free["digit"] if normalize == "main" else sum(free.values()) / len(free)
    assert fixed == pytest.approx({t: w / scale for t, w in free.items()}, rel=1e-5)
    assert abs(scale - 1.0) > 1e-3  # the outer step did change the scale
    assert (fixed["digit"] if normalize == "main" else sum(fixed.values())) == pytest.approx(
        1.0 if normalize == "main" else len(fixed))


def test_normalize_needs_a_linear_net_without_skip_main():
    with pytest.raises(ConfigError, match="normalize = 'main' rescales a linear auxiliary network"):
        run(steps=1, **{"weightings.auxilearn.auxnet": "@auxnets.nonlinear", "weightings.auxilearn.normalize": "'main'"})
    with pytest.raises(ConfigError, match="must be one of"):
        AuxiLearn(normalize="max")


def test_official_recipe_steps_phi_by_sgd_as_the_authors_trainers(tmp_path):
    """weightings/auxilearn_official.gin: SGD(lr=1e-3, momentum=.9, weight_decay=1e-4) on phi,
    the hypergradient clipped at 25 (experiments/nyuv2/trainer.py), the weights' scale left free."""
    from auxframe.checkpoint import latest_checkpoint, load_checkpoint

    run(tmp_path / "r", steps=2, files=("experiments/synthetic_equal.gin", "weightings/auxilearn_official.gin"),
        **{"weightings.auxilearn.outer_every": 1, "train.device": "'cpu'"})
    state = load_checkpoint(latest_checkpoint(tmp_path / "r"))["weighting"]
    group = state["outer_optimizer"]["param_groups"][0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (1e-3, 0.9, 1e-4)
    assert all("momentum_buffer" in s for s in state["outer_optimizer"]["state"].values())  # SGD's, not Adam's
