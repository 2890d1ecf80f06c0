"""Sweeps over gin parameters: a grid (or a random / Bayesian search, :mod:`auxframe.search`),
one run directory per point, trained one at a time or ``jobs`` at a time; or a W&B sweep file.

A grid is one or more *axes*, each written as a gin binding whose value is a list of values::

    torch.optim.Adam.lr = [1e-3, 1e-2]                     # two points
    train.backbone = [@backbones.mlp, @backbones.small_cnn]
    weightings.fixed.weights = {'parity': [0.1, 0.3, 1.0], 'rotation': [0.0, 0.5]}

A dict whose entries are lists is swept entry by entry (the cartesian product of the entries'
values; entries that are not lists stay fixed), so the last line gives six dicts such as
``{'parity': 0.1, 'rotation': 0.0}``. The points of the sweep are the cartesian product of all axes,
the first axis varying slowest; ``seeds`` adds an axis that sets ``train.seed`` and
``LowDataSplit.seed`` together, so that a seed also draws the split.

:func:`run_sweep` trains every point in its own run directory ``<sweep_dir>/<point name>`` (named
from its values, e.g. ``lr=0.001,seed=0``): in this process with ``jobs=1``, else in ``jobs``
child processes ``auxframe run ...`` at a time, each with ``cores // jobs`` threads. Rerunning the
same sweep skips finished points (``metrics.json`` written, same config) and resumes interrupted
ones from their latest checkpoint. It then writes the summary (:func:`write_summary`): the points
grouped into *configurations* (the points that differ only in their seeds), each with the mean and
95% interval over its seeds, the configuration with the best mean validation metric marked.

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
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from auxframe.errors import AuxframeError, ConfigError, RunDirError
from auxframe.runconfig import SEED_KEY, SEED_KEYS, SPLIT_SEED_KEY, _Delegate, gin_text  # noqa: F401 - re-exported
from auxframe.stats import Interval, mean_ci

SUMMARY_CSV = "summary.csv"
POINTS_CSV = "points.csv"
SUMMARY_MD = "summary.md"
SWEEP_FILE = "sweep.json"
LOG_DIR = "logs"
#: The environment variables that set a child process's threads (OpenMP, MKL, OpenBLAS; torch's
#: intra-op pool takes OMP_NUM_THREADS).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_EXAMPLE = "--grid \"torch.optim.Adam.lr=[1e-3, 1e-2]\""


# -- grid --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AxisValue:
    """One value of an axis.

    Attributes:
        text: the value as gin text, e.g. ``"0.001"`` or ``"{'parity': 0.1, 'rotation': 0.0}"``.
        columns: summary column name -> gin text of what varies, e.g.
            ``{"weightings.fixed.weights['parity']": "0.1"}``.
        label: the value's name in point names (default: made from ``text``), e.g. ``without-parity``
            for a task list of an ablation (:mod:`auxframe.ablation`).
    """

    text: str
    columns: tuple[tuple[str, str], ...]
    label: str = ""


@dataclass(frozen=True)
class Axis:
    """One swept gin parameter and its values.

    Attributes:
        key: the gin binding key, e.g. ``"torch.optim.Adam.lr"``.
        values: the values, in the order given.
        entries: for a dict axis, the swept dict keys (named in point names); empty otherwise.
        also: more gin parameters bound to the same value at every point (the seeds axis binds
            ``train.seed`` and ``LowDataSplit.seed`` together).
    """

    key: str
    values: tuple[AxisValue, ...]
    entries: tuple[str, ...] = ()
    also: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """Every gin parameter this axis binds: ``key``, then ``also`` (bound to the same value)."""
        return (self.key, *self.also)


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
    """The ``--seeds`` axis: each seed sets ``train.seed`` and ``LowDataSplit.seed`` alike.

    So a seed picks the model's initialisation, the data order *and* the split, and intervals over
    seeds include split-to-split variation; two methods run on the same seeds see the same splits,
    which is what makes their paired differences paired (:mod:`auxframe.stats`).
    """
    axis = parse_grid(f"{SEED_KEY}=[{', '.join(str(int(s)) for s in seeds)}]")
    return Axis(axis.key, axis.values, also=(SPLIT_SEED_KEY,))


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

    @property
    def configuration(self) -> tuple[tuple[str, str], ...]:
        """The point's values without its seeds: the points of one configuration differ only in seeds."""
        return tuple((k, v) for k, v in self.values.items() if k not in SEED_KEYS)

    @property
    def seed(self) -> tuple[tuple[str, str], ...]:
        """The point's seed values (``train.seed``, ``LowDataSplit.seed``) where the sweep sets them."""
        return tuple((k, v) for k, v in self.values.items() if k in SEED_KEYS)


def grid_points(axes: Sequence[Axis]) -> list[Point]:
    """The cartesian product of the axes, the first axis varying slowest.

    Raises:
        ConfigError: two axes sweep the same gin parameter.
    """
    keys = [k for a in axes for k in a.keys]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"{', '.join(repeated)} is swept more than once; give each parameter one --grid (or drop --seeds, "
                          f"which sweeps {SEED_KEY} and {SPLIT_SEED_KEY} together).")
    labels = _short_labels([a.key for a in axes])
    points = []
    for combo in itertools.product(*(a.values for a in axes)):
        parts = []
        for axis, label, v in zip(axes, labels, combo):
            if axis.entries:
                parts += [f"{_slug(entry)}={_slug(text)}" for entry, (_, text) in zip(axis.entries, v.columns)]
            else:
                parts.append(f"{label}={_slug(v.label or v.text)}")
        points.append(Point(
            name=",".join(parts) or "default",
            bindings=tuple(f"{k} = {v.text}" for a, v in zip(axes, combo) for k in a.keys),
            columns={c: t for v in combo for c, t in v.columns},
            values={k: v.text for a, v in zip(axes, combo) for k in a.keys},
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


# -- running ------------------------------------------------------------------------------------------
@dataclass
class PointResult:
    """What a point's run gave (``status`` is ``done``, ``skipped``, ``failed: ...``, ``interrupted``
    or ``not run``)."""

    point: Point
    status: str
    metrics: dict[str, Any] | None = None


def threads_per_job(jobs: int) -> int:
    """The threads each of ``jobs`` parallel runs gets: the cores this process may use, divided by ``jobs``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // jobs)


class PointRunner:
    """Trains the points of one sweep into their run directories, in this process or in children.

    With ``jobs=1`` a point trains in this process (:func:`auxframe.experiment.train`). With more,
    each point is a child process ``python -m auxframe run --gin ... --run-dir <point>`` whose
    OpenMP/MKL threads are ``threads_per_job(jobs)`` (set in its environment before it imports
    torch: two torch processes with every core each slow each other down by an order of magnitude),
    with its output in ``<sweep_dir>/logs/<point>.log``. A child process rather than a
    multiprocessing worker: a crash or out-of-memory in one point cannot take the sweep down, gin's
    global config is never shared, and each point is exactly the ``auxframe run`` a user can rerun.

    Children run in their own session, so a Ctrl-C reaches only the sweep, which passes one SIGINT
    on to every running point (each then checkpoints and stops, as ``auxframe run`` does) and
    starts no more.

    Args:
        gin_files: the experiment's gin files.
        gin_params: bindings for every point (before the point's own).
        sweep_dir: the sweep's directory.
        jobs: how many points train at once.
        log: where progress lines go.
    """

    def __init__(self, gin_files: Sequence[str | Path], gin_params: Sequence[str], sweep_dir: str | Path,
                 jobs: int = 1, log: Callable[[str], None] = print):
        if not isinstance(jobs, int) or jobs < 1:
            raise ConfigError(f"--jobs must be a positive integer, got {jobs!r}.")
        self.gin_files, self.gin_params = [str(f) for f in gin_files], list(gin_params)
        self.sweep_dir, self.jobs, self.log = Path(sweep_dir), jobs, log
        self.threads = threads_per_job(jobs)
        self._gin_lock = threading.Lock()  # gin's config is global: one point is parsed at a time
        self._children: set[subprocess.Popen] = set()
        self._children_lock = threading.Lock()
        self.stopping = False

    # -- states --------------------------------------------------------------------------------
    def prepare(self, point: Point) -> str:
        """Parse the point's config and check its directory: ``new``, ``done`` or ``resume``.

        Raises:
            ConfigError: the point's config does not parse.
            RunDirError: its directory holds a run with another config, or is in use.
        """
        with self._gin_lock:
            text = parse_point(self.gin_files, self.gin_params, point)
            return _point_state(self.sweep_dir / point.name, text, point)

    def higher_is_better(self, point: Point) -> bool:
        """Whether the main metric of ``point``'s config is better when higher."""
        with self._gin_lock:
            parse_point(self.gin_files, self.gin_params, point)
            return main_metric_higher_is_better()

    # -- training ------------------------------------------------------------------------------
    def run(self, point: Point, state: str, where: str = "") -> PointResult:
        """Train one point (``state`` from :meth:`prepare`); a failure is a result, not an error."""
        where = where or point.name
        path = self.sweep_dir / point.name
        if state == "done":
            self.log(f"{where}: finished earlier, skipped")
            return PointResult(point, "skipped", _read_metrics(path))
        if self.stopping:
            return PointResult(point, "not run")
        self.log(f"{where}: {'resuming' if state == 'resume' else 'training'}")
        if self.jobs == 1:
            result = self._train_here(point, path, state == "resume")
        else:
            result = self._train_child(point, path, state == "resume")
        if result.status == "done":
            m = result.metrics
            self.log(f"{where}: {m['main_task']} {m['main_metric']}: validation {m['val']:.4f}, test {m['test']:.4f}")
        elif result.status != "not run":
            self.log(f"{where}: {result.status}")
        return result

    def _train_here(self, point: Point, path: Path, resume: bool) -> PointResult:
        from auxframe.experiment import train

        parse_point(self.gin_files, self.gin_params, point)
        from auxframe.testing.dry import plugin_failure

        try:
            train(run_dir=path, resume=resume, job_type="sweep")
        except AuxframeError as err:  # e.g. a learning rate that diverges: report it, go on with the rest
            return PointResult(point, f"failed: {' '.join(str(err).split())}")
        except Exception as exc:  # a plugin's own error while gin built it, as `auxframe run` reports it
            failure = plugin_failure(exc)
            if failure is None:
                raise
            return PointResult(point, f"failed: {failure}")
        return PointResult(point, "done", _read_metrics(path))

    def command(self, point: Point, resume: bool = False) -> list[str]:
        """The ``auxframe run`` command line that trains ``point`` (what a child process runs)."""
        cmd = [sys.executable, "-m", "auxframe", "run"]
        for f in self.gin_files:
            cmd += ["--gin", f]
        for b in [*self.gin_params, *point.bindings]:
            cmd += ["--gin-param", b]
        return cmd + ["--run-dir", str(self.sweep_dir / point.name), "--job-type", "sweep"] + (["--resume"] if resume else [])

    def child_env(self) -> dict[str, str]:
        """This process's environment with each child's thread count set."""
        return {**os.environ, **{v: str(self.threads) for v in THREAD_VARIABLES}}

    def _train_child(self, point: Point, path: Path, resume: bool) -> PointResult:
        log_path = self.sweep_dir / LOG_DIR / f"{point.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._children_lock:
            if self.stopping:
                return PointResult(point, "not run")
            with log_path.open("a") as out:
                out.write(f"$ {' '.join(self.command(point, resume))}\n")
                out.flush()
                proc = subprocess.Popen(self.command(point, resume), stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=self.child_env(), start_new_session=True)
            self._children.add(proc)
        try:
            code = proc.wait()
        finally:
            with self._children_lock:
                self._children.discard(proc)
        if code == 0:
            return PointResult(point, "done", _read_metrics(path))
        if code == 130:
            return PointResult(point, "interrupted")
        return PointResult(point, f"failed: {_child_error(log_path, code)}")

    def stop(self, signum: int = signal.SIGINT) -> None:
        """Start no more points and pass ``signum`` on to every running one."""
        with self._children_lock:
            self.stopping = True
            for proc in self._children:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def run_all(self, jobs: Iterable[tuple[Point, str, str]]) -> list[PointResult]:
        """Train ``(point, state, where)`` jobs, ``self.jobs`` at a time; results in the jobs' order.

        Raises:
            KeyboardInterrupt: the sweep was interrupted (after the running points checkpointed).
        """
        jobs = list(jobs)
        if self.jobs == 1:
            return [self.run(*job) for job in jobs]
        with ThreadPoolExecutor(self.jobs) as pool, _sigterm_as_interrupt():
            futures: list[Future] = [pool.submit(self.run, *job) for job in jobs]
            try:
                _wait_all(futures)
            except KeyboardInterrupt:
                self.log("interrupted: the running points checkpoint and stop; run the same command again to continue")
                self.stop(signal.SIGINT)
                try:
                    _wait_all(futures)
                except KeyboardInterrupt:  # a second Ctrl-C: stop the points at once
                    self.stop(signal.SIGINT)
                    _wait_all(futures)
                raise KeyboardInterrupt("sweep interrupted") from None
            results = [f.result() for f in futures]
        if any(r.status == "interrupted" for r in results):  # a point was stopped from outside
            raise KeyboardInterrupt("a point was interrupted")
        return results


def _wait_all(futures: Sequence[Future]) -> None:
    pending = set(futures)
    while pending:  # a timeout, so that Ctrl-C reaches this thread promptly
        _, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)


class _sigterm_as_interrupt:
    """While a parallel sweep runs (in the main thread), SIGTERM stops it as Ctrl-C does."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def _child_error(log_path: Path, code: int) -> str:
    """The one-line error of a failed ``auxframe run`` from its log, else its last line."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    marker = text.rfind("auxframe: error: ")
    if marker >= 0:
        return " ".join(text[marker + len("auxframe: error: "):].split())
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else "no output"
    return f"exit status {code}: {last} (see {log_path})"


def run_sweep(
    gin_files: Sequence[str | Path],
    gin_params: Sequence[str],
    axes: Sequence[Axis],
    sweep_dir: str | Path,
    log: Callable[[str], None] = print,
    jobs: int = 1,
) -> dict[str, Any]:
    """Train every point of the grid, skipping finished ones, and write the summary.

    Every point's config is built (and its directory checked) before any training, so that a bad
    binding stops the sweep before it costs anything.

    Args:
        gin_files: the experiment's gin files.
        gin_params: bindings applied to every point (before the point's own).
        axes: the grid.
        sweep_dir: the sweep's directory; one run directory per point under it.
        log: where progress lines go.
        jobs: how many points train at once (each in its own process when more than one).

    Returns:
        What :func:`write_summary` returns.

    Raises:
        ConfigError: a point's config is invalid, or ``jobs`` is not a positive integer.
        RunDirError: a point's directory holds a run with another config, or is in use.
        KeyboardInterrupt: the sweep was interrupted; rerunning it continues.
    """
    runner = PointRunner(gin_files, gin_params, sweep_dir, jobs, log)
    points = grid_points(axes)
    states = {p.name: runner.prepare(p) for p in points}
    higher = runner.higher_is_better(points[0])
    write_sweep_file(runner.sweep_dir, gin_files, gin_params, points, axes)
    results = runner.run_all((p, states[p.name], f"[{i}/{len(points)}] {p.name}") for i, p in enumerate(points, 1))
    return write_summary(results, runner.sweep_dir, higher)


def write_sweep_file(sweep_dir: Path, gin_files: Sequence[str | Path], gin_params: Sequence[str],
                     points: Sequence[Point], axes: Sequence[Axis], **extra: Any) -> Path:
    """Write ``sweep.json``: the gin files, the bindings, the axes and every point (read by ``auxframe report``)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / SWEEP_FILE
    _write(path, json.dumps({
        "gin_files": [str(f) for f in gin_files], "gin_params": list(gin_params),
        "axes": [{"keys": list(a.keys), "values": [v.text for v in a.values]} for a in axes],
        "points": [{"name": p.name, "bindings": list(p.bindings), "values": p.values, "columns": p.columns}
                   for p in points],
        **extra,
    }, indent=2) + "\n")
    return path


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


def _read_metrics(path: Path) -> dict[str, Any]:
    return json.loads((path / "metrics.json").read_text())


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
@dataclass
class Configuration:
    """The points of a sweep that differ only in their seeds, and their results.

    Attributes:
        values: swept gin key -> gin text of the value, seeds left out.
        columns: summary column -> gin text (one column per swept parameter or dict entry).
        results: one result per seed.
    """

    values: dict[str, str]
    columns: dict[str, str]
    results: list[PointResult]

    @property
    def label(self) -> str:
        return "; ".join(f"{k} = {v}" for k, v in self.values.items()) or "(all points)"

    def interval(self, metric: str) -> Interval:
        """Mean and 95% interval over the finished seeds of ``metric``: ``val``, ``test``,
        ``best_val`` or ``best_test`` (the best-on-validation state's)."""
        return mean_ci([v for v in (_metric(r.metrics, metric) for r in self.results) if v is not None])


def _metric(metrics: dict[str, Any] | None, name: str) -> float | None:
    if not metrics:
        return None
    if name.startswith("best_"):
        return (metrics.get("best") or {}).get(name[5:])
    return metrics.get(name)


def configurations(results: Sequence[PointResult]) -> list[Configuration]:
    """Group the results by configuration (their values without the seeds), in order of first appearance."""
    groups: dict[tuple, Configuration] = {}
    for r in results:
        key = r.point.configuration
        if key not in groups:
            columns = {c: t for c, t in r.point.columns.items() if c not in SEED_KEYS}
            groups[key] = Configuration(dict(key), columns, [])
        groups[key].results.append(r)
    return list(groups.values())


def best_index(scores: Sequence[float | None], higher_is_better: bool) -> int | None:
    """Index of the best score (the first on ties), ignoring missing ones; None if all are missing."""
    valid = [(s if higher_is_better else -s, -i) for i, s in enumerate(scores) if s is not None and not math.isnan(s)]
    return -max(valid)[1] if valid else None


_SCORES = ("best_val", "best_test", "val", "test")


def write_summary(results: Sequence[PointResult], sweep_dir: Path, higher_is_better: bool) -> dict[str, Any]:
    """Write the summary: ``summary.csv`` and ``summary.md`` over configurations, ``points.csv`` per point.

    A configuration's score is the mean over its seeds of the validation metric of each run's
    best-on-validation state (``best.val`` in ``metrics.json``); the configuration with the best
    score is marked ``*``. Every score is given as its mean and 95% t interval over the seeds (see
    :mod:`auxframe.stats`); choose on validation, report the chosen configuration's test metric.

    Returns:
        ``{"results", "configurations", "best", "csv", "points_csv", "markdown", "text"}``; ``best``
        is the best :class:`Configuration` (None when no point finished).
    """
    groups = configurations(results)
    scores = [g.interval("best_val") for g in groups]
    best = best_index([s.mean for s in scores], higher_is_better)
    seeded = any(len(g.results) > 1 for g in groups)

    config_rows = []
    for i, g in enumerate(groups):
        row: dict[str, Any] = {"configuration": g.label, **g.columns,
                               "seeds": f"{sum(1 for r in g.results if r.metrics)}/{len(g.results)}"}
        for name in _SCORES:
            ci = g.interval(name)
            row.update({f"{name}_mean": _num(ci.mean), f"{name}_ci_low": _num(ci.low), f"{name}_ci_high": _num(ci.high)})
        row["best"] = "*" if i == best else ""
        config_rows.append(row)
    _write_csv(sweep_dir / SUMMARY_CSV, config_rows)
    _write_csv(sweep_dir / POINTS_CSV, [_point_row(r) for r in results])

    metric = _metric_name(results)
    what = "mean ± 95% interval over seeds" if seeded else "one seed per configuration"
    lines = [f"# Sweep summary: {metric}", "",
             f"Configurations ({what}); the best on validation ({'higher' if higher_is_better else 'lower'} is "
             f"better) is marked *. `best_*` are the metrics of each run's best-on-validation state.", ""]
    table = [{"configuration": g.label, "seeds": config_rows[i]["seeds"],
              **{name: g.interval(name).format() for name in ("best_val", "best_test")},
              "best": config_rows[i]["best"]} for i, g in enumerate(groups)]
    lines += _markdown_table(list(table[0]), table) if table else []
    if best is not None:
        g = groups[best]
        lines += ["", f"Best configuration: {g.label}: validation {g.interval('best_val').format()}, "
                      f"test {g.interval('best_test').format()} ({config_rows[best]['seeds']} seeds)"]
    points = [_point_row(r) for r in results]
    lines += ["", "## Points", ""]
    lines += _markdown_table([c for c in points[0] if c != "run_dir"], points) if points else []
    text = "\n".join(lines) + "\n"
    _write(sweep_dir / SUMMARY_MD, text)
    return {"results": list(results), "configurations": groups, "best": groups[best] if best is not None else None,
            "csv": sweep_dir / SUMMARY_CSV, "points_csv": sweep_dir / POINTS_CSV,
            "markdown": sweep_dir / SUMMARY_MD, "text": text}


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


def _point_row(r: PointResult) -> dict[str, Any]:
    m = r.metrics or {}
    best = m.get("best") or {}
    return {
        "point": r.point.name, **r.point.columns, "status": r.status,
        "val": m.get("val"), "test": m.get("test"),
        "best_step": best.get("step"), "best_val": best.get("val"), "best_test": best.get("test"),
        "steps": m.get("steps"), "wall_time_s": m.get("wall_time_s"), "run_dir": r.point.name,
    }


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write(path, buf.getvalue())


def _metric_name(results: Sequence[PointResult]) -> str:
    for r in results:
        if r.metrics:
            return f"main task '{r.metrics['main_task']}', {r.metrics['main_metric']}"
    return "no point finished"


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
    # An axis that binds several parameters (--seeds: train.seed and LowDataSplit.seed) is one W&B
    # parameter, a gin macro that the command binds each of them to.
    linked = {a.key: wandb_macro(a.key) for a in axes if a.also}
    command = ["${env}", "auxframe", "run"]
    for f in gin_files:
        command += ["--gin", str(f)]
    links = [f"{k} = %{linked[a.key]}" for a in axes if a.also for k in a.keys]
    for b in [*gin_params, *WANDB_BINDINGS, *links]:
        command += ["--gin-param", b]
    command.append("${args_no_hyphens}")
    return {
        "name": name,
        "method": "grid",
        "metric": {"name": "val", "goal": "maximize" if higher_is_better else "minimize"},
        "parameters": {linked.get(a.key, a.key): {"values": [_wandb_value(v.text) for v in a.values]} for a in axes},
        "command": command,
    }


def wandb_macro(key: str) -> str:
    """The gin macro that stands for a linked axis in a W&B sweep: ``train.seed`` -> ``train_seed``."""
    return re.sub(r"\W", "_", key)


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
