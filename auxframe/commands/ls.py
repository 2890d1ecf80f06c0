"""``auxframe ls``: the shipped recipes, one line each (as torchtune's ``tune ls``)."""

from __future__ import annotations

import argparse
import shutil
import sys

from auxframe.commands import print_table

HELP = "list the shipped recipes (gin files) with what each one is"
EPILOG = "Example: auxframe ls experiments/   then   auxframe cp experiments/digits_arml.gin mine.gin"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", nargs="?", default="", metavar="PREFIX",
                   help="only recipes whose name starts with this, e.g. experiments/ or weightings/")


def main(args: argparse.Namespace) -> int:
    from auxframe import recipes

    for missing in recipes.missing_sources():
        print(f"auxframe: warning: recipe folder {missing} is not an installed package; skipped.", file=sys.stderr)
    found = recipes.recipes(args.prefix)
    if not found:
        print(f"no recipes{' starting with ' + repr(args.prefix) if args.prefix else ''}")
        return 0
    width = 10**6  # piped: whole sentences, for grep
    if sys.stdout.isatty():  # on a terminal: one line each
        width = max(40, shutil.get_terminal_size().columns - max(len(r.name) for r in found) - 2)
    print_table([(r.name, _fit(r.description, width)) for r in found], ("RECIPE", "DESCRIPTION"))
    return 0


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."
