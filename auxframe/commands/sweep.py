"""``auxframe sweep``: train a grid of gin parameter values, one run directory per point."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from auxframe.commands import add_gin_arguments

HELP = "train a grid of gin parameter values, one run directory per point"
EPILOG = ("Example: auxframe sweep --gin quickstart.gin --gin weightings/fixed.gin "
          "--grid \"weightings.fixed.weights={'parity': [0.1, 1.0], 'rotation': [0.0, 0.5]}\" --seeds 0 1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_gin_arguments(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[V1, V2, ...]",
                   help="a swept parameter and its values, e.g. 'torch.optim.Adam.lr=[1e-3, 1e-2]', or a dict with "
                        "list entries swept entry by entry (repeatable; the points are the cartesian product)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="also sweep the seeds: each sets train.seed and LowDataSplit.seed (the split)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N points at once, each in its own process with cores/N threads (default: 1)")
    p.add_argument("--sweep-dir", metavar="DIR",
                   help="where the point run directories and the summary go (default: sweeps/<config name>); "
                        "rerunning into it skips finished points and resumes interrupted ones")
    p.add_argument("--wandb-sweep", metavar="YAML",
                   help="write the grid as a W&B sweep configuration to YAML instead of training")
    p.add_argument("--dry-run", action="store_true",
                   help="parse every point's config and list the points and their bindings; train nothing")


def main(args: argparse.Namespace) -> int:
    from auxframe import sweep
    from auxframe.errors import ConfigError

    axes = [sweep.parse_grid(spec) for spec in args.grid]
    if args.seeds:
        axes.append(sweep.seeds_axis(args.seeds))
    if not axes:
        raise ConfigError("nothing to sweep: give at least one --grid 'KEY=[V1, V2]' or --seeds.")
    points = sweep.grid_points(axes)
    if args.dry_run:
        sweep.build_points(args.gin, args.gin_param, points)  # a config that does not parse is an error
        for p in points:
            print(f"{p.name}: {'; '.join(p.bindings)}")
        print(f"{len(points)} points")
        return 0
    if args.wandb_sweep:
        _, higher = sweep.build_points(args.gin, args.gin_param, points)  # every point must build
        spec = sweep.wandb_sweep_config(args.gin, args.gin_param, axes, Path(args.wandb_sweep).stem, higher)
        path = sweep.write_wandb_sweep(args.wandb_sweep, spec, args.gin)
        print(f"wrote W&B sweep of {len(points)} runs to {path}; start it with: wandb sweep {path}")
        return 0
    sweep_dir = args.sweep_dir or str(Path("sweeps") / Path(args.gin[-1]).stem)
    try:
        out = sweep.run_sweep(args.gin, args.gin_param, axes, sweep_dir, jobs=args.jobs)
    except KeyboardInterrupt as stop:
        print(f"auxframe: {stop or 'interrupted'}. Run the same sweep command again to continue.", file=sys.stderr)
        return 130
    print()
    print(out["text"], end="")
    print(f"summary: {out['markdown']}, {out['csv']} (configurations) and {out['points_csv']} (points)")
    failed = [r for r in out["results"] if r.status.startswith("failed")]
    return 1 if failed else 0
