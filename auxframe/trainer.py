"""The generic training loop: inner steps, optional outer steps, and callbacks for the rest.

``Trainer.fit`` is the loop: each :meth:`Trainer.train_step` takes one inner step (every task's
unreduced loss on its batch, the weighting turns them into gradients, the optimizer steps) and,
every ``outer_every`` steps, the weighting's outer step; then the callbacks of
:mod:`auxframe.callbacks` do what is due at that step: the non-finite policy's checks, logs and
the progress bar, evaluation and the best state, checkpoints, stop signals. Where and how the
model runs (the device, the processes of a ``torchrun`` launch) is the
:class:`~auxframe.strategy.Strategy`'s business. The trainer knows nothing about any particular
weighting method.

What the loop carries over a resume is its :class:`~auxframe.callbacks.TrainerState` (step,
skipped steps, the log interval's sums), the model, optimizer, scheduler, weighting, data and RNG
states, and every callback's ``state_dict``: a resumed run continues exactly.

Non-finite values: ``nonfinite='stop'`` (default) ends the run with a :class:`TrainingError`
naming the task (or weight) and the step, before anything non-finite is checkpointed;
``nonfinite='skip'`` drops such a step (no parameter or optimizer update; an outer step's update
of the weighting is undone) and counts it as ``skipped_steps`` in the logs and ``metrics.json``
(:class:`~auxframe.callbacks.NonFinite`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from auxframe.callbacks import (DATA_BOUND, METRICS_FILE, NONFINITE, Callback, StepRecord, TrainerControl, TrainerState,
                                check_callbacks, default_callbacks)
from auxframe.checkpoint import save_checkpoint
from auxframe.data.loader import BatchStream, EvalBatches, PoolLoader
from auxframe.errors import CheckpointError, TrainingError
from auxframe.strategy import Strategy, all_gradients
from auxframe.tasks import BatchGroup, TaskGraph, batch_groups
from auxframe.weighting.base import StepContext, TaskLosses, Weighting

__all__ = ["DATA_BOUND", "METRICS_FILE", "NONFINITE", "ResolvedTask", "Schedule", "Trainer", "check_same_graph"]


@dataclass
class ResolvedTask:
    """A task with its plugins resolved to callables.

    Attributes:
        name: task name.
        labels: dataset label field, or None for a signal task (for a generated-label task, the
            main task's field, which its generator reads).
        signal: self-supervised signal, or None.
        pool: split pool its training batches come from.
        loss: ``fn(output, target) -> unreduced loss``.
        metric: factory of a metric object (``update``/``compute``).
        num_outputs: the head's output size.
        generator: the task's :class:`~auxframe.labelgen.GeneratedLabels`, or None.
    """

    name: str
    labels: str | None
    signal: Any
    pool: str
    loss: Callable
    metric: Callable
    num_outputs: int
    generator: Any = None


@dataclass
class Schedule:
    """How long and how often: steps, batch sizes, and the log/eval/checkpoint intervals."""

    steps: int
    batch_size: int
    pool_batch_sizes: Mapping[str, int]
    eval_every: int
    eval_batch_size: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int


class Trainer:
    """Trains a multi-task model with a weighting algorithm.

    Args:
        model: the multi-task model (already on ``device``).
        graph: the task graph.
        tasks: resolved tasks by name.
        dataset: the dataset every pool indexes.
        split: the low-data split (``split.pool(name)`` gives indices).
        weighting: the weighting algorithm, already set up.
        optimizer: the model's optimizer.
        scheduler: an optional learning-rate scheduler stepped once per inner step.
        schedule: steps and intervals.
        device: where to train (ignored when ``strategy`` is given: its device is used).
        seed: seeds the data order and the signals' randomness.
        run_dir: where checkpoints, logs and metrics go (None: write nothing).
        loggers: objects with ``log(step, scalars)`` (and optionally ``summary``/``close``).
        progress: show a progress bar.
        checkpoint_extra: more entries for every checkpoint.
        nonfinite: ``'stop'`` or ``'skip'`` a step whose losses, weights, gradients or
            hypergradients are NaN or infinite (see the module docstring).
        num_workers: DataLoader worker processes that make the training and evaluation batches
            ahead of the step (0: in this process; see :mod:`auxframe.data.loader`).
        prefetch_factor: steps each worker has ready in advance.
        strategy: device, processes and precision (default: ``Strategy(device)``).
        callbacks: more callbacks (:class:`~auxframe.callbacks.Callback`), called after the
            trainer's own at every hook, and before the checkpoints are written.

    Example::

        trainer = Trainer(model, graph, tasks, dataset, split, weighting, optimizer, None, schedule,
                          torch.device("cpu"), run_dir="runs/a")
        summary = trainer.fit()          # {'test': ..., 'val': ..., 'best': {...}, ...}
    """

    def __init__(
        self,
        model: nn.Module,
        graph: TaskGraph,
        tasks: Mapping[str, ResolvedTask],
        dataset: Any,
        split: Any,
        weighting: Weighting,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        schedule: Schedule,
        device: torch.device,
        seed: int = 0,
        run_dir: str | Path | None = None,
        loggers: Sequence[Any] = (),
        progress: bool = True,
        checkpoint_extra: Mapping[str, Any] | None = None,
        nonfinite: str = "stop",
        num_workers: int = 0,
        prefetch_factor: int = 2,
        strategy: Strategy | None = None,
        callbacks: Sequence[Callback] = (),
    ):
        if nonfinite not in NONFINITE:
            raise TrainingError(f"train.nonfinite must be one of {NONFINITE}, got {nonfinite!r}.")
        self.strategy = strategy if strategy is not None else Strategy(device)
        self.model, self.graph, self.tasks = model, graph, dict(tasks)
        self.dataset, self.split, self.weighting = dataset, split, weighting
        self.optimizer, self.scheduler, self.schedule = optimizer, scheduler, schedule
        self.device, self.seed = self.strategy.device, seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.nonfinite = nonfinite
        self.state, self.control = TrainerState(), TrainerControl()
        self.callbacks = default_callbacks(nonfinite, loggers, progress, run_dir, callbacks)
        check_callbacks(self.callbacks)
        self.rank, self.world_size = self.strategy.rank, self.strategy.world_size
        self.writes = self.strategy.writes
        self.groups = batch_groups(graph, weighting.tasks_needed())
        self.loaders = {g.key: self._make_loader(g.pool, i, g.data) for i, g in enumerate(self.groups)}
        self.signal_rngs = {  # each rank draws its own signal randomness for its own images
            g.key: torch.Generator(device=self.device).manual_seed(seed * 7919 + i + 1_000_003 * self.rank)
            for i, g in enumerate(self.groups)
        }
        self.aux_loader = None
        if weighting.outer_every:
            self.aux_loader = self._make_loader("aux", len(self.groups))
        self._make_streams(num_workers, prefetch_factor)
        self.ctx = StepContext(
            step=0,
            model=model,
            shared_parameters=list(model.shared_parameters()),
            train_losses=lambda: self._next_train_losses(label_grad=True),
            aux_set_losses=self._next_aux_set_losses if self.aux_loader is not None else None,
            train_batch=self._next_train_batch,
            aux_set_batch=self._next_aux_set_batch if self.aux_loader is not None else None,
            make_losses=self._losses_from,
            backward=self.strategy.scaled_backward,
        )
        self._aux_names = [t.name for t in graph.aux]  # computed once, not on every step
        self._group_tasks = [g.tasks for g in self.groups]
        self.strategy.setup(model, weighting, optimizer)
        self._forward_model = model  # the inner step's forward runs the strategy's train_model

    @property
    def step(self) -> int:
        """Steps taken (``state.step``)."""
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = int(value)

    def callback(self, name: str) -> Callback:
        """The callback called ``name``.

        Raises:
            KeyError: naming the callbacks there are.
        """
        for cb in self.callbacks:
            if cb.name == name:
                return cb
        raise KeyError(f"no callback {name!r}; the trainer has {[cb.name for cb in self.callbacks]}")

    def call(self, hook: str, *args: Any) -> None:
        """Call ``on_<hook>(self, *args)`` on every callback that has it, in order."""
        for cb in self.callbacks:
            method = getattr(cb, f"on_{hook}", None)
            if method is not None:
                method(self, *args)

    def log(self, scalars: Mapping[str, float]) -> None:
        """One row of scalars at the current step, through the callbacks' ``on_log``."""
        self.call("log", scalars)

    # -- data ------------------------------------------------------------------------------------
    def _make_loader(self, pool: str, index: int, data: Any = None) -> PoolLoader:
        """A loader over a pool of the split, or over all of a task's own ``data``."""
        bs = self.schedule.pool_batch_sizes.get(pool, self.schedule.batch_size)
        seed = self.seed * 104_729 + index
        if data is not None:
            return PoolLoader(data, np.arange(len(data)), bs, seed=seed, name=f"{type(data).__name__} (all)",
                              rank=self.rank, world_size=self.world_size)
        return PoolLoader(self.dataset, self.split.pool(pool), bs, seed=seed, name=pool,
                          rank=self.rank, world_size=self.world_size)

    def _make_streams(self, num_workers: int, prefetch_factor: int) -> None:
        """The batch streams over the loaders: the training groups' (one DataLoader for all of
        them, so one set of workers), the auxiliary set's (one worker: it is drawn every
        ``outer_every`` steps), and evaluation's (per dataset, started at the first evaluation)."""
        self.train_stream = BatchStream(self.loaders, self.device, num_workers, prefetch_factor)
        self.aux_stream = None
        if self.aux_loader is not None:
            self.aux_stream = BatchStream({"aux": self.aux_loader}, self.device, min(num_workers, 1), prefetch_factor)
        self._eval_batches = EvalBatches(self.dataset, self.device, num_workers, prefetch_factor)

    def pop_data_wait(self) -> float:
        """Seconds the loop waited for training and auxiliary-set batches since the last call."""
        return self.train_stream.pop_wait() + (self.aux_stream.pop_wait() if self.aux_stream is not None else 0.0)

    def close_data(self) -> None:
        """Stop the data worker processes (a later draw starts them again)."""
        for stream in (self.train_stream, self.aux_stream, self._eval_batches):
            if stream is not None:
                stream.close()

    def _load_signal_rng(self, key: str, state: torch.Tensor) -> None:
        """Restore a signal's generator (on the training device) from a checkpoint."""
        try:
            self.signal_rngs[key].set_state(state)
        except RuntimeError as exc:  # a CPU generator's state is 5,056 bytes, a CUDA one's 16
            raise CheckpointError(
                f"the checkpoint's random state of '{key}' was saved on another kind of device than "
                f"{self.device.type} (signals draw on the training device); resume with the train.device "
                f"of the run that wrote it."
            ) from exc

    def _group_batch(self, group: BatchGroup, images: torch.Tensor, labels: dict, train: bool, rng=None,
                     label_grad: bool = False):
        """Inputs and per-task targets of one group's batch (applying its signal or label generator).

        The batch is moved to the device first (streams hand it out there already), so that signals
        run on the device. Generated labels carry gradients to their generator only with ``label_grad``
        (outer steps).
        """
        images = images.to(self.device, non_blocking=True)
        if group.signal is not None:
            images, target = group.signal(images, generator=rng, train=train)
            targets = {group.tasks[0]: target}
        else:
            targets = {t: labels[self.tasks[t].labels] for t in group.tasks}
        targets = {t: y.to(self.device, non_blocking=True) for t, y in targets.items()}
        for t in group.tasks:
            if self.tasks[t].generator is not None:
                targets[t] = self.tasks[t].generator(images, targets[t], train=train, grad=label_grad)
        return images, targets

    def prepare_batches(self, batches: Mapping[str, tuple], label_grad: bool = False
                        ) -> dict[tuple[str, ...], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Each group's inputs (after any signal) and per-task targets, on the device, given one
        raw batch per group: ``{group's tasks: (inputs, {task: targets})}``.

        Args:
            batches: one raw batch per group key.
            label_grad: generated labels carry gradients to their generators (for outer steps).
        """
        prepared = {}
        for g in self.groups:
            images, labels = batches[g.key]
            prepared[tuple(g.tasks)] = self._group_batch(g, images, labels, train=True, rng=self.signal_rngs[g.key],
                                                         label_grad=label_grad)
        return prepared

    def compute_losses(self, batches: Mapping[str, tuple], label_grad: bool = False) -> TaskLosses:
        """Unreduced losses of every needed task, given one raw batch per group.

        Args:
            batches: one raw batch per group key.
            label_grad: generated labels carry gradients to their generators (for outer steps).
        """
        outputs: dict[str, torch.Tensor] = {}
        targets: dict[str, torch.Tensor] = {}
        features: dict[str, torch.Tensor] = {}
        inputs: dict[str, torch.Tensor] = {}
        for tasks, (x, group_targets) in self.prepare_batches(batches, label_grad).items():
            group_outputs, group_features = self._forward_model(x, tasks=list(tasks), return_features=True)
            outputs.update(group_outputs)
            features.update(group_features)
            inputs.update({t: x for t in tasks})
            targets.update(group_targets)
        return self._losses_from(outputs, targets, features, inputs)

    def _losses_from(self, outputs, targets, features=None, inputs=None) -> TaskLosses:
        values = {t: self.tasks[t].loss(outputs[t], targets[t]) for t in outputs}
        return TaskLosses(
            values, self.graph.main.name, self._aux_names, self._group_tasks,
            outputs=outputs, from_outputs=lambda new, other=None: self._losses_from(new, targets if other is None else other),
            features=features, inputs=inputs, targets=targets,
        )

    def _next_train_losses(self, label_grad: bool = False) -> TaskLosses:
        return self.compute_losses(next(self.train_stream), label_grad=label_grad)

    def _next_train_batch(self) -> dict[tuple[str, ...], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The next training batch of every group, prepared (:meth:`prepare_batches`), without a
        forward pass."""
        return self.prepare_batches(next(self.train_stream))

    def _next_aux_set_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next auxiliary-set batch: inputs and the main task's targets, on the device."""
        images, labels = next(self.aux_stream)["aux"]
        return images, labels[self.tasks[self.graph.main.name].labels]

    def _next_aux_set_losses(self) -> TaskLosses:
        x, y = self._next_aux_set_batch()
        main = self.graph.main.name
        out = self.model(x, tasks=[main])
        return TaskLosses({main: self.tasks[main].loss(out[main], y)}, main, [], [[main]])

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until ``schedule.steps``, evaluate on validation and test, return the metrics."""
        start, state, control = time.perf_counter(), self.state, self.control
        self.call("fit_start")
        try:
            while state.step < self.schedule.steps and not control.stop:
                record = self.train_step()                # the inner step, and the outer step when due
                control.plan(state.step, self.schedule, self.strategy.check_each_step)
                state.interval.add(record)
                self.agree()                              # losses and stop flag, between ranks
                self.call("step_end", record)             # checks, logs, evaluation, checkpoints
        finally:
            self.call("teardown")
        if control.stop:
            saved = f"; checkpoint written to {control.saved}" if control.saved else ""
            raise KeyboardInterrupt(f"stopped at step {state.step}{saved}")
        return self.finish(time.perf_counter() - start)

    def train_step(self) -> StepRecord:
        """One inner step and, when due, the weighting's outer step; what they produced."""
        started = time.perf_counter()
        losses = self.inner_step()
        self.state.step += 1
        means = None if self.control.skip_step else losses.detached_means()
        del losses  # no graph of this step outlives it (an outer step may capture a CUDA graph)
        record = StepRecord(self.state.step, means, updated=self.control.weights_updated)
        if self.weighting.outer_every and self.state.step % self.weighting.outer_every == 0:
            record.updated = self.outer_step() or record.updated
        record.timings["step"] = time.perf_counter() - started
        record.timings["data"] = self.pop_data_wait()  # of it, waiting for batches
        return record

    def inner_step(self) -> TaskLosses:
        """One optimizer step on the weighted task losses; returns the step's losses."""
        if not self.model.training:
            self.model.train()
        self.ctx.step = self.state.step
        self.ctx.extras.clear()
        self.control.skip_step = False
        self._forward_model = self.strategy.train_model  # DDP, autocast, compile: the strategy decides
        try:
            losses = self._next_train_losses()
        finally:
            self._forward_model = self.model
        self.optimizer.zero_grad(set_to_none=True)
        self.strategy.backward(self.weighting, losses, self.ctx)
        self.call("before_optimizer_step", losses)  # the non-finite policy may drop the step
        if self.control.skip_step:  # no update of the parameters or the optimizer's state
            self.optimizer.zero_grad(set_to_none=True)
        self.strategy.optimizer_step(self.optimizer, skip=self.control.skip_step)
        if self.scheduler is not None:
            self.scheduler.step()
        self.control.weights_updated = not self.control.skip_step and bool(self.weighting.after_step(self.ctx))
        return losses

    def outer_step(self) -> bool:
        """The weighting's outer step, checked by the callbacks (a non-finite result stops the run
        or is undone). Returns whether it changed the weights."""
        self.control.outer_undone = False
        self.call("outer_step_start")
        updated = bool(self.weighting.outer_step(self.ctx))
        self.call("outer_step_end")
        return updated and not self.control.outer_undone

    def agree(self) -> None:
        """At a check: the interval's losses averaged over ranks and the stop flag agreed (one
        collective under torchrun). Between checks only a single process stops at once."""
        control, interval = self.control, self.state.interval
        if control.check:
            interval.agreed, control.stop = self.strategy.agree(interval.sums, control.stop_requested)
        else:
            control.stop = control.stop_requested and self.world_size == 1

    def finish(self, wall_time: float) -> dict[str, Any]:
        """Evaluate on validation and test, checkpoint, and return (and write) the summary."""
        results = {"val": self.evaluate("val"), "test": self.evaluate("test")}
        self.callback("evaluation").track(self, results["val"])
        self.log({**results["val"], **results["test"]})
        self.call("train_end")
        main, metric_name = self.graph.main.name, self.main_metric_name(results["test"])
        summary = {
            "main_task": main,
            "main_metric": metric_name,
            "higher_is_better": bool(getattr(self.tasks[main].metric, "higher_is_better", True)),  # for reports
            "test": results["test"][f"test/{main}/{metric_name}"],
            "val": results["val"][f"val/{main}/{metric_name}"],
            "steps": self.state.step,
            "wall_time_s": round(wall_time, 3),
            "skipped_steps": self.state.skipped_steps,
            "weights": self.weighting.weights(),
            "metrics": {**results["val"], **results["test"]},
        }
        self.call("fit_end", summary)  # the best state's metrics, metrics.json, the loggers' summaries
        return summary

    def main_metric_name(self, metrics: Mapping[str, float]) -> str:
        """The main task's metric among ``metrics`` (the first that is not its loss)."""
        prefix = f"/{self.graph.main.name}/"
        return next(k.rsplit("/", 1)[1] for k in metrics if prefix in k and not k.endswith("/loss"))

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, pool: str) -> dict[str, float]:
        """Per-task metrics and mean losses on a split pool, as ``{pool}/{task}/{metric}``."""
        was_training = self.model.training
        self.model.eval()
        groups = [g for g in batch_groups(self.graph) if g.data is None]  # other data has no val/test split
        tasks = [t for g in groups for t in g.tasks]
        metrics = {t: self.tasks[t].metric() for t in tasks}
        loss_sum = {t: 0.0 for t in tasks}
        count = {t: 0 for t in tasks}
        # each batch is read once (decoded once, in the workers) for every group
        for images, labels in self._eval_batches(self.split.pool(pool), self.schedule.eval_batch_size):
            for g in groups:
                x, targets = self._group_batch(g, images, labels, train=False)
                outputs = self.model(x, tasks=g.tasks)
                for t in g.tasks:
                    metrics[t].update(outputs[t], targets[t])
                    loss = self.tasks[t].loss(outputs[t], targets[t])
                    loss_sum[t] += float(loss.sum())
                    count[t] += loss.numel()
        out: dict[str, float] = {}
        for t in tasks:
            for name, value in metrics[t].compute().items():
                out[f"{pool}/{t}/{name}"] = float(value)
            out[f"{pool}/{t}/loss"] = loss_sum[t] / max(count[t], 1)
        self.model.train(was_training)
        return out

    # -- non-finite values -----------------------------------------------------------------------
    def finite_step(self, losses: TaskLosses) -> bool:
        """Whether this step's losses and gradients are finite on every rank (gradients that
        overflowed under the fp16 loss scale are the scale's business: it skips that step)."""
        grads = [] if self.strategy.overflowed() else all_gradients(self.optimizer)
        values = torch.stack([*losses.detached_means().values(), *torch._foreach_norm(grads)])
        return not self.strategy.any(not bool(torch.isfinite(values).all()))

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: model, optimizer, weighting, data, RNG, the loop's
        state and every callback's."""
        return {
            **self.state.state_dict(),
            "graph": self.graph.signature(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "weighting": self.weighting.state_dict(),
            "loaders": {k: v.state_dict() for k, v in self.loaders.items()},
            "aux_loader": self.aux_loader.state_dict() if self.aux_loader is not None else None,
            "signal_rngs": {k: g.get_state() for k, g in self.signal_rngs.items()},
            **self._per_rank_state(),
            "label_generators": {t: r.generator.state_dict() for t, r in self.tasks.items() if r.generator is not None},
            "rng": _rng_state(),
            "strategy": self.strategy.state_dict(),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            **self.checkpoint_extra,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_same_graph(state, self.graph)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.weighting.load_state_dict(state["weighting"])
        for k, v in state["loaders"].items():
            self.loaders[k].load_state_dict(v)
        if self.aux_loader is not None and state.get("aux_loader") is not None:
            self.aux_loader.load_state_dict(state["aux_loader"])
        by_rank = state.get("signal_rngs_by_rank") or [state["signal_rngs"]]
        if self.rank < len(by_rank):  # a rank the saved run did not have keeps its fresh seeding
            for k, s in by_rank[self.rank].items():
                self._load_signal_rng(k, s)
        for t, s in state.get("label_generators", {}).items():
            self.tasks[t].generator.load_state_dict(s)
        _set_rng_state(state["rng"])
        self.strategy.load_state_dict(state.get("strategy") or {})
        saved = dict(state.get("callbacks") or {})
        if "evaluation" not in saved and state.get("best") is not None:  # a checkpoint from before callbacks
            saved["evaluation"] = {"best": state["best"]}
        for cb in self.callbacks:
            if cb.name in saved:
                cb.load_state_dict(saved[cb.name])
        self.state.load_state_dict(state, self.device)

    def _per_rank_state(self) -> dict[str, Any]:
        """Under torchrun: every rank's signal RNG states (a collective; nothing in one process)."""
        if self.world_size == 1:
            return {}
        return {"signal_rngs_by_rank": self.strategy.gather({k: g.get_state() for k, g in self.signal_rngs.items()})}

    def save(self) -> Path | None:
        """Checkpoint (every rank takes part under torchrun; rank 0 writes). Returns the path written."""
        if self.run_dir is None:
            return None
        state = self.state_dict()
        if not self.writes:
            return None
        return save_checkpoint(self.run_dir, self.state.step, state, keep=self.schedule.keep_checkpoints)


def check_same_graph(state: Mapping[str, Any], graph: TaskGraph) -> None:
    """Refuse a checkpoint written for another task graph.

    Raises:
        CheckpointError: naming both graphs and the fix.
    """
    if state.get("graph") != graph.signature():
        raise CheckpointError(
            f"the checkpoint was written for another task graph ({_describe_graph(state.get('graph'))}); "
            f"this run's graph is {_describe_graph(graph.signature())}. Resume with the gin files of that "
            f"run, or start a new run directory."
        )


def _describe_graph(signature: Any) -> str:
    """A task-graph signature as ``tasks a (main, labels 'a', pool 'labeled'), b (...)``."""
    try:
        return "tasks " + ", ".join(
            f"{name} ({'main, ' if name == signature['main'] else ''}labels '{source}', pool '{pool}'"
            + (f", data {data}" if data else "") + ")"
            for name, source, pool, data in signature["tasks"]
        )
    except (TypeError, KeyError, ValueError):
        return repr(signature)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
