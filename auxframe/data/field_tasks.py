"""Many auxiliary tasks at once: one per label field of a dataset (CelebA's 39, CUB's 312 attributes).

Writing 312 ``Task`` bindings by hand is no way to configure CUB. :func:`field_tasks` returns the
main task followed by one auxiliary task per matching field, ready for ``TaskGraph.tasks``. The
dataset is given once and shared with ``train.dataset`` through a gin singleton, so it is read once::

    DATA = @data/singleton()
    data/singleton.constructor = @datasets.cub
    train.dataset = %DATA
    field_tasks.dataset = %DATA
    field_tasks.main = @species/Task()
    field_tasks.fields = 'attr_*'
    TaskGraph.tasks = @field_tasks()
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable, Sequence

from auxframe.errors import ConfigError
from auxframe.tasks import Task


def task_name(field: str) -> str:
    """A valid task name for a field: other characters become ``_``, a leading digit gets ``_``."""
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", field)
    return name if re.match(r"[A-Za-z_]", name) else f"_{name}"


def field_tasks(
    main: Task,
    dataset: Any,
    fields: str | Sequence[str] = "*",
    exclude: Sequence[str] = (),
    head: Callable | str = "classification",
    loss: Callable | str = "cross_entropy",
    metric: Callable | str = "accuracy",
    pool: str | None = None,
) -> list[Task]:
    """The main task, then one auxiliary task per label field of ``dataset`` that matches ``fields``.

    Args:
        main: the main task (its own field is never an auxiliary task).
        dataset: the dataset whose fields are matched (the experiment's, via a gin singleton).
        fields: an ``fnmatch`` pattern (``'attr_*'``, ``'*'``) or a list of field names.
        exclude: fields to leave out.
        head, loss, metric: of every auxiliary task (registered names or plugins).
        pool: the auxiliary tasks' pool (default: ``'labeled'``, the main task's labelled batch).

    Returns:
        ``[main, aux_1, ...]``, each auxiliary task named after its field (:func:`task_name`).

    Raises:
        ConfigError: a listed field does not exist, or nothing matches.
    """
    names = list(dataset.fields)
    if isinstance(fields, str):
        chosen = [f for f in names if fnmatch.fnmatchcase(f, fields)]
    else:
        unknown = [f for f in fields if f not in dataset.fields]
        if unknown:
            raise ConfigError(f"field_tasks.fields names {unknown}, which {type(dataset).__name__} does not have; "
                              f"its fields are: {', '.join(names)}.")
        chosen = list(fields)
    chosen = [f for f in chosen if f != main.labels and f not in set(exclude)]
    if not chosen:
        raise ConfigError(f"field_tasks.fields = {fields!r} matches no field of {type(dataset).__name__} other than "
                          f"the main task's; its fields are: {', '.join(names)}.")
    return [main] + [Task(task_name(f), labels=f, head=head, loss=loss, metric=metric, pool=pool) for f in chosen]
