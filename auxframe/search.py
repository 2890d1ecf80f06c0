"""Random and Bayesian search over gin parameters, on Optuna: ``auxframe sweep --search random|tpe``.

A search samples *trials* from a space of gin parameters; each trial is one configuration, trained
once per seed (``--seeds``) as ordinary sweep points (:mod:`auxframe.sweep`: run directories
``<sweep_dir>/<point name>``, ``--jobs`` at a time, resumable), and scored by its mean
best-on-validation metric over the seeds, which Optuna maximises (or minimises, for a
lower-is-better metric). The space is written as::

    torch.optim.Adam.lr=loguniform(1e-4, 1e-1)     # float, uniform in log space
    weightings.arml.weight_lr=uniform(0.01, 0.5)   # float
    backbones.small_cnn.width=int(8, 64)           # integer (logint(8, 64): in log space)
    train.backbone=[@backbones.mlp, @backbones.small_cnn]   # one of these gin values

``--search random`` draws every trial independently (:class:`optuna.samplers.RandomSampler`);
``--search tpe`` is Optuna's Tree-structured Parzen Estimator (random for the first 10 trials, then
guided by the finished ones; ``constant_liar`` keeps parallel workers from sampling the same point).

Why Optuna rather than W&B sweeps: it runs where the training runs, offline and without an
account or a server (W&B's sweep controller is its cloud service, and our machines train offline
by default); its study lives in a database (by default ``<sweep_dir>/optuna.db``, SQLite), so a
search is stopped and continued like a grid; and ``--storage`` names a shared database (e.g.
``postgresql://host/db``) that workers on several machines join, each running ``auxframe sweep
... --storage URL --study NAME`` into its own ``--sweep-dir``; ``auxframe report`` then reads
their sweep directories together. W&B stays the place to *watch* runs, and ``--wandb-sweep``
still writes grids for W&B agents.

Resuming: a trial interrupted in this sweep directory (still RUNNING in the study when the sweep
starts again) is marked FAIL and asked again with the same values; its points have the same names,
so they resume from their checkpoints. ``--trials N`` is the study's total (over every worker) of
trials run or running, retried ones counted once; workers that start at the same moment may run a
few more.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import math
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from auxframe.errors import ConfigError, RunDirError
from auxframe.stats import mean_ci
from auxframe.sweep import (
    SWEEP_FILE, Axis, AxisValue, Point, PointResult, PointRunner, grid_points, parse_grid, seeds_axis,
    write_summary, write_sweep_file,
)

SEARCHES = ("grid", "random", "tpe")
_DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint")
_SPACE = re.compile(r"^\s*([^=\s][^=]*?)\s*=\s*(\w+)\s*\((.*)\)\s*$", re.S)
_LOCK = ".search.lock"


@dataclass(frozen=True)
class Dimension:
    """One searched gin parameter.

    Attributes:
        key: the gin binding key, e.g. ``torch.optim.Adam.lr``.
        kind: ``uniform``, ``loguniform``, ``int``, ``logint`` or ``categorical``.
        low: the lower bound (numeric kinds).
        high: the upper bound, included (numeric kinds).
        choices: the gin texts of the values (``categorical``).
    """

    key: str
    kind: str
    low: float = math.nan
    high: float = math.nan
    choices: tuple[str, ...] = ()

    def suggest(self, trial: Any) -> str:
        """Sample this dimension in an Optuna trial; returns the value's gin text."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind in ("int", "logint"):
            return repr(trial.suggest_int(self.key, int(self.low), int(self.high), log=self.kind == "logint"))
        return repr(float(trial.suggest_float(self.key, self.low, self.high, log=self.kind == "loguniform")))

    def example(self) -> str:
        """A value of the space (its low end, or first choice), to check the config before searching."""
        if self.kind == "categorical":
            return self.choices[0]
        return repr(int(self.low)) if self.kind in ("int", "logint") else repr(float(self.low))


def parse_space(spec: str) -> Dimension:
    """Parse one ``--space`` argument: ``KEY=loguniform(LOW, HIGH)`` (or ``uniform``, ``int``,
    ``logint``) or ``KEY=[v1, v2, ...]`` (gin values, one of which each trial takes).

    Raises:
        ConfigError: not one of these forms, bounds that are not numbers with ``LOW < HIGH``, or
            a log scale over non-positive numbers.
    """
    where = f"--space {spec!r}"
    match = _SPACE.match(spec)
    if match is None:
        axis = parse_grid(spec)  # KEY=[...]; its errors say how to write it
        return axis_dimension(axis)
    key, kind, args = match.groups()
    if kind not in _DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; use one of {', '.join(_DISTRIBUTIONS)}, "
                          f"e.g. --space \"torch.optim.Adam.lr=loguniform(1e-4, 1e-1)\", or a list [v1, v2].")
    try:
        bounds = ast.literal_eval(f"({args},)")
    except (ValueError, SyntaxError):
        bounds = ()
    if len(bounds) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
        raise ConfigError(f"{where}: give two numbers, {kind}(LOW, HIGH).")
    low, high = bounds
    if kind in ("int", "logint") and not all(float(b).is_integer() for b in bounds):
        raise ConfigError(f"{where}: {kind} takes integer bounds, got {low!r} and {high!r}.")
    if not low < high:
        raise ConfigError(f"{where}: the lower bound {low!r} must be below the upper bound {high!r}.")
    if kind.startswith("log") and low <= 0:
        raise ConfigError(f"{where}: a log scale needs positive bounds, got {low!r}; use uniform or int instead.")
    return Dimension(key.strip(), kind, float(low), float(high))


def axis_dimension(axis: Axis) -> Dimension:
    """A grid axis as a categorical dimension (a search samples one of its values per trial).

    Raises:
        ConfigError: the axis binds several parameters (``--seeds``, which a search sweeps per trial).
    """
    if axis.also:
        raise ConfigError(f"{axis.key} binds several parameters and cannot be searched; give the seeds with --seeds.")
    return Dimension(axis.key, "categorical", choices=tuple(v.text for v in axis.values))


def trial_points(values: dict[str, str], seeds: Sequence[int], keys: Sequence[str]) -> list[Point]:
    """The sweep points of one trial: its values, once per seed (named as a grid names its points)."""
    axes = [Axis(k, (AxisValue(values[k], ((k, values[k]),)),)) for k in keys]
    return grid_points([*axes, seeds_axis(seeds)] if seeds else axes)


def make_sampler(method: str, seed: int) -> Any:
    """Optuna's sampler for ``method`` (``random`` or ``tpe``), seeded."""
    import optuna

    if method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if method == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    raise ConfigError(f"--search {method!r} is not a search; use one of {', '.join(SEARCHES)}.")


def run_search(
    gin_files: Sequence[str | Path],
    gin_params: Sequence[str],
    dimensions: Sequence[Dimension],
    seeds: Sequence[int],
    sweep_dir: str | Path,
    trials: int,
    method: str = "tpe",
    storage: str | None = None,
    study_name: str | None = None,
    search_seed: int = 0,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or continue) a search until its study holds ``trials`` trials, then write the summary.

    Args:
        gin_files: the experiment's gin files.
        gin_params: bindings for every run (before the trial's own).
        dimensions: the space (:func:`parse_space`).
        seeds: each trial trains once per seed (``train.seed`` and ``LowDataSplit.seed``); none: once.
        sweep_dir: where this worker's run directories, logs and summary go.
        trials: the study's total number of trials.
        method: ``random`` or ``tpe``.
        storage: an Optuna storage URL shared by workers (default ``sqlite:///<sweep_dir>/optuna.db``).
        study_name: the study's name in the storage (default: the sweep directory's name).
        search_seed: seeds the sampler (mixed with the host, the sweep directory and the number of
            trials so far, so that workers and continued searches draw new values).
        jobs: how many points train at once, each in its own process when more than one.
        log: where progress lines go.

    Returns:
        What :func:`auxframe.sweep.write_summary` returns, plus ``study`` (the Optuna study).

    Raises:
        ConfigError: an empty space, a parameter searched twice, a trial budget below 1, a config that
            does not parse, or a study whose direction differs from the metric's.
        RunDirError: another search runs in this sweep directory.
    """
    import optuna
    from optuna.trial import TrialState

    if not dimensions:
        raise ConfigError("--search needs a space: give --space KEY=loguniform(LOW, HIGH) or --grid KEY=[V1, V2].")
    keys = [d.key for d in dimensions]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{', '.join(sorted({k for k in keys if keys.count(k) > 1}))} is searched more than once; "
                          f"give each parameter one --space or --grid.")
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"--trials must be a positive integer, got {trials!r}.")
    sweep_dir = Path(sweep_dir)
    runner = PointRunner(gin_files, gin_params, sweep_dir, jobs, log)
    example = trial_points({d.key: d.example() for d in dimensions}, seeds[:1], keys)[0]
    runner.prepare(example)  # a config that does not parse stops the search before anything trains
    higher = runner.higher_is_better(example)

    sweep_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(sweep_dir)
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
        name = study_name or sweep_dir.resolve().name
        direction = "maximize" if higher else "minimize"
        study = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True)
        if study.direction.name.lower() != direction:
            raise ConfigError(f"study {name!r} in {storage} is set to {study.direction.name.lower()}, but the main "
                              f"metric is to {direction}; use another --study.")
        here = str(sweep_dir.resolve())
        _retry_interrupted(study, here, log)
        done = len(study.get_trials(deepcopy=False))
        seed = int(hashlib.sha1(f"{search_seed}|{done}|{socket.gethostname()}|{here}".encode()).hexdigest()[:8], 16)
        study.sampler = make_sampler(method, seed)
        points = _known_points(sweep_dir)
        state = _SearchState(study, runner, dimensions, list(seeds), keys, trials, here, points, log,
                             dict(gin_files=gin_files, gin_params=gin_params, method=method, storage=storage,
                                  study=name, seeds=list(seeds), trials=trials))
        state.run(max(1, jobs))
        results = [_result(sweep_dir, p) for p in state.points]
        out = write_summary(results, sweep_dir, higher)
        out["study"] = study
        counted = sum(1 for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING)
        log(f"study {name}: {counted} trials ({study.direction.name.lower()}; storage {storage})")
        return out
    finally:
        os.close(lock)


def _lock(sweep_dir: Path) -> int:
    fd = os.open(sweep_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirError(f"another search runs in {sweep_dir}; give each worker its own --sweep-dir "
                          f"(the same --storage and --study make them one search).") from None
    return fd


def _retry_interrupted(study: Any, here: str, log: Callable[[str], None]) -> None:
    """Trials this sweep directory left RUNNING were interrupted: fail them and ask them again."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("sweep_dir") != here or t.number in retried:
            continue
        study.tell(t.number, state=TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            log(f"trial {t.number} was interrupted: it runs again with the same values (its points resume)")


def _known_points(sweep_dir: Path) -> list[Point]:
    f = sweep_dir / SWEEP_FILE
    if not f.is_file():
        return []
    spec = json.loads(f.read_text())
    return [Point(p["name"], tuple(p["bindings"]), p.get("columns", {}), p.get("values", {})) for p in spec.get("points", [])]


def _result(sweep_dir: Path, point: Point) -> PointResult:
    f = sweep_dir / point.name / "metrics.json"
    return PointResult(point, "done", json.loads(f.read_text())) if f.is_file() else PointResult(point, "not run")


class _SearchState:
    """The search loop: ask a trial, train its points, tell its score; ``jobs`` workers at once."""

    def __init__(self, study, runner: PointRunner, dimensions, seeds, keys, trials, here, points, log, info):
        self.study, self.runner, self.dimensions, self.seeds, self.keys = study, runner, dimensions, seeds, keys
        self.trials, self.here, self.points, self.log, self.info = trials, here, points, log, info
        self.lock = threading.Lock()

    def counted(self) -> int:
        from optuna.trial import TrialState

        all_trials = self.study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in all_trials}
        return sum(1 for t in all_trials if t.state != TrialState.WAITING and t.number not in retried)

    def run(self, jobs: int) -> None:
        if jobs == 1:
            self.worker()
            return
        from concurrent.futures import ThreadPoolExecutor

        from auxframe.sweep import _sigterm_as_interrupt, _wait_all

        with ThreadPoolExecutor(jobs) as pool, _sigterm_as_interrupt():
            futures = [pool.submit(self.worker) for _ in range(jobs)]
            try:
                _wait_all(futures)
            except KeyboardInterrupt:
                self.log("interrupted: the running points checkpoint and stop; run the same command again to continue")
                self.runner.stop()
                _wait_all(futures)
                raise KeyboardInterrupt("search interrupted") from None
            for f in futures:
                f.result()
        if self.runner.stopping:
            raise KeyboardInterrupt("a point was interrupted")

    def worker(self) -> None:
        from optuna.trial import TrialState

        while True:
            with self.lock:
                if self.runner.stopping or self.counted() >= self.trials:
                    return
                trial = self.study.ask()
                trial.set_user_attr("sweep_dir", self.here)
                trial.set_user_attr("host", socket.gethostname())
                values = {d.key: d.suggest(trial) for d in self.dimensions}
                points = trial_points(values, self.seeds, self.keys)
                trial.set_user_attr("points", [p.name for p in points])
                known = {p.name for p in self.points}
                self.points += [p for p in points if p.name not in known]
                write_sweep_file(self.runner.sweep_dir, self.info["gin_files"], self.info["gin_params"], self.points,
                                 [], search={k: v for k, v in self.info.items() if k not in ("gin_files", "gin_params")})
            label = ", ".join(f"{k} = {v}" for k, v in values.items())
            self.log(f"trial {trial.number}: {label}")
            results = [self.runner.run(p, self.runner.prepare(p), f"  trial {trial.number} {p.name}") for p in points]
            if any(r.status in ("interrupted", "not run") for r in results):
                self.runner.stopping = True  # left RUNNING: the next search here runs it again
                return
            scores = [r.metrics["best"]["val"] for r in results if r.metrics]
            with self.lock:
                if len(scores) < len(results):
                    self.study.tell(trial, state=TrialState.FAIL)
                    self.log(f"trial {trial.number}: failed ({sum(1 for r in results if not r.metrics)} of its points)")
                else:
                    score = mean_ci(scores)
                    self.study.tell(trial, score.mean)
                    self.log(f"trial {trial.number}: mean best validation {score.format()} over {len(scores)} seed(s)")
