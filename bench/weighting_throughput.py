"""Training throughput of every weighting over Equal, on the quickstart model.

Each method trains the quickstart setting (digits, small CNN 32-64-64, batch 32) from the same
initial weights on the same batches; blocks of ``--steps`` steps alternate between Equal and the
method (order alternating between rounds), and the ratio of median per-step times is printed
against the goal. Methods with an outer step (AuxiLearn, AuxiNash, ForkMerge) take it inside the
timed blocks, as ``Trainer.fit`` does, at the interval given in :data:`METHODS`, and are compared
by their mean block time (choose ``--steps`` times ``--rounds`` a multiple of the interval).

Task graphs (``--tasks``):

* ``all``: the quickstart's digit + rotation + parity + ge5 (the goals of issue 6: ARML <= 1.2;
  GCS, OL_AUX, GradNorm, PCGrad <= 2.5);
* ``k5``, ``k39``: the digit and K binary attribute heads on the labelled batch (parity, ge5 and
  loops in turn), the CelebA-like setting of issue 15, whose GPU goals at K = 39 are <= 1.2 for
  loss-based methods and <= 2.0 for Gramian methods (printed as goals on CUDA only).

Run::

    OMP_NUM_THREADS=1 .venv/bin/python bench/weighting_throughput.py                      # quickstart
    OMP_NUM_THREADS=1 .venv/bin/python bench/weighting_throughput.py --tasks k5,k39 --steps 20 --rounds 3
    .venv/bin/python bench/weighting_throughput.py --device cuda --tasks k5,k39
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import framework_tax  # noqa: E402
from auxilearn_cost import build_trainer  # noqa: E402
from framework_tax import _loadavg  # noqa: E402

from auxframe.tasks import Task, TaskGraph  # noqa: E402
from auxframe.trainer import Trainer  # noqa: E402
from auxframe.weighting.arml import ARML  # noqa: E402
from auxframe.weighting.auto_lambda import AutoLambda  # noqa: E402
from auxframe.weighting.auxilearn import AuxiLearn  # noqa: E402
from auxframe.weighting.auxinash import AuxiNash  # noqa: E402
from auxframe.weighting.famo import FAMO  # noqa: E402
from auxframe.weighting.forkmerge import ForkMerge  # noqa: E402
from auxframe.weighting.gradient_based import GCS, GradNorm, OLAux, PCGrad  # noqa: E402
from auxframe.weighting.jacobian_descent import (  # noqa: E402
    CAGrad, DualProj, GradVac, IMTLG, MGDA, AlignedMTL, NashMTL, UPGrad,
)
from auxframe.weighting.loss_based import DWA, AdaLoss, Uncertainty  # noqa: E402
from auxframe.weighting.metabalance import MetaBalance  # noqa: E402
from auxframe.weighting.rlw import RLW  # noqa: E402

LOSS, GRAMIAN, BILEVEL = "loss", "gramian", "bilevel"
#: name -> (factory, family, goal on the quickstart graph). The issue-15 GPU goals at K = 39 follow
#: the family: <= 1.2 for loss-based, <= 2.0 for Gramian methods (none for bilevel ones).
METHODS = {
    "arml": (lambda: ARML(update_every=20), GRAMIAN, 1.2),
    "gcs": (GCS, GRAMIAN, 2.5),
    "ol_aux": (OLAux, GRAMIAN, 2.5),
    "gradnorm": (GradNorm, GRAMIAN, 2.5),
    "pcgrad": (PCGrad, GRAMIAN, 2.5),
    "uncertainty": (Uncertainty, LOSS, None),
    "adaloss": (AdaLoss, LOSS, None),
    "dwa": (DWA, LOSS, None),
    "rlw": (RLW, LOSS, None),
    "famo": (FAMO, LOSS, None),
    "metabalance": (MetaBalance, GRAMIAN, None),
    "gradvac": (GradVac, GRAMIAN, None),
    "pri_gradvac": (lambda: GradVac(aux_only=True), GRAMIAN, None),
    "upgrad": (UPGrad, GRAMIAN, None),
    "mgda": (MGDA, GRAMIAN, None),
    "cagrad": (CAGrad, GRAMIAN, None),
    "nash_mtl": (NashMTL, GRAMIAN, None),
    "imtl_g": (IMTLG, GRAMIAN, None),
    "aligned_mtl": (AlignedMTL, GRAMIAN, None),
    "dualproj": (DualProj, GRAMIAN, None),
    "auxinash": (lambda: AuxiNash(outer_every=25), BILEVEL, None),
    "auto_lambda": (AutoLambda, BILEVEL, None),
    "forkmerge": (lambda: ForkMerge(merge_every=50), BILEVEL, None),
    "auxilearn": (lambda: AuxiLearn(outer_every=20), BILEVEL, None),
}
K39_GOALS = {LOSS: 1.2, GRAMIAN: 2.0}
ATTRIBUTES = ("parity", "ge5", "loops")


def make_graph(which: str) -> TaskGraph:
    """``k<K>``: the digit and K binary attribute heads on the labelled batch; else the quickstart's sets."""
    if not which.startswith("k"):
        return _make_graph(which)
    k = int(which[1:])
    tasks = [Task("digit", labels="digit", main=True, head="classification", loss="cross_entropy", metric="accuracy")]
    tasks += [Task(f"attr{i}", labels=ATTRIBUTES[i % len(ATTRIBUTES)]) for i in range(k)]
    return TaskGraph(tasks)


_make_graph = framework_tax.make_graph
framework_tax.make_graph = make_graph  # build_auxframe builds the graph through this name


def build(args, device, weighting=None) -> Trainer:
    """The quickstart trainer with ``weighting`` (None: Equal); same seed, same weights and batches."""
    trainer = build_trainer(args, device, weighting)
    if weighting is not None and weighting.inner_parameters():  # Uncertainty's log-variances
        trainer.optimizer.add_param_group({"params": weighting.inner_parameters()})
    return trainer


def block(trainer: Trainer, n: int, sync) -> float:
    sync()
    start = time.perf_counter()
    every = trainer.weighting.outer_every
    for _ in range(n):
        trainer.inner_step()
        trainer.step += 1
        if every and trainer.step % every == 0:  # as Trainer.fit
            trainer.outer_step()
    sync()
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=40, help="steps per timed block (a multiple of 20)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--tasks", default="all", help="comma-separated: all, k5, k39 (see the module docstring)")
    p.add_argument("--time-limit", type=float, default=1e9)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    print(f"# weighting throughput on {device}, {torch.get_num_threads()} threads, load {_loadavg()}")
    print(f"# blocks of {args.steps} steps, {args.rounds} rounds, Equal and the method alternating")
    for tasks in args.tasks.split(","):
        args.tasks = tasks
        print(f"## tasks {tasks}")
        print(f"{'method':<12} {'Equal ms':>9} {'method ms':>10} {'ratio':>6} {'goal':>6}")
        for name in args.methods.split(","):
            factory, family, goal = METHODS[name]
            if tasks != "all":
                goal = K39_GOALS.get(family) if tasks == "k39" and device.type == "cuda" else None
            equal, method = build(args, device), build(args, device, factory())
            for tr in (equal, method):
                block(tr, args.warmup, sync)
            t_eq, t_m = [], []
            for r in range(args.rounds):
                pair = [(equal, t_eq), (method, t_m)]
                for tr, times in (pair if r % 2 == 0 else pair[::-1]):
                    times.append(block(tr, args.steps, sync))
            # A method with an outer step pays it in some blocks only: compare totals, not medians
            # (exact when steps * rounds is a multiple of its interval).
            pick = statistics.mean if method.weighting.outer_every else statistics.median
            ratio = pick(t_m) / pick(t_eq)
            verdict = "" if goal is None else ("meets" if ratio <= goal else "MISSES")
            print(f"{name:<12} {1e3 * pick(t_eq):>9.1f} {1e3 * pick(t_m):>10.1f} "
                  f"{ratio:>6.2f} {goal if goal else '-':>6} {verdict}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
