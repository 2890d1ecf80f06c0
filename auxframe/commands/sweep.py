"""``auxframe sweep``: train a grid of gin parameter values, one run directory per point."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from auxframe.commands import add_gin_arguments

HELP = "train a grid (or a random / Bayesian search) of gin parameter values, one run directory per point"
EPILOG = ("Example: auxframe sweep --gin quickstart.gin --gin weightings/fixed.gin "
          "--grid \"weightings.fixed.weights={'parity': [0.1, 1.0], 'rotation': [0.0, 0.5]}\" --seeds 0 1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_gin_arguments(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[V1, V2, ...]",
                   help="a swept parameter and its values, e.g. 'torch.optim.Adam.lr=[1e-3, 1e-2]', or a dict with "
                        "list entries swept entry by entry (repeatable; the points are the cartesian product)")
    p.add_argument("--ablate", action="append", default=[], choices=("one-at-a-time", "leave-one-out"),
                   help="sweep the task graph: the main task alone and with each auxiliary task (one-at-a-time), or "
                        "every task and every task but one (leave-one-out); repeatable (auxframe.ablation)")
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
    search = p.add_argument_group("random and Bayesian search (Optuna; docs/sweeps.md)")
    search.add_argument("--search", choices=("grid", "random", "tpe"), default="grid",
                        help="grid: every point of the --grid axes (default); random or tpe (Bayesian): --trials "
                             "configurations sampled from --space and the --grid values, each trained once per seed")
    search.add_argument("--space", action="append", default=[], metavar="KEY=DIST",
                        help="a searched parameter: KEY=loguniform(LOW, HIGH), uniform(...), int(...), logint(...), "
                             "or KEY=[V1, V2, ...] (repeatable)")
    search.add_argument("--trials", type=int, metavar="N", help="the search's number of trials, over all its workers")
    search.add_argument("--storage", metavar="URL",
                        help="Optuna storage shared by workers, e.g. postgresql://host/db (default: "
                             "sqlite:///<sweep-dir>/optuna.db)")
    search.add_argument("--study", metavar="NAME", help="the study's name in the storage (default: the sweep folder's name)")
    search.add_argument("--search-seed", type=int, default=0, metavar="N", help="seeds the sampler (default: 0)")


def main(args: argparse.Namespace) -> int:
    from auxframe import sweep
    from auxframe.errors import ConfigError

    axes = [sweep.parse_grid(spec) for spec in args.grid]
    if args.ablate:
        from auxframe.ablation import ablation_axis

        axes.insert(0, ablation_axis(args.gin, args.gin_param, args.ablate))
    if args.search != "grid":
        return _search(args, axes)
    if args.space or args.trials is not None:
        raise ConfigError("--space and --trials belong to a search: add --search random or --search tpe.")
    if args.seeds:
        axes.append(sweep.seeds_axis(args.seeds))
    if not axes:
        raise ConfigError("nothing to sweep: give at least one --grid 'KEY=[V1, V2]', --ablate or --seeds.")
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
    code = _print_summary(out)
    if args.ablate:
        from auxframe.ablation import write_effects

        try:
            path, text = write_effects(sweep_dir)
        except ConfigError as err:  # no point finished: the summary above says why
            print(f"no ablation effects: {err}")
        else:
            print("\n" + text + f"ablation effects: {path}")
    return code


def _print_summary(out: dict) -> int:
    print()
    print(out["text"], end="")
    print(f"summary: {out['markdown']}, {out['csv']} (configurations) and {out['points_csv']} (points)")
    failed = [r for r in out["results"] if r.status.startswith("failed")]
    return 1 if failed else 0


def _search(args: argparse.Namespace, axes: list) -> int:
    from auxframe import search
    from auxframe.errors import ConfigError

    if args.wandb_sweep:
        raise ConfigError("--wandb-sweep writes grids only; drop --search, or run the search here.")
    if args.trials is None:
        raise ConfigError(f"--search {args.search} needs --trials N (how many configurations to try).")
    dimensions = [search.axis_dimension(a) for a in axes] + [search.parse_space(s) for s in args.space]
    sweep_dir = args.sweep_dir or str(Path("sweeps") / Path(args.gin[-1]).stem)
    if args.dry_run:
        example = search.trial_points({d.key: d.example() for d in dimensions}, (args.seeds or [])[:1],
                                      [d.key for d in dimensions])
        from auxframe import sweep

        sweep.build_points(args.gin, args.gin_param, example)  # a config that does not parse is an error
        for d in dimensions:
            shown = ", ".join(d.choices) if d.kind == "categorical" else f"{d.low:g} .. {d.high:g}"
            print(f"{d.key}: {d.kind} {shown}")
        print(f"{args.trials} trials x {len(args.seeds or [0])} seed(s), {args.search} search")
        return 0
    try:
        out = search.run_search(args.gin, args.gin_param, dimensions, args.seeds or [], sweep_dir, args.trials,
                                args.search, args.storage, args.study, args.search_seed, args.jobs)
    except KeyboardInterrupt as stop:
        print(f"auxframe: {stop or 'interrupted'}. Run the same sweep command again to continue.", file=sys.stderr)
        return 130
    return _print_summary(out)
