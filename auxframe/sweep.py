"""Grid sweeps over gin parameters: locally, one run directory per point, or as a W&B sweep.

A grid is one or more *axes*, each written as a gin binding whose value is a list of values::

    torch.optim.Adam.lr = [1e-3, 1e-2]                     # two points
    train.backbone = [@backbones.mlp, @backbones.small_cnn]
    weightings.fixed.weights = {'parity': [0.1, 0.3, 1.0], 'rotation': [0.0, 0.5]}

A dict whose entries are lists is swept entry by entry (the cartesian product of the entries'
values; entries that are not lists stay fixed), so the last line gives six dicts such as
``{'parity': 0.1, 'rotation': 0.0}``. The points of the sweep are the cartesian product of all axes,
the first axis varying slowest; ``seeds`` adds a ``train.seed`` axis.

:func:`run_sweep` trains the points one after another, each in its own run directory
``<sweep_dir>/<point name>`` (named from its values, e.g. ``lr=0.001,seed=0``). Rerunning the same
sweep skips finished points (``metrics.json`` written, same config) and resumes interrupted ones
from their latest checkpoint. It then writes ``summary.csv`` and ``summary.md`` with each point's
values, the main task's validation and test metric and the best-on-validation state's metrics, and
marks the point with the best validation metric (with several seeds, the configuration with the
best mean over seeds).

:func:`wandb_sweep_config` writes the same grid as a W&B sweep (``method: grid``) whose command runs
``auxframe run`` with the same gin files and the point's bindings (``${args_no_hyphens}`` gives
one ``KEY=VALUE`` argument per parameter, which ``auxframe run`` accepts as bindings).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from auxframe.errors import AuxframeError, ConfigError, RunDirError

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
SWEEP_FILE = "sweep.json"
SEED_KEY = "train.seed"
_EXAMPLE = "--grid \"torch.optim.Adam.lr=[1e-3, 1e-2]\""


# -- grid --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Ref:
    """A gin reference or macro inside a grid value; ``repr`` gives its gin text back."""

    text: str

    def __repr__(self) -> str:
        return self.text


class _Delegate:
    """Parser delegate for ``gin.config_parser``: keeps references and macros as their text."""

    def configurable_reference(self, scoped_name: str, evaluate: bool) -> _Ref:
        return _Ref(f"@{scoped_name}{'()' if evaluate else ''}")

    def macro(self, name: str) -> _Ref:
        return _Ref(f"%{name}")


def gin_text(value: Any) -> str:
    """The gin text of a value parsed from a grid (Python literals, references, macros)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"grid value {value!r} cannot be written in gin; use finite numbers.")
    return repr(value)


@dataclass(frozen=True)
class AxisValue:
    """One value of an axis.

    Attributes:
        text: the value as gin text, e.g. ``"0.001"`` or ``"{'parity': 0.1, 'rotation': 0.0}"``.
        columns: summary column name -> gin text of what varies, e.g.
            ``{"weightings.fixed.weights['parity']": "0.1"}``.
    """

    text: str
    columns: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Axis:
    """One swept gin parameter and its values.

    Attributes:
        key: the gin binding key, e.g. ``"torch.optim.Adam.lr"``.
        values: the values, in the order given.
        entries: for a dict axis, the swept dict keys (named in point names); empty otherwise.
    """

    key: str
    values: tuple[AxisValue, ...]
    entries: tuple[str, ...] = ()


def parse_grid(spec: str) -> Axis:
    """Parse one ``--grid`` argument, ``KEY=[v1, v2, ...]`` or ``KEY={'a': [..], 'b': [..]}``.

    Args:
        spec: a gin binding whose value is a list (one value per point) or a dict with list
            entries (swept entry by entry).

    Returns:
        The :class:`Axis`.

    Raises:
        ConfigError: the spec is not one gin binding, its value is not a list or a dict with a list
            entry, a list is empty, or a value is repeated.
    """
    from gin import config_parser

    where = f"--grid {spec!r}"
    try:
        parser = config_parser.ConfigParser(spec, _Delegate())
        statement = parser.parse_statement()
        extra = parser.parse_statement() if statement is not None else None
    except (SyntaxError, ValueError) as exc:
        raise ConfigError(f"{where}: {_first_line(exc)}. Write KEY=[v1, v2, ...], e.g. {_EXAMPLE}.") from None
    except Exception as exc:  # tokenize errors (an unclosed bracket) have no common base class
        raise ConfigError(f"{where}: cannot parse it ({_first_line(exc)}); check its brackets and quotes.") from None
    if not isinstance(statement, config_parser.BindingStatement) or extra is not None:
        raise ConfigError(f"{where}: give exactly one binding KEY=[v1, v2, ...], e.g. {_EXAMPLE}.")
    key = spec.split("=", 1)[0].strip()
    value = statement.value
    if isinstance(value, list):
        return Axis(key, _unique(where, [AxisValue(gin_text(v), ((key, gin_text(v)),)) for v in value]))
    if isinstance(value, dict) and any(isinstance(v, list) for v in value.values()):
        return _dict_axis(where, key, value)
    hint = (f"a tuple is one value: to sweep over tuples write [{gin_text(value)}, ...]"
            if isinstance(value, tuple) else "for one fixed value use --gin-param instead")
    raise ConfigError(
        f"{where}: the value {gin_text(value)} is not a list of values to sweep over ({hint}). Write "
        f"KEY=[v1, v2, ...], or a dict with list entries such as "
        f"\"weightings.fixed.weights={{'parity': [0.1, 1.0], 'rotation': [0.0, 0.5]}}\"."
    )


def _dict_axis(where: str, key: str, value: dict) -> Axis:
    swept = [k for k, v in value.items() if isinstance(v, list)]
    choices = [value[k] if k in swept else [value[k]] for k in value]
    values = []
    for combo in itertools.product(*choices):
        point = dict(zip(value, combo))
        columns = tuple((f"{key}[{k!r}]", gin_text(point[k])) for k in swept)
        values.append(AxisValue(gin_text(point), columns))
    for k in swept:
        if not value[k]:
            raise ConfigError(f"{where}: the entry {k!r} has an empty list; give it at least one value.")
    return Axis(key, _unique(where, values), tuple(str(k) for k in swept))


def _unique(where: str, values: list[AxisValue]) -> tuple[AxisValue, ...]:
    if not values:
        raise ConfigError(f"{where}: the list of values is empty; give at least one value.")
    texts = [v.text for v in values]
    repeated = sorted({t for t in texts if texts.count(t) > 1})
    if repeated:
        raise ConfigError(f"{where}: the value(s) {', '.join(repeated)} appear more than once; list each value once.")
    return tuple(values)


def seeds_axis(seeds: Sequence[int]) -> Axis:
    """A ``train.seed`` axis over ``seeds``."""
    return parse_grid(f"{SEED_KEY}=[{', '.join(str(int(s)) for s in seeds)}]")


def _first_line(exc: BaseException) -> str:
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


@dataclass(frozen=True)
class Point:
    """One point of the grid.

    Attributes:
        name: its run directory's name under the sweep directory.
        bindings: the gin bindings that make this point, ``"KEY = VALUE"``, one per axis.
        columns: summary column -> gin text of each varying value.
        values: axis key -> gin text of this point's value.
    """

    name: str
    bindings: tuple[str, ...]
    columns: dict[str, str]
    values: dict[str, str] = field(default_factory=dict)


def grid_points(axes: Sequence[Axis]) -> list[Point]:
    """The cartesian product of the axes, the first axis varying slowest.

    Raises:
        ConfigError: two axes sweep the same gin parameter.
    """
    keys = [a.key for a in axes]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"{', '.join(repeated)} is swept more than once; give each parameter one --grid (or drop --seeds).")
    labels = _short_labels(keys)
    points = []
    for combo in itertools.product(*(a.values for a in axes)):
        parts = []
        for axis, label, v in zip(axes, labels, combo):
            if axis.entries:
                parts += [f"{_slug(entry)}={_slug(text)}" for entry, (_, text) in zip(axis.entries, v.columns)]
            else:
                parts.append(f"{label}={_slug(v.text)}")
        points.append(Point(
            name=",".join(parts) or "default",
            bindings=tuple(f"{a.key} = {v.text}" for a, v in zip(axes, combo)),
            columns={c: t for v in combo for c, t in v.columns},
            values={a.key: v.text for a, v in zip(axes, combo)},
        ))
    return _unique_names(points)


def _short_labels(keys: Sequence[str]) -> list[str]:
    """The shortest dotted suffix of each key that tells it apart from the others (``lr``, ``Adam.lr``)."""
    parts = [re.split(r"[./]", k) for k in keys]
    depth = [1] * len(keys)
    while True:
        labels = [".".join(p[-n:]) for p, n in zip(parts, depth)]
        clash = [i for i, lab in enumerate(labels) if labels.count(lab) > 1 and depth[i] < len(parts[i])]
        if not clash:
            return labels
        for i in clash:
            depth[i] += 1


def _slug(text: str) -> str:
    """A value's text made safe for a directory name: ``@backbones.mlp`` -> ``mlp``, ``(8, 8)`` -> ``8-8``."""
    text = re.sub(r"@(?:[\w.]*/)?(?:\w+\.)*(\w+)(?:\(\))?", r"\1", text)
    return re.sub(r"[^\w.+\-]+", "-", text, flags=re.ASCII).strip("-") or "x"


def _unique_names(points: list[Point]) -> list[Point]:
    """Shorten long names and tell apart names that clash, with a hash of the bindings."""
    names = [p.name for p in points]
    out = []
    for p in points:
        if len(p.name) > 120 or names.count(p.name) > 1:
            digest = hashlib.sha1("\n".join(p.bindings).encode()).hexdigest()[:8]
            p = Point(f"{p.name[:100]}-{digest}", p.bindings, p.columns, p.values)
        out.append(p)
    return out


# -- running locally ----------------------------------------------------------------------------------
@dataclass
class PointResult:
    """What a point's run gave (``status`` is ``done``, ``skipped``, ``failed: ...`` or ``not run``)."""

    point: Point
    status: str
    metrics: dict[str, Any] | None = None


def run_sweep(
    gin_files: Sequence[str | Path],
    gin_params: Sequence[str],
    axes: Sequence[Axis],
    sweep_dir: str | Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every point of the grid in turn, skipping finished ones, and write the summary.

    Every point's config is built (and its directory checked) before any training, so that a bad
    binding stops the sweep before it costs anything.

    Args:
        gin_files: the experiment's gin files.
        gin_params: bindings applied to every point (before the point's own).
        axes: the grid.
        sweep_dir: the sweep's directory; one run directory per point under it.
        log: where progress lines go.

    Returns:
        ``{"results": [PointResult, ...], "best": PointResult | None, "csv": path, "markdown": path}``.

    Raises:
        ConfigError: a point's config is invalid.
        RunDirError: a point's directory holds a run with another config, or is in use.
    """
    sweep_dir = Path(sweep_dir)
    points = grid_points(axes)
    texts, higher = build_points(gin_files, gin_params, points)
    states = {p.name: _point_state(sweep_dir / p.name, text, p) for p, text in zip(points, texts)}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write(sweep_dir / SWEEP_FILE, json.dumps({
        "gin_files": [str(f) for f in gin_files], "gin_params": list(gin_params),
        "points": [{"name": p.name, "bindings": list(p.bindings)} for p in points],
    }, indent=2) + "\n")

    results = []
    for i, p in enumerate(points, 1):
        where = f"[{i}/{len(points)}] {p.name}"
        if states[p.name] == "done":
            log(f"{where}: finished earlier, skipped")
            results.append(PointResult(p, "skipped", _read_metrics(sweep_dir / p.name)))
            continue
        log(f"{where}: {'resuming' if states[p.name] == 'resume' else 'training'}")
        results.append(_train_point(gin_files, gin_params, p, sweep_dir / p.name, states[p.name] == "resume", log))
    return write_summary(results, sweep_dir, higher, seeded=_has_seeds(axes))


def build_points(gin_files: Sequence[str | Path], gin_params: Sequence[str], points: Sequence[Point]) -> tuple[list[str], bool]:
    """Parse every point's config, so that a bad binding stops a sweep before anything trains.

    Returns:
        Each point's gin config text, and whether the main task's metric is better when higher.

    Raises:
        ConfigError: a point's config does not parse; the message names the point.
    """
    texts, higher = [], True
    for i, p in enumerate(points):
        texts.append(parse_point(gin_files, gin_params, p))
        if i == 0:
            higher = main_metric_higher_is_better()
    return texts, higher


def parse_point(gin_files: Sequence[str | Path], gin_params: Sequence[str], point: Point) -> str:
    """Parse the config of one point (gin files, then ``gin_params``, then its bindings); returns its text."""
    import gin

    from auxframe import config

    try:
        config.parse(gin_files, [*gin_params, *point.bindings])
    except ConfigError as err:
        raise ConfigError(f"sweep point {point.name} ({'; '.join(point.bindings)}): {err}") from None
    return gin.config_str()


def _point_state(path: Path, config_text: str, point: Point) -> str:
    """``new``, ``done`` (finished with this very config) or ``resume``."""
    from auxframe import rundir

    saved = path / rundir.CONFIG_FILE
    if not saved.is_file():
        return "new"
    try:
        rundir.RunDir(path, resume=True, config=config_text).release()  # same config? not in use?
    except RunDirError as err:
        raise RunDirError(
            f"sweep point {point.name}: {err} (The sweep's gin files or --gin-param changed since this point "
            f"ran: use a new --sweep-dir, or delete {path} to rerun it.)"
        ) from None
    if (path / "metrics.json").is_file() and saved.read_text() == config_text:
        return "done"
    return "resume"


def _train_point(gin_files, gin_params, point: Point, path: Path, resume: bool, log) -> PointResult:
    from auxframe.experiment import train

    parse_point(gin_files, gin_params, point)
    try:
        result = train(run_dir=path, resume=resume)
    except AuxframeError as err:  # e.g. a learning rate that diverges: report it, go on with the rest
        message = " ".join(str(err).split())
        log(f"  failed: {message}")
        return PointResult(point, f"failed: {message}")
    log(f"  {result['main_task']} {result['main_metric']}: validation {result['val']:.4f}, test {result['test']:.4f}")
    return PointResult(point, "done", _read_metrics(path))


def _read_metrics(path: Path) -> dict[str, Any]:
    return json.loads((path / "metrics.json").read_text())


def _has_seeds(axes: Sequence[Axis]) -> bool:
    return any(a.key == SEED_KEY and len(a.values) > 1 for a in axes)


def main_metric_higher_is_better() -> bool:
    """Whether the parsed config's main-task metric is better when higher (its ``higher_is_better``)."""
    import gin

    from auxframe.registry import registry

    try:
        graph = gin.query_parameter("train.tasks").scoped_configurable_fn()
        metric = graph.main.metric
        metric = registry.get("metrics", metric) if isinstance(metric, str) else metric
    except (ValueError, AttributeError, AuxframeError):  # no task graph: train() will say so
        return True
    return bool(getattr(metric, "higher_is_better", True))


# -- summary ------------------------------------------------------------------------------------------
_METRIC_COLUMNS = ("val", "test", "best_step", "best_val", "best_test")


def _row(r: PointResult) -> dict[str, Any]:
    m = r.metrics or {}
    best = m.get("best") or {}
    return {
        "point": r.point.name, **r.point.columns, "status": r.status,
        "val": m.get("val"), "test": m.get("test"),
        "best_step": best.get("step"), "best_val": best.get("val"), "best_test": best.get("test"),
        "steps": m.get("steps"), "wall_time_s": m.get("wall_time_s"), "run_dir": r.point.name,
    }


def best_index(scores: Sequence[float | None], higher_is_better: bool) -> int | None:
    """Index of the best score (the first on ties), ignoring missing ones; None if all are missing."""
    valid = [(s if higher_is_better else -s, -i) for i, s in enumerate(scores) if s is not None]
    return -max(valid)[1] if valid else None


def write_summary(results: Sequence[PointResult], sweep_dir: Path, higher_is_better: bool, seeded: bool = False) -> dict[str, Any]:
    """Write ``summary.csv`` and ``summary.md``, marking the best point by validation metric.

    The score of a point is the validation metric of its best-on-validation state (``best.val``
    in its ``metrics.json``). With several seeds, the markdown also groups points by their other
    values and marks the configuration with the best mean score.

    Returns:
        ``{"results", "best", "csv", "markdown", "text"}``; ``best`` is the best point's result.
    """
    rows = [_row(r) for r in results]
    best = best_index([r["best_val"] for r in rows], higher_is_better)
    for i, row in enumerate(rows):
        row["best"] = "*" if i == best else ""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write(sweep_dir / SUMMARY_CSV, buf.getvalue())

    metric = _metric_name(results)
    lines = [f"# Sweep summary: {metric}", "",
             f"Best on validation ({'higher' if higher_is_better else 'lower'} is better) is marked *; "
             f"`best_*` are the metrics of each run's best-on-validation state.", ""]
    shown = [c for c in columns if c not in ("run_dir",)]
    lines += _markdown_table(shown, rows)
    if best is not None:
        b = rows[best]
        lines += ["", f"Best point: `{b['point']}`: validation {b['best_val']:.4f}, test {b['best_test']:.4f} "
                      f"({'; '.join(results[best].point.bindings)})"]
    if seeded:
        lines += ["", *_seed_groups(results, rows, higher_is_better)]
    text = "\n".join(lines) + "\n"
    _write(sweep_dir / SUMMARY_MD, text)
    return {"results": list(results), "best": results[best] if best is not None else None,
            "csv": sweep_dir / SUMMARY_CSV, "markdown": sweep_dir / SUMMARY_MD, "text": text}


def _metric_name(results: Sequence[PointResult]) -> str:
    for r in results:
        if r.metrics:
            return f"main task '{r.metrics['main_task']}', {r.metrics['main_metric']}"
    return "no point finished"


def _seed_groups(results: Sequence[PointResult], rows: list[dict], higher_is_better: bool) -> list[str]:
    """Mean and standard deviation over seeds of each configuration's best_val and best_test."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(results):
        key = tuple((k, v) for k, v in r.point.values.items() if k != SEED_KEY)
        groups.setdefault(key, []).append(i)
    table, means = [], []
    for key, members in groups.items():
        vals = [rows[i]["best_val"] for i in members if rows[i]["best_val"] is not None]
        tests = [rows[i]["best_test"] for i in members if rows[i]["best_test"] is not None]
        means.append(sum(vals) / len(vals) if vals else None)
        table.append({"configuration": "; ".join(f"{k} = {v}" for k, v in key) or "(all)",
                      "seeds": f"{len(vals)}/{len(members)}", "best_val": _mean_std(vals), "best_test": _mean_std(tests)})
    best = best_index(means, higher_is_better)
    for i, row in enumerate(table):
        row["best"] = "*" if i == best else ""
    lines = ["## Over seeds (mean ± standard deviation)", ""]
    lines += _markdown_table(list(table[0]), table)
    if best is not None:
        lines += ["", f"Best configuration: {table[best]['configuration']}: validation {table[best]['best_val']}, "
                      f"test {table[best]['best_test']}"]
    return lines


def _mean_std(xs: Sequence[float]) -> str:
    if not xs:
        return ""
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def _markdown_table(columns: Sequence[str], rows: Sequence[dict]) -> list[str]:
    def cell(v: Any) -> str:
        text = "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|")

    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows
    ]


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    tmp.replace(path)


# -- W&B ----------------------------------------------------------------------------------------------
#: Bindings the W&B command adds so that each agent run logs to W&B online.
WANDB_BINDINGS = ("train.wandb = @WandbLogger()", "WandbLogger.online = True")


def _wandb_value(text: str) -> Any:
    """A grid value for W&B: numbers and booleans as themselves, anything else as its gin text.

    W&B's agent writes each parameter as ``KEY=str(value)``, which gives the gin text back either way.
    """
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (bool, int, float)) and repr(value) == text else text


def wandb_sweep_config(
    gin_files: Sequence[str | Path], gin_params: Sequence[str], axes: Sequence[Axis], name: str, higher_is_better: bool = True
) -> dict[str, Any]:
    """The grid as a W&B sweep configuration (``method: grid``) running ``auxframe run``.

    Args:
        gin_files: the experiment's gin files (paths as the agents will see them).
        gin_params: bindings for every run.
        axes: the grid; each axis becomes one W&B parameter named by its gin key.
        name: the sweep's name.
        higher_is_better: the main metric's direction (the sweep's ``metric.goal``).

    Returns:
        A dict ready for ``yaml.safe_dump``: ``name``, ``method``, ``metric`` (the run summary's
        ``val``, the main task's final validation metric), ``parameters`` and ``command``.
    """
    grid_points(axes)  # the same checks as a local sweep
    command = ["${env}", "auxframe", "run"]
    for f in gin_files:
        command += ["--gin", str(f)]
    for b in [*gin_params, *WANDB_BINDINGS]:
        command += ["--gin-param", b]
    command.append("${args_no_hyphens}")
    return {
        "name": name,
        "method": "grid",
        "metric": {"name": "val", "goal": "maximize" if higher_is_better else "minimize"},
        "parameters": {a.key: {"values": [_wandb_value(v.text) for v in a.values]} for a in axes},
        "command": command,
    }


def write_wandb_sweep(path: str | Path, sweep: dict[str, Any], gin_files: Sequence[str | Path]) -> Path:
    """Write a W&B sweep configuration as YAML, with a comment on how to start it."""
    import yaml

    path = Path(path)
    points = math.prod(len(p["values"]) for p in sweep["parameters"].values())
    header = (
        f"# W&B sweep written by `auxframe sweep`: {points} runs of `auxframe run` on {', '.join(map(str, gin_files))}.\n"
        f"# Start it with `wandb sweep {path.name}`, then on each machine, from the folder the gin paths are\n"
        f"# relative to: `wandb agent ENTITY/PROJECT/SWEEP_ID`. See docs/sweeps.md.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, header + yaml.safe_dump(sweep, sort_keys=False, width=1000))
    return path
