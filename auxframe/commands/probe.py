"""``auxframe probe``: how much each auxiliary task helps the main task, from one short window (:mod:`auxframe.probe`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from auxframe.commands import add_gin_arguments, print_table

HELP = "rank the auxiliary tasks by how much they help the main task (lookahead transference, gradient cosine)"
EPILOG = ("Example: auxframe probe --gin experiments/digits_min_data.gin --out probes/min_data; check it against "
          "auxframe sweep --gin experiments/digits_min_data.gin --ablate one-at-a-time --seeds 0 1 2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_gin_arguments(p)
    # The defaults are auxframe.probe's (WINDOW, EVERY, ...), named in the help without importing it
    # (commands import only the standard library; tests/test_probe.py checks the help says them).
    p.add_argument("--steps", type=int, metavar="N", help="the training window in steps (default: 8)")
    p.add_argument("--every", type=int, metavar="K", help="measure every K steps of the window (default: 2)")
    p.add_argument("--start", type=int, metavar="S", help="the first step measured (default: 2)")
    p.add_argument("--head-warmup", type=int, metavar="H",
                   help="head-only steps before the window, the backbone frozen (default: 25; 0: none)")
    p.add_argument("--head-lr", type=float, metavar="LR", help="the learning rate of the head-only steps (default: 0.02)")
    p.add_argument("--batches", type=int, metavar="B",
                   help="training batches each task's gradient is averaged over at a measurement (default: 4)")
    p.add_argument("--lookahead-lr", type=float, metavar="LR",
                   help="the lookahead step size (default: the optimizer's learning rate, as TAG)")
    p.add_argument("--pool", default="aux+val",
                   help="split pool(s) the main task's loss is measured on (default: aux+val, every held-out "
                        "main-task label; aux: the auxiliary set alone)")
    p.add_argument("--keep-weighting", action="store_true",
                   help="train the window with the experiment's weighting (default: every task with weight 1)")
    p.add_argument("--seed", type=int, metavar="S", help="set train.seed and LowDataSplit.seed")
    p.add_argument("--out", metavar="DIR",
                   help="where probe.json, probe.md and probe.png go (default: probes/<config name>)")
    p.add_argument("--run-dir", metavar="DIR", help="also keep the window's run (logs, W&B run of job type 'probe')")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")


def main(args: argparse.Namespace) -> int:
    from auxframe import probe

    params = list(args.gin_param)
    if args.seed is not None:
        params += [f"train.seed = {args.seed}", f"LowDataSplit.seed = {args.seed}"]
    chosen = {"steps": args.steps, "every": args.every, "start": args.start, "head_warmup": args.head_warmup,
              "head_lr": args.head_lr, "batches": args.batches}
    result = probe.run_probe(args.gin, params, lookahead_lr=args.lookahead_lr, pool=args.pool,
                             keep_weighting=args.keep_weighting, run_dir=args.run_dir,
                             **{k: v for k, v in chosen.items() if v is not None})
    out = Path(args.out) if args.out else Path("probes") / Path(args.gin[-1]).stem
    written = probe.write_probe(result, out, plot=not args.no_plot)
    rows = []
    for i, s in enumerate(result.scores, 1):
        rows.append(("—" if s.main else str(i), f"{s.task} (main)" if s.main else s.task,
                     probe.format_interval(s.transference), probe.format_interval(s.cosine)))
    print_table(rows, ("RANK", "TASK", "TRANSFERENCE (95% CI)", "COSINE WITH MAIN (95% CI)"))
    st = result.settings
    print(f"\n{st['measurements']} measurements in a {st['window']}-step window ({st['wall_time_s']:.1f}s; the experiment "
          f"trains {st['full_steps']} steps); main loss on '{st['pool']}' ({st['pool_images']} images)")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0
