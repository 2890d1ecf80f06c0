"""How much each auxiliary task helps the main task, measured cheaply at the start of training.

An ablation trains one model per auxiliary task (``auxframe sweep --ablate``, :mod:`auxframe.ablation`).
The probe trains one model with every task for a few steps and measures, for each task ``k`` (the
main task included, as a reference):

- **Lookahead transference** (Fifty et al., NeurIPS 2021, "Efficiently Identifying Task Groupings",
  TAG): one step on task ``k``'s gradient alone, on the shared parameters ``theta``,
  ``theta_k = theta - lr * g_k`` with ``g_k = grad_theta L_k`` on ``k``'s training batch (the heads
  unchanged), and what it did to the main task's loss on held-out main-task labels::

      Z_k = (1 - L_main^held(theta_k) / L_main^held(theta)) / lr

  ``Z_k > 0``: a step on ``k`` lowers the main loss on images the main task does not train on. The
  division by ``lr`` is TAG's (their code's ``(1 - new_loss / loss) / lr``), so ``Z`` does not
  scale with the step size to first order; the step is plain gradient descent with the optimizer's
  learning rate (TAG's lookahead is its SGD optimizer's step). TAG measures on the training batch;
  the probe measures on held-out labels (by default the auxiliary set and the validation split),
  the question being whether ``k`` helps the main task *generalise*.
- **Gradient cosine** with the main task: ``cos(g_k, grad_theta L_main^held)``, the first-order
  counterpart of the same question without its scale (``Z_k ~ <g_main^held, g_k> / L`` for a small
  step).

The schedule (:func:`run_probe`, defaults in :data:`WINDOW` and its neighbours):

1. **Fit the heads first** (:func:`fit_heads`): at initialisation the heads are random, and a
   task's gradient reaches the shared layers through a random projection of its errors. The heads
   alone take a few steps on fresh batches, the backbone frozen.
2. **A short window** of ordinary training with every task at weight 1 (as TAG trains all tasks
   together), measuring every ``every`` steps from step ``start``.

Each task gets a mean and a 95% t interval over the measurements (:mod:`auxframe.stats`; the
measurements are neighbours in one run, so the interval says how steady the measure was, not how it
varies between seeds); tasks are ranked by mean transference. docs/probe.md has the evidence:
the ranking against one-at-a-time and leave-one-out ablations, and what it costs.

Where it sits: :class:`TaskProbe` is a trainer callback (``on_fit_start``, ``on_step_end``);
``auxframe probe`` (:mod:`auxframe.commands.probe`) runs an experiment's gin config with it and
writes ``probe.json``, ``probe.md`` and ``probe.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from auxframe.callbacks import Callback
from auxframe.errors import ConfigError
from auxframe.stats import Interval, mean_ci

#: What the probe writes into its output folder.
PROBE_JSON, PROBE_MD, PROBE_PNG = "probe.json", "probe.md", "probe.png"
#: The probe's defaults (docs/probe.md: measured with these on the planted data and the digits
#: minimum-data recipe, seeds 0-4, against their ablations): 25 head steps at 0.02, then an 8-step
#: window measured at steps 2, 4, 6 and 8, each task's gradient averaged over 4 training batches.
WINDOW, EVERY, START, HEAD_WARMUP, HEAD_LR, BATCHES = 8, 2, 2, 25, 0.02, 4


# -- the two measures --------------------------------------------------------------------------------
def lookahead_transference(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    lr: float,
    loss: Callable[[], torch.Tensor],
    before: float | None = None,
) -> float:
    """TAG's lookahead transference of one gradient step to a loss.

    ``Z = (1 - loss(theta - lr * g) / loss(theta)) / lr``, with ``theta`` the ``params`` as they are.
    The parameters are moved in place and put back exactly (the same tensors, bitwise) before
    returning.

    Args:
        params: the parameters the step moves (the shared ones).
        grads: the step's gradient, one per parameter (None: that parameter does not move).
        lr: the step size (> 0).
        loss: evaluates the loss at the current parameters (called under ``torch.no_grad``).
        before: ``loss()`` at ``theta``, if already known.

    Returns:
        ``Z``; positive when the step lowers the loss.

    Raises:
        ConfigError: ``lr`` is not positive.
    """
    if not lr > 0:
        raise ConfigError(f"the probe's lookahead learning rate must be > 0, got {lr!r}.")
    with torch.no_grad():
        base = float(loss()) if before is None else float(before)
        saved = [p.detach().clone() for p in params]
        try:
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(lr * g)
            after = float(loss())
        finally:
            for p, s in zip(params, saved):
                p.copy_(s)
    return (1.0 - after / base) / lr


def gradient_cosine(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    """The cosine between two gradients given as lists of tensors (None counts as zeros).

    Returns:
        ``<a, b> / (|a| |b|)``, or 0 when either gradient is zero.
    """
    dot = na = nb = 0.0
    for x, y in zip(a, b):
        if x is not None:
            na += float(x.double().pow(2).sum())
        if y is not None:
            nb += float(y.double().pow(2).sum())
        if x is not None and y is not None:
            dot += float((x.double() * y.double()).sum())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return dot / math.sqrt(na * nb)


@contextlib.contextmanager
def kept_buffers(model: torch.nn.Module) -> Iterator[None]:
    """Put the model's buffers (BatchNorm running statistics) back as they were on exit, so that the
    probe's extra forward passes leave the run's state untouched."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in saved:
                b.copy_(s)


def _interval_json(i: Interval) -> dict[str, float | None]:
    """An interval as JSON; no NaN in the JSON: an undefined bound is null."""
    return {"mean": i.mean, "low": None if math.isnan(i.low) else i.low,
            "high": None if math.isnan(i.high) else i.high, "n": i.n}


# -- the callback ------------------------------------------------------------------------------------
@dataclass
class Measurement:
    """One measurement step: per task, transference and cosine with the main task's aux-set gradient."""

    step: int
    transference: dict[str, float]
    cosine: dict[str, float]


@dataclass
class TaskScore:
    """One task's measures over the window."""

    task: str
    transference: Interval
    cosine: Interval
    main: bool = False


@dataclass
class ProbeResult:
    """What the probe found: per-step measurements and per-task scores, ranked (main task apart).

    Attributes:
        main_task: the main task's name.
        measurements: every measurement, in step order.
        scores: the auxiliary tasks' scores, best transference first, then the main task's (a reference).
        settings: how it was measured (window, interval, lookahead learning rate, aux-set size).
    """

    main_task: str
    measurements: list[Measurement]
    scores: list[TaskScore]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ranking(self) -> list[str]:
        """The auxiliary tasks, most helpful first (by mean transference)."""
        return [s.task for s in self.scores if not s.main]

    def to_json(self) -> dict[str, Any]:
        return {
            "main_task": self.main_task,
            "ranking": self.ranking,
            "settings": self.settings,
            "scores": [{"task": s.task, "main": s.main, "transference": _interval_json(s.transference),
                        "cosine": _interval_json(s.cosine)} for s in self.scores],
            "measurements": [{"step": m.step, "transference": m.transference, "cosine": m.cosine}
                             for m in self.measurements],
        }


def summarise(main_task: str, measurements: Sequence[Measurement], settings: Mapping[str, Any] | None = None) -> ProbeResult:
    """Per-task means and 95% intervals over the measurements, ranked by mean transference."""
    tasks = list(measurements[0].transference) if measurements else []
    scores = [TaskScore(t, mean_ci([m.transference[t] for m in measurements]),
                        mean_ci([m.cosine[t] for m in measurements]), main=t == main_task) for t in tasks]
    aux = sorted((s for s in scores if not s.main), key=lambda s: -s.transference.mean)
    return ProbeResult(main_task, list(measurements), aux + [s for s in scores if s.main], dict(settings or {}))


def task_gradients(
    shared: Sequence[torch.nn.Parameter],
    losses: Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]],
) -> dict[str, list[torch.Tensor | None]]:
    """Each task's gradient of its mean loss on the shared parameters, averaged over batches.

    Args:
        shared: the shared parameters.
        losses: task -> its unreduced (or mean) training loss with its graph, or a sequence of
            such mappings (one per batch; the gradients are averaged over them; an iterator is
            consumed one batch at a time, so only one batch's graph is alive at once).

    Returns:
        task -> one gradient per shared parameter (None where the task does not reach it).
    """
    batches = [losses] if isinstance(losses, Mapping) else losses
    total: dict[str, list[torch.Tensor | None]] = {}
    n = 0
    for batch in batches:
        n += 1
        names = list(batch)
        for i, t in enumerate(names):
            g = torch.autograd.grad(batch[t].mean(), shared, retain_graph=i < len(names) - 1, allow_unused=True)
            if t not in total:
                total[t] = [None if x is None else x.detach().clone() for x in g]
            else:
                total[t] = [a if x is None else (x.detach().clone() if a is None else a + x) for a, x in zip(total[t], g)]
    return {t: [None if x is None else x / n for x in g] for t, g in total.items()}


def measure(
    model: torch.nn.Module,
    shared: Sequence[torch.nn.Parameter],
    losses: Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]],
    main_loss: Callable[[], torch.Tensor],
    lr: float,
    step: int = 0,
) -> Measurement:
    """Transference and cosine of every task, at the model's current parameters.

    Args:
        model: the multi-task model (its buffers are put back afterwards).
        shared: the shared parameters the lookahead step moves.
        losses: task -> its unreduced (or mean) training loss, with its graph; or one such mapping
            per batch, whose gradients are averaged (:func:`task_gradients`).
        main_loss: evaluates the main task's mean loss on the auxiliary set at the current
            parameters (the same inputs and randomness on every call).
        lr: the lookahead step size.
        step: the training step, recorded with the measurement.

    Returns:
        The :class:`Measurement` (for tasks whose loss does not reach the shared parameters,
        transference and cosine are 0).
    """
    shared = list(shared)
    grads = task_gradients(shared, losses)
    with kept_buffers(model):
        reference = main_loss()
        main_grad = torch.autograd.grad(reference, shared, allow_unused=True)
        before = float(reference.detach())
        transference = {t: lookahead_transference(shared, g, lr, main_loss, before) for t, g in grads.items()}
    cosine = {t: gradient_cosine(g, main_grad) for t, g in grads.items()}
    return Measurement(step, transference, cosine)


def fit_heads(trainer: Any, steps: int, lr: float) -> None:
    """Fit every task's head to the backbone's features at the current (initial) parameters.

    At initialisation the heads are random, so a task's gradient reaches the shared layers through
    a random projection of its errors, and transference and cosine say little about the task (on
    the planted data, with the other defaults, the probe ranked the tasks right in 1 of 5 seeds
    without this, in 5 of 5 with it; docs/probe.md). The heads alone take ``steps`` Adam steps
    (learning rate ``lr``, their own optimizer state), each on fresh training batches whose
    backbone features are computed without gradients (fresh batches, so that the heads cannot
    memorise a few batches of a noise task's random labels); the backbone is untouched and its
    BatchNorm statistics are put back. A head step costs a forward pass of the backbone without
    its backward pass.
    """
    model = trainer.model
    params = [p for name in trainer.graph.names for p in model.heads[name].parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    with kept_buffers(model):
        for _ in range(steps):
            total = 0.0
            for tasks, (x, targets) in trainer.ctx.train_batch().items():
                with torch.no_grad():
                    features = model.backbone(x)
                for t in tasks:
                    total = total + trainer.tasks[t].loss(model.heads[t](features), targets[t]).mean()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()


class TaskProbe(Callback):
    """A trainer callback that measures every task's transference and cosine every ``every`` steps.

    Args:
        every: measure after every this many training steps (from step ``start`` on).
        lookahead_lr: the lookahead step size; None: the optimizer's learning rate at that step.
        pool: the split pool (or union of pools) the main task's loss is measured on. The default,
            ``'aux+val'``, is every held-out main-task label: the auxiliary set alone (5 per class
            in the digits recipes) made the planted ranking right in 3 of 5 seeds instead of 5
            (docs/probe.md). ``'aux'`` measures on
            the auxiliary set only.
        max_images: at most this many images of that pool per measurement (a seeded random subset
            of them, redrawn at every measurement, when the pool is larger).
        start: the first step measured (then every ``every`` steps).
        head_warmup: head-only steps before the window (:func:`fit_heads`); 0: none.
        head_lr: the learning rate of those steps.
        batches: training batches each task's gradient is averaged over at a measurement (one
            batch's gradient misranked the planted tasks in 1 of 5 seeds; docs/probe.md).

    After training, :meth:`result` gives the :class:`ProbeResult`.
    """

    name = "probe"

    def __init__(self, every: int = EVERY, lookahead_lr: float | None = None, pool: str = "aux+val", max_images: int = 256,
                 start: int = START, head_warmup: int = HEAD_WARMUP, head_lr: float = HEAD_LR, batches: int = BATCHES):
        if isinstance(head_warmup, bool) or not isinstance(head_warmup, int) or head_warmup < 0:
            raise ConfigError(f"the probe's head warm-up must be a whole number of steps >= 0, got {head_warmup!r}.")
        if not head_lr > 0:
            raise ConfigError(f"the probe's head learning rate must be > 0, got {head_lr!r}.")
        if isinstance(start, bool) or not isinstance(start, int) or start < 1:
            raise ConfigError(f"the probe's first measured step must be a whole number >= 1, got {start!r}.")
        self.start, self.head_warmup, self.head_lr = start, head_warmup, float(head_lr)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"the probe's measurement interval must be a positive integer, got {every!r}.")
        if lookahead_lr is not None and not lookahead_lr > 0:
            raise ConfigError(f"the probe's lookahead learning rate must be > 0, got {lookahead_lr!r}.")
        self.every, self.lookahead_lr, self.pool, self.max_images = every, lookahead_lr, pool, max_images
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ConfigError(f"the probe averages each task's gradient over a positive whole number of batches, got {batches!r}.")
        self.batches = batches
        self.measurements: list[Measurement] = []
        self.main_task = ""
        self._images = 0
        self._lrs: list[float] = []

    def on_fit_start(self, trainer: Any) -> None:
        if self.head_warmup:
            fit_heads(trainer, self.head_warmup, self.head_lr)

    def on_step_end(self, trainer: Any, record: Any) -> None:
        step = int(getattr(record, "step", record))
        if step < self.start or (step - self.start) % self.every:
            return
        main = trainer.graph.main.name
        self.main_task = main
        x, y = self._main_batch(trainer, step)
        loss_fn = trainer.tasks[main].loss
        model = trainer.model
        seed = 1_000_003 + step

        def main_loss() -> torch.Tensor:
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                torch.manual_seed(seed)  # the same dropout masks on every call
                return loss_fn(model(x, tasks=[main])[main], y).mean()

        lr = self.lookahead_lr if self.lookahead_lr is not None else float(trainer.optimizer.param_groups[0]["lr"])
        self._lrs.append(lr)
        with kept_buffers(model):  # the extra batches' forward passes leave BatchNorm's statistics alone
            batches = (trainer.ctx.train_losses().values for _ in range(self.batches))
            m = measure(model, model.shared_parameters(), batches, main_loss, lr, step)
        self.measurements.append(m)
        if hasattr(trainer, "log"):
            trainer.log({**{f"probe/{t}/transference": v for t, v in m.transference.items()},
                         **{f"probe/{t}/cosine": v for t, v in m.cosine.items()}})

    def _main_batch(self, trainer: Any, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np

        indices = trainer.split.pool(self.pool)
        if len(indices) == 0:
            raise ConfigError(
                f"the probe measures the main task's loss on the '{self.pool}' pool, and this split has none. Set "
                f"`LowDataSplit.aux_per_class` (e.g. 5), or measure on validation with `auxframe probe --pool val`."
            )
        if len(indices) > self.max_images:
            indices = np.sort(np.random.default_rng(step).choice(indices, self.max_images, replace=False))
        self._images = len(indices)
        images, labels = trainer.dataset.get_batch(torch.as_tensor(indices))
        main = trainer.tasks[trainer.graph.main.name]
        return images.to(trainer.device), labels[main.labels].to(trainer.device)

    def result(self, **settings: Any) -> ProbeResult:
        """The scores of what was measured (``settings`` are recorded with them)."""
        if not self.measurements:
            raise ConfigError(
                f"the probe made no measurement: the window was shorter than its interval ({self.every} steps). "
                f"Lengthen the window or measure more often."
            )
        lrs = sorted(set(self._lrs))
        info = {"every": self.every, "measurements": len(self.measurements), "pool": self.pool,
                "pool_images": self._images, "lookahead_lr": lrs[0] if len(lrs) == 1 else lrs, **settings}
        return summarise(self.main_task, self.measurements, info)

    def state_dict(self) -> dict[str, Any]:
        return {"measurements": [m.__dict__ for m in self.measurements], "main_task": self.main_task}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.measurements = [Measurement(**m) for m in state["measurements"]]
        self.main_task = state["main_task"]


# -- running it on an experiment ----------------------------------------------------------------------
def run_probe(
    gin_files: Sequence[str | Path],
    gin_params: Sequence[str] = (),
    steps: int = WINDOW,
    every: int = EVERY,
    lookahead_lr: float | None = None,
    pool: str = "aux+val",
    keep_weighting: bool = False,
    run_dir: str | Path | None = None,
    start: int = START,
    head_warmup: int = HEAD_WARMUP,
    head_lr: float = HEAD_LR,
    batches: int = BATCHES,
) -> ProbeResult:
    """Train an experiment for a short window with the probe, and score its auxiliary tasks.

    Args:
        gin_files: the experiment's gin files.
        gin_params: extra bindings (applied before the probe's own).
        steps: the window in training steps.
        every: measure every this many steps (from step ``start``).
        lookahead_lr: the lookahead step (None: the optimizer's learning rate).
        pool: where the main task's loss is measured (default: the auxiliary set and validation).
        keep_weighting: train the window with the experiment's weighting; by default every task is
            trained with weight 1 (``weightings.equal``), so that every task's head learns, as TAG
            trains all tasks together.
        run_dir: a run directory for the window's run (logs, W&B with job type ``probe``); None:
            nothing is written.
        start: the first step measured.
        head_warmup: head-only steps before the window (:func:`fit_heads`).
        head_lr: their learning rate.
        batches: training batches per task gradient at each measurement.

    Returns:
        The :class:`ProbeResult`; its ``settings`` record the window, the full run's steps, the
        probe's wall time and the gin files and bindings.
    """
    import time

    import gin

    from auxframe import config
    from auxframe.experiment import train

    config.parse(gin_files, gin_params)
    full_steps = int(gin.query_parameter("train.steps"))
    window = steps
    if isinstance(window, bool) or not isinstance(window, int) or window < start:
        raise ConfigError(f"the probe's window ({window!r} steps) must be a whole number of steps reaching its first "
                          f"measurement (step {start}).")
    overrides = [f"train.steps = {window}", "train.eval_every = 0", "train.checkpoint_every = 0"]
    if not keep_weighting:
        overrides.append("train.weighting = @weightings.equal()")
    config.parse(gin_files, [*gin_params, *overrides])
    probe = TaskProbe(every=every, lookahead_lr=lookahead_lr, pool=pool, start=start, head_warmup=head_warmup,
                      head_lr=head_lr, batches=batches)
    try:
        existing = list(gin.query_parameter("train.callbacks"))
    except ValueError:
        existing = []
    began = time.perf_counter()
    # An explicit argument, not a gin binding: gin passes copies of bound values, and the probe's
    # measurements are read from this very object.
    train(run_dir=run_dir, job_type="probe", callbacks=[*existing, probe])
    wall = time.perf_counter() - began
    return probe.result(window=window, start=start, head_warmup=head_warmup, head_lr=head_lr, batches=batches,
                        full_steps=full_steps,
                        wall_time_s=round(wall, 3), weighting="experiment's" if keep_weighting else "equal",
                        gin_files=[str(f) for f in gin_files], gin_params=list(gin_params))


@dataclass
class SeedsProbe:
    """The probe run once per seed, and each task's score over the seeds.

    Attributes:
        seeds: the seeds, in order.
        results: one :class:`ProbeResult` per seed.
        transference: task -> the per-seed mean transferences' mean and 95% t interval over seeds.
        cosine: task -> the same for the cosine.
        main_task: the main task's name.
    """

    seeds: list[int]
    results: list[ProbeResult]
    transference: dict[str, Interval]
    cosine: dict[str, Interval]
    main_task: str

    @property
    def ranking(self) -> list[str]:
        """The auxiliary tasks by mean transference over the seeds, most helpful first."""
        aux = [t for t in self.transference if t != self.main_task]
        return sorted(aux, key=lambda t: -self.transference[t].mean)


def over_seeds(seeds: Sequence[int], results: Sequence[ProbeResult]) -> SeedsProbe:
    """Each task's per-seed mean transference and cosine, summarised over the seeds (95% t interval:
    how the probe's verdict varies between seeds and splits)."""
    if not results:
        raise ConfigError("no probe result to summarise over seeds; give at least one seed.")
    tasks = [s.task for s in results[0].scores]

    def per_task(attr: str) -> dict[str, Interval]:
        return {t: mean_ci([getattr(next(s for s in r.scores if s.task == t), attr).mean for r in results]) for t in tasks}

    return SeedsProbe(list(seeds), list(results), per_task("transference"), per_task("cosine"), results[0].main_task)


@dataclass
class Agreement:
    """How a probe's scores rank the auxiliary tasks against an ablation's effects.

    Attributes:
        mode: the ablation (``one-at-a-time`` or ``leave-one-out``).
        per_seed: one row per seed: ``(seed, Spearman of transference, Spearman of cosine)``, each
            seed's probe against the ablation's mean effects (None: fewer than 3 tasks in common).
        of_means: the Spearman of the mean transference over seeds, and of the mean cosine.
    """

    mode: str
    per_seed: list[tuple[int, float | None, float | None]]
    of_means: tuple[float | None, float | None]


def agreement(probes: SeedsProbe, effects: Sequence[Any]) -> Agreement:
    """Spearman's rank correlation between the probe's scores and an ablation's effects.

    Args:
        probes: the probe over seeds (:func:`over_seeds`).
        effects: one ablation's :class:`auxframe.ablation.TaskEffect` per auxiliary task.
    """
    from auxframe.ablation import spearman

    if not effects:
        raise ConfigError("the ablation has no task effect to compare the probe with.")
    benefit = {e.task: e.benefit for e in effects}

    def rho(scores: Mapping[str, float]) -> float | None:
        common = [t for t in scores if t in benefit]
        return spearman({t: scores[t] for t in common}, benefit) if len(common) >= 3 else None

    rows = []
    for seed, r in zip(probes.seeds, probes.results):
        aux = [s for s in r.scores if not s.main]
        rows.append((seed, rho({s.task: s.transference.mean for s in aux}), rho({s.task: s.cosine.mean for s in aux})))
    aux = [t for t in probes.transference if t != probes.main_task]
    means = (rho({t: probes.transference[t].mean for t in aux}), rho({t: probes.cosine[t].mean for t in aux}))
    return Agreement(effects[0].mode, rows, means)


def markdown_seeds(probes: SeedsProbe, effects: Sequence[Any] | None = None, agreed: Agreement | None = None) -> str:
    """The tasks ranked by mean transference over the seeds (with an ablation's effects beside them),
    each seed's ranking, and the rank correlations with the ablation."""
    by_task = {e.task: e for e in effects or ()}
    head = f"| rank | task | transference over {len(probes.seeds)} seeds (95% CI) | cosine with main (95% CI) |"
    rule = "|---|---|---|---|"
    if effects:
        head, rule = head + f" {effects[0].mode} ablation effect (95% CI, wins/ties/losses) |", rule + "---|"
    lines = [head, rule]
    for i, t in enumerate(probes.ranking, 1):
        row = f"| {i} | {t} | {format_interval(probes.transference[t])} | {format_interval(probes.cosine[t])} |"
        if effects:
            e = by_task.get(t)
            row += (f" {format_interval(e.effect, 4)} ({e.effect.wins}/{e.effect.ties}/{e.effect.losses}) |"
                    if e is not None else " — |")
        lines.append(row)
    lines += ["", "| seed | ranking (transference) | Spearman with the ablation: transference | cosine |",
              "|---|---|---|---|"]
    rhos = {seed: (a, b) for seed, a, b in (agreed.per_seed if agreed else [])}
    for seed, r in zip(probes.seeds, probes.results):
        a, b = rhos.get(seed, (None, None))
        lines.append(f"| {seed} | {' > '.join(r.ranking)} | {_rho(a)} | {_rho(b)} |")
    if agreed is not None:
        lines += ["", f"Spearman of the mean over seeds with the {agreed.mode} ablation's effects: transference "
                      f"{_rho(agreed.of_means[0])}, cosine {_rho(agreed.of_means[1])}."]
    return "\n".join(lines) + "\n"


def _rho(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def write_seeds(probes: SeedsProbe, out: str | Path, effects: Sequence[Any] | None = None,
                agreed: Agreement | None = None, plot: bool = True) -> dict[str, Path]:
    """``probes.md`` and ``probes.json`` (over seeds, and against an ablation when given) into ``out``,
    and with an ablation and ``plot``, ``probes.png`` (:func:`plot_against`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    data: dict[str, Any] = {
        "main_task": probes.main_task, "seeds": probes.seeds, "ranking": probes.ranking,
        "transference": {t: _interval_json(i) for t, i in probes.transference.items()},
        "cosine": {t: _interval_json(i) for t, i in probes.cosine.items()},
        "per_seed_ranking": {str(s): r.ranking for s, r in zip(probes.seeds, probes.results)},
    }
    if effects:
        data["ablation"] = {"mode": effects[0].mode, "effects": {e.task: _interval_json(e.effect) for e in effects}}
    if agreed is not None:
        data["spearman"] = {"per_seed": [{"seed": s, "transference": a, "cosine": b} for s, a, b in agreed.per_seed],
                            "of_means": {"transference": agreed.of_means[0], "cosine": agreed.of_means[1]}}
    paths = {"json": out / "probes.json", "markdown": out / "probes.md"}
    _write(paths["json"], json.dumps(data, indent=2) + "\n")
    _write(paths["markdown"], markdown_seeds(probes, effects, agreed))
    if effects and plot:
        paths["png"] = plot_against(probes, effects, out / "probes.png", agreed)
    return paths


def plot_against(probes: SeedsProbe, effects: Sequence[Any], path: str | Path, agreed: Agreement | None = None) -> Path:
    """Each auxiliary task's mean transference over the seeds against its ablation effect (both with
    95% intervals): a probe that ranks like the ablation puts the tasks on a rising curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_task = {e.task: e for e in effects}
    tasks = [t for t in probes.ranking if t in by_task]

    def err(i: Interval) -> list[float]:
        return [0.0, 0.0] if i.n < 2 else [i.mean - i.low, i.high - i.mean]

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for t in tasks:
        e, z = by_task[t], probes.transference[t]
        sign = 1.0 if e.higher_is_better else -1.0
        ax.errorbar([sign * e.effect.mean], [z.mean], xerr=[[err(e.effect)[int(sign < 0)]], [err(e.effect)[int(sign > 0)]]],
                    yerr=[[err(z)[0]], [err(z)[1]]], fmt="o", capsize=3)
        ax.annotate(t, (sign * e.effect.mean, z.mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(0, color="black", lw=0.6)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel(f"{effects[0].mode} ablation effect on the main task (better →)", fontsize=8)
    ax.set_ylabel(f"probe: lookahead transference, mean over {len(probes.seeds)} seeds", fontsize=8)
    title = "probe vs ablation, 95% intervals"
    if agreed is not None and agreed.of_means[0] is not None:
        title += f" (Spearman {agreed.of_means[0]:+.2f})"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(result: ProbeResult, effects: Mapping[str, float] | None = None) -> str:
    """The ranked table (with an ablation's effect per task beside it, if given)."""
    head = "| rank | task | transference (95% CI) | cosine with main (95% CI) |"
    rule = "|---|---|---|---|"
    if effects is not None:
        head, rule = head + " ablation effect |", rule + "---|"
    lines = [head, rule]
    for i, s in enumerate(result.scores, 1):
        name = f"{s.task} (main, reference)" if s.main else s.task
        row = f"| {'—' if s.main else i} | {name} | {format_interval(s.transference)} | {format_interval(s.cosine)} |"
        if effects is not None:
            row += f" {effects[s.task]:+.4f} |" if s.task in effects else " — |"
        lines.append(row)
    st = result.settings
    lines += ["", f"{st.get('measurements', len(result.measurements))} measurements every {st.get('every')} steps of a "
              f"{st.get('window', '?')}-step window (the experiment trains {st.get('full_steps', '?')} steps); main loss "
              f"on the '{st.get('pool')}' pool ({st.get('pool_images')} images), lookahead step {st.get('lookahead_lr')}."]
    return "\n".join(lines) + "\n"


def format_interval(i: Interval, digits: int = 3) -> str:
    """``mean [low, high]`` with signs (``mean`` alone for one value)."""
    if i.n < 2:
        return f"{i.mean:+.{digits}f}"
    return f"{i.mean:+.{digits}f} [{i.low:+.{digits}f}, {i.high:+.{digits}f}]"


def write_probe(result: ProbeResult, out: str | Path, plot: bool = True) -> dict[str, Path]:
    """Write ``probe.json``, ``probe.md`` and (with ``plot``) ``probe.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / PROBE_JSON, "markdown": out / PROBE_MD}
    _write(paths["json"], json.dumps(result.to_json(), indent=2) + "\n")
    _write(paths["markdown"], markdown(result))
    if plot:
        paths["png"] = plot_probe(result, out / PROBE_PNG)
    return paths


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    tmp.replace(path)


def plot_probe(result: ProbeResult, path: str | Path) -> Path:
    """Transference and cosine per task (mean and 95% interval, ranked), and transference over the window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = result.scores
    names = [f"{s.task} (main)" if s.main else s.task for s in scores]
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.35 * len(scores) + 2.2))
    for ax, attr, title in ((axes[0], "transference", "lookahead transference to the main task"),
                            (axes[1], "cosine", "gradient cosine with the main task")):
        ivs = [getattr(s, attr) for s in scores]
        errs = [[i.mean - i.low if i.n > 1 else 0 for i in ivs], [i.high - i.mean if i.n > 1 else 0 for i in ivs]]
        colors = ["#999999" if s.main else ("#4c72b0" if i.mean >= 0 else "#c44e52") for s, i in zip(scores, ivs)]
        ax.barh(range(len(scores)), [i.mean for i in ivs], xerr=errs, color=colors, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(scores)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("mean over the window, 95% interval", fontsize=8)
    ax = axes[2]
    steps = [m.step for m in result.measurements]
    for s in scores:
        ax.plot(steps, [m.transference[s.task] for m in result.measurements], lw=1.2 if not s.main else 0.8,
                ls="--" if s.main else "-", label=s.task)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("training step", fontsize=8)
    ax.set_title("transference at each measurement", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
