"""``auxframe cp``: copy a shipped recipe to edit it (as torchtune's ``tune cp``)."""

from __future__ import annotations

import argparse

HELP = "copy a shipped recipe to a file of your own to edit"
EPILOG = "Example: auxframe cp experiments/digits_arml.gin my_arml.gin && auxframe run --gin my_arml.gin"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", metavar="RECIPE", help="a recipe as `auxframe ls` names it, e.g. quickstart.gin")
    p.add_argument("destination", metavar="FILE", help="the file to write, or a folder to copy it into")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")


def main(args: argparse.Namespace) -> int:
    from auxframe import recipes

    _, written = recipes.copy(args.recipe, args.destination, force=args.force)
    print(f"copied {args.recipe} to {written}; its includes still read the shipped recipes. "
          f"Run it with: auxframe run --gin {written}")
    return 0
