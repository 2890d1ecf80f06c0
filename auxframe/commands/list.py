"""``auxframe list``: every plugin the registry found, from package metadata alone.

Nothing is imported (``list`` answers in a fraction of a second, without torch); ``--check`` loads
each plugin and shows whether it loads, a broken one with its package and why, the others still
listed.
"""

from __future__ import annotations

import argparse
import sys

from auxframe.commands import print_table

HELP = "list every installed plugin with its package (--check: load each one and show its status)"
EPILOG = "Example: auxframe list weightings --check"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", nargs="?", help="only this kind (backbones, heads, datasets, ...)")
    p.add_argument("--check", action="store_true",
                   help="import every plugin and show whether it loads (slower: imports torch and the plugins)")


def main(args: argparse.Namespace) -> int:
    from auxframe.registry import registry

    if args.kind is not None:
        registry.check_kind(args.kind)
    if args.check:
        rows = [(info.name, info.kind, info.dist, info.version, _status(err))
                for info, _obj, err in registry.load_all(args.kind)]
        header: tuple[str, ...] = ("NAME", "KIND", "PACKAGE", "VERSION", "STATUS")
    else:
        rows = [(info.name, info.kind, info.dist, info.version, info.value) for info in registry.find(args.kind)]
        header = ("NAME", "KIND", "PACKAGE", "VERSION", "TARGET")
    if not rows:
        print(f"no plugins found{' of kind ' + args.kind if args.kind else ''}")
        return 0
    print_table(rows, header)
    if not args.check:
        for clash in registry.clashes(args.kind):
            print(f"auxframe: warning: {clash}", file=sys.stderr)
    return 0


def _status(err) -> str:
    if err is None:
        return "ok"
    if "more than one package" in str(err):
        return f"broken: {err}"
    return f"broken: {getattr(err, 'cause', err)}"
