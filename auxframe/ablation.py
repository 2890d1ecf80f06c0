"""Ablations of the auxiliary tasks as a sweep: what each task does to the main task, trained for real.

Two ablations, each an axis over ``TaskGraph.tasks`` made from the experiment's own task list
(``auxframe sweep --ablate one-at-a-time --ablate leave-one-out``):

- **one-at-a-time**: the main task alone (``main-only``), and the main task with each auxiliary task
  on its own (``only-<task>``). A task's *effect* is ``metric(only-<task>) - metric(main-only)``.
- **leave-one-out**: every task (``all``), and every task but one (``without-<task>``). A task's
  effect is ``metric(all) - metric(without-<task>)``.

Both are paired over seeds (the same seeds see the same splits), with a 95% t interval and
wins/ties/losses (:func:`auxframe.stats.paired`). They are the ground truth the probe
(:mod:`auxframe.probe`) is checked against: :func:`spearman` compares a probe's ranking with an
ablation's.

The tasks keep the experiment's weighting, so run the ablation with the weighting whose behaviour
you want to know about (Equal, for what the tasks do by themselves).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from auxframe.errors import ConfigError
from auxframe.stats import Paired, paired
from auxframe.sweep import SEED_KEYS, SWEEP_FILE, Axis, AxisValue

MODES = ("one-at-a-time", "leave-one-out")
KEY = "TaskGraph.tasks"
COLUMN = "ablation"


@dataclass(frozen=True)
class TaskRef:
    """One entry of ``TaskGraph.tasks``: the task's name, its gin reference and whether it is the main task."""

    name: str
    text: str
    main: bool


def task_refs(gin_files: Sequence[str | Path], gin_params: Sequence[str]) -> list[TaskRef]:
    """The experiment's ``TaskGraph.tasks``, read from its gin config without building anything.

    Raises:
        ConfigError: ``TaskGraph.tasks`` is not a list of ``@scope/Task()`` references with a
            ``Task.name`` each, or it has no main task or several.
    """
    import gin

    from auxframe import config

    config.parse(gin_files, gin_params)
    try:
        refs = gin.query_parameter(KEY)
    except ValueError:
        refs = None
    if not isinstance(refs, (list, tuple)) or not refs:
        raise ConfigError(f"an ablation needs `{KEY}` as a list of tasks (`[@main/Task(), @aux/Task(), ...]`); this "
                          f"config gives {refs!r}.")
    out = []
    for ref in refs:
        scopes = list(getattr(ref, "scopes", []) or [])
        if not scopes:
            raise ConfigError(f"{KEY} holds {ref!r}; an ablation needs each task as a scoped reference, `@name/Task()`.")
        scope = "/".join(scopes)

        def bound(param: str, default=None):
            try:
                return gin.query_parameter(f"{scope}/Task.{param}")
            except ValueError:
                return default

        name = bound("name")
        if not isinstance(name, str):
            raise ConfigError(f"the task {ref!r} has no `{scope}/Task.name`; an ablation names its points after the tasks.")
        out.append(TaskRef(name, repr(ref), bool(bound("main", False))))
    mains = [t.name for t in out if t.main]
    if len(mains) != 1:
        raise ConfigError(f"{KEY} has {len(mains)} main tasks ({', '.join(mains) or 'none'}); an ablation needs exactly one.")
    return out


def ablation_values(tasks: Sequence[TaskRef], modes: Sequence[str]) -> list[tuple[str, list[TaskRef]]]:
    """The task lists of the ablations, named: ``main-only``, ``only-<t>``, ``all``, ``without-<t>``.

    Raises:
        ConfigError: an unknown mode, or no auxiliary task to ablate.
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ConfigError(f"unknown ablation {', '.join(repr(m) for m in unknown) or '(none given)'}; choose from {', '.join(MODES)}.")
    main = next(t for t in tasks if t.main)
    aux = [t for t in tasks if not t.main]
    if not aux:
        raise ConfigError(f"the task graph has no auxiliary task to ablate (only '{main.name}').")
    values: list[tuple[str, list[TaskRef]]] = []
    if "one-at-a-time" in modes:
        values += [("main-only", [main])] + [(f"only-{t.name}", [main, t]) for t in aux]
    if "leave-one-out" in modes:
        values += [("all", list(tasks))] + [(f"without-{t.name}", [u for u in tasks if u is not t]) for t in aux]
    seen, unique = set(), []
    for label, chosen in values:  # one auxiliary task: only-<t> is all, and main-only is without-<t>
        text = "[" + ", ".join(t.text for t in chosen) + "]"
        if text not in seen:
            seen.add(text)
            unique.append((label, chosen))
    return unique


def ablation_axis(gin_files: Sequence[str | Path], gin_params: Sequence[str], modes: Sequence[str]) -> Axis:
    """A sweep axis over ``TaskGraph.tasks`` with the ablations' task lists (see the module docstring)."""
    values = []
    for label, chosen in ablation_values(task_refs(gin_files, gin_params), modes):
        text = "[" + ", ".join(t.text for t in chosen) + "]"
        values.append(AxisValue(text, ((COLUMN, label),), label=label))
    return Axis(KEY, tuple(values))


@dataclass(frozen=True)
class TaskEffect:
    """What one auxiliary task did to the main task's metric in one ablation (paired over seeds)."""

    task: str
    mode: str
    effect: Paired
    higher_is_better: bool = True

    @property
    def benefit(self) -> float:
        """The mean effect signed so that larger is better for the main task (what a probe's score
        should rank like)."""
        return self.effect.mean if self.higher_is_better else -self.effect.mean


def ablation_effects(sweep_dir: str | Path, metric: str = "best_test") -> dict[str, list[TaskEffect]]:
    """Each auxiliary task's effect in each ablation a sweep ran, best first.

    Args:
        sweep_dir: an ``auxframe sweep --ablate ...`` directory (finished points are read; others
            are left out).
        metric: ``best_test`` (the test metric of the best-on-validation state), ``best_val``,
            ``test`` or ``val``.

    Returns:
        ``{mode: [TaskEffect, ...]}`` for the modes whose reference point (``main-only`` or
        ``all``) ran, each list sorted by mean effect, largest first.

    Raises:
        ConfigError: the folder is not an ablation sweep.
    """
    path = Path(sweep_dir)
    spec_file = path / SWEEP_FILE
    if not spec_file.is_file():
        raise ConfigError(f"{path} is not a sweep directory (no {SWEEP_FILE}); run `auxframe sweep --ablate ...` into it.")
    spec = json.loads(spec_file.read_text())
    by_label: dict[str, dict[tuple, float]] = {}
    higher = True
    for point in spec.get("points", []):
        label = (point.get("columns") or {}).get(COLUMN)
        metrics_file = path / point["name"] / "metrics.json"
        if label is None or not metrics_file.is_file():
            continue
        metrics = json.loads(metrics_file.read_text())
        higher = bool(metrics.get("higher_is_better", higher))
        seed = tuple((k, v) for k, v in point["values"].items() if k in SEED_KEYS)
        by_label.setdefault(label, {})[seed] = _metric(metrics, metric)
    if not by_label:
        raise ConfigError(f"{path} has no finished ablation point (points with an '{COLUMN}' column and metrics.json).")
    out: dict[str, list[TaskEffect]] = {}
    for mode, reference, prefix in (("one-at-a-time", "main-only", "only-"), ("leave-one-out", "all", "without-")):
        if reference not in by_label:
            continue
        effects = []
        for label, values in by_label.items():
            if not label.startswith(prefix):
                continue
            task = label[len(prefix):]
            a, b = (values, by_label[reference]) if mode == "one-at-a-time" else (by_label[reference], values)
            effects.append(TaskEffect(task, mode, paired(a, b, higher_is_better=higher), higher))
        out[mode] = sorted(effects, key=lambda e: -e.benefit)
    return out


#: What ``auxframe sweep --ablate`` writes into the sweep folder beside its summary.
ABLATION_MD = "ablation.md"


def markdown_effects(effects: Mapping[str, Sequence[TaskEffect]], metric: str = "best_test") -> str:
    """One table per ablation: each task's paired effect on the main task's metric, best first."""
    reference = {"one-at-a-time": "metric(only-<task>) - metric(main-only)",
                 "leave-one-out": "metric(all) - metric(without-<task>)"}
    lines = []
    for mode, rows in effects.items():
        lines += [f"## {mode}: {reference[mode]}, {metric}, paired over seeds", "",
                  "| task | effect (95% CI) | seeds | wins/ties/losses |", "|---|---|---|---|"]
        for e in rows:
            ci = f"{e.effect.mean:+.4f}" if e.effect.n < 2 else f"{e.effect.mean:+.4f} [{e.effect.low:+.4f}, {e.effect.high:+.4f}]"
            lines.append(f"| {e.task} | {ci} | {e.effect.n} | {e.effect.wins}/{e.effect.ties}/{e.effect.losses} |")
        lines.append("")
    return "\n".join(lines)


def write_effects(sweep_dir: str | Path, metric: str = "best_test") -> tuple[Path, str]:
    """Write the ablations' effects (:func:`ablation_effects`) as ``ablation.md`` into the sweep folder.

    Returns:
        The file and its text.
    """
    text = markdown_effects(ablation_effects(sweep_dir, metric), metric)
    path = Path(sweep_dir) / ABLATION_MD
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    tmp.replace(path)
    return path, text


def _metric(metrics: Mapping, name: str) -> float:
    if name == "best_test":
        return float(metrics["best"]["test"])
    if name == "best_val":
        return float(metrics["best"]["val"])
    if name in ("test", "val"):
        return float(metrics[name])
    raise ConfigError(f"unknown ablation metric '{name}'; use best_test, best_val, test or val.")


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman's rank correlation of two scores over the tasks both have (average ranks for ties).

    Raises:
        ConfigError: fewer than 3 tasks in common.
    """
    from scipy import stats

    common = [t for t in a if t in b]
    if len(common) < 3:
        raise ConfigError(f"a rank correlation needs at least 3 tasks in common, got {common}.")
    return float(stats.spearmanr([a[t] for t in common], [b[t] for t in common]).statistic)
