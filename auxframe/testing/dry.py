"""The contract kit's light checks in ``auxframe run``'s dry pass, before the run directory exists.

:func:`auxframe.experiment.train` builds everything and validates it before it creates the run
directory; these functions add the plugin checks that cost nothing there:

- :func:`check_dataset_for_run`: the dataset's fields, image shape and a batch's shapes and dtypes;
- :func:`check_weighting_for_run`: the setup contract (``super().setup(info)``), ``tasks_needed``,
  and, for a weighting that trains through ``combine``, one ``combine`` of the losses of a small
  evaluation batch of the run's data (computed as validation computes them), on a copy of the
  weighting (the run's state and random streams are untouched), which must give one differentiable
  scalar. That is one more call of the weighting's ``combine`` before training;
- :func:`plugin_failure`: an exception a plugin raised while gin built it, as one line naming the
  plugin (the command line prints it instead of a traceback).

A broken plugin is then a one-line :class:`~auxframe.errors.ContractError` naming the plugin and the
fix, nothing is written, and the rerun after the fix is not refused.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable

import torch

from auxframe.errors import AuxframeError, ContractError, PluginError
from auxframe.testing.checks import combine_problem, dataset_problem, plugin_label, weighting_setup_problem
from auxframe.weighting.base import StepContext, TaskLosses, Weighting, WeightingSetup

_IN_CALL = re.compile(r"In call to configurable '([^']+)'")


def bound_label(kind: str, parameter: str, obj: Any) -> str:
    """The plugin bound to a gin parameter (``train.dataset = @datasets.digits()``) as
    ``kind.name (package 'dist')``; else what :func:`plugin_label` makes of the object."""
    import gin

    from auxframe.registry import registry

    try:
        ref = gin.query_parameter(parameter)
        selector = ref.selector
    except (ValueError, AttributeError):  # not bound in gin (a Python caller), or not a reference
        return plugin_label(kind, obj)
    name = selector.rsplit("/", 1)[-1]
    if name.startswith(f"{kind}."):
        name = name[len(kind) + 1:]
        try:
            return f"{kind}.{name} (package '{registry.info(kind, name).dist}')"
        except PluginError:
            pass
    return f"{selector} ({type(obj).__name__})"


def check_dataset_for_run(dataset: Any) -> None:
    """The dataset's declared fields and shapes against a small batch of it.

    Raises:
        ContractError: naming the dataset plugin and the fix.
    """
    try:
        problem = dataset_problem(dataset)
    except AuxframeError:
        raise
    except Exception as exc:  # its own get_batch fails: that too is the plugin's, said in one line
        problem = f"get_batch() of its first examples fails: {type(exc).__name__}: {_first_line(exc)}"
    if problem:
        raise ContractError(f"{bound_label('datasets', 'train.dataset', dataset)}: {problem}")


def check_weighting_for_run(weighting: Weighting, info: WeightingSetup,
                            losses: Callable[[list[str]], TaskLosses]) -> None:
    """The weighting right after ``setup(info)``: its setup contract and one dry ``combine``.

    Args:
        weighting: the run's weighting, set up.
        info: what it was set up with.
        losses: ``losses(tasks) -> TaskLosses`` of a small evaluation batch of the run's data, each
            loss a leaf that requires grad.

    Raises:
        ContractError: naming the weighting plugin and the fix.
    """
    label = bound_label("weightings", "train.weighting", weighting)
    problem = weighting_setup_problem(weighting, info)
    if problem:
        raise ContractError(f"{label}: {problem}")
    needed = weighting.tasks_needed()
    if not isinstance(needed, list) or info.main_task not in needed or not set(needed) <= {info.main_task, *info.aux_tasks}:
        raise ContractError(f"{label}: tasks_needed() returned {needed!r}; return a list with the main task "
                            f"{info.main_task!r} and any of {list(info.aux_tasks)}.")
    cls = type(weighting)
    if cls.combine is Weighting.combine or cls.backward is not Weighting.backward:
        return  # it writes its gradients itself: the kit's check_weighting covers it in tests
    model = info.model
    shared = {id(x): x for x in (model, *model.modules(), *model.parameters(), *model.buffers())}
    try:  # a copy of the weighting (sharing the model, which the dry combine does not change)
        probe = copy.deepcopy(weighting, memo=shared)
    except Exception:  # noqa: BLE001 - an object that cannot be copied (a CUDA graph): no dry combine
        return
    devices = [info.device.index or 0] if info.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        batch = losses(needed)
        ctx = StepContext(step=0, model=model, shared_parameters=list(info.shared_parameters),
                          train_losses=lambda: losses(needed))
        try:
            total = probe.combine(batch, ctx)
        except AuxframeError:
            raise
        except Exception as exc:
            raise ContractError(f"{label}: combine() fails on a batch of the run's data: {type(exc).__name__}: "
                                f"{_first_line(exc)}") from exc
    main = batch.values[info.main_task]
    problem = combine_problem(total, batch=main.shape[0] if main.ndim else None)
    if problem:
        raise ContractError(f"{label}: {problem}")


def plugin_failure(exc: BaseException) -> PluginError | None:
    """An exception raised inside a plugin while gin called it, as one error naming the plugin.

    gin adds ``In call to configurable 'NAME'`` to what a configurable raises; when the innermost
    such configurable is a plugin (e.g. a dataset factory raising ValueError), the error names it,
    its package and where to look. Anything else gives None (the caller re-raises it).
    """
    if isinstance(exc, AuxframeError):
        return None
    found = _IN_CALL.search(str(exc))
    if found is None:
        return None
    from auxframe.registry import KINDS, registry

    selector = found.group(1).rsplit("/", 1)[-1]
    kind, _, name = selector.rpartition(".")
    candidates = [p for p in registry.find() if p.name == name and (not kind or p.kind == kind) and p.kind in KINDS]
    if not candidates:
        return None
    p = candidates[0]
    message = str(exc).split("\n  In call to configurable")[0]
    return PluginError(
        f"plugin {p.kind}.{p.name} (package '{p.dist}') failed while gin built it: {type(exc).__name__}: "
        f"{' '.join(message.split())[:500]}. It is a mistake in the plugin or in its parameters "
        f"(`auxframe describe {p.kind}.{p.name}` lists them); nothing was written."
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).split("\n  In call to configurable")[0].strip()
    return text.splitlines()[0] if text else type(exc).__name__
