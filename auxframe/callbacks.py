"""The trainer's side concerns as callbacks: logs, evaluation, checkpoints, the non-finite policy, stops.

:meth:`auxframe.trainer.Trainer.fit` is a short loop; everything around the steps happens in
callbacks that it calls by hook name (a callback without that hook is skipped)::

    fit_start                                   once, before the first step
    before_optimizer_step(losses)               after the weighting's backward: may drop the step
    outer_step_start / outer_step_end           around the weighting's outer step: may undo it
    step_end(record)                            after every step: checks, logs, evaluation, checkpoints
    log(scalars)                                every row of scalars, before the loggers write it
    train_end                                   after the last step and the final evaluation
    fit_end(summary)                            with the final metrics: best state, metrics.json, W&B
    teardown                                    however the run ends (progress bar, signal handlers)

Each hook is called as ``callback.on_<hook>(trainer, ...)``, in the order of ``trainer.callbacks``.
Callbacks steer the loop only through ``trainer.control`` (:class:`TrainerControl`, flags of this
step, never saved), and keep what must survive a resume in their own ``state_dict()``, which
checkpoints carry under ``"callbacks"``, by :attr:`Callback.name` (the pattern of transformers'
``TrainerState`` / ``TrainerControl`` and Lightning Fabric's build-your-own-trainer).

Example: a callback of your own (``train.callbacks = [@CountUpdates()]`` in gin after
``gin.register(CountUpdates)``)::

    class CountUpdates(Callback):
        name = "count_updates"

        def __init__(self):
            self.updates = 0

        def on_step_end(self, trainer, record):
            self.updates += record.updated

        def state_dict(self):
            return {"updates": self.updates}

        def load_state_dict(self, state):
            self.updates = state["updates"]
"""

from __future__ import annotations

import copy
import json
import math
import signal as signal_module
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from auxframe.errors import ConfigError, TrainingError

if TYPE_CHECKING:  # the trainer imports this module
    from auxframe.trainer import Trainer

METRICS_FILE = "metrics.json"
NONFINITE = ("stop", "skip")
#: The share of the step spent waiting for batches from which the progress bar says a run is data-bound.
DATA_BOUND = 0.2


# -- the loop's state and flags --------------------------------------------------------------------
@dataclass
class StepRecord:
    """What one step produced, for the callbacks.

    Attributes:
        step: the number of steps taken, this one included (1-based).
        means: each task's mean loss, detached (None when the step was dropped).
        updated: a periodic update changed the task weights in this step (the weighting said so).
        timings: seconds spent in parts of the step, by name (``'step'``: the whole step,
            ``'data'``: of it, waiting for batches); the logging callback logs each as
            ``time/<name>``, in milliseconds per step over its interval.
    """

    step: int
    means: dict[str, torch.Tensor] | None
    updated: bool = False
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Interval:
    """The running sums of the current log interval: per-task loss means over the steps taken.

    Saved in checkpoints, so that the first log row after a resume equals the uninterrupted run's.

    Attributes:
        sums: task -> sum of its mean loss over the interval's steps (tensors on the device).
        steps: steps counted (dropped steps are not).
        first: the first step of the interval (1-based).
        agreed: ``sums`` averaged over ranks at the last check (the sums themselves in one process).
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    first: int = 1
    agreed: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, record: StepRecord) -> None:
        if record.means is None:
            return
        for task, value in record.means.items():
            self.sums[task] = self.sums[task] + value if task in self.sums else value
        self.steps += 1

    def reset(self, next_step: int) -> None:
        self.sums, self.steps, self.first, self.agreed = {}, 0, next_step, {}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.detach().clone() for k, v in self.sums.items()}, "steps": self.steps, "first": self.first}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.steps, self.first, self.agreed = int(state["steps"]), int(state["first"]), {}


@dataclass
class TrainerState:
    """What the loop itself must carry over a resume (checkpointed at the top level).

    Attributes:
        step: steps taken.
        skipped_steps: steps (and outer steps) dropped by ``nonfinite='skip'``.
        interval: the current log interval's sums.
        last_val: the last validation metrics (shown on the progress bar).
    """

    step: int = 0
    skipped_steps: int = 0
    interval: Interval = field(default_factory=Interval)
    last_val: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "interval": self.interval.state_dict(),
                "last_val": dict(self.last_val)}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if state.get("interval") is not None:
            self.interval.load_state_dict(state["interval"], device)
        else:  # a checkpoint from before intervals were saved: the interval starts afresh
            self.interval.reset(self.step + 1)
        self.last_val = dict(state.get("last_val") or {})


@dataclass
class TrainerControl:
    """Flags of the current step that callbacks set and the loop reads; never saved.

    Attributes:
        log, evaluate, save: due at this step (from the schedule, see :meth:`plan`).
        check: the interval's losses are checked (and agreed between ranks) at this step.
        skip_step: drop this step's update (set before the optimizer step).
        weights_updated: the weighting's ``after_step`` said a periodic update changed the weights.
        outer_undone: the outer step's update was undone.
        stop_requested: a stop was asked for on this process (a signal, or a callback).
        stop: stop after this step (agreed between ranks).
        stop_reason: why, for the message.
        saved: the checkpoint written at this step, if any.
    """

    log: bool = False
    evaluate: bool = False
    save: bool = False
    check: bool = False
    skip_step: bool = False
    weights_updated: bool = False
    outer_undone: bool = False
    stop_requested: bool = False
    stop: bool = False
    stop_reason: str = ""
    saved: Path | None = None

    def plan(self, step: int, schedule: Any, check_each_step: bool) -> None:
        """Set the flags due at ``step`` (1-based) under ``schedule``."""
        self.log = step % schedule.log_every == 0 or step == schedule.steps
        self.save = bool(schedule.checkpoint_every) and step % schedule.checkpoint_every == 0
        self.evaluate = bool(schedule.eval_every) and step % schedule.eval_every == 0 and step < schedule.steps
        self.check = check_each_step or self.log or self.save
        self.saved = None


# -- callbacks -------------------------------------------------------------------------------------
class Callback:
    """Base class of callbacks: hooks named ``on_<hook>(trainer, ...)`` (see the module docstring),
    each optional, and ``state_dict``/``load_state_dict`` for what must survive a resume.

    Attributes:
        name: the key of this callback's state in checkpoints (unique among a trainer's callbacks).
    """

    name: str = ""

    def state_dict(self) -> dict[str, Any]:
        """What this callback needs to continue exactly after a resume (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def check_callbacks(callbacks: Sequence[Callback]) -> None:
    """Refuse callbacks without a name, or two with the same name (their checkpoint keys).

    Raises:
        ConfigError: naming the callbacks and the fix.
    """
    seen: dict[str, str] = {}
    for cb in callbacks:
        name = getattr(cb, "name", "")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"callback {type(cb).__name__} has no `name`; give its class a unique "
                              f"`name = '...'` (the key of its state in checkpoints).")
        if name in seen:
            raise ConfigError(f"callbacks {seen[name]} and {type(cb).__name__} are both named {name!r}; "
                              f"give one another `name` (names key their state in checkpoints).")
        seen[name] = type(cb).__name__


class StopOnSignal(Callback):
    """On SIGTERM/SIGINT, let the current step finish, then checkpoint and stop; a second signal
    stops at once. Handlers are installed from the main thread only and put back at teardown."""

    name = "stop_on_signal"

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.control: TrainerControl | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.control = trainer.control
        if threading.current_thread() is threading.main_thread():
            for sig in (signal_module.SIGTERM, signal_module.SIGINT):
                self.previous[sig] = signal_module.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.control.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.control.stop_requested = True

    def on_teardown(self, trainer: Trainer) -> None:
        for sig, handler in self.previous.items():
            signal_module.signal(sig, handler)
        self.previous = {}


class NonFinite(Callback):
    """What a NaN or infinite loss, gradient, weight or hypergradient does.

    ``'stop'`` ends the run with a :class:`TrainingError` naming the task (or weight) and the step,
    before anything non-finite is checkpointed. ``'skip'`` drops such a step (no parameter or
    optimizer update; an outer step's update of the weighting is undone) and counts it in
    ``skipped_steps``. Losses are checked every step on the CPU, where it is free, and once per log
    or checkpoint interval on a GPU (a check every step would synchronise it every step).

    Args:
        policy: ``'stop'`` or ``'skip'``.
    """

    name = "nonfinite"

    def __init__(self, policy: str = "stop"):
        if policy not in NONFINITE:
            raise TrainingError(f"train.nonfinite must be one of {NONFINITE}, got {policy!r}.")
        self.policy = policy
        self._saved: Any = None

    def on_before_optimizer_step(self, trainer: Trainer, losses: Any) -> None:
        if self.policy == "skip" and not trainer.finite_step(losses):
            trainer.control.skip_step = True
            trainer.state.skipped_steps += 1

    def on_outer_step_start(self, trainer: Trainer) -> None:
        self._saved = copy.deepcopy(trainer.weighting.state_dict()) if self.policy == "skip" else None

    def on_outer_step_end(self, trainer: Trainer) -> None:
        bad = _nonfinite_weighting(trainer.weighting)
        if not bad:
            return
        if self._saved is None:
            raise TrainingError(
                f"the outer step after step {trainer.state.step} left non-finite values in the weighting "
                f"({'; '.join(bad)}): a NaN or infinite hypergradient or weight. Lower the outer learning "
                f"rate, clip the hypergradient, or set train.nonfinite = 'skip'; the last checkpoint is kept."
            )
        trainer.weighting.load_state_dict(self._saved)
        trainer.control.outer_undone = True
        trainer.state.skipped_steps += 1

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None:
        if not trainer.control.check:
            return
        interval, step = trainer.state.interval, trainer.state.step
        means = interval.agreed
        if not means or bool(torch.isfinite(torch.stack(list(means.values()))).all()):
            return  # (no means: every step of the interval was skipped)
        when = f"at step {step}" if trainer.strategy.check_each_step else f"between steps {interval.first} and {step}"
        bad = [f"'{t}' ({float(v)})" for t, v in means.items() if not math.isfinite(float(v))]
        raise TrainingError(
            f"the loss of task {', '.join(bad)} is not finite {when}. Lower the learning "
            f"rate or check the data and the loss; the last checkpoint is kept."
        )

    def on_log(self, trainer: Trainer, scalars: Mapping[str, float]) -> None:
        bad = [f"'{k[7:]}' ({v})" for k, v in scalars.items() if k.startswith("weight/") and not math.isfinite(v)]
        if bad:
            raise TrainingError(
                f"the weight of task {', '.join(bad)} is not finite at step {trainer.state.step}. Lower the "
                f"learning rates of the weighting or check its inputs; the last checkpoint is kept."
            )


class Evaluation(Callback):
    """Validation every ``eval_every`` steps, and the model state that scored best on it.

    The best state (the first of ties) is kept in memory and in checkpoints; at the end its test
    metric is reported as ``best`` beside the final model's.
    """

    name = "evaluation"

    def __init__(self) -> None:
        self.best: dict[str, Any] | None = None

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None:
        if trainer.control.evaluate:
            val = trainer.evaluate("val")
            trainer.state.last_val = val
            self.track(trainer, val)
            trainer.log(val)

    def track(self, trainer: Trainer, val: Mapping[str, float]) -> None:
        """Keep the model state if its main-task validation metric is the best seen."""
        main = trainer.graph.main.name
        value = val[f"val/{main}/{trainer.main_metric_name(val)}"]
        sign = 1.0 if getattr(trainer.tasks[main].metric, "higher_is_better", True) else -1.0
        if self.best is None or sign * value > sign * self.best["val"]:
            state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            self.best = {"step": trainer.state.step, "val": value, "model": state}

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """Report the validation and test metrics of the best-on-validation state as ``best``."""
        main, metric_name = trainer.graph.main.name, summary["main_metric"]
        if self.best["step"] == trainer.state.step:
            test = summary["test"]
        else:
            current = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            trainer.model.load_state_dict(self.best["model"])
            test = trainer.evaluate("test")[f"test/{main}/{metric_name}"]
            trainer.model.load_state_dict(current)
        summary["best"] = {"step": self.best["step"], "val": self.best["val"], "test": test}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")


class Logging(Callback):
    """Training scalars every ``log_every`` steps, a row for every periodic weight update, the
    progress bar, and at the end ``metrics.json`` and the loggers' summaries (rank 0 only).

    The row of a log step holds each task's mean loss over the interval (averaged over ranks), the
    weighting's :meth:`~auxframe.weighting.Weighting.log_values`, the learning rate, the interval's
    milliseconds per step of every timing the loop records (``time/step``, and ``time/data`` of it
    waiting for batches) and, with ``nonfinite='skip'``,
    ``train/skipped_steps``.

    Args:
        loggers: objects with ``log(step, scalars)`` (and optionally ``summary``/``close``).
        progress: show a progress bar.
        run_dir: where ``metrics.json`` goes (None: nowhere).
    """

    name = "logging"

    def __init__(self, loggers: Sequence[Any] = (), progress: bool = True, run_dir: str | Path | None = None):
        self.loggers, self.progress = list(loggers), progress
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.bar = None
        self.timings: dict[str, float] = {}
        self.timed_steps = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.progress and trainer.strategy.writes:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=trainer.schedule.steps, initial=trainer.state.step, desc="train", unit="step",
                            dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 15.0)

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None:
        for part, seconds in record.timings.items():
            self.timings[part] = self.timings.get(part, 0.0) + seconds
        self.timed_steps += 1
        if trainer.control.log:
            scalars = self.train_scalars(trainer)
            trainer.log(scalars)
            if self.bar is not None:
                self.bar.set_postfix_str(self.postfix(trainer, scalars), refresh=False)
            trainer.state.interval.reset(trainer.state.step + 1)
            self.timings, self.timed_steps = {}, 0
        elif record.updated:  # a periodic update gets its own log row
            trainer.log(trainer.weighting.log_values())
        if self.bar is not None:
            self.bar.update(1)

    def train_scalars(self, trainer: Trainer) -> dict[str, float]:
        """The row of a log step (see the class docstring)."""
        interval = trainer.state.interval
        n = max(interval.steps, 1)
        scalars = {f"train/{t}/loss": float(v) / n for t, v in interval.agreed.items()}
        scalars.update(trainer.weighting.log_values())
        timed = max(self.timed_steps, 1)
        scalars.update({f"time/{part}": 1000.0 * s / timed for part, s in self.timings.items()})
        scalars["train/lr"] = trainer.optimizer.param_groups[0]["lr"]
        scalars.update(trainer.strategy.log_values())
        if trainer.nonfinite == "skip":
            scalars["train/skipped_steps"] = trainer.state.skipped_steps
        return scalars

    def postfix(self, trainer: Trainer, scalars: Mapping[str, float]) -> str:
        """The progress bar's text: main loss, last validation metric, the weights, and a note when
        the run waits for data (``DATA_BOUND``)."""
        main = trainer.graph.main.name
        parts = [f"loss={scalars[f'train/{main}/loss']:.3f}"] if f"train/{main}/loss" in scalars else []
        val = [(k.split("/")[-1], v) for k, v in trainer.state.last_val.items()
               if k.startswith(f"val/{main}/") and not k.endswith("/loss")]
        if val:
            parts.append(f"val_{val[0][0][:3]}={val[0][1]:.3f}")
        ws = trainer.weighting.weights()
        if ws:
            parts.append("w=" + ",".join(f"{t}:{w:.2g}" for t, w in ws.items()))
        share = scalars.get("time/data", 0.0) / max(scalars.get("time/step", 0.0), 1e-9)
        if share >= DATA_BOUND:
            parts.append(f"data-bound: {share:.0%} of the step waits for batches (raise train.num_workers)")
        return " ".join(parts)

    def on_log(self, trainer: Trainer, scalars: Mapping[str, float]) -> None:
        if trainer.strategy.writes:
            for lg in self.loggers:
                lg.log(trainer.state.step, scalars)

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if not trainer.strategy.writes:
            return
        if self.run_dir is not None:
            write_json_atomic(self.run_dir / METRICS_FILE, summary)
        for lg in self.loggers:
            if hasattr(lg, "summary"):
                lg.summary({k: v for k, v in summary.items() if k != "metrics"})

    def on_teardown(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Checkpointing(Callback):
    """Checkpoints every ``checkpoint_every`` steps, when the run is stopped, and at the end.

    Every rank takes part (the trainer's state gathers per-rank randomness); rank 0 writes. Runs
    after every other callback, so that a checkpoint holds their state (and the log interval) as
    the step left it.
    """

    name = "checkpointing"

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None:
        control = trainer.control
        if control.save or control.stop:
            control.saved = trainer.save()

    def on_train_end(self, trainer: Trainer) -> None:
        trainer.save()


def default_callbacks(nonfinite: str, loggers: Sequence[Any], progress: bool, run_dir: str | Path | None,
                      extra: Sequence[Callback] = ()) -> list[Callback]:
    """The trainer's callbacks in the order they run: stop signals, the non-finite policy,
    evaluation, logging, the ``extra`` ones, and checkpoints last (a checkpoint holds every
    callback's state after the step)."""
    return [StopOnSignal(), NonFinite(nonfinite), Evaluation(), Logging(loggers, progress, run_dir), *extra,
            Checkpointing()]


# -- helpers ---------------------------------------------------------------------------------------
def _nonfinite_weighting(weighting: Any) -> list[str]:
    """Non-finite task weights and tensors of the weighting's state, by name."""
    bad = [f"weight of '{t}' = {w}" for t, w in weighting.weights().items() if not math.isfinite(w)]
    return bad + [f"{name} is not finite" for name in nonfinite_tensors(weighting.state_dict())]


def nonfinite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Paths of floating-point tensors holding NaN or Inf in a nested state dict."""
    if isinstance(state, torch.Tensor):
        return [prefix or "value"] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, Mapping):
        return [p for k, v in state.items() for p in nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(state, (list, tuple)):
        return [p for i, v in enumerate(state) for p in nonfinite_tensors(v, f"{prefix}[{i}]")]
    return []


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
