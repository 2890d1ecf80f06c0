"""The injection root: ``train`` builds an experiment from gin and runs it.

``train`` is the one ``@gin.configurable`` function; everything else it receives (dataset, split,
tasks, backbone, weighting, optimizer) is built by gin from registered classes and plugins. Order:

1. check the run directory (before any work), 2. build data, tasks and model and validate them with
one dry forward pass per batch group, 3. only then create the run directory and write the config,
4. train, evaluate, write ``metrics.json``.

A failure in steps 1-2 leaves nothing on disk.

Under ``torchrun`` every process runs ``train``: rank 0 alone checks, locks and writes the run
directory and reads the checkpoint to resume, and shares what it found (or its error) with the
others (see :mod:`auxframe.distributed`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gin
import numpy as np
import torch
import torch.nn as nn

from auxframe import distributed, rundir
from auxframe.callbacks import Callback
from auxframe.data.field_tasks import field_tasks
from auxframe.data.loader import default_num_workers
from auxframe.data.splits import LowDataSplit
from auxframe.errors import ConfigError, TaskGraphError
from auxframe.labelgen import build_generated_labels
from auxframe.loggers import ScalarLog, WandbLogger, gin_bindings, run_tags
from auxframe.models.multitask import MultiTaskModel
from auxframe.registry import registry
from auxframe.tasks import Task, TaskGraph, batch_groups
from auxframe.strategy import Strategy
from auxframe.trainer import ResolvedTask, Schedule, Trainer, check_same_graph
from auxframe.testing import dry
from auxframe.weighting.base import TaskLosses, Weighting, WeightingSetup


@gin.configurable(denylist=["run_dir", "resume", "dry_run", "job_type"])
def train(
    run_dir: str | Path | None = None,
    resume: bool = False,
    dry_run: bool = False,
    job_type: str = "train",
    *,
    dataset: Any = None,
    tasks: TaskGraph | None = None,
    backbone: Callable[..., nn.Module] | None = None,
    split: LowDataSplit | None = None,
    weighting: Weighting | None = None,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    scheduler: Callable[..., Any] | None = None,
    steps: int = 1_000,
    batch_size: int = 32,
    pool_batch_sizes: Mapping[str, int] | None = None,
    eval_every: int = 0,
    eval_batch_size: int = 512,
    log_every: int = 10,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 3,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    nonfinite: str = "stop",
    sync_batchnorm: bool | None = None,
    num_workers: int | str = "auto",
    prefetch_factor: int = 2,
    precision: str = "fp32",
    tf32: bool = True,
    channels_last: bool = False,
    compile: bool | str = False,
    cudnn_benchmark: bool | None = None,
    deterministic: bool = False,
    wandb: WandbLogger | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Build the experiment described by the gin config and train it.

    Args:
        run_dir: where the run's files go (None: train without writing anything).
        resume: continue the run in ``run_dir`` from its latest checkpoint.
        dry_run: check ``run_dir`` (if given), build and validate everything (the dry forward
            included), then return what was built (:func:`dry_run_summary`) without training or
            writing anything.
        job_type: what started the run, for W&B: ``'train'``, ``'sweep'`` or ``'probe'``.
        dataset: the dataset, e.g. ``@datasets.digits()``.
        tasks: the task graph, ``@TaskGraph()``.
        backbone: backbone factory, e.g. ``@backbones.small_cnn`` (called with ``input_shape``).
        split: the low-data splitter, ``@LowDataSplit()`` (default: its defaults).
        weighting: the weighting algorithm, e.g. ``@weightings.equal()`` (default: equal).
        optimizer: optimizer factory, e.g. ``@torch.optim.Adam`` (default: Adam, lr 1e-3).
        scheduler: optional learning-rate scheduler factory taking the optimizer, stepped per step.
        steps: number of inner steps.
        batch_size: batch size of every pool.
        pool_batch_sizes: per-pool overrides, e.g. ``{'train': 128}`` for a self-supervised task.
        eval_every: evaluate on the validation split every this many steps (0: only at the end).
        eval_batch_size: batch size for evaluation.
        log_every: log training scalars every this many steps.
        checkpoint_every: checkpoint every this many steps (0: only at the end).
        keep_checkpoints: how many checkpoints to keep.
        seed: seeds model initialisation, data order and signals (the split has its own seed).
        device: ``'auto'`` (CUDA when present, else CPU), ``'cpu'``, ``'cuda'``, ``'cuda:1'``, ...
        progress: show a progress bar.
        nonfinite: what a NaN or infinite loss, weight, gradient or hypergradient does: ``'stop'``
            the run (naming the task and the step; the last checkpoint is kept) or ``'skip'`` the
            step (no update; counted as ``skipped_steps`` in the logs and ``metrics.json``).
        sync_batchnorm: under torchrun, convert BatchNorm layers to SyncBatchNorm so that batch
            statistics are those of the global batch. Default (None): on GPUs, unless the weighting
            takes outer steps (their second derivatives cannot pass through SyncBatchNorm).
        num_workers: DataLoader worker processes per training process that make the batches ahead
            of the step (reading, decoding, per-image augmentation); ``'auto'``: on a GPU one per CPU
            core but one (at most 8), on the CPU none up to 4 cores (workers would compete with the
            training threads) and one per 4 cores beyond. 0: batches are made in the training
            process. See README, "The data path".
        prefetch_factor: steps each worker has ready in advance.
        precision: the inner step's forward in ``'fp32'``, ``'bf16'`` or ``'fp16'`` (autocast; fp16
            with a loss scale). Losses, outer steps (AuxiLearn's hypergradient), forward-mode JVPs
            and evaluation stay fp32; see :mod:`auxframe.strategy` and README, "Precision and speed".
        tf32: let fp32 matrix products and convolutions use TF32 on Ampere and later GPUs.
        channels_last: NHWC memory format for the convolutions (often faster with bf16/fp16 on GPUs).
        compile: ``torch.compile`` the inner step's forward (True, or a backend name such as
            ``'aot_eager'``); a weighting that differentiates the step's graph twice runs eagerly.
        cudnn_benchmark: let cuDNN time its algorithms and keep the fastest (None: on CUDA unless
            ``deterministic``).
        deterministic: deterministic algorithms (with cuDNN and cuBLAS), so that a resumed run on a
            GPU is bit-identical to an uninterrupted one; an operation without a deterministic
            implementation warns, naming itself.
        wandb: the W&B logger settings (default: offline, project ``auxframe``).
        callbacks: more trainer callbacks (:class:`auxframe.callbacks.Callback`), e.g.
            ``[@MyCallback()]`` after ``gin.register(MyCallback)``; their state is checkpointed.

    Returns:
        The final metrics (also written to ``run_dir/metrics.json``).
    """
    _require(dataset, "dataset", "@datasets.digits()", "datasets/digits.gin")
    _require(tasks, "tasks", "@TaskGraph()", "tasks/digits_attributes.gin")
    _require(backbone, "backbone", "@backbones.small_cnn", "models/small_cnn.gin")
    _check_positive(steps=steps, batch_size=batch_size, log_every=log_every, eval_batch_size=eval_batch_size)
    strategy = Strategy(resolve_device(device), sync_batchnorm=sync_batchnorm, precision=precision, tf32=tf32,
                        channels_last=channels_last, compile=compile, cudnn_benchmark=cudnn_benchmark,
                        deterministic=deterministic)
    run: rundir.RunDir | None = None  # rank 0's handle on the run directory
    loggers: list[Any] = []
    trainer: Trainer | None = None

    def open_run_dir() -> dict[str, Any] | None:
        nonlocal run
        run = rundir.RunDir(run_dir, resume, gin.config_str())
        return run.resume_state()

    try:  # the run directory's lock and the loggers are released however the run ends
        resume_state = distributed.share_from_main(open_run_dir) if run_dir is not None else None
        if resume_state is not None:
            check_same_graph(resume_state, tasks)

        device_ = strategy.device
        seed_everything(seed)
        dry.check_dataset_for_run(dataset)  # the kit's shape checks, before the split reads it
        split_ = (split or gin.get_configurable(LowDataSplit)())(dataset)  # LowDataSplit.* bindings apply
        resolved = resolve_tasks(tasks, dataset)
        weighting = weighting if weighting is not None else registry.get("weightings", "equal")()
        model = strategy.prepare_model(build_model(backbone, tasks, resolved, dataset), weighting)
        generators = {name: r.generator.to(device_) for name, r in resolved.items() if r.generator is not None}
        schedule = Schedule(steps, batch_size, dict(pool_batch_sizes or {}), eval_every, eval_batch_size,
                            log_every, checkpoint_every, keep_checkpoints)
        main_pool = len(split_.pool(tasks.main.pool))  # PoolLoader drops each epoch's ragged end:
        main_batch = min(schedule.pool_batch_sizes.get(tasks.main.pool, batch_size), main_pool)
        setup = WeightingSetup(
            main_task=tasks.main.name, aux_tasks=[t.name for t in tasks.aux], model=model,
            shared_parameters=model.shared_parameters(), device=device_, total_steps=steps,
            steps_per_epoch=main_pool // max(main_batch, 1),  # (an empty pool fails in its loader)
            has_aux_set=len(split_.aux) > 0, label_generators=generators,
        )
        weighting.setup(setup)
        dry.check_weighting_for_run(weighting, setup, lambda needed: dry_losses(model, tasks, resolved, dataset, needed))
        if weighting.outer_every and len(split_.aux) == 0:
            raise ConfigError(
                f"weighting {type(weighting).__name__} takes outer steps on the held-out auxiliary set, but the "
                f"split has none. Set `LowDataSplit.aux_per_class` (e.g. 5) or `LowDataSplit.aux_fraction`."
            )
        optimizer_ = (optimizer or gin.get_configurable("torch.optim.Adam"))(
            list(model.parameters()) + list(weighting.inner_parameters())
        )
        scheduler_ = scheduler(optimizer_) if scheduler is not None else None
        if dry_run:
            return dry_run_summary(tasks, split_, model, weighting, device_, steps, run_dir)

        wandb_logger = wandb or WandbLogger()
        if run is not None:
            run.create(device_, strategy.world_size)
            loggers.append(ScalarLog(run.path))
            wandb_id = wandb_logger.start(run.path, run.path.name, gin_bindings(gin.operative_config_str()), run.wandb_id(),
                                          group=run.group, job_type=job_type,
                                          tags=run_tags(gin.config_str(), tasks.main.name, [t.name for t in tasks.aux]))
            run.record_wandb_id(wandb_id)
            loggers.append(wandb_logger)
        trainer = Trainer(
            model, tasks, resolved, dataset, split_, weighting, optimizer_, scheduler_, schedule, device_,
            seed=seed, run_dir=run_dir, loggers=loggers, progress=progress, nonfinite=nonfinite,
            num_workers=resolve_num_workers(num_workers, device_), prefetch_factor=prefetch_factor,
            strategy=strategy, callbacks=callbacks,
        )
        if resume_state is not None:
            trainer.load_state_dict(resume_state)
        if run is not None:
            run.write_operative_config()
        result = trainer.fit()
        if run is not None:
            run.write_operative_config()
        if run_dir is not None:
            result["run_dir"] = str(run_dir)
        return result
    finally:
        if trainer is not None:
            trainer.close_data()  # the data workers, however the run ends
        for lg in loggers:
            lg.close()
        if run is not None:
            run.release()
        strategy.close()


def dry_run_summary(graph: TaskGraph, split: Any, model: nn.Module, weighting: Weighting, device: torch.device,
                    steps: int, run_dir: str | Path | None) -> dict[str, Any]:
    """What ``train(dry_run=True)`` built: tasks, pool sizes, parameter count, weighting, device."""
    return {
        "dry_run": True, "main_task": graph.main.name, "aux_tasks": [t.name for t in graph.aux],
        "pools": split.sizes(), "parameters": sum(p.numel() for p in model.parameters()),
        "weighting": type(weighting).__name__, "device": str(device), "steps": steps,
        "run_dir": str(run_dir) if run_dir is not None else None,
    }


# -- building blocks (usable from Python without gin) -----------------------------------------------
def resolve_device(device: str) -> torch.device:
    """``'auto'`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = '{device}' but CUDA is not available; use 'auto' or 'cpu'.")
    return dev


def resolve_num_workers(num_workers: int | str, device: torch.device) -> int:
    """``train.num_workers``: ``'auto'`` (:func:`auxframe.data.loader.default_num_workers`) or a count."""
    if num_workers == "auto":
        import os

        return default_num_workers(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"train.num_workers must be 'auto' or a whole number >= 0, got {num_workers!r}.")
    return num_workers


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _plugin(kind: str, value: Any) -> Any:
    return registry.get(kind, value) if isinstance(value, str) else value


def resolve_tasks(graph: TaskGraph, dataset: Any) -> dict[str, ResolvedTask]:
    """Resolve every task's plugins and output size against the dataset."""
    out = {}
    for t in graph.tasks:
        data = t.data if t.data is not None else dataset
        if t.data is not None and tuple(t.data.input_shape) != tuple(dataset.input_shape):
            raise TaskGraphError(
                f"task '{t.name}' has data of image shape {tuple(t.data.input_shape)}, but the main "
                f"dataset's images are {tuple(dataset.input_shape)}; the shared backbone needs one shape. "
                f"Resize one of them (e.g. with the dataset's transform parameters)."
            )
        generator = None
        if t.generator is not None:
            field = graph.main.labels
            generator = build_generated_labels(t.generator, t.name, dataset.input_shape, data.fields[field].num_classes)
            num_outputs = generator.num_outputs
        elif t.labels is not None:
            if t.labels not in data.fields:
                raise TaskGraphError(
                    f"task '{t.name}' reads labels '{t.labels}', which {type(data).__name__} does not "
                    f"have; its label fields are: {', '.join(sorted(data.fields))}."
                )
            num_outputs = data.fields[t.labels].num_outputs
        else:
            num_outputs = getattr(t.signal, "num_classes", None)
            if not isinstance(num_outputs, int):
                raise TaskGraphError(f"signal of task '{t.name}' has no integer `num_classes` attribute.")
        out[t.name] = ResolvedTask(
            t.name, t.labels if generator is None else graph.main.labels, t.signal, t.pool,
            _plugin("losses", t.loss), _plugin("metrics", t.metric), num_outputs, generator,
        )
    return out


def build_model(backbone: Callable, graph: TaskGraph, tasks: Mapping[str, ResolvedTask], dataset: Any) -> MultiTaskModel:
    """Backbone + one head per task, checked by one dry forward pass per batch group."""
    net = backbone(input_shape=tuple(dataset.input_shape))
    if not isinstance(net, nn.Module):
        raise ConfigError(f"the backbone factory {backbone!r} returned {type(net).__name__}, not an nn.Module.")
    feature_shape = _dry_forward(net, dataset.input_shape)
    heads = {}
    for t in graph.tasks:
        try:
            head = _plugin("heads", t.head)(feature_shape=feature_shape, num_outputs=tasks[t.name].num_outputs)
        except (ValueError, TypeError) as exc:  # a head that cannot read these features says why
            raise ConfigError(f"the head of task '{t.name}' cannot be built on the backbone's features "
                              f"{feature_shape}: {_cause(exc, with_type=False)}") from exc
        if not isinstance(head, nn.Module):
            raise ConfigError(f"the head of task '{t.name}' is {type(head).__name__}, not an nn.Module.")
        heads[t.name] = head
    model = MultiTaskModel(net, heads)
    validate_outputs(model, graph, tasks, dataset)
    return model


@torch.no_grad()
def _dry_forward(net: nn.Module, input_shape) -> tuple[int, ...]:
    was = net.training
    net.eval()
    try:
        feats = net(torch.zeros(2, *input_shape))
    except Exception as exc:
        raise ConfigError(f"the backbone fails on inputs of shape (B, {', '.join(map(str, input_shape))}): {exc}") from exc
    finally:
        net.train(was)
    return tuple(feats.shape[1:])


@torch.no_grad()
def validate_outputs(model: MultiTaskModel, graph: TaskGraph, tasks: Mapping[str, ResolvedTask], dataset: Any) -> None:
    """Check, before training, that every head's output fits its loss, labels and metric."""
    was = model.training
    model.eval()
    try:
        for names, x, targets in dry_batches(graph, tasks, dataset):
            outputs = model(x, tasks=names)
            for t in names:
                _check_task_output(t, outputs[t], targets[t], tasks[t], x.shape[0])
    finally:
        model.train(was)


def dry_batches(graph: TaskGraph, tasks: Mapping[str, ResolvedTask], dataset: Any, needed: list[str] | None = None,
                device: torch.device | None = None):
    """One small evaluation batch per batch group, as training makes them: ``(tasks, inputs, targets)``.

    The batch size equals no output size, so that a mismatch cannot pass by broadcasting.
    """
    batch = next(b for b in (3, 5, 7, 11, 13) if all(r.num_outputs != b for r in tasks.values()))
    for g in batch_groups(graph, needed):
        data = g.data if g.data is not None else dataset
        images, labels = data.get_batch(torch.arange(min(batch, len(data))))
        if device is not None:
            images, labels = images.to(device), {k: v.to(device) for k, v in labels.items()}
        x, targets = images, {t: labels[tasks[t].labels] for t in g.tasks if tasks[t].labels}
        for t in g.tasks:
            if tasks[t].generator is not None:
                targets[t] = tasks[t].generator(images, targets[t], train=False)
        if g.signal is not None:
            x, y = g.signal(images, generator=None, train=False)
            targets = {g.tasks[0]: y}
        yield list(g.tasks), x, targets


@torch.no_grad()
def dry_losses(model: nn.Module, graph: TaskGraph, tasks: Mapping[str, ResolvedTask], dataset: Any,
               needed: list[str]) -> TaskLosses:
    """The unreduced losses of the tasks ``needed`` on one small evaluation batch per group.

    Computed as validation computes them (eval mode, no graph, no training state touched); each
    loss is then a leaf that requires grad, so that what a weighting builds from it can be checked.
    """
    device = next(model.parameters()).device
    values, outputs, groups = {}, {}, []
    was = model.training
    model.eval()
    try:
        for names, x, targets in dry_batches(graph, tasks, dataset, needed, device):
            out = model(x, tasks=names)
            outputs.update(out)
            values.update({t: tasks[t].loss(out[t], targets[t]).detach().requires_grad_() for t in names})
            groups.append(names)
    finally:
        model.train(was)
    return TaskLosses(values, graph.main.name, [t.name for t in graph.aux], groups, outputs=outputs)


def _check_task_output(name: str, output: torch.Tensor, target: torch.Tensor, task: ResolvedTask, batch: int) -> None:
    what = (f"head output of shape {tuple(output.shape)} and labels of shape {tuple(target.shape)} "
            f"({str(target.dtype).replace('torch.', '')})")
    if output.shape[0] != batch:
        raise TaskGraphError(f"task '{name}': the head returned batch size {output.shape[0]} for {batch} inputs.")
    class_labels = not target.is_floating_point() and output.ndim == target.ndim + 1
    if class_labels and output.shape[1] != task.num_outputs:
        raise TaskGraphError(
            f"task '{name}': {what}: the head gives {output.shape[1]} scores per example but the labels "
            f"have {task.num_outputs} classes. Use a head that honours `num_outputs` (it was asked for "
            f"{task.num_outputs} outputs)."
        )
    try:
        loss = task.loss(output, target)
    except Exception as exc:
        raise TaskGraphError(
            f"task '{name}': its loss fails on the {what}: {_cause(exc)}. Make the head's "
            f"output match the loss and the labels (the head was asked for {task.num_outputs} outputs)."
        ) from exc
    if not isinstance(loss, torch.Tensor) or loss.ndim == 0 or loss.shape[0] != batch:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TaskGraphError(
            f"task '{name}': its loss returned {shape}; losses must be unreduced, with the batch ({batch}) "
            f"as first dimension (e.g. reduction='none')."
        )
    try:
        metric = task.metric()
        metric.update(output, target)
        metric.compute()
    except Exception as exc:
        raise TaskGraphError(f"task '{name}': its metric fails on the {what}: {_cause(exc)}.") from exc


def _cause(exc: BaseException, with_type: bool = True) -> str:
    """An exception as ``Type: message``, without the "In call to configurable" lines gin appends."""
    message = "\n".join(ln for ln in str(exc).splitlines() if not ln.startswith("  In call to configurable"))
    return f"{type(exc).__name__}: {message}" if with_type else message


def _require(value: Any, name: str, example: str, include: str) -> None:
    if value is None:
        raise ConfigError(f"train.{name} is not set. Add `train.{name} = {example}` or include '{include}'.")


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"train.{name} must be a positive integer, got {v!r}.")


gin.register(LowDataSplit, module=None)
gin.register(Task, module=None)
gin.register(TaskGraph, module=None)
gin.register(field_tasks, module=None)
gin.register(WandbLogger, module=None)
for _opt in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop):
    gin.register(_opt, module="torch.optim")
for _sched in (torch.optim.lr_scheduler.CosineAnnealingLR, torch.optim.lr_scheduler.StepLR,
               torch.optim.lr_scheduler.MultiStepLR, torch.optim.lr_scheduler.LinearLR):
    gin.register(_sched, module="torch.optim.lr_scheduler")
