"""``auxframe report``: results tables and plots over runs and sweeps, as docs/results.md reports them.

Give it run directories, sweep directories (``auxframe sweep``'s, with their ``sweep.json``) or
folders holding either. Each run belongs to a *method* (its sweep's folder name, the run's parent
folder's name, or a label given as ``LABEL=PATH``) and to a *configuration*: its ``config.gin``
without the seeds (``train.seed``, ``LowDataSplit.seed``) and without what only logs
(``train.progress``, W&B settings). A row of the table is one method's configuration; its runs are
its seeds. For every row the report gives:

- the number of finished seeds, the metric's mean and 95% t interval over them;
- against each ``--baseline`` method, the paired difference over the seeds both ran (same seeds,
  hence the same splits) with its 95% interval, and wins/ties/losses;
- the mean final task weights, the wall time against the first baseline, and the command that
  reruns the row.

The baseline row of a row is the baseline method's row with the same *setting* (the swept values
other than the seeds, e.g. ``LowDataSplit.labels_per_class = 5``), or the baseline's only row.

It writes ``NAME.md`` and ``NAME.csv`` and two plots: ``NAME_accuracy.png`` (every row's mean and
interval, with its seeds as dots) and ``NAME_weights.png`` (task weights over training, mean over
seeds, for every row whose weights change; from each run's ``scalars.jsonl``).

Example:
    >>> rep = build_report(["sweeps/stl", "sweeps/stl_plus", "sweeps/arml"], baselines=["stl", "stl_plus"])
    >>> paths = write_report(rep, "docs", "results_digits")

This module imports no torch; matplotlib is imported to draw the plots.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from auxframe.errors import ConfigError, RunDirError
from auxframe.runconfig import config_bindings, configuration  # noqa: F401 - config_bindings re-exported
from auxframe.stats import Interval, Paired, mean_ci, paired
from auxframe.sweep import SEED_KEY, SEED_KEYS, SPLIT_SEED_KEY, SWEEP_FILE, _short_labels

#: Metrics a report can tabulate; any other name is looked up in ``metrics.json``'s ``metrics``
#: (e.g. ``test/parity/accuracy``).
METRICS = ("best_test", "test", "best_val", "val")
_MAX_DEPTH = 4


@dataclass
class RunRecord:
    """One run as the report sees it.

    Attributes:
        path: its run directory.
        method: the method (row family) it belongs to.
        setting: the swept values other than the seeds, ``((key, gin text), ...)``.
        seed: its seed values, ``((key, gin text), ...)``; runs with the same seed are paired.
        config: its configuration (the config without seeds), ``((key, gin text), ...)``.
        metrics: its ``metrics.json`` (None while it has not finished).
        command: the command that reruns its row.
    """

    path: Path
    method: str
    setting: tuple[tuple[str, str], ...]
    seed: tuple[tuple[str, str], ...]
    config: tuple[tuple[str, str], ...]
    metrics: dict[str, Any] | None
    command: str = ""
    from_sweep: bool = False


@dataclass
class Row:
    """One method's configuration and its runs (one per seed), with what the report computed."""

    method: str
    setting: tuple[tuple[str, str], ...]
    runs: list[RunRecord]
    interval: Interval | None = None
    values: dict[tuple, float] = field(default_factory=dict)
    versus: dict[str, Paired | None] = field(default_factory=dict)
    time_ratio: float | None = None

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.metrics]

    @property
    def command(self) -> str:
        return self.runs[0].command

    def setting_text(self, labels: dict[str, str] | None = None) -> str:
        return ", ".join(f"{(labels or {}).get(k, k)}={v}" for k, v in self.setting)

    def mean_weights(self) -> dict[str, float]:
        """Mean over finished seeds of each auxiliary task's final weight."""
        runs = self.finished
        if not runs:
            return {}
        main = runs[0].metrics.get("main_task")
        tasks = [t for t in runs[0].metrics.get("weights", {}) if t != main]
        return {t: math.fsum(r.metrics["weights"].get(t, math.nan) for r in runs) / len(runs) for t in tasks}

    def mean_wall_time(self) -> float | None:
        times = [r.metrics["wall_time_s"] for r in self.finished if r.metrics.get("wall_time_s") is not None]
        return math.fsum(times) / len(times) if times else None


@dataclass
class Report:
    """The rows of a report and how they were computed (see :func:`build_report`)."""

    rows: list[Row]
    metric: str
    baselines: list[str]
    higher_is_better: bool
    notes: list[str] = field(default_factory=list)


# -- finding runs ------------------------------------------------------------------------------------
def collect(paths: Sequence[str | Path]) -> list[RunRecord]:
    """Every run under ``paths`` (run directories, sweep directories, or folders holding them).

    A path may be written ``LABEL=PATH`` to name its method.

    Raises:
        RunDirError: a path does not exist or holds no run.
    """
    records: list[RunRecord] = []
    for spec in paths:
        label, path = split_label(str(spec))
        found = _collect_path(path, label, 0)
        if not found:
            raise RunDirError(
                f"{path} holds no auxframe run (no {SWEEP_FILE} or config.gin in it or in its folders); "
                f"give run directories or sweep directories."
            )
        records += found
    _plain_settings([r for r in records if not r.from_sweep])
    return records


def split_label(spec: str) -> tuple[str | None, Path]:
    """``LABEL=PATH`` as ``(LABEL, PATH)``, a plain path as ``(None, PATH)`` (a path may hold ``=``).

    Raises:
        RunDirError: the path does not exist.
    """
    label, sep, rest = spec.partition("=")
    if sep and label and "/" not in label and not Path(spec).exists():
        path = Path(rest)
    else:
        label, path = None, Path(spec)
    if not path.exists():
        raise RunDirError(f"{path} does not exist; give run directories or sweep directories (auxframe sweep --sweep-dir).")
    return label, path


def _collect_path(path: Path, label: str | None, depth: int) -> list[RunRecord]:
    if (path / SWEEP_FILE).is_file():
        return _collect_sweep(path, label or path.name)
    if (path / "config.gin").is_file():
        return [_record(path, label or path.resolve().parent.name, (), None)]
    if depth >= _MAX_DEPTH or not path.is_dir():
        return []
    out = []
    for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out += _collect_path(child, None, depth + 1)
    if label is not None:  # LABEL=FOLDER: its runs are method LABEL, its sweeps LABEL/<sweep>
        for r in out:
            r.method = f"{label}/{r.method}" if r.from_sweep else label
    return out


def _collect_sweep(path: Path, method: str) -> list[RunRecord]:
    spec = json.loads((path / SWEEP_FILE).read_text())
    points = spec.get("points", [])
    out = []
    for p in points:
        run_dir = path / p["name"]
        if not (run_dir / "config.gin").is_file():
            continue
        values = p.get("values") or dict(b.split(" = ", 1) for b in p["bindings"])
        setting = tuple((k, v) for k, v in values.items() if k not in SEED_KEYS)
        out.append(_record(run_dir, method, setting, (spec, path)))
    return out


def _record(run_dir: Path, method: str, setting: tuple, sweep: tuple[dict, Path] | None) -> RunRecord:
    bindings = config_bindings((run_dir / "config.gin").read_text())
    seed = tuple((k, bindings.get(k, "default")) for k in SEED_KEYS)
    config = configuration(bindings)
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    record = RunRecord(run_dir, method, setting, seed, config, metrics, from_sweep=sweep is not None)
    record.command = _sweep_command(sweep, setting) if sweep is not None else _run_command(run_dir)
    return record


def _plain_settings(records: list[RunRecord]) -> None:
    """The setting of runs given one by one: what differs between the configurations of a method."""
    by_method: dict[str, list[RunRecord]] = {}
    for r in records:
        by_method.setdefault(r.method, []).append(r)
    for runs in by_method.values():
        configs = [dict(r.config) for r in runs]
        keys = sorted({k for c in configs for k in c})
        varying = [k for k in keys if len({c.get(k, "(unset)") for c in configs}) > 1]
        for r, c in zip(runs, configs):
            r.setting = tuple((k, c.get(k, "(unset)")) for k in varying)


def _sweep_command(sweep: tuple[dict, Path], setting: tuple) -> str:
    spec, path = sweep
    cmd = ["auxframe", "sweep"]
    for f in spec.get("gin_files", []):
        cmd += ["--gin", f]
    for b in [*spec.get("gin_params", []), *(f"{k} = {v}" for k, v in setting)]:
        cmd += ["--gin-param", b]
    seeds: dict[str, list[str]] = {}
    for p in spec.get("points", []):
        values = p.get("values") or dict(b.split(" = ", 1) for b in p["bindings"])
        if tuple((k, v) for k, v in values.items() if k not in SEED_KEYS) == setting:
            for k in SEED_KEYS:
                if k in values and values[k] not in seeds.setdefault(k, []):
                    seeds[k].append(values[k])
    if seeds.get(SEED_KEY) and seeds.get(SEED_KEY) == seeds.get(SPLIT_SEED_KEY):
        cmd += ["--seeds", *seeds[SEED_KEY]]
    else:
        for k, vs in seeds.items():
            if vs:
                cmd += ["--grid", f"{k}=[{', '.join(vs)}]"]
    if spec.get("jobs", 1) > 1:
        cmd += ["--jobs", str(spec["jobs"])]
    return shell_join([*cmd, "--sweep-dir", str(path)])


def _run_command(run_dir: Path) -> str:
    run = run_dir / "run.json"
    info = json.loads(run.read_text()) if run.is_file() else {}
    command = info.get("command")
    if isinstance(command, list):
        return shell_join(command)
    if isinstance(command, str):
        return command
    return shell_join(["auxframe", "run", "--gin", str(run_dir / "config.gin"), "--run-dir", f"{run_dir}-rerun"])


def shell_join(args: Sequence[str]) -> str:
    """A command line as a user would type it: gin values in double quotes where that is enough."""
    out = []
    for a in args:
        if a and shlex.quote(a) == a:
            out.append(a)
        elif not any(c in a for c in '"$`\\!'):
            out.append(f'"{a}"')
        else:
            out.append(shlex.quote(a))
    return " ".join(out)


# -- the table -----------------------------------------------------------------------------------------
def build_report(
    paths: Sequence[str | Path],
    baselines: Sequence[str] = (),
    metric: str = "best_test",
    tie: float = 0.0,
) -> Report:
    """Group the runs under ``paths`` into rows and compute their intervals and paired differences.

    Args:
        paths: run directories, sweep directories or folders holding them (``LABEL=PATH`` names one).
        baselines: methods to compare every row against (e.g. ``["stl", "stl_plus"]``).
        metric: ``best_test`` (the test metric of the best-on-validation state, the default),
            ``test``, ``best_val``, ``val``, or a key of ``metrics.json``'s ``metrics``.
        tie: differences of at most this size count as ties.

    Returns:
        The :class:`Report`.

    Raises:
        RunDirError: a path holds no run.
        ConfigError: a baseline is not one of the methods, or the metric is in no run.
    """
    records = collect(paths)
    rows: dict[tuple, Row] = {}
    for r in records:
        key = (r.method, r.config)
        if key not in rows:
            rows[key] = Row(r.method, r.setting, [])
        rows[key].runs.append(r)
    report = Report(list(rows.values()), metric, list(baselines), _higher_is_better(records, metric))
    methods = list(dict.fromkeys(row.method for row in report.rows))
    for b in baselines:
        if b not in methods:
            raise ConfigError(f"--baseline {b!r} is not one of the methods: {', '.join(methods)}. "
                              f"A method is a sweep folder's name, a run's parent folder's name, or LABEL in LABEL=PATH.")
    if not any(_value(r.metrics, metric) is not None for r in records):
        raise ConfigError(f"--metric {metric!r} is in no finished run's metrics.json; use one of {', '.join(METRICS)} "
                          f"or a key of its 'metrics' (e.g. 'test/<task>/<metric>').")
    for row in report.rows:
        for r in row.finished:
            v = _value(r.metrics, metric)
            if v is None:
                continue
            if r.seed in row.values:
                report.notes.append(f"{row.method} {row.setting_text()}: two runs with seed {dict(r.seed)}; "
                                    f"the first is used ({r.path} left out).")
                continue
            row.values[r.seed] = v
        row.interval = mean_ci(list(row.values.values()))
        unfinished = len(row.runs) - len(row.finished)
        if unfinished:
            report.notes.append(f"{row.method} {row.setting_text()}: {unfinished} of {len(row.runs)} runs have not finished.")
    for row in report.rows:
        for b in baselines:
            base = baseline_row(report.rows, row, b)
            row.versus[b] = (None if base is None or base is row else
                             paired(row.values, base.values, report.higher_is_better, tie))
            if base is None and row.method != b:
                report.notes.append(f"{row.method} {row.setting_text()}: no {b} row with the same setting to compare with.")
        if baselines:
            base = baseline_row(report.rows, row, baselines[0])
            mine, theirs = row.mean_wall_time(), base.mean_wall_time() if base is not None else None
            row.time_ratio = mine / theirs if mine is not None and theirs else None
    return report


def baseline_row(rows: Sequence[Row], row: Row, method: str) -> Row | None:
    """The row of ``method`` to compare ``row`` with: the same setting, else agreeing on every swept
    key both have, else the method's only row."""
    candidates = [r for r in rows if r.method == method]
    same = [r for r in candidates if r.setting == row.setting]
    if len(same) == 1:
        return same[0]
    mine = dict(row.setting)
    agree = [r for r in candidates if all(mine.get(k, v) == v for k, v in r.setting)]
    if len(agree) == 1:
        return agree[0]
    return candidates[0] if len(candidates) == 1 else None


def _value(metrics: dict[str, Any] | None, name: str) -> float | None:
    if not metrics:
        return None
    if name.startswith("best_") and name[5:] in ("val", "test"):
        return (metrics.get("best") or {}).get(name[5:])
    if name in ("val", "test"):
        return metrics.get(name)
    return (metrics.get("metrics") or {}).get(name)


def _higher_is_better(records: Sequence[RunRecord], metric: str) -> bool:
    if metric.endswith("/loss"):
        return False
    for r in records:
        if r.metrics and "higher_is_better" in r.metrics:
            return bool(r.metrics["higher_is_better"])
    return not any(r.metrics and r.metrics.get("main_metric") in ("error", "rmse", "abs_error") for r in records)


# -- writing -------------------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int, scale: float, sign: bool = False) -> str:
    if x is None or math.isnan(x):
        return "—"
    return f"{x * scale:+.{digits}f}" if sign else f"{x * scale:.{digits}f}"


def table_rows(report: Report, percent: bool = False) -> list[dict[str, Any]]:
    """The report as one dict per row: the markdown table's cells (``markdown``) and the CSV's
    numbers (``csv``)."""
    scale, digits = (100.0, 1) if percent else (1.0, 4)
    keys = list(dict.fromkeys(k for row in report.rows for k, _ in row.setting))
    labels = dict(zip(keys, _short_labels(keys))) if keys else {}
    out = []
    for row in report.rows:
        ci = row.interval
        md: dict[str, Any] = {
            "method": row.method, "setting": row.setting_text(labels) or "—",
            "seeds": f"{len(row.values)}/{len(row.runs)}",
            f"{report.metric} mean ± 95% CI": ci.format(digits, scale) if ci and ci.n else "—",
        }
        csv_row: dict[str, Any] = {
            "method": row.method, "setting": "; ".join(f"{k} = {v}" for k, v in row.setting),
            "seeds": len(row.values), "runs": len(row.runs), "metric": report.metric,
            "mean": _num(ci.mean), "ci_low": _num(ci.low), "ci_high": _num(ci.high),
        }
        for b in report.baselines:
            d = row.versus.get(b)
            md[f"Δ vs {b} (95% CI)"] = ("—" if d is None or d.n == 0 else
                                       f"{_fmt(d.mean, digits, scale, True)} [{_fmt(d.low, digits, scale, True)}, "
                                       f"{_fmt(d.high, digits, scale, True)}]")
            md[f"W/T/L vs {b}"] = "—" if d is None or d.n == 0 else d.record
            csv_row.update({f"diff_{b}_mean": _num(d.mean) if d else None, f"diff_{b}_ci_low": _num(d.low) if d else None,
                            f"diff_{b}_ci_high": _num(d.high) if d else None, f"pairs_{b}": d.n if d else 0,
                            f"wins_{b}": d.wins if d else None, f"ties_{b}": d.ties if d else None,
                            f"losses_{b}": d.losses if d else None})
        weights = row.mean_weights()
        md["final weights (mean)"] = ", ".join(f"{t} {w:.2f}" for t, w in weights.items()) or "—"
        csv_row["final_weights"] = json.dumps(weights)
        if report.baselines:
            md[f"time vs {report.baselines[0]}"] = f"{row.time_ratio:.2f}x" if row.time_ratio else "—"
            csv_row[f"time_vs_{report.baselines[0]}"] = row.time_ratio
        else:
            wall = row.mean_wall_time()
            md["wall time (s)"] = f"{wall:.1f}" if wall is not None else "—"
        csv_row["wall_time_s"] = row.mean_wall_time()
        md["command"] = f"`{row.command}`"
        csv_row["command"] = row.command
        out.append({"markdown": md, "csv": csv_row})
    return out


def _num(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def markdown(report: Report, percent: bool = False) -> str:
    """The report's table in markdown, with a line on how to read it and its notes."""
    rows = [r["markdown"] for r in table_rows(report, percent)]
    columns = list(rows[0])
    direction = "higher" if report.higher_is_better else "lower"
    unit = " (in %)" if percent else ""
    lines = [f"`{report.metric}`{unit} over seeds: mean ± 95% t interval; Δ is the paired difference to the "
             f"baseline over the seeds both ran (same seeds, same splits), W/T/L its wins/ties/losses "
             f"({direction} is better).", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in columns) + " |" for r in rows]
    if report.notes:
        lines += ["", *(f"- {n}" for n in report.notes)]
    return "\n".join(lines) + "\n"


def write_report(report: Report, out: str | Path, name: str = "report", percent: bool = False,
                 plots: bool = True) -> dict[str, Path]:
    """Write ``NAME.md``, ``NAME.csv`` and the plots ``NAME_accuracy.png`` and ``NAME_weights.png``
    under ``out``.

    Returns:
        What was written: ``{"markdown", "csv", "accuracy", "weights"}`` (a plot that had nothing
        to show is left out).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / f"{name}.md", "csv": out / f"{name}.csv"}
    _write(paths["markdown"], markdown(report, percent))
    rows = [r["csv"] for r in table_rows(report, percent)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write(paths["csv"], buf.getvalue())
    if plots:
        from auxframe import report_plots

        acc = report_plots.plot_metric(report, out / f"{name}_accuracy.png", percent)
        if acc is not None:
            paths["accuracy"] = acc
        weights = report_plots.plot_weights(report, out / f"{name}_weights.png")
        if weights is not None:
            paths["weights"] = weights
    return paths


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    tmp.replace(path)
