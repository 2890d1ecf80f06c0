"""The generic training loop: inner steps, optional outer steps, evaluation, logs and checkpoints.

``Trainer.fit`` reads top to bottom: for each step, :meth:`Trainer.inner_step` computes every
task's unreduced loss on its batch, the weighting turns them into gradients, the optimizer steps;
every ``outer_every`` steps the weighting takes its outer step; logs, evaluation and checkpoints
happen on their own schedules. The trainer knows nothing about any particular weighting method.

Under ``torchrun`` (see :mod:`auxframe.distributed`) every process runs this same loop on its
shard of each global batch. The standard inner step (a weighting that only defines ``combine``)
goes through ``DistributedDataParallel``; a weighting that writes gradients itself has the model's
gradients averaged after its ``backward``. Loss means, the stop flag and the finiteness checks are
agreed between processes; only rank 0 logs and writes files.

Non-finite values: ``nonfinite='stop'`` (default) ends the run with a :class:`TrainingError`
naming the task (or weight) and the step, before anything non-finite is checkpointed;
``nonfinite='skip'`` drops such a step (no parameter or optimizer update; an outer step's update
of the weighting is undone) and counts it as ``skipped_steps`` in the logs and ``metrics.json``.
"""

from __future__ import annotations

import copy
import json
import math
import random
import signal as signal_module
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from auxframe import distributed
from auxframe.checkpoint import save_checkpoint
from auxframe.data.loader import BatchStream, EvalBatches, PoolLoader
from auxframe.errors import CheckpointError, TrainingError
from auxframe.tasks import BatchGroup, TaskGraph, batch_groups
from auxframe.weighting.base import StepContext, TaskLosses, Weighting

METRICS_FILE = "metrics.json"
NONFINITE = ("stop", "skip")
#: The share of the step spent waiting for batches from which the progress bar says a run is data-bound.
DATA_BOUND = 0.2


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
        device: where to train.
        seed: seeds the data order and the signals' randomness.
        run_dir: where checkpoints, logs and metrics go (None: write nothing).
        loggers: objects with ``log(step, scalars)`` (and optionally ``summary``/``close``).
        progress: show a progress bar.
        nonfinite: ``'stop'`` or ``'skip'`` a step whose losses, weights, gradients or
            hypergradients are NaN or infinite (see the module docstring).
        num_workers: DataLoader worker processes that make the training and evaluation batches
            ahead of the step (0: in this process; see :mod:`auxframe.data.loader`).
        prefetch_factor: steps each worker has ready in advance.
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
    ):
        if nonfinite not in NONFINITE:
            raise TrainingError(f"train.nonfinite must be one of {NONFINITE}, got {nonfinite!r}.")
        self.model, self.graph, self.tasks = model, graph, dict(tasks)
        self.dataset, self.split, self.weighting = dataset, split, weighting
        self.optimizer, self.scheduler, self.schedule = optimizer, scheduler, schedule
        self.device, self.seed = device, seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.loggers, self.progress = list(loggers), progress
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.nonfinite, self.skipped_steps, self.last_step_skipped = nonfinite, 0, False
        self.weights_updated = False  # the weighting's after_step said a periodic update changed the weights
        self.step = 0
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.writes = self.rank == 0  # logs, progress bar and files come from rank 0 only
        self.groups = batch_groups(graph, weighting.tasks_needed())
        self.loaders = {g.key: self._make_loader(g.pool, i, g.data) for i, g in enumerate(self.groups)}
        self.signal_rngs = {  # each rank draws its own signal randomness for its own images
            g.key: torch.Generator(device=device).manual_seed(seed * 7919 + i + 1_000_003 * self.rank)
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
        )
        self._stop_requested = False
        self.best: dict[str, Any] | None = None
        self._aux_names = [t.name for t in graph.aux]  # computed once, not on every step
        self._group_tasks = [g.tasks for g in self.groups]
        self._forward_model = self._inner_model = model
        self._synced_parameters: list[nn.Parameter] = []  # gradients averaged over ranks after backward
        if self.world_size > 1:
            self._setup_distributed()

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
    def inner_step(self) -> TaskLosses:
        """One optimizer step on the weighted task losses; returns the step's losses."""
        if not self.model.training:
            self.model.train()
        self.ctx.step = self.step
        self.ctx.extras.clear()
        self._forward_model = self._inner_model  # DistributedDataParallel's wrapper under torchrun
        try:
            losses = self._next_train_losses()
        finally:
            self._forward_model = self.model
        self.optimizer.zero_grad(set_to_none=True)
        self.weighting.backward(losses, self.ctx)
        if self._synced_parameters:
            distributed.all_reduce_mean([p.grad for p in self._synced_parameters if p.grad is not None])
        self.last_step_skipped = self.nonfinite == "skip" and not self._finite_step(losses)
        if self.last_step_skipped:  # no update of the parameters or the optimizer's state
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.weights_updated = not self.last_step_skipped and bool(self.weighting.after_step(self.ctx))
        return losses

    def outer_step(self) -> bool:
        """The weighting's outer step, checked: a non-finite result stops the run, or is undone.

        Returns:
            Whether it changed the weights (the weighting's answer; False when undone).
        """
        saved = copy.deepcopy(self.weighting.state_dict()) if self.nonfinite == "skip" else None
        updated = bool(self.weighting.outer_step(self.ctx))
        bad = self._nonfinite_weighting()
        if not bad:
            return updated
        if saved is None:
            raise TrainingError(
                f"the outer step after step {self.step} left non-finite values in the weighting "
                f"({'; '.join(bad)}): a NaN or infinite hypergradient or weight. Lower the outer learning "
                f"rate, clip the hypergradient, or set train.nonfinite = 'skip'; the last checkpoint is kept."
            )
        self.weighting.load_state_dict(saved)
        self.skipped_steps += 1
        return False

    def fit(self) -> dict[str, Any]:
        """Train until ``schedule.steps``, evaluate on validation and test, return the metrics."""
        s = self.schedule
        start_time = time.perf_counter()
        bar = self._progress_bar()
        acc: dict[str, torch.Tensor] = {}
        acc_n, interval_start = 0, time.perf_counter()
        last_val: dict[str, float] = {}
        each_step = self.device.type == "cpu"  # checks are free on CPU; on GPU they would sync every step
        stop = False
        with _StopOnSignal(self):
            while self.step < s.steps and not stop:
                losses = self.inner_step()
                self.step += 1
                means = None if self.last_step_skipped else losses.detached_means()
                del losses  # no graph of this step outlives it (an outer step may capture a CUDA graph)
                updated = self.weights_updated
                if self.weighting.outer_every and self.step % self.weighting.outer_every == 0:
                    updated = self.outer_step() or updated
                if means is not None:
                    for t, v in means.items():
                        acc[t] = acc[t] + v if t in acc else v
                    acc_n += 1
                log_now = self.step % s.log_every == 0 or self.step == s.steps
                save_now = bool(s.checkpoint_every) and self.step % s.checkpoint_every == 0
                stop = self._stop_requested
                if each_step or log_now or save_now:  # before anything is logged or checkpointed
                    interval, stop = self._agree(acc, self._stop_requested)
                    when = f"at step {self.step}" if each_step else f"between steps {self.step - acc_n + 1} and {self.step}"
                    self._check_finite(interval, when)
                elif self.world_size > 1:
                    stop = False  # the ranks agree on stopping only when they compare notes
                if log_now:
                    scalars = self._train_scalars(interval, acc_n, time.perf_counter() - interval_start)
                    self._check_weights(scalars)
                    self._log(scalars)
                    if bar is not None:
                        bar.set_postfix_str(self._postfix(scalars, last_val), refresh=False)
                    acc, acc_n, interval_start = {}, 0, time.perf_counter()
                elif updated:  # a periodic update gets its own log row
                    scalars = self.weighting.log_values()
                    self._check_weights(scalars)
                    self._log(scalars)
                if s.eval_every and self.step % s.eval_every == 0 and self.step < s.steps:
                    last_val = self.evaluate("val")
                    self._track_best(last_val)
                    self._log(last_val)
                if save_now:
                    self.save()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        if stop:
            path = self.save()
            raise KeyboardInterrupt(f"stopped at step {self.step}" + (f"; checkpoint written to {path}" if path else ""))
        return self._finish(time.perf_counter() - start_time)

    def _finish(self, wall_time: float) -> dict[str, Any]:
        results = {"val": self.evaluate("val"), "test": self.evaluate("test")}
        self._track_best(results["val"])
        self._log({**results["val"], **results["test"]})
        self.save()
        main, metric_name = self.graph.main.name, self._main_metric_name(results["test"])
        summary = {
            "main_task": main,
            "main_metric": metric_name,
            "higher_is_better": bool(getattr(self.tasks[main].metric, "higher_is_better", True)),  # for reports
            "test": results["test"][f"test/{main}/{metric_name}"],
            "val": results["val"][f"val/{main}/{metric_name}"],
            "steps": self.step,
            "best": self._best_summary(results, metric_name),
            "wall_time_s": round(wall_time, 3),
            "skipped_steps": self.skipped_steps,
            "weights": self.weighting.weights(),
            "metrics": {**results["val"], **results["test"]},
        }
        if self.run_dir is not None and self.writes:
            _write_json_atomic(self.run_dir / METRICS_FILE, summary)
        for lg in self.loggers:
            if hasattr(lg, "summary"):
                lg.summary({k: v for k, v in summary.items() if k != "metrics"})
        return summary

    # -- choosing the checkpoint on validation ----------------------------------------------------
    def _main_metric_name(self, metrics: Mapping[str, float]) -> str:
        prefix = f"/{self.graph.main.name}/"
        return next(k.rsplit("/", 1)[1] for k in metrics if prefix in k and not k.endswith("/loss"))

    def _track_best(self, val: Mapping[str, float]) -> None:
        """Keep the model state with the best main-task validation metric seen at an evaluation."""
        name = self._main_metric_name(val)
        value = val[f"val/{self.graph.main.name}/{name}"]
        sign = 1.0 if getattr(self.tasks[self.graph.main.name].metric, "higher_is_better", True) else -1.0
        if self.best is None or sign * value > sign * self.best["val"]:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best = {"step": self.step, "val": value, "model": state}

    def _best_summary(self, final: Mapping[str, Any], metric_name: str) -> dict[str, Any]:
        """Validation and test metrics of the best-on-validation model state."""
        main = self.graph.main.name
        if self.best["step"] == self.step:
            test = final["test"]
        else:
            current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self.best["model"])
            test = self.evaluate("test")
            self.model.load_state_dict(current)
        return {"step": self.best["step"], "val": self.best["val"], "test": test[f"test/{main}/{metric_name}"]}

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

    # -- agreement between processes and non-finite values ----------------------------------------
    def _agree(self, acc: dict[str, torch.Tensor], stop: bool) -> tuple[dict[str, torch.Tensor], bool]:
        """The interval's loss sums averaged over ranks, and whether any rank was asked to stop.

        One collective under torchrun; in a single process, ``acc`` and ``stop`` as they are.
        """
        if self.world_size == 1:
            return acc, stop
        keys = list(acc)
        flat = torch.stack([*(acc[k].float() for k in keys), torch.tensor(float(stop), device=self.device)])
        distributed.all_reduce_mean([flat])
        return dict(zip(keys, flat[:-1])), bool(flat[-1] > 0)

    def _finite_step(self, losses: TaskLosses) -> bool:
        """Whether this step's losses and gradients are finite on every rank (``nonfinite='skip'``)."""
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        values = torch.stack([*losses.detached_means().values(), *torch._foreach_norm(grads)])
        return not distributed.all_reduce_any(not bool(torch.isfinite(values).all()), self.device)

    def _nonfinite_weighting(self) -> list[str]:
        """Non-finite task weights and tensors of the weighting's state, by name."""
        bad = [f"weight of '{t}' = {w}" for t, w in self.weighting.weights().items() if not math.isfinite(w)]
        return bad + [f"{name} is not finite" for name in _nonfinite_tensors(self.weighting.state_dict())]

    def _check_weights(self, scalars: Mapping[str, float]) -> None:
        """Stop when a task weight is NaN or infinite, naming the task and the step."""
        bad = [f"'{k[7:]}' ({v})" for k, v in scalars.items() if k.startswith("weight/") and not math.isfinite(v)]
        if bad:
            raise TrainingError(
                f"the weight of task {', '.join(bad)} is not finite at step {self.step}. Lower the learning "
                f"rates of the weighting or check its inputs; the last checkpoint is kept."
            )

    # -- logging ---------------------------------------------------------------------------------
    def _check_finite(self, means: Mapping[str, torch.Tensor], when: str) -> None:
        """Stop when a task loss is NaN or infinite, naming the task and the step (or steps)."""
        if not means:  # every step of the interval was skipped
            return
        values = torch.stack(list(means.values()))
        if bool(torch.isfinite(values).all()):
            return
        bad = [f"'{t}' ({float(v)})" for t, v in means.items() if not math.isfinite(float(v))]
        raise TrainingError(
            f"the loss of task {', '.join(bad)} is not finite {when}. Lower the learning "
            f"rate or check the data and the loss; the last checkpoint is kept."
        )

    def _train_scalars(self, acc: dict, n: int, seconds: float) -> dict[str, float]:
        n = max(n, 1)
        scalars = {f"train/{t}/loss": float(v) / n for t, v in acc.items()}
        scalars.update(self.weighting.log_values())
        scalars["time/step"] = 1000.0 * seconds / n  # ms per step, and of it waiting for batches:
        scalars["time/data"] = 1000.0 * self.pop_data_wait() / n
        scalars["train/lr"] = self.optimizer.param_groups[0]["lr"]
        if self.nonfinite == "skip":
            scalars["train/skipped_steps"] = self.skipped_steps
        return scalars

    def _log(self, scalars: Mapping[str, float]) -> None:
        for lg in self.loggers:
            lg.log(self.step, scalars)

    def _progress_bar(self):
        if not self.progress or not self.writes:
            return None
        from tqdm.auto import tqdm

        import sys

        interactive = sys.stderr.isatty()
        return tqdm(total=self.schedule.steps, initial=self.step, desc="train", unit="step",
                    dynamic_ncols=True, mininterval=0.1 if interactive else 15.0)

    def _postfix(self, scalars: Mapping[str, float], last_val: Mapping[str, float]) -> str:
        main = self.graph.main.name
        parts = [f"loss={scalars[f'train/{main}/loss']:.3f}"]
        val = [(k.split("/")[-1], v) for k, v in last_val.items() if k.startswith(f"val/{main}/") and not k.endswith("/loss")]
        if val:
            parts.append(f"val_{val[0][0][:3]}={val[0][1]:.3f}")
        ws = self.weighting.weights()
        if ws:
            parts.append("w=" + ",".join(f"{t}:{w:.2g}" for t, w in ws.items()))
        share = scalars.get("time/data", 0.0) / max(scalars.get("time/step", 0.0), 1e-9)
        if share >= DATA_BOUND:
            parts.append(f"data-bound: {share:.0%} of the step waits for batches (raise train.num_workers)")
        return " ".join(parts)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: model, optimizer, weighting, data, RNG, step."""
        return {
            "step": self.step,
            "graph": self.graph.signature(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "weighting": self.weighting.state_dict(),
            "loaders": {k: v.state_dict() for k, v in self.loaders.items()},
            "aux_loader": self.aux_loader.state_dict() if self.aux_loader is not None else None,
            "signal_rngs": {k: g.get_state() for k, g in self.signal_rngs.items()},
            **self._per_rank_state(),
            "skipped_steps": self.skipped_steps,
            "label_generators": {t: r.generator.state_dict() for t, r in self.tasks.items() if r.generator is not None},
            "rng": _rng_state(),
            "best": self.best,
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
                self.signal_rngs[k].set_state(s)
        self.skipped_steps = int(state.get("skipped_steps", 0))
        for t, s in state.get("label_generators", {}).items():
            self.tasks[t].generator.load_state_dict(s)
        _set_rng_state(state["rng"])
        self.best = state.get("best")
        self.step = int(state["step"])

    def _per_rank_state(self) -> dict[str, Any]:
        """Under torchrun: every rank's signal RNG states (a collective; nothing in one process)."""
        if self.world_size == 1:
            return {}
        return {"signal_rngs_by_rank": distributed.gather_objects({k: g.get_state() for k, g in self.signal_rngs.items()})}

    def save(self) -> Path | None:
        """Checkpoint (every rank takes part under torchrun; rank 0 writes). Returns the path written."""
        if self.run_dir is None:
            return None
        state = self.state_dict()
        if not self.writes:
            return None
        return save_checkpoint(self.run_dir, self.step, state, keep=self.schedule.keep_checkpoints)

    def _setup_distributed(self) -> None:
        """Under torchrun: DistributedDataParallel for the standard inner step; else averaged gradients.

        A weighting that only defines ``combine`` trains through DDP's wrapper (gradients reduced in
        buckets during backward; heads of tasks the weighting does not compute are left out of
        it). A weighting that writes gradients itself (overrides ``backward``) bypasses DDP's hooks,
        so the trainer averages the model's gradients after its ``backward``. The weighting's own
        inner parameters (e.g. learned log-variances) are averaged in both cases.
        """
        from torch.nn.parallel import DistributedDataParallel

        own = list(self.weighting.inner_parameters())
        if type(self.weighting).backward is not Weighting.backward:
            self._synced_parameters = [p for p in self.model.parameters() if p.requires_grad] + own
            return
        needed = set(self.weighting.tasks_needed())
        unused = [f"heads.{t}.{n}" for t, head in self.model.heads.items() if t not in needed
                  for n, _ in head.named_parameters()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, unused)
        self._inner_model = DistributedDataParallel(
            self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
        )
        self._synced_parameters = own


class _StopOnSignal:
    """On SIGTERM/SIGINT, let the current step finish, then checkpoint and stop."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.previous: dict[int, Any] = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal_module.SIGTERM, signal_module.SIGINT):
                self.previous[sig] = signal_module.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.trainer._stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.trainer._stop_requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal_module.signal(sig, handler)
        return False


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


def _nonfinite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Paths of floating-point tensors holding NaN or Inf in a nested state dict."""
    if isinstance(state, torch.Tensor):
        return [prefix or "value"] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, Mapping):
        return [p for k, v in state.items() for p in _nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(state, (list, tuple)):
        return [p for i, v in enumerate(state) for p in _nonfinite_tensors(v, f"{prefix}[{i}]")]
    return []


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


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
