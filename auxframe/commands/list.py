"""``auxframe list``: every plugin the registry found, with its package."""

from __future__ import annotations

import argparse

from auxframe.commands import print_table

HELP = "list every plugin the registry found, with its package"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", nargs="?", help="only this kind (backbones, heads, datasets, ...)")


def main(args: argparse.Namespace) -> int:
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
    print_table(rows, ("NAME", "KIND", "PACKAGE", "VERSION", "STATUS"))
    return 0
