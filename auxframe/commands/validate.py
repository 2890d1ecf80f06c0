"""``auxframe validate``: ``auxframe run --dry-run`` under its own name (as ``tune validate``)."""

from __future__ import annotations

import argparse

from auxframe.commands import run

HELP = "check an experiment without training: parse, build, dry forward, print the operative config"
EPILOG = "Example: auxframe validate --gin my_experiment.gin --gin-param 'train.steps=200'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    run.add_arguments(p)
    p.set_defaults(dry_run=True)


def main(args: argparse.Namespace) -> int:
    args.dry_run = True
    return run.main(args)
