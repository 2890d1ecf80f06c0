"""``auxframe labels``: a grid of examples per generated auxiliary class of a run."""

from __future__ import annotations

import argparse

HELP = "save a grid of examples per generated auxiliary class of a run"
EPILOG = "Example: auxframe labels runs/generated --out grid.png --classes 3 8"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run with a generated-label task (Task.generator)")
    p.add_argument("--out", required=True, metavar="PNG", help="the image to write, e.g. grid.png")
    p.add_argument("--pool", default="train", help="split pool to label (default: train)")
    p.add_argument("--task", help="the generated-label task (default: the only one)")
    p.add_argument("--per-class", type=int, default=8, help="examples per auxiliary class (default: 8)")
    p.add_argument("--classes", type=int, nargs="+", metavar="C",
                   help="main classes to show (default: all, at most the first 10)")


def main(args: argparse.Namespace) -> int:
    from auxframe.labelgrid import generated_classes, save_grid

    classes, dataset = generated_classes(args.run_dir, pool=args.pool, task=args.task)
    path = save_grid(classes, dataset, args.out, per_class=args.per_class, main_classes=args.classes)
    in_use = (classes.counts() > 0).sum(axis=1)
    print(f"task '{classes.task}': {len(classes.assigned)} '{args.pool}' images over {classes.num_classes} x "
          f"{classes.classes_per_main} generated classes; classes in use per main class: {in_use.tolist()}")
    print(f"wrote {path}")
    return 0
