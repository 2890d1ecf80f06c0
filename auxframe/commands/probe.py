"""``auxframe probe``: how much each auxiliary task helps the main task, from one short window (:mod:`auxframe.probe`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from auxframe.commands import add_gin_arguments, print_table

HELP = "rank the auxiliary tasks by how much they help the main task (lookahead transference, gradient cosine)"
EPILOG = ("Example: auxframe sweep --gin experiments/digits_min_data.gin --ablate one-at-a-time --seeds 0 1 2 3 4 "
          "--sweep-dir sweeps/min_data_ablation; auxframe probe --gin experiments/digits_min_data.gin --seeds 0 1 2 3 4 "
          "--against sweeps/min_data_ablation --out probes/min_data")


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
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, metavar="S", help="set train.seed and LowDataSplit.seed")
    seeds.add_argument("--seeds", type=int, nargs="+", metavar="S",
                       help="probe once per seed (each into OUT/seed-S) and rank the tasks by their mean over the "
                            "seeds, with 95%% intervals (OUT/probes.md, probes.json)")
    p.add_argument("--against", metavar="SWEEP_DIR",
                   help="an `auxframe sweep --ablate ...` directory of the same experiment: put its effects beside "
                        "the probe's ranking, with Spearman's rank correlation per seed and of the means")
    p.add_argument("--ablation", choices=("one-at-a-time", "leave-one-out"),
                   help="which ablation of --against (default: one-at-a-time if it ran, else leave-one-out)")
    p.add_argument("--metric", default="best_test", choices=("best_test", "best_val", "test", "val"),
                   help="the ablation's metric (default: best_test, the test metric of the best-on-validation state)")
    p.add_argument("--out", metavar="DIR",
                   help="where probe.json, probe.md and probe.png go (default: probes/<config name>)")
    p.add_argument("--run-dir", metavar="DIR", help="also keep the window's run (logs, W&B run of job type 'probe')")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")


def main(args: argparse.Namespace) -> int:
    from auxframe import probe
    from auxframe.errors import ConfigError

    effects = None
    if args.against:  # read first: a wrong folder fails before any training
        from auxframe.ablation import ablation_effects

        found = ablation_effects(args.against, args.metric)
        mode = args.ablation or ("one-at-a-time" if "one-at-a-time" in found else "leave-one-out")
        if mode not in found:
            raise ConfigError(f"{args.against} has no finished {mode} ablation (it has: {', '.join(found) or 'none'}).")
        effects = found[mode]
    chosen = {"steps": args.steps, "every": args.every, "start": args.start, "head_warmup": args.head_warmup,
              "head_lr": args.head_lr, "batches": args.batches}
    options = dict(lookahead_lr=args.lookahead_lr, pool=args.pool, keep_weighting=args.keep_weighting,
                   **{k: v for k, v in chosen.items() if v is not None})
    out = Path(args.out) if args.out else Path("probes") / Path(args.gin[-1]).stem
    seeds = args.seeds if args.seeds else ([args.seed] if args.seed is not None else [None])
    results = []
    for seed in seeds:
        params = list(args.gin_param)
        if seed is not None:
            params += [f"train.seed = {seed}", f"LowDataSplit.seed = {seed}"]
        run_dir = args.run_dir if len(seeds) == 1 or not args.run_dir else Path(args.run_dir) / f"seed-{seed}"
        result = probe.run_probe(args.gin, params, run_dir=run_dir, **options)
        written = probe.write_probe(result, out / f"seed-{seed}" if args.seeds else out, plot=not args.no_plot)
        results.append(result)
        if args.seeds:
            print(f"seed {seed}: {' > '.join(result.ranking)} ({result.settings['wall_time_s']:.1f}s)", flush=True)
    if not args.seeds:
        _print_one(results[0], effects)
        print("wrote " + ", ".join(str(p) for p in written.values()))
        return 0
    over = probe.over_seeds(args.seeds, results)
    agreed = probe.agreement(over, effects) if effects else None
    text = probe.markdown_seeds(over, effects, agreed)
    written = probe.write_seeds(over, out, effects, agreed, plot=not args.no_plot)
    print("\n" + text)
    print("wrote " + ", ".join(str(p) for p in written.values()) + f" and {out}/seed-*/")
    return 0


def _print_one(result, effects) -> None:
    from auxframe import probe

    by_task = {e.task: e for e in effects or ()}
    rows = []
    for i, s in enumerate(result.scores, 1):
        row = ("—" if s.main else str(i), f"{s.task} (main)" if s.main else s.task,
               probe.format_interval(s.transference), probe.format_interval(s.cosine))
        if effects is not None:
            row += (probe.format_interval(by_task[s.task].effect, 4) if s.task in by_task else "—",)
        rows.append(row)
    header = ("RANK", "TASK", "TRANSFERENCE (95% CI)", "COSINE WITH MAIN (95% CI)")
    print_table(rows, header + (("ABLATION EFFECT",) if effects is not None else ()))
    st = result.settings
    print(f"\n{st['measurements']} measurements in a {st['window']}-step window ({st['wall_time_s']:.1f}s; the experiment "
          f"trains {st['full_steps']} steps); main loss on '{st['pool']}' ({st['pool_images']} images)")
