"""Tasks and the task graph: one main task and K >= 0 auxiliary tasks on a shared backbone.

A task has a name, a head, a loss, a metric and a label source: a label field of the dataset
(the main data with other labels), a label field of *other data* (``Task.data``, a dataset of its
own, used whole), a self-supervised signal such as rotation, or a label generator that invents
the labels (``Task.generator``, see :mod:`auxframe.labelgen`). It draws its
batches from a *pool* of the low-data split: ``labeled`` (the main task's few labels), ``train``
(every training image, for self-supervised tasks), ``aux``, or unions such as ``labeled+aux``.

Tasks that read labels from the same pool share one batch and one backbone pass, so their
per-sample losses line up (weightings over loss vectors rely on this). A task with a signal gets
its own batch, since the signal changes the input.

Example (gin)::

    digit/Task.name = 'digit'
    digit/Task.labels = 'digit'
    digit/Task.main = True
    rotation/Task.name = 'rotation'
    rotation/Task.signal = @signals.rotation()
    TaskGraph.tasks = [@digit/Task(), @rotation/Task()]

K = 0 (only the main task) is single-task learning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from auxframe.errors import TaskGraphError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class Task:
    """One task of the task graph.

    Args:
        name: the task's name, used in logs, metrics and weighting parameters.
        labels: the dataset label field this task predicts (e.g. ``'digit'``); exclusive with
            ``signal``.
        signal: a self-supervised signal (e.g. ``@signals.rotation()``) that makes inputs and
            labels from unlabelled images; exclusive with ``labels``.
        head: head factory (``@heads.classification``) or its registered name.
        loss: per-sample loss (``@losses.cross_entropy``) or its registered name.
        metric: metric class (``@metrics.accuracy``) or its registered name.
        pool: which split pool the task's batches come from; default ``'labeled'`` for
            labelled tasks and ``'train'`` (all training images) for signal tasks. Ignored for
            tasks with their own ``data``, which train on all of it.
        main: whether this is the main task (exactly one task must be).
        data: other data for an auxiliary task (e.g. ``@datasets.digits()`` or another
            dataset plugin with the same image shape); its labels come from its field ``labels``
            (or from ``signal``). Such a task is trained on all of ``data`` and, having no
            validation or test split, reports training losses only.
        generator: a label generator (``@labelgens.default``, the factory, no parentheses) that
            makes this auxiliary task's soft labels from each image and its main-task label;
            exclusive with ``labels`` and ``signal``. The task shares the main task's batch (its
            pool is the main task's).
    """

    def __init__(
        self,
        name: str,
        labels: str | None = None,
        signal: Any = None,
        head: Callable | str = "classification",
        loss: Callable | str = "cross_entropy",
        metric: Callable | str = "accuracy",
        pool: str | None = None,
        main: bool = False,
        data: Any = None,
        generator: Callable | str | None = None,
    ):
        self.name = name
        self.labels = labels
        self.signal = signal
        self.head = head
        self.loss = loss
        self.metric = metric
        self.pool = pool or ("train" if signal is not None else "labeled")
        self.main = bool(main)
        self.data = data
        if data is not None:
            self.pool = "all"
        self.generator = generator
        self._pool_given = pool is not None

    def __repr__(self) -> str:
        source = f"labels={self.labels!r}" if self.signal is None else f"signal={type(self.signal).__name__}"
        if self.generator is not None:
            source = f"generator={_source_name(self)}"
        where = f"data={type(self.data).__name__}" if self.data is not None else f"pool={self.pool!r}"
        return f"Task({self.name!r}, {source}, {where}{', main' if self.main else ''})"


class TaskGraph:
    """The main task and its auxiliary tasks, validated on construction.

    Args:
        tasks: every task; exactly one has ``main=True``.

    Raises:
        TaskGraphError: no main task or several, duplicate or invalid names, a task with both or
            neither of ``labels`` and ``signal``.
    """

    def __init__(self, tasks: Sequence[Task]):
        tasks = list(tasks)
        if not tasks:
            raise TaskGraphError("the task graph is empty; set `TaskGraph.tasks = [@main/Task(), ...]`.")
        for t in tasks:
            if not isinstance(t, Task):
                raise TaskGraphError(
                    f"TaskGraph.tasks holds {t!r}, not a Task; write `@name/Task()` (with the parentheses)."
                )
        _check_names(tasks)
        _check_sources(tasks)
        mains = [t.name for t in tasks if t.main]
        if len(mains) != 1:
            found = "none" if not mains else ", ".join(mains)
            raise TaskGraphError(
                f"a task graph needs exactly one main task, found {found}. Set `Task.main = True` on "
                f"exactly one task (e.g. `{tasks[0].name}/Task.main = True`)."
            )
        self.main = next(t for t in tasks if t.main)
        self.aux = [t for t in tasks if not t.main]
        _check_generated(self.main, self.aux)

    @property
    def tasks(self) -> list[Task]:
        """Main task first, then the auxiliary tasks in declared order."""
        return [self.main, *self.aux]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def __getitem__(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def signature(self) -> dict[str, Any]:
        """What a checkpoint records to recognise this graph: names, main task, label sources."""
        return {
            "main": self.main.name,
            "tasks": [
                [t.name, _source_name(t), t.pool, type(t.data).__name__ if t.data is not None else ""]
                for t in self.tasks
            ],
        }

    def __repr__(self) -> str:
        return f"TaskGraph(main={self.main!r}, aux={self.aux!r})"


def _check_names(tasks: list[Task]) -> None:
    seen: set[str] = set()
    for t in tasks:
        if not isinstance(t.name, str) or not _NAME.match(t.name):
            raise TaskGraphError(
                f"task name {t.name!r} is not valid; use letters, digits, '_' or '-', starting with a letter."
            )
        if t.name in seen:
            raise TaskGraphError(f"two tasks are named '{t.name}'; task names must be unique.")
        seen.add(t.name)


def _source_name(t: Task) -> str:
    """How a task's labels are made, for checkpoint signatures: a field, a signal or a generator."""
    if t.generator is not None:
        return t.generator if isinstance(t.generator, str) else getattr(t.generator, "__name__", type(t.generator).__name__)
    return t.labels or type(t.signal).__name__


def _check_sources(tasks: list[Task]) -> None:
    for t in tasks:
        given = [k for k in ("labels", "signal", "generator") if getattr(t, k) is not None]
        if len(given) != 1:
            which = "both " + " and ".join(f"`{k}`" for k in given) if given else "neither `labels` and `signal` nor `generator`"
            raise TaskGraphError(
                f"task '{t.name}' has {which}; give exactly one of `labels`, `signal` and `generator`: "
                f"`{t.name}/Task.labels = '<field>'`, `{t.name}/Task.signal = @signals.rotation()` or "
                f"`{t.name}/Task.generator = @labelgens.default`."
            )
        if t.main and t.data is not None:
            raise TaskGraphError(
                f"main task '{t.name}' has its own `data`; the main task reads `train.dataset`. Move the "
                f"dataset to `train.dataset` and drop `{t.name}/Task.data`."
            )
        if t.main and (t.signal is not None or t.generator is not None):
            what = "a self-supervised signal" if t.signal is not None else "a label generator"
            raise TaskGraphError(
                f"main task '{t.name}' uses {what}; the main task must read labels "
                f"from the dataset (`labels = '<field>'`)."
            )


def _check_generated(main: Task, aux: list[Task]) -> None:
    """A generated-label task reads the main task's labels: it must share the main task's batch."""
    for t in aux:
        if t.generator is None:
            continue
        if t.data is not None:
            raise TaskGraphError(
                f"task '{t.name}' has a label generator and its own `data`; a generator reads the main task's "
                f"labels, so the task trains on the main data: drop `{t.name}/Task.data`."
            )
        if t._pool_given and t.pool != main.pool:
            raise TaskGraphError(
                f"task '{t.name}' generates labels from the main task's labels, so it trains on the main task's "
                f"pool '{main.pool}', not '{t.pool}' (other images' labels are hidden). Drop `{t.name}/Task.pool`."
            )
        t.pool = main.pool


@dataclass
class BatchGroup:
    """Tasks that share one batch (and one backbone pass) in a training step.

    Attributes:
        key: a stable name for the group (used for loader state in checkpoints).
        pool: the split pool the batch comes from.
        tasks: names of the tasks in the group.
        signal: the self-supervised signal applied to the batch, if any.
        data: the group's own dataset (None: the experiment's dataset and split).
    """

    key: str
    pool: str
    tasks: list[str]
    signal: Any = None
    data: Any = None


def batch_groups(graph: TaskGraph, tasks: Sequence[str] | None = None) -> list[BatchGroup]:
    """Group tasks by shared batch: labelled tasks by pool; each signal or other-data task alone."""
    wanted = set(tasks) if tasks is not None else set(graph.names)
    groups: dict[str, BatchGroup] = {}
    for t in graph.tasks:
        if t.name not in wanted:
            continue
        if t.data is not None:
            key = f"{t.name}@data"
            groups[key] = BatchGroup(key, "all", [t.name], t.signal, t.data)
        elif t.signal is None:
            key = f"labels@{t.pool}"
            groups.setdefault(key, BatchGroup(key, t.pool, [], None)).tasks.append(t.name)
        else:
            key = f"{t.name}@{t.pool}"
            groups[key] = BatchGroup(key, t.pool, [t.name], t.signal)
    return list(groups.values())
