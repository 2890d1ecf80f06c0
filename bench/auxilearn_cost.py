"""AuxiLearn cost: what an outer step costs next to an inner step, and what it does to training speed.

Everything runs on the low-label digits graph (``auxframe/configs/experiments/digits_equal_all.gin``, the quickstart's until issue 13: digits, the
``datasets/digits.gin`` split, ``small_cnn`` 32-64-64, digit + rotation + parity + ge5, Adam lr 1e-3
weight decay 5e-4, batch 32), built from Python with ``framework_tax.build_auxframe`` and given an
``AuxiLearn`` weighting (linear auxiliary network, ``alpha='auto'``, Neumann series). Sections:

1. ``ratio``: time of ``weighting.outer_step(trainer.ctx)`` over ``trainer.inner_step()`` for
   J = ``neumann_terms`` in 0, 1, 3, 5 and W = ``inner_params`` in shared / all. Goal for J = 3
   (W = shared, the default): at most 6 inner steps.
2. ``memory``: the autograd graph an outer step retains over the one an inner step builds (bytes of
   the tensors saved for backward, counted with ``torch.autograd.graph.saved_tensors_hooks``); on
   CUDA also the peak of ``torch.cuda.max_memory_allocated`` above the memory in use before the step.
3. ``throughput``: blocks of ``--outer-every`` (20) training steps as ``Trainer.fit`` takes them,
   AuxiLearn (one outer step per block) against Equal. Goal: AuxiLearn / Equal <= 1.3.
4. ``profile``: where one outer step's time goes (the fresh training-batch forward, the gradient
   graph, each Hessian-vector product, the mixed term, the aux-set forward, the optimizer), timed
   by wrapping the functions the outer step calls; then torch.profiler's time per autograd node.
5. ``whatif``: measured savings of candidate changes, side by side with the current outer step:
   reusing the inner step's forward and gradient graph, a forward-mode mixed term, forward-over-
   reverse Hessian-vector products, and ``outer_bn_mode='eval'``.

``alpha='auto'`` runs a power iteration (20 Hessian-vector products) at the first outer step only:
every trainer takes that first outer step during its untimed warm-up, so no timed outer step
contains it (its cost is printed separately).

Run::

    WANDB_MODE=disabled OMP_NUM_THREADS=1 .venv/bin/python bench/auxilearn_cost.py
    WANDB_MODE=disabled OMP_NUM_THREADS=1 .venv/bin/python bench/auxilearn_cost.py --sections ratio,throughput
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

os.environ.setdefault("WANDB_MODE", "disabled")
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jvp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from framework_tax import _loadavg, build_auxframe, max_abs_diff, quartiles  # noqa: E402

from auxframe import hypergrad  # noqa: E402
from auxframe.trainer import Trainer  # noqa: E402
from auxframe.weighting.auxilearn import AuxiLearn  # noqa: E402
from auxframe.weighting.base import WeightingSetup  # noqa: E402

GOAL_OUTER_J3 = 6.0  # an outer step with J = 3 costs at most this many inner steps
GOAL_THROUGHPUT = 1.3  # AuxiLearn (outer every 20 steps) / Equal
JS = (0, 1, 3, 5)
WS = ("shared", "all")
SECTIONS = ("ratio", "memory", "throughput", "profile", "whatif", "fraction", "graph")
FRACTIONS = (1.0, 0.5, 0.25)


# -- building -----------------------------------------------------------------------------------
def build_trainer(args, device: torch.device, weighting=None) -> Trainer:
    """The quickstart trainer of ``framework_tax.build_auxframe`` (Equal), or the same one with
    ``weighting`` instead: same seed, so the same initial weights and the same batches."""
    base, _, _ = build_auxframe(args, device)
    if weighting is None:
        return base
    graph, model = base.graph, base.model
    weighting.setup(WeightingSetup(
        main_task=graph.main.name, aux_tasks=[t.name for t in graph.aux], model=model,
        shared_parameters=model.shared_parameters(), device=device, total_steps=base.schedule.steps,
        steps_per_epoch=max(1, len(base.split.pool("labeled")) // args.batch_size),
        has_aux_set=len(base.split.aux) > 0,
    ))
    # Equal and AuxiLearn add no parameters to the model's optimizer, so base.optimizer is the same.
    return Trainer(model, graph, base.tasks, base.dataset, base.split, weighting, base.optimizer, None,
                   base.schedule, device, seed=base.seed, run_dir=None, loggers=(), progress=False)


def make_auxilearn(args, inner_params: str = "shared", **options) -> AuxiLearn:
    alpha = args.alpha if args.alpha == "auto" else float(args.alpha)
    options = {"mixed": args.mixed, "curvature_fraction": args.curvature_fraction, "curvature": args.curvature,
               "cuda_graph": args.cuda_graph, **options}
    return AuxiLearn(auxnet="linear", outer_every=args.outer_every, neumann_terms=3, alpha=alpha,
                     inner_params=inner_params, **options)


def warm_up(trainer: Trainer, steps: int, sync) -> float:
    """``steps`` inner steps, then the first outer step (alpha='auto': the power iteration);
    returns that first outer step's time."""
    for _ in range(steps):
        trainer.inner_step()
    sync()
    start = time.perf_counter()
    trainer.weighting.outer_step(trainer.ctx)
    sync()
    return time.perf_counter() - start


def fit_steps(trainer: Trainer, n: int) -> None:
    """``n`` steps of ``Trainer.fit``'s loop: inner step, and the outer step every ``outer_every``
    (without fit's logging, evaluation and checkpoints)."""
    w = trainer.weighting
    for _ in range(n):
        trainer.inner_step()
        trainer.step += 1
        if w.outer_every and trainer.step % w.outer_every == 0:
            w.outer_step(trainer.ctx)


# -- measuring ----------------------------------------------------------------------------------
def timed(fn: Callable[[], object], n: int, sync) -> float:
    """Seconds per call over ``n`` consecutive calls."""
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n


def spread(xs: list[float], fmt: str = ".2f") -> str:
    q1, q3 = quartiles(xs)
    return (f"{statistics.median(xs):{fmt}} (IQR {q1:{fmt}}-{q3:{fmt}}, min-max {min(xs):{fmt}}-{max(xs):{fmt}}, "
            f"n={len(xs)})")


def verdict(value: float, goal: float) -> str:
    return f"PASS: {value:.2f} <= {goal:g}" if value <= goal else f"ABOVE GOAL: {value:.2f} > {goal:g}"


def rounds(limit_s: float, wanted: int):
    """Round indices until ``wanted`` rounds or ``limit_s`` seconds (at least 3 rounds)."""
    deadline = time.perf_counter() + limit_s
    for r in range(wanted):
        if r >= 3 and time.perf_counter() > deadline:
            print(f"  (time limit of {limit_s:g} s reached after {r} of {wanted} rounds)")
            return
        gc.collect()
        yield r


class SavedTensorBytes:
    """Bytes of the tensors autograd saves for backward while active (see the README).

    ``packed``: the sum of ``numel * element_size`` over every packed tensor (a tensor saved by two
    nodes counts twice; parameters count). ``retained``: the distinct storages among them, without
    the model's parameters and buffers (which exist anyway): the memory the graphs keep alive.
    """

    def __init__(self, model: torch.nn.Module):
        self.exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.packed = 0
        self.storages: dict[int, object] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.packed += t.numel() * t.element_size()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.exclude:
            self.storages[ptr] = storage  # held until the count is read: addresses cannot be reused
        return t

    def measure(self, fn: Callable[[], object]) -> tuple[int, int]:
        self.packed, self.storages = 0, {}
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            fn()
        retained = sum(s.nbytes() for s in self.storages.values())
        self.storages = {}
        return self.packed, retained


def cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    """Peak allocated CUDA memory during ``fn`` above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


@contextlib.contextmanager
def quiet_output():
    """Silence file descriptors 1 and 2 (torch.profiler's native start/stop messages)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


# -- 1. outer / inner ---------------------------------------------------------------------------
def section_ratio(args, trainers: dict[str, Trainer], sync) -> dict:
    print(f"\n== 1. outer step / inner step, J = {', '.join(map(str, JS))}, W = shared / all ==")
    print(f"  each round, per W: a block of {args.inner_steps} inner steps, then one outer step per J "
          f"(orders alternate between rounds); ratio = outer / the adjacent block's mean inner step")
    for tr in trainers.values():  # one untimed outer step per J: allocator and caches warm
        for J in JS:
            tr.weighting.neumann_terms = J
            tr.weighting.outer_step(tr.ctx)
    t_in = {W: [] for W in trainers}
    t_out = {(W, J): [] for W in trainers for J in JS}
    ratio = {(W, J): [] for W in trainers for J in JS}
    for r in rounds(args.time_limit, args.rounds):
        for W in (list(trainers) if r % 2 == 0 else list(trainers)[::-1]):
            tr = trainers[W]
            inner = timed(tr.inner_step, args.inner_steps, sync)
            t_in[W].append(inner)
            for J in (JS if r % 2 == 0 else JS[::-1]):
                tr.weighting.neumann_terms = J
                outer = timed(lambda: tr.weighting.outer_step(tr.ctx), 1, sync)
                t_out[W, J].append(outer)
                ratio[W, J].append(outer / inner)
    for tr in trainers.values():
        tr.weighting.neumann_terms = 3
    print(f"\n  {'W':7s} {'J':>2s} {'outer ms':>9s} {'inner ms':>9s}   outer / inner: median (IQR, min-max)")
    for W in trainers:
        for J in JS:
            print(f"  {W:7s} {J:2d} {1e3 * statistics.median(t_out[W, J]):9.1f} {1e3 * statistics.median(t_in[W]):9.1f}"
                  f"   {spread(ratio[W, J])}")
        per_term = [(a - b) / 4 / i for a, b, i in zip(t_out[W, 5], t_out[W, 1], t_in[W])]
        print(f"  {W:7s}    each Neumann term (J=1 -> 5) adds {statistics.median(per_term):.2f} inner steps; "
              f"alpha = {trainers[W].weighting.alpha:.4g}")
    for W in trainers:
        j3 = statistics.median(ratio[W, 3])
        tag = "goal" if W == "shared" else "W=all, for reference"
        print(f"J=3 outer / inner, W={W} ({tag}): {verdict(j3, GOAL_OUTER_J3)}")
    return {"ratio": ratio, "inner": t_in, "outer": t_out}


# -- 2. memory ----------------------------------------------------------------------------------
def section_memory(args, trainers: dict[str, Trainer], device: torch.device) -> dict:
    print("\n== 2. retained autograd graph: outer step / inner step ==")
    print("  bytes of tensors saved for backward during the step (saved_tensors_hooks); 'packed' = sum of\n"
          "  numel*element_size of every packed tensor, 'retained' = distinct storages, parameters excluded")
    cuda = device.type == "cuda"
    result = {}
    for W, tr in trainers.items():
        counter = SavedTensorBytes(tr.model)
        inner = counter.measure(tr.inner_step)
        peak_in = cuda_peak(tr.inner_step, device) if cuda else None
        line = f"  W={W:6s} inner step: packed {mib(inner[0])}, retained {mib(inner[1])}"
        print(line + (f"; CUDA peak {mib(peak_in)}" if cuda else ""))
        for J in JS:
            tr.weighting.neumann_terms = J
            outer = counter.measure(lambda: tr.weighting.outer_step(tr.ctx))
            extra = ""
            if cuda:
                peak = cuda_peak(lambda: tr.weighting.outer_step(tr.ctx), device)
                extra = f"; CUDA peak {mib(peak)} = {peak / peak_in:.2f}x inner"
            print(f"  W={W:6s} outer J={J}: packed {mib(outer[0])} = {outer[0] / inner[0]:.2f}x inner, "
                  f"retained {mib(outer[1])} = {outer[1] / inner[1]:.2f}x inner{extra}")
            result[W, J] = (outer[0] / inner[0], outer[1] / inner[1], peak / peak_in if cuda else None)
        tr.weighting.neumann_terms = 3
    return result


# -- 3. throughput ------------------------------------------------------------------------------
def section_throughput(args, aux: Trainer, equal: Trainer, sync) -> list[float]:
    n = args.outer_every * args.block_outer
    print(f"\n== 3. training throughput: AuxiLearn (J=3, W=shared, outer every {args.outer_every}) / Equal ==")
    print(f"  pairs of blocks of {n} steps as Trainer.fit takes them ({args.block_outer} outer step(s) per "
          f"AuxiLearn block), order alternating")
    t_aux, t_eq = [], []
    for r in rounds(args.time_limit, args.pairs):
        first, second = ((aux, t_aux), (equal, t_eq)) if r % 2 == 0 else ((equal, t_eq), (aux, t_aux))
        for tr, times in (first, second):
            times.append(timed(lambda: fit_steps(tr, n), 1, sync) / n)
    pair = [a / e for a, e in zip(t_aux, t_eq)]
    print(f"  per-step time: AuxiLearn {spread([1e3 * t for t in t_aux], '.1f')} ms, "
          f"Equal {spread([1e3 * t for t in t_eq], '.1f')} ms")
    ratio = statistics.median(pair)
    print(f"  AuxiLearn / Equal per pair: {spread(pair)}; ratio of medians "
          f"{statistics.median(t_aux) / statistics.median(t_eq):.2f}")
    print(f"throughput AuxiLearn / Equal: {verdict(ratio, GOAL_THROUGHPUT)}")
    return pair


# -- 4. profile ---------------------------------------------------------------------------------
class PhaseTimer:
    """Exclusive wall time per labelled phase: a wrapped call's time minus its wrapped children's."""

    def __init__(self, sync):
        self.sync = sync
        self.time: dict[str, float] = defaultdict(float)
        self.calls: Counter = Counter()
        self.stack: list[list] = []
        self._patches: list[tuple[object, str, object]] = []

    def wrap(self, label: str, fn: Callable, only_under: str | None = None) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a, **k):
            if only_under is not None and (not self.stack or self.stack[-1][0] != only_under):
                return fn(*a, **k)
            self.sync()
            start = time.perf_counter()
            self.stack.append([label, 0.0])
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                elapsed = time.perf_counter() - start
                _, children = self.stack.pop()
                self.time[label] += elapsed - children
                self.calls[label] += 1
                if self.stack:
                    self.stack[-1][1] += elapsed
        return wrapper

    def patch(self, owner: object, name: str, label: str, only_under: str | None = None) -> None:
        original = getattr(owner, name, None)
        if original is None:
            print(f"  (cannot time '{label}': {owner!r} has no '{name}')")
            return
        in_dict = isinstance(owner, type) or name in getattr(owner, "__dict__", {})
        self._patches.append((owner, name, original if in_dict else None))
        setattr(owner, name, self.wrap(label, original, only_under))

    def restore(self) -> None:
        for owner, name, original in reversed(self._patches):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._patches = []


OUTER = "outer_step: other (loss matrix, BN modes, clip, logs)"
HYPER = "hypergradient: other (checks, Neumann axpy, norms)"
OUTER_PHASES = [  # printing order
    "forward: fresh training batch (data, model, losses)",
    "forward: aux-set batch",
    "graph check: once-differentiable walk",
    "v = grad of aux-set loss (backward)",
    "gradient graph: grad of L_T, create_graph",
    "Hessian-vector products",
    "mixed term: backward through gradient graph",
    HYPER,
    "phi: Adam step",
    "effective weights (for logs)",
    "power iteration (alpha='auto')",
    OUTER,
]


def section_profile(args, tr: Trainer, sync) -> None:
    n = args.profile_steps
    print(f"\n== 4. profile: {n} rounds of 3 inner steps then one outer step (J=3, W=shared) ==")
    w = tr.weighting
    w.neumann_terms = 3
    inner_timer, timer = PhaseTimer(sync), PhaseTimer(sync)
    inner_timer.patch(tr, "_next_train_losses", "forward (data, signal, model, losses)")
    inner_timer.patch(w, "backward", "backward (auxnet combine + backward)")
    inner_timer.patch(tr.optimizer, "step", "Adam step")
    timer.patch(w, "outer_step", OUTER)
    timer.patch(tr.ctx, "train_losses", OUTER_PHASES[0])  # the ctx holds its own bound method
    timer.patch(tr.ctx, "aux_set_losses", OUTER_PHASES[1])
    timer.patch(hypergrad, "hypergradient", HYPER)
    timer.patch(hypergrad.implicit, "_check_once_differentiable", OUTER_PHASES[2])
    timer.patch(torch.autograd, "grad", OUTER_PHASES[3], only_under=HYPER)
    timer.patch(hypergrad.HessianOperator, "_build", OUTER_PHASES[4])
    timer.patch(hypergrad.HessianOperator, "__call__", OUTER_PHASES[5])
    timer.patch(hypergrad.implicit, "mixed_vjp", OUTER_PHASES[6])
    timer.patch(w.outer_optimizer, "step", OUTER_PHASES[8])
    timer.patch(w, "_effective_weights", OUTER_PHASES[9])
    timer.patch(hypergrad, "top_eigenvalue", OUTER_PHASES[10])
    inner_total = total = 0.0
    try:
        for _ in range(n):
            inner_total += timed(tr.inner_step, 3, sync) * 3
            total += timed(lambda: w.outer_step(tr.ctx), 1, sync)
    finally:
        timer.restore()
        inner_timer.restore()
    ref = inner_total / (3 * n)
    per_step = total / n
    print(f"  inner step {1e3 * ref:.1f} ms:")
    for label, t in inner_timer.time.items():
        print(f"    {label:52s} {1e3 * t / (3 * n):7.1f} ms  {100 * t / inner_total:5.1f}%")
    print(f"  outer step {1e3 * per_step:.1f} ms = {per_step / ref:.1f} inner steps (these rounds):")
    print(f"    {'phase':52s} {'ms/step':>7s} {'share':>6s} {'inner steps':>11s} calls/step")
    for label in OUTER_PHASES + [k for k in timer.time if k not in OUTER_PHASES]:
        if label in timer.time:
            t = timer.time[label] / n
            print(f"    {label:52s} {1e3 * t:7.1f} {100 * t / per_step:5.1f}% {t / ref:11.2f} "
                  f"{timer.calls[label] / n:g}")
    if OUTER_PHASES[10] not in timer.time:
        print("    (no power iteration in these outer steps: alpha was set by the untimed warm-up outer step)")

    if tr.device.type == "cpu":
        from torch.profiler import ProfilerActivity, profile

        steps = max(1, min(2, n))
        with quiet_output(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                w.outer_step(tr.ctx)
        prefix = "autograd::engine::evaluate_function: "
        nodes = [(e.key[len(prefix):], e.cpu_time_total) for e in prof.key_averages() if e.key.startswith(prefix)]
        backward = sum(t for _, t in nodes)
        wall = sum(e.self_cpu_time_total for e in prof.key_averages())
        print(f"  torch.profiler, {steps} outer steps: autograd backward nodes take {100 * backward / wall:.0f}% of the "
              f"profiled CPU time; by node type (*BackwardBackward0: the second-order passes, HVPs and mixed term):")
        for name, t in sorted(nodes, key=lambda x: -x[1])[:8]:
            print(f"    {name:52s} {100 * t / wall:5.1f}%")
    else:
        from torch.profiler import ProfilerActivity, profile

        with quiet_output(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            w.outer_step(tr.ctx)
            sync()
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15))


# -- 5. what-if ---------------------------------------------------------------------------------
def fused_hypergrad(tr: Trainer, train_loss, outer_loss, J: int, alpha: float):
    """The inner step's gradients built with create_graph, reused for the hypergradient.

    Returns the detached gradients of all model parameters (for the optimizer) and the
    hypergradient ``-mixed`` for phi by the hypergradient core's parts (the Neumann solver on a
    :class:`HessianOperator` of the inner step's own gradient graph, the mixed term by vjp): what
    ``hypergrad.hypergradient`` computes (Neumann, scale_by_alpha=False, mixed='vjp', Hessian)."""
    w = tr.weighting
    params = [p for p in tr.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(train_loss, params, create_graph=True)
    by_id = {id(p): g for p, g in zip(params, grads)}
    inner = w._inner_parameters(tr.ctx)
    operator = hypergrad.HessianOperator.from_gradients([by_id[id(p)] for p in inner], inner)
    phi = list(w.auxnet.parameters())
    v = list(torch.autograd.grad(outer_loss, inner))
    p = hypergrad.Neumann(J, alpha)(operator, v).x
    mixed = hypergrad.mixed_vjp(operator.grads, p, phi)
    return [x.detach() for x in grads], [-m for m in mixed]


def fused_step(tr: Trainer) -> None:
    """An inner step and an outer step sharing one forward: the hypergradient at W_t on the inner
    step's batch, then both optimizer steps (after the graph is used: they update in place)."""
    w = tr.weighting
    tr.model.train()
    tr.ctx.step = tr.step
    tr.ctx.extras.clear()
    losses = tr._next_train_losses()
    train_loss = w.auxnet(w.loss_matrix(losses))
    outer_loss = tr.ctx.aux_set_losses().mean(w.main_task)
    grads, hyper = fused_hypergrad(tr, train_loss, outer_loss, w.neumann_terms, w.alpha)
    tr.optimizer.zero_grad(set_to_none=True)
    for p, g in zip([p for p in tr.model.parameters() if p.requires_grad], grads):
        p.grad = g
    tr.optimizer.step()
    w.after_step(tr.ctx)
    phi = list(w.auxnet.parameters())
    for p, h in zip(phi, hyper):
        p.grad = h
    torch.nn.utils.clip_grad_norm_(phi, w.grad_clip if w.grad_clip else math.inf)
    w.outer_optimizer.step()
    w.outer_optimizer.zero_grad(set_to_none=True)
    w.auxnet.project_()


class Components:
    """One fresh training batch with its gradient graph over W = shared, for timing the mixed term
    and one Hessian-vector product in two ways each."""

    def __init__(self, tr: Trainer, generator: torch.Generator):
        self.tr, w, model = tr, tr.weighting, tr.model
        self.prepared = []
        for g in tr.groups:
            images, labels = next(tr.loaders[g.key])
            x, targets = tr._group_batch(g, images, labels, train=True, rng=tr.signal_rngs[g.key])
            self.prepared.append((g.tasks, x, targets))
        names = {id(p): n for n, p in model.named_parameters()}
        self.inner = w._inner_parameters(tr.ctx)
        self.inner_names = [names[id(p)] for p in self.inner]
        self.phi = list(w.auxnet.parameters())
        self.matrix = self._matrix(None)
        self.hessian = hypergrad.HessianOperator(w.auxnet(self.matrix), self.inner)
        self.p = [torch.randn(q.shape, generator=generator).to(q) * 1e-2 for q in self.inner]
        self.p_named = dict(zip(self.inner_names, self.p))

    def _matrix(self, params):
        """The (B, T) loss matrix; with ``params``, through ``functional_call`` on copies of the
        BatchNorm buffers (so that the running statistics are not updated twice)."""
        tr, outs, targets = self.tr, {}, {}
        for tasks, x, y in self.prepared:
            if params is None:
                outs.update(tr.model(x, tasks=tasks))
            else:
                buffers = {n: b.clone() for n, b in tr.model.named_buffers()}
                outs.update(functional_call(tr.model, {**params, **buffers}, (x,), {"tasks": tasks}))
            targets.update(y)
        return tr.weighting.loss_matrix(tr._losses_from(outs, targets))

    def mixed_vjp(self):
        return hypergrad.mixed_vjp(self.hessian.grads, self.p, self.phi)

    def mixed_forward(self):
        """grad_phi <d auxnet / d M, J_W M . p>: J_W M . p by one forward-mode pass (no double backward)."""
        params = {n: q.detach() for n, q in self.tr.model.named_parameters()}
        with torch.no_grad(), fwAD.dual_level():
            for n, t in self.p_named.items():
                params[n] = fwAD.make_dual(params[n], t)
            tangent = fwAD.unpack_dual(self._matrix(params)).tangent
        with torch.enable_grad():
            m = self.matrix.detach().requires_grad_()
            (dm,) = torch.autograd.grad(self.tr.weighting.auxnet(m), m, create_graph=True)
            return torch.autograd.grad((dm * tangent).sum(), self.phi)

    def hvp_reverse(self):
        return self.hessian(self.p)

    def hvp_forward_over_reverse(self):
        model = self.tr.model
        others = {n: q.detach() for n, q in model.named_parameters() if n not in self.p_named}
        primals = {n: q.detach() for n, q in zip(self.inner_names, self.inner)}

        def loss(ps):
            return self.tr.weighting.auxnet(self._matrix({**ps, **others}))

        out = jvp(grad(loss), (primals,), (self.p_named,))[1]
        return [out[n] for n in self.inner_names]


def max_rel_diff(a, b) -> float:
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


def section_whatif(args, tr: Trainer, sync, j3_ratio: float | None) -> None:
    print("\n== 5. what-if: measured savings per outer step (J=3, W=shared) ==")
    w = tr.weighting
    w.neumann_terms = 3
    gen = torch.Generator().manual_seed(0)

    # Same numbers first: each prototype must compute what the current code computes.
    losses = tr._next_train_losses()
    train_loss = w.auxnet(w.loss_matrix(losses))
    outer_loss = tr.ctx.aux_set_losses().mean(w.main_task)
    inner, phi = w._inner_parameters(tr.ctx), list(w.auxnet.parameters())
    ref = hypergrad.hypergradient(train_loss, outer_loss, inner, phi, neumann_terms=3, alpha=w.alpha)
    c = Components(tr, gen)
    checks = {
        "fused": ("fused hypergradient vs hypergrad.hypergradient",
                  lambda: fused_hypergrad(tr, train_loss, outer_loss, 3, w.alpha)[1], lambda: ref.grads),
        "mixed fwd": ("forward-mode mixed term vs vjp", c.mixed_forward, c.mixed_vjp),
        "hvp fwd-rev": ("forward-over-reverse HVP vs reverse-over-reverse", c.hvp_forward_over_reverse, c.hvp_reverse),
    }
    usable = set()
    for key, (name, new, old) in checks.items():
        try:
            d = max_rel_diff(new(), old())
        except Exception as exc:  # a prototype the device or a later auxframe does not support
            print(f"  check: {name}: skipped, the prototype fails here: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        print(f"  check: {name}: max relative difference {d:.1e} {'OK' if d < 1e-3 else 'MISMATCH (not timed)'}")
        if d < 1e-3:
            usable.add(key)
    del c, checks, losses, train_loss, outer_loss, ref

    t = defaultdict(list)

    def outer_eval():
        w.outer_bn_mode = "eval"
        try:
            w.outer_step(tr.ctx)
        finally:
            w.outer_bn_mode = "train"

    steps = {
        "inner": (tr.inner_step, 5),
        "inner+outer": (lambda: (tr.inner_step(), w.outer_step(tr.ctx)), 1),
        "fused": (lambda: fused_step(tr), 1),
        "outer": (lambda: w.outer_step(tr.ctx), 1),
        "outer bn eval": (outer_eval, 1),
    }
    if "fused" not in usable:
        del steps["fused"]
    for r in rounds(args.time_limit, args.whatif_rounds):
        for k in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            fn, n = steps[k]
            t[k].append(timed(fn, n, sync))
        c = Components(tr, gen)
        parts = {"mixed vjp": c.mixed_vjp, "mixed fwd": c.mixed_forward,
                 "hvp rev-rev": c.hvp_reverse, "hvp fwd-rev": c.hvp_forward_over_reverse}
        parts = {k: f for k, f in parts.items() if k in usable or k in ("mixed vjp", "hvp rev-rev")}
        for k in (list(parts) if r % 2 == 0 else list(parts)[::-1]):
            t[k].append(timed(parts[k], 1, sync))
        del c

    med = {k: statistics.median(v) for k, v in t.items()}
    outer_ratio = statistics.median([o / i for o, i in zip(t["outer"], t["inner"])])
    print(f"  this section's rounds: inner step {1e3 * med['inner']:.1f} ms, outer step {1e3 * med['outer']:.1f} ms "
          f"= {outer_ratio:.2f} inner steps")
    rows = [
        ("A", "reuse the inner step's forward and gradient graph: one fused step vs inner step + outer step",
         "inner+outer", "fused"),
        ("B", "mixed term by forward mode (forward_ad JVP of the loss matrix) vs double backward",
         "mixed vjp", "mixed fwd"),
        ("C", "one Hessian-vector product forward-over-reverse (torch.func) vs reverse-over-reverse",
         "hvp rev-rev", "hvp fwd-rev"),
        ("D", "outer_bn_mode='eval' (existing option; changes the curvature: BatchNorm frozen) vs 'train'",
         "outer", "outer bn eval"),
    ]
    fraction = defaultdict(float)
    for key, label, before, after in rows:
        if not t[after]:
            print(f"  {key}. {label}: not measured (its prototype failed the check)")
            continue
        saved = [b - a for b, a in zip(t[before], t[after])]
        in_inner = [x / i for x, i in zip(saved, t["inner"])]
        of_outer = [x / o for x, o in zip(saved, t["outer"])]
        fraction[key] = statistics.median(of_outer)
        print(f"  {key}. {label}\n     {1e3 * med[before]:.1f} ms -> {1e3 * med[after]:.1f} ms; saves "
              f"{spread(in_inner)} inner steps = {100 * fraction[key]:.0f}% of an outer step")
    base = outer_ratio if j3_ratio is None else j3_ratio
    src = "this section's" if j3_ratio is None else "section 1's"
    a, b, d = (max(fraction[k], 0.0) for k in "ABD")
    print(f"  J=3 outer / inner ({src} {base:.2f}) projected: with A {base * (1 - a):.2f}, with A+B "
          f"{base * (1 - a - b):.2f}, with A+B+D {base * (1 - a - b - d):.2f} (goal {GOAL_OUTER_J3:g})")


# -- 6. curvature mini-batch ----------------------------------------------------------------------
def _cosine(a, b) -> float:
    x, y = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    return float(x @ y / (x.norm() * y.norm()).clamp_min(1e-30))


def section_fraction(args, tr: Trainer, sync) -> dict:
    """Outer step cost and hypergradient agreement for curvature_fraction in FRACTIONS (J=3)."""
    from auxframe.weighting.auxilearn import _restore_batchnorm_mode, _set_batchnorm_mode

    print(f"\n== 6. curvature mini-batch: curvature_fraction = {', '.join(map(str, FRACTIONS))} (J=3, W=shared, "
          f"mixed {tr.weighting.mixed}) ==")
    print("  cost: each round a block of inner steps, then one outer step per fraction (order alternating);\n"
          "  agreement: on one training batch and one aux-set batch, the hypergradient with each fraction\n"
          "  (a fresh random subset each round) against the whole batch's (cosine), beside the cosine between\n"
          "  the whole-batch hypergradients of two different training batches (the noise SGD already has)")
    w = tr.weighting
    w.neumann_terms = 3
    ratio = {f: [] for f in FRACTIONS}
    agree = {f: [] for f in FRACTIONS if f < 1}
    noise: list[float] = []
    for r in rounds(args.time_limit, args.rounds):
        inner = timed(tr.inner_step, args.inner_steps, sync)
        for f in (FRACTIONS if r % 2 == 0 else FRACTIONS[::-1]):
            w.reconfigure(curvature_fraction=f)
            ratio[f].append(timed(lambda: w.outer_step(tr.ctx), 1, sync) / inner)
        saved = _set_batchnorm_mode(tr.model, w.outer_bn_mode == "train")
        try:
            outer_loss = tr.ctx.aux_set_losses().mean(w.main_task)
            first, second = tr.ctx.train_losses(), tr.ctx.train_losses()
            w.reconfigure(curvature_fraction=1.0)
            whole = w.hypergradient(tr.ctx, first, outer_loss)[0].grads
            noise.append(_cosine(whole, w.hypergradient(tr.ctx, second, outer_loss)[0].grads))
            for f in agree:
                w.reconfigure(curvature_fraction=f)
                agree[f].append(_cosine(w.hypergradient(tr.ctx, first, outer_loss)[0].grads, whole))
        finally:
            _restore_batchnorm_mode(saved)
            w.reconfigure(curvature_fraction=args.curvature_fraction)
    for f in FRACTIONS:
        line = f"  fraction {f:<5g} outer / inner {spread(ratio[f])}"
        if f < 1:
            line += f"; cosine with the whole batch's hypergradient {spread(agree[f], '.3f')}"
        print(line)
    print(f"  whole batch vs another training batch: cosine {spread(noise, '.3f')}")
    for f in FRACTIONS:
        print(f"J=3 outer / inner with curvature_fraction {f:g}: {verdict(statistics.median(ratio[f]), GOAL_OUTER_J3)}")
    return {"ratio": ratio, "agree": agree, "noise": noise}


# -- 7. CUDA graph ---------------------------------------------------------------------------------
def section_graph(args, tr: Trainer, sync) -> None:
    print("\n== 7. CUDA-graph capture of the outer step (auxframe.weighting.graphed; J=3, Hessian, whole batch) ==")
    if tr.device.type != "cuda":
        print("  skipped: needs --device cuda")
        return
    from auxframe.weighting.auxilearn import _restore_batchnorm_mode, _set_batchnorm_mode

    w = tr.weighting
    saved = _set_batchnorm_mode(tr.model, True)
    try:
        batch, aux = tr.ctx.train_batch(), tr.ctx.aux_set_batch()
        setting = (tr.model, w._inner_parameters(tr.ctx), tr.ctx.make_losses, batch, aux)
        gc.collect()  # capture needs no live autograd graph from another stream
        graph = w.graph(*setting)  # captured
        eager = w.graph(*setting, capture=False)  # the same function, run eagerly
        replayed = graph(batch, aux, w.alpha)[0].grads
        print(f"  check: replay vs eager: max relative difference "
              f"{max_rel_diff(replayed, eager(batch, aux, w.alpha)[0].grads):.1e} (the function itself is checked "
              f"against hypergrad.hypergradient in tests/test_auxilearn.py)")
        t = defaultdict(list)
        for r in rounds(args.time_limit, args.rounds):
            t["inner"].append(timed(tr.inner_step, args.inner_steps, sync))
            steps = {"eager": lambda: eager(batch, aux, w.alpha), "replay": lambda: graph(batch, aux, w.alpha)}
            for k in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
                t[k].append(timed(steps[k], 3, sync))
        for k in ("eager", "replay"):
            print(f"  {k:6s} hypergradient: {1e3 * statistics.median(t[k]):.2f} ms = "
                  f"{spread([a / i for a, i in zip(t[k], t['inner'])])} inner steps")
        del graph, eager
        # AuxiLearn's own cuda_graph=True against its eager outer step (mixed='vjp' for both)
        trainers = {flag: build_trainer(args, tr.device, make_auxilearn(args, cuda_graph=flag, mixed="vjp"))
                    for flag in (False, True)}
        for t_ in trainers.values():
            warm_up(t_, args.warmup, sync)  # the first outer step (alpha), eager
            t_.weighting.outer_step(t_.ctx)  # cuda_graph=True captures here
        ratio = defaultdict(list)
        for r in rounds(args.time_limit, args.rounds):
            for flag in ((False, True) if r % 2 == 0 else (True, False)):
                t_ = trainers[flag]
                inner = timed(t_.inner_step, args.inner_steps, sync)
                ratio[flag].append(timed(lambda: t_.weighting.outer_step(t_.ctx), 1, sync) / inner)
        captured = trainers[True].weighting._graphed is not None
        for flag in (False, True):
            print(f"  AuxiLearn outer step, cuda_graph={flag}: {spread(ratio[flag])} inner steps"
                  + (f" (graph captured: {captured})" if flag else ""))
        print(f"J=3 outer / inner with cuda_graph=True: {verdict(statistics.median(ratio[True]), GOAL_OUTER_J3)}")
    except Exception as exc:  # report what stops capture on this device
        print(f"  capture failed: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        _restore_batchnorm_mode(saved)


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--rounds", type=int, default=12, help="section 1: rounds (default 12)")
    p.add_argument("--inner-steps", type=int, default=10, help="section 1: inner steps per block (default 10)")
    p.add_argument("--pairs", type=int, default=16, help="section 3: pairs of blocks (default 16)")
    p.add_argument("--block-outer", type=int, default=1, help="section 3: outer steps per block (default 1)")
    p.add_argument("--profile-steps", type=int, default=4, help="section 4: outer steps profiled (default 4)")
    p.add_argument("--whatif-rounds", type=int, default=10, help="section 5: rounds (default 10)")
    p.add_argument("--time-limit", type=float, default=40.0,
                   help="stop a timed section's rounds after this many seconds, with at least 3 done (default 40)")
    p.add_argument("--warmup", type=int, default=20, help="inner steps per trainer before its first outer step")
    p.add_argument("--outer-every", type=int, default=20, help="AuxiLearn outer_every (default 20)")
    p.add_argument("--alpha", default="auto", help="AuxiLearn alpha: 'auto' (default) or a number")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of every pool (quickstart: 32)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4, help="as auxframe/configs/base/train.gin")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--mixed", default="auto", help="AuxiLearn mixed: auto (default), forward, vjp, jacobian")
    p.add_argument("--curvature", default="hessian", help="AuxiLearn curvature: hessian (default) or gauss_newton")
    p.add_argument("--cuda-graph", action="store_true", help="AuxiLearn cuda_graph=True (section 7 times both)")
    p.add_argument("--curvature-fraction", type=float, default=1.0,
                   help="AuxiLearn curvature_fraction for every section but 6 (default 1.0)")
    args = p.parse_args(argv)
    args.tasks = "all"  # the quickstart task graph, for framework_tax.build_auxframe
    sections = [s for s in args.sections.split(",") if s]
    if unknown := set(sections) - set(SECTIONS):
        p.error(f"unknown sections {sorted(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    started = time.perf_counter()

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print("auxframe AuxiLearn cost: outer step vs inner step, and AuxiLearn vs Equal training")
    print(f"  torch {torch.__version__}, python {platform.python_version()}, device {device} ({dev_name}), "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load average {_loadavg()}")

    trainers = {W: build_trainer(args, device, make_auxilearn(args, W)) for W in WS}
    tr = trainers["shared"]
    n_params = sum(q.numel() for q in tr.model.parameters())
    n_shared = sum(q.numel() for q in tr.ctx.shared_parameters)
    print(f"  quickstart: small_cnn 32-64-64, {n_params:,} parameters ({n_shared:,} shared); batch groups "
          f"{', '.join(g.key for g in tr.groups)}; AuxiLearn linear auxnet, outer_every {args.outer_every}, "
          f"alpha {args.alpha}, Neumann, curvature {args.curvature}, outer_bn_mode train, mixed {args.mixed}, "
          f"curvature_fraction {args.curvature_fraction:g}")
    first = {W: warm_up(t, args.warmup, sync) for W, t in trainers.items()}
    print("  warm-up (untimed): per trainer {} inner steps, then the first outer step, which for alpha='auto' "
          "includes the power iteration: {}".format(
              args.warmup, ", ".join(f"W={W} {first[W]:.2f} s (alpha {trainers[W].weighting.alpha:.4g})" for W in WS)))

    j3_ratio = memory = throughput = None
    if "ratio" in sections:
        res = section_ratio(args, trainers, sync)
        j3_ratio = statistics.median(res["ratio"]["shared", 3])
    if "memory" in sections:
        memory = section_memory(args, trainers, device)
    if "throughput" in sections:
        equal = build_trainer(args, device)
        aux = build_trainer(args, device, make_auxilearn(args, "shared"))
        same = max_abs_diff(equal.model, aux.model)
        print(f"\n  (throughput trainers start from identical weights: max difference {same:g})")
        for t in (equal, aux):  # one full block each, untimed; AuxiLearn's first outer step (power iteration) in it
            fit_steps(t, args.outer_every)
        throughput = statistics.median(section_throughput(args, aux, equal, sync))
    if "profile" in sections:
        section_profile(args, tr, sync)
    if "whatif" in sections:
        section_whatif(args, tr, sync, j3_ratio)
    if "fraction" in sections:
        section_fraction(args, tr, sync)
    if "graph" in sections:
        section_graph(args, tr, sync)
    print("\n== summary ==")
    if j3_ratio is not None:
        print(f"  outer step J=3 / inner step (W=shared): {verdict(j3_ratio, GOAL_OUTER_J3)}")
    if throughput is not None:
        print(f"  training throughput AuxiLearn / Equal:    {verdict(throughput, GOAL_THROUGHPUT)}")
    if memory is not None:
        packed, retained, peak = memory["shared", 3]
        print(f"  outer / inner step memory (W=shared, J=3): retained graph {retained:.2f}x, packed saved tensors "
              f"{packed:.2f}x" + (f", CUDA peak {peak:.2f}x" if peak is not None else ""))
    print(f"(total {time.perf_counter() - started:.0f} s; load average now {_loadavg()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
