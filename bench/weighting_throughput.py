"""Training throughput of every adaptive weighting over Equal, on the quickstart model.

Each method trains the quickstart setting (digits, small CNN 32-64-64, digit + rotation + parity
+ ge5, batch 32) from the same initial weights on the same batches; blocks of ``--steps`` steps
alternate between Equal and the method (order alternating between rounds), and the ratio of
median per-step times is printed against the goal:

* ARML (weights every 20 steps): <= 1.2
* GCS, OL_AUX, GradNorm, PCGrad (every step): <= 2.5
* Uncertainty, AdaLoss, DWA (no goal in the issue; loss-based, expected ~1.0)

Run::

    OMP_NUM_THREADS=1 .venv/bin/python bench/weighting_throughput.py
    .venv/bin/python bench/weighting_throughput.py --device cuda
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
from auxilearn_cost import build_trainer  # noqa: E402
from framework_tax import _loadavg  # noqa: E402

from auxframe.trainer import Trainer  # noqa: E402
from auxframe.weighting.arml import ARML  # noqa: E402
from auxframe.weighting.gradient_based import GCS, GradNorm, OLAux, PCGrad  # noqa: E402
from auxframe.weighting.loss_based import DWA, AdaLoss, Uncertainty  # noqa: E402

METHODS = {
    "arml": (lambda: ARML(update_every=20), 1.2),
    "gcs": (GCS, 2.5),
    "ol_aux": (OLAux, 2.5),
    "gradnorm": (GradNorm, 2.5),
    "pcgrad": (PCGrad, 2.5),
    "uncertainty": (Uncertainty, None),
    "adaloss": (AdaLoss, None),
    "dwa": (DWA, None),
}


def build(args, device, weighting=None) -> Trainer:
    """The quickstart trainer with ``weighting`` (None: Equal); same seed, same weights and batches."""
    trainer = build_trainer(args, device, weighting)
    if weighting is not None and weighting.inner_parameters():  # Uncertainty's log-variances
        trainer.optimizer.add_param_group({"params": weighting.inner_parameters()})
    return trainer


def block(trainer: Trainer, n: int, sync) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(n):
        trainer.inner_step()
        trainer.step += 1
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
    p.add_argument("--tasks", default="all")
    p.add_argument("--time-limit", type=float, default=1e9)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    print(f"# weighting throughput on {device}, {torch.get_num_threads()} threads, load {_loadavg()}")
    print(f"# blocks of {args.steps} steps, {args.rounds} rounds, Equal and the method alternating")
    print(f"{'method':<12} {'Equal ms':>9} {'method ms':>10} {'ratio':>6} {'goal':>6}")
    for name in args.methods.split(","):
        factory, goal = METHODS[name]
        equal, method = build(args, device), build(args, device, factory())
        for tr in (equal, method):
            block(tr, args.warmup, sync)
        t_eq, t_m = [], []
        for r in range(args.rounds):
            pair = [(equal, t_eq), (method, t_m)]
            for tr, times in (pair if r % 2 == 0 else pair[::-1]):
                times.append(block(tr, args.steps, sync))
        ratio = statistics.median(t_m) / statistics.median(t_eq)
        verdict = "" if goal is None else ("meets" if ratio <= goal else "MISSES")
        print(f"{name:<12} {1e3 * statistics.median(t_eq):>9.1f} {1e3 * statistics.median(t_m):>10.1f} "
              f"{ratio:>6.2f} {goal if goal else '-':>6} {verdict}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
