"""Framework tax: an auxframe Equal training step against a hand-written PyTorch loop.

Both sides train the same model class from the same initial weights, with the same optimizer
settings, on the same batches (each side draws from its own, identically seeded PoolLoader, so
data cost is identical); the only difference is who runs the step:

* **auxframe**: ``Trainer.inner_step()`` (TaskLosses, ``Equal.backward``, dict plumbing, the
  StepContext, the per-group signal call), set up from Python exactly as ``auxframe/configs/experiments/digits_equal_all.gin`` (the quickstart's graph until issue 13)
  sets it up (digits, the ``datasets/digits.gin`` split, ``small_cnn`` 32-64-64, Adam lr 1e-3 with
  weight decay 5e-4, batch 32 for every pool).
* **hand-written**: a plain loop that forwards the backbone once per batch group, applies the
  heads, sums ``F.cross_entropy(..., reduction='none').mean()`` per task, then
  ``zero_grad / backward / step``.

Before timing, both sides take ``--check-steps`` steps from the same state and their parameters
and BatchNorm buffers are compared (the comparison is only meaningful if they compute the same
thing). Then blocks of ``--steps`` steps alternate between the sides, ``--repeats`` times (the side
that goes first alternates too, so neither always runs on a cache warmed by itself), and the
median per-step times, their ratio auxframe / hand-written and the spread of the per-pair ratios
are printed against the goal of 1.05.

Run::

    WANDB_MODE=disabled .venv/bin/python bench/framework_tax.py
    WANDB_MODE=disabled .venv/bin/python bench/framework_tax.py --tasks main --steps 200
    WANDB_MODE=disabled .venv/bin/python bench/framework_tax.py --profile   # where the tax goes
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import os
import platform
import statistics
import sys
import time
from typing import Callable

os.environ.setdefault("WANDB_MODE", "disabled")

import torch
import torch.nn.functional as F

from auxframe.data.digits import digits
from auxframe.data.loader import PoolLoader
from auxframe.data.signals import Rotation
from auxframe.data.splits import LowDataSplit
from auxframe.experiment import build_model, resolve_tasks, seed_everything
from auxframe.models.backbones import SmallCNN
from auxframe.tasks import Task, TaskGraph
from auxframe.trainer import Schedule, Trainer
from auxframe.weighting.base import WeightingSetup
from auxframe.weighting.fixed import Equal

GOAL = 1.05

#: --tasks: which task graph (names as in auxframe/configs/tasks/).
#:   main        digits_main.gin        digit alone
#:   attributes  digits_attributes.gin  digit + parity + ge5 + loops (one shared labelled batch)
#:   all         digits_all.gin         digit + rotation + parity + ge5 (the quickstart)
TASK_SETS = {
    "main": ["digit"],
    "attributes": ["digit", "parity", "ge5", "loops"],
    "all": ["digit", "rotation", "parity", "ge5"],
}


# -- the auxframe side --------------------------------------------------------------------------
def make_graph(which: str) -> TaskGraph:
    tasks = []
    for name in TASK_SETS[which]:
        if name == "digit":
            tasks.append(Task("digit", labels="digit", main=True, head="classification",
                              loss="cross_entropy", metric="accuracy"))
        elif name == "rotation":
            tasks.append(Task("rotation", signal=Rotation(all_rotations=True), pool="train"))
        else:
            tasks.append(Task(name, labels=name))
    return TaskGraph(tasks)


def build_auxframe(args, device: torch.device):
    """Everything ``experiment.train`` builds for the quickstart, minus gin, run dir and loggers."""
    seed = 0
    seed_everything(seed)
    dataset = digits()
    split = LowDataSplit(labels_per_class=10, aux_per_class=5, val_per_class=10,
                         test_fraction=0.3, seed=0)(dataset)  # auxframe/configs/datasets/digits.gin
    graph = make_graph(args.tasks)
    resolved = resolve_tasks(graph, dataset)
    backbone = functools.partial(SmallCNN, channels=(32, 64, 64), pool_after=(1,))
    model = build_model(backbone, graph, resolved, dataset).to(device)
    weighting = Equal()
    total_steps = 10**9
    weighting.setup(WeightingSetup(
        main_task=graph.main.name, aux_tasks=[t.name for t in graph.aux], model=model,
        shared_parameters=model.shared_parameters(), device=device, total_steps=total_steps,
        steps_per_epoch=max(1, len(split.pool("labeled")) // args.batch_size), has_aux_set=len(split.aux) > 0,
    ))
    optimizer = torch.optim.Adam(list(model.parameters()) + list(weighting.inner_parameters()),
                                 lr=args.lr, weight_decay=args.weight_decay)
    schedule = Schedule(steps=total_steps, batch_size=args.batch_size, pool_batch_sizes={}, eval_every=0,
                        eval_batch_size=512, log_every=10, checkpoint_every=0, keep_checkpoints=1)
    trainer = Trainer(model, graph, resolved, dataset, split, weighting, optimizer, None, schedule, device,
                      seed=seed, run_dir=None, loggers=(), progress=False)
    return trainer, backbone, resolved


# -- the hand-written side ----------------------------------------------------------------------
def build_handwritten(trainer: Trainer, backbone: Callable, resolved, args, device: torch.device) -> Callable[[], None]:
    """A plain PyTorch step on a second model of the same class with the same initial weights."""
    model = build_model(backbone, trainer.graph, resolved, trainer.dataset).to(device)
    model.load_state_dict(copy.deepcopy(trainer.model.state_dict()))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    names = TASK_SETS[args.tasks]
    labelled = [n for n in names if n != "rotation"]  # digit first: label field == task name
    rotation = "rotation" in names
    # The same batches: loaders seeded exactly like the trainer's (seed * 104_729 + group index,
    # groups in task-graph order: the labelled tasks' shared batch first, then rotation).
    expected_groups = ["labels@labeled"] + (["rotation@train"] if rotation else [])
    assert [g.key for g in trainer.groups] == expected_groups, [g.key for g in trainer.groups]
    bs = args.batch_size
    seed = trainer.seed * 104_729
    lab_loader = PoolLoader(trainer.dataset, trainer.split.pool("labeled"), bs, seed=seed + 0, name="labeled")
    rot_loader = PoolLoader(trainer.dataset, trainer.split.pool("train"), bs, seed=seed + 1, name="train") if rotation else None

    net = model.backbone
    heads = [model.heads[n] for n in labelled]
    rot_head = model.heads["rotation"] if rotation else None
    # Loss order as Equal sums it: main task, then the auxiliary tasks in graph order.
    order = [names.index(n) for n in labelled] + ([names.index("rotation")] if rotation else [])

    def step() -> None:
        images, labels = next(lab_loader)
        x = images.to(device, non_blocking=True)
        feats = net(x)
        losses = [F.cross_entropy(h(feats), labels[n].to(device, non_blocking=True), reduction="none").mean()
                  for n, h in zip(labelled, heads)]
        if rotation:
            images, _ = next(rot_loader)
            rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
            target = torch.arange(4).repeat_interleave(images.shape[0])
            out = rot_head(net(rotated.to(device, non_blocking=True)))
            losses.append(F.cross_entropy(out, target.to(device, non_blocking=True), reduction="none").mean())
        by_graph = [None] * len(names)
        for i, loss in zip(order, losses):
            by_graph[i] = loss
        total = by_graph[0]
        for loss in by_graph[1:]:
            total = total + loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    step.model = model  # type: ignore[attr-defined]
    return step


# -- measurement --------------------------------------------------------------------------------
def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].is_floating_point())


def timed_block(step: Callable[[], object], n: int, sync: Callable[[], None]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per step over ``n`` consecutive steps."""
    sync()
    cpu, start = time.process_time(), time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - start) / n, (time.process_time() - cpu) / n


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return min(xs), max(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _loadavg() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def profile_auxframe(trainer: Trainer, steps: int) -> None:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        trainer.inner_step()
    prof.disable()
    print(f"\ncProfile of {steps} auxframe inner steps (tottime, top 25):")
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="steps per timed block (default 20)")
    p.add_argument("--repeats", type=int, default=50, help="timed blocks per side (default 50)")
    p.add_argument("--time-limit", type=float, default=100.0,
                   help="stop timing after this many seconds, whatever --repeats says (default 100)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps per side before timing (default 30)")
    p.add_argument("--check-steps", type=int, default=20, help="steps of the equality check (default 20)")
    p.add_argument("--atol", type=float, default=1e-5, help="tolerance of the equality check (default 1e-5)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of every pool (quickstart: 32)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4, help="as auxframe/configs/base/train.gin")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tasks", choices=sorted(TASK_SETS), default="all", help="task graph (default: all, the quickstart's)")
    p.add_argument("--profile", action="store_true", help="afterwards, cProfile --profile-steps auxframe steps")
    p.add_argument("--profile-steps", type=int, default=100, help="steps profiled by --profile (default 100)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    trainer, backbone, resolved = build_auxframe(args, device)
    hand = build_handwritten(trainer, backbone, resolved, args, device)
    aux = trainer.inner_step

    n_params = sum(p.numel() for p in trainer.model.parameters())
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print("auxframe framework tax: Trainer.inner_step (Equal) vs a hand-written PyTorch step")
    print(f"  torch {torch.__version__}, python {platform.python_version()}, device {device} ({dev_name}), "
          f"threads {torch.get_num_threads()} ({'--threads' if args.threads else 'torch default'}; interop {torch.get_num_interop_threads()}), cpus {os.cpu_count()}"
          + "".join(f", {k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ))
    print(f"  model MultiTaskModel(small_cnn 32-64-64): {n_params:,} parameters; batch size {args.batch_size}; "
          f"tasks {args.tasks}: {' + '.join(TASK_SETS[args.tasks])}; batch groups: "
          f"{', '.join(g.key for g in trainer.groups)}")
    print(f"  Adam lr {args.lr:g} weight_decay {args.weight_decay:g}; blocks of {args.steps} steps x {args.repeats} "
          f"repeats per side after {args.warmup} warm-up steps")

    # 1. Same computation: from the same state, after the same steps, the same parameters.
    start_diff = max_abs_diff(trainer.model, hand.model)
    for _ in range(args.check_steps):
        aux()
        hand()
    sync()
    diff = max_abs_diff(trainer.model, hand.model)
    same = start_diff == 0.0 and diff <= args.atol
    print(f"\ncheck: after {args.check_steps} steps from identical weights, max |param/buffer difference| = "
          f"{diff:.3g} (tolerance {args.atol:g}): {'OK' if same else 'MISMATCH'}")
    if not same:
        print("the two sides do not compute the same update; the timing below would compare different work")
        return 2

    # 2. Warm-up, then interleaved timed blocks (the side that goes first alternates).
    for _ in range(args.warmup):
        aux()
        hand()
    sync()
    load_before = _loadavg()
    t_aux: list[float] = []
    t_hand: list[float] = []
    c_aux: list[float] = []
    c_hand: list[float] = []

    def block(step, times, cpu_times):
        wall, cpu = timed_block(step, args.steps, sync)
        times.append(wall)
        cpu_times.append(cpu)

    deadline = time.perf_counter() + args.time_limit
    for r in range(args.repeats):
        if r >= 3 and time.perf_counter() > deadline:
            print(f"\n(time limit of {args.time_limit:g} s reached: stopped after {r} of {args.repeats} repeats)")
            break
        gc.collect()
        if r % 2 == 0:
            block(aux, t_aux, c_aux)
            block(hand, t_hand, c_hand)
        else:
            block(hand, t_hand, c_hand)
            block(aux, t_aux, c_aux)
    load_after = _loadavg()

    n = len(t_aux)
    med_a, med_h = statistics.median(t_aux), statistics.median(t_hand)
    pair = [a / h for a, h in zip(t_aux, t_hand)]
    ratio = statistics.median(pair)
    q1, q3 = quartiles(pair)
    drift = max_abs_diff(trainer.model, hand.model)
    total_steps = args.check_steps + args.warmup + args.steps * n
    h1, h3 = quartiles(t_hand)
    noise = (h3 - h1) / med_h

    print(f"\nper-step time, median of {n} blocks of {args.steps} steps (min-max):")
    print(f"  auxframe     {1e3 * med_a:8.3f} ms  ({1e3 * min(t_aux):.3f}-{1e3 * max(t_aux):.3f})")
    print(f"  hand-written {1e3 * med_h:8.3f} ms  ({1e3 * min(t_hand):.3f}-{1e3 * max(t_hand):.3f})")
    print(f"  difference   {1e6 * (med_a - med_h):8.1f} us/step (medians), {1e6 * (min(t_aux) - min(t_hand)):.1f} us/step (minima)")
    print(f"ratio auxframe / hand-written = {ratio:.3f}: median of the {n} per-pair ratios "
          f"(IQR {q1:.3f}-{q3:.3f}, min-max {min(pair):.3f}-{max(pair):.3f}); "
          f"ratio of medians {med_a / med_h:.3f}, of minima {min(t_aux) / min(t_hand):.3f}")
    cpu_pair = [a / h for a, h in zip(c_aux, c_hand)]
    cq1, cq3 = quartiles(cpu_pair)
    print(f"  process CPU time per step (all threads): auxframe {1e3 * statistics.median(c_aux):.3f} ms, hand-written "
          f"{1e3 * statistics.median(c_hand):.3f} ms; median per-pair ratio {statistics.median(cpu_pair):.3f} "
          f"(IQR {cq1:.3f}-{cq3:.3f})")
    print(f"  machine: load average {load_before} before, {load_after} after timing; hand-written block "
          f"IQR / median = {100 * noise:.1f}%")
    if noise > 0.05:
        print("  WARNING: block times vary by more than 5%: the machine is busy (other processes?) and the ratio is "
              "unreliable; rerun on a quiet machine, with more --repeats, or with OMP_WAIT_POLICY=PASSIVE or "
              "--threads 1 (see bench/README.md)")
    print(f"  (after all {total_steps} steps per side the parameters still differ by at most {drift:.3g})")
    verdict = "PASS" if ratio <= GOAL else "ABOVE GOAL"
    print(f"{verdict}: {ratio:.3f} {'<=' if ratio <= GOAL else '>'} {GOAL}")

    if args.profile:
        profile_auxframe(trainer, args.profile_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
