"""The subcommands of ``auxframe``: one module each.

A command module has a one-line ``HELP``, ``add_arguments(parser)`` and ``main(args) -> int``, and
may set ``EPILOG`` (an example shown under its ``--help``). ``auxframe/cli.py`` lists the modules in
:data:`auxframe.cli.COMMANDS`; adding a command is one module and one name there. A command module
imports only the standard library at import time (``auxframe --help`` builds every parser), and
keeps its logic in the library module it drives (``auxframe.sweep``, ``auxframe.labelgrid``, ...):
the command parses arguments, calls that module and prints.

A handler reports bad input by raising one of :mod:`auxframe.errors`' exceptions; ``auxframe``
prints it as one line ``auxframe: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse


def add_gin_arguments(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--gin FILE`` (repeatable) and ``--gin-param BINDING`` (repeatable), as every command that
    reads an experiment takes them."""
    p.add_argument("--gin", action="append", required=required, default=None if required else [], metavar="FILE",
                   help="gin config file, or a shipped recipe such as quickstart.gin (`auxframe ls`); "
                        "repeatable, later files override earlier ones")
    p.add_argument("--gin-param", action="append", default=[], metavar="BINDING",
                   help="extra gin binding, e.g. 'train.steps=2000' (repeatable; applied last)")


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> None:
    """Rows as left-aligned columns two spaces apart; the last column is not padded."""
    table = [header, *rows] if header else list(rows)
    if not table:
        return
    widths = [max(len(str(r[i])) for r in table) for i in range(len(table[0]) - 1)]
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths)) + ("  " if widths else "") + str(r[-1]))
