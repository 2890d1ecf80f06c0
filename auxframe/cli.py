"""The ``auxframe`` command: ``run``, ``list``, ``describe`` and ``labels``.

This module imports only the standard library at import time; torch is imported by the commands
that need it, so ``auxframe --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="auxframe",
        description="Auxiliary learning: train a main task better with auxiliary tasks.",
        epilog="Example: auxframe run --gin quickstart.gin --gin-param 'train.steps=200'",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="train the experiment described by gin files")
    run.add_argument("--gin", action="append", required=True, metavar="FILE",
                     help="gin config file (repeatable; later files override earlier ones)")
    run.add_argument("--gin-param", action="append", default=[], metavar="BINDING",
                     help="extra gin binding, e.g. 'train.steps=2000' (repeatable; applied last)")
    run.add_argument("--run-dir", metavar="DIR",
                     help="where the run's files go (default: runs/<config name>-<time>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --run-dir from its latest checkpoint")
    run.add_argument("bindings", nargs="*", metavar="KEY=VALUE",
                     help="more gin bindings, applied after --gin-param (as a W&B sweep agent passes them)")

    sweep = sub.add_parser("sweep", help="train a grid of gin parameter values, one run directory per point",
                           epilog="Example: auxframe sweep --gin quickstart.gin --gin weightings/fixed.gin "
                                  "--grid \"weightings.fixed.weights={'parity': [0.1, 1.0], 'rotation': [0.0, 0.5]}\" --seeds 0 1")
    sweep.add_argument("--gin", action="append", required=True, metavar="FILE",
                       help="gin config file (repeatable; later files override earlier ones)")
    sweep.add_argument("--gin-param", action="append", default=[], metavar="BINDING",
                       help="gin binding for every point, e.g. 'train.steps=500' (repeatable)")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=[V1, V2, ...]",
                       help="a swept parameter and its values, e.g. 'torch.optim.Adam.lr=[1e-3, 1e-2]', or a dict with "
                            "list entries swept entry by entry (repeatable; the points are the cartesian product)")
    sweep.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                       help="also sweep the seeds: each sets train.seed and LowDataSplit.seed (the split)")
    sweep.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="train N points at once, each in its own process with cores/N threads (default: 1)")
    sweep.add_argument("--sweep-dir", metavar="DIR",
                       help="where the point run directories and the summary go (default: sweeps/<config name>); "
                            "rerunning into it skips finished points and resumes interrupted ones")
    sweep.add_argument("--wandb-sweep", metavar="YAML",
                       help="write the grid as a W&B sweep configuration to YAML instead of training")
    sweep.add_argument("--dry-run", action="store_true",
                       help="parse every point's config and list the points and their bindings; train nothing")

    ls = sub.add_parser("list", help="list every plugin the registry found, with its package")
    ls.add_argument("kind", nargs="?", help="only this kind (backbones, heads, datasets, ...)")

    desc = sub.add_parser("describe", help="show a plugin's documentation and parameters")
    desc.add_argument("plugin", metavar="KIND.NAME", help="e.g. backbones.small_cnn")

    labels = sub.add_parser("labels", help="save a grid of examples per generated auxiliary class of a run")
    labels.add_argument("run_dir", metavar="RUN_DIR", help="a run with a generated-label task (Task.generator)")
    labels.add_argument("--out", required=True, metavar="PNG", help="the image to write, e.g. grid.png")
    labels.add_argument("--pool", default="train", help="split pool to label (default: train)")
    labels.add_argument("--task", help="the generated-label task (default: the only one)")
    labels.add_argument("--per-class", type=int, default=8, help="examples per auxiliary class (default: 8)")
    labels.add_argument("--classes", type=int, nargs="+", metavar="C",
                        help="main classes to show (default: all, at most the first 10)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from auxframe.errors import AuxframeError

    try:
        return {"run": _run, "sweep": _sweep, "list": _list, "describe": _describe, "labels": _labels}[args.command](args)
    except AuxframeError as err:
        # gin appends "In call to configurable ..." to errors raised inside configurables; drop it.
        message = "\n".join(ln for ln in str(err).splitlines() if not ln.startswith("  In call to configurable"))
        print(f"auxframe: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(f"auxframe: {stop or 'interrupted'}. Continue with --resume.", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from auxframe import config

    if args.resume and not args.run_dir:
        print("auxframe: error: --resume needs --run-dir (the run to continue).", file=sys.stderr)
        return 2
    config.parse(args.gin, [*args.gin_param, *args.bindings])
    from auxframe.experiment import train

    # Under a W&B sweep agent, its run id keeps parallel agents' default run directories apart.
    suffix = f"-{os.environ['WANDB_RUN_ID']}" if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID") else ""
    run_dir = args.run_dir or str(Path("runs") / f"{Path(args.gin[-1]).stem}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}")
    result = train(run_dir=run_dir, resume=args.resume)
    _print_task_table(result["metrics"])
    print(
        f"main task '{result['main_task']}': test {result['main_metric']} = {result['test']:.4f} "
        f"(validation {result['val']:.4f}) after {result['steps']} steps in {result['wall_time_s']:.1f}s"
    )
    best = result["best"]
    if best["step"] != result["steps"]:
        print(
            f"best on validation: step {best['step']}, validation {best['val']:.4f}, "
            f"test {result['main_metric']} = {best['test']:.4f}"
        )
    print(f"run directory: {result['run_dir']}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from auxframe import sweep

    axes = [sweep.parse_grid(spec) for spec in args.grid]
    if args.seeds:
        axes.append(sweep.seeds_axis(args.seeds))
    if not axes:
        print("auxframe: error: nothing to sweep: give at least one --grid 'KEY=[V1, V2]' or --seeds.", file=sys.stderr)
        return 2
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


def _print_task_table(metrics: dict) -> None:
    """Validation and test metrics per task, one line per task and metric."""
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in metrics.items():
        split, task, name = key.split("/", 2)
        rows.setdefault((task, name), {})[split] = value
    print(f"{'task':<14}{'metric':<14}{'val':>9}{'test':>9}")
    for (task, name), v in rows.items():
        print(f"{task:<14}{name:<14}{v.get('val', float('nan')):>9.4f}{v.get('test', float('nan')):>9.4f}")


def _list(args: argparse.Namespace) -> int:
    from auxframe.registry import registry

    rows = []
    for info, _obj, err in registry.load_all(args.kind):
        status = "ok" if err is None else f"broken: {getattr(err, 'cause', err)}"
        if err is not None and "more than one package" in str(err):
            status = f"broken: {err}"
        rows.append((info.name, info.kind, info.dist, info.version, status))
    if not rows:
        print(f"no plugins found{' of kind ' + args.kind if args.kind else ''}")
        return 0
    header = ("NAME", "KIND", "PACKAGE", "VERSION", "STATUS")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:4], widths)) + "  " + str(r[4]))
    return 0


def _describe(args: argparse.Namespace) -> int:
    import inspect

    from auxframe.errors import PluginError
    from auxframe.registry import plugin_parameters, registry

    if "." not in args.plugin:
        raise PluginError(f"name a plugin as KIND.NAME, e.g. backbones.small_cnn (got '{args.plugin}').")
    kind, name = args.plugin.split(".", 1)
    registry._check_kind(kind)  # noqa: SLF001 - same validation, same message
    info = registry.info(kind, name)
    obj = registry.get(kind, name)
    print(f"{kind}.{name}  ({info.value}, package {info.dist} {info.version})")
    print(f"gin: @{kind}.{name}")
    print()
    print(inspect.getdoc(obj) or "(no docstring)")
    params = plugin_parameters(obj)
    if params:
        print()
        print("Parameters:")
        for pname, default in params:
            shown = "(required)" if default is inspect.Parameter.empty else f"= {default!r}"
            print(f"  {pname} {shown}")
    return 0


def _labels(args: argparse.Namespace) -> int:
    from auxframe.labelgrid import generated_classes, save_grid

    classes, dataset = generated_classes(args.run_dir, pool=args.pool, task=args.task)
    path = save_grid(classes, dataset, args.out, per_class=args.per_class, main_classes=args.classes)
    in_use = (classes.counts() > 0).sum(axis=1)
    print(f"task '{classes.task}': {len(classes.assigned)} '{args.pool}' images over {classes.num_classes} x "
          f"{classes.classes_per_main} generated classes; classes in use per main class: {in_use.tolist()}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
