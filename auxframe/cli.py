"""The ``auxframe`` command.

Each subcommand is a module of :mod:`auxframe.commands` (``HELP``, ``add_arguments(parser)``,
``main(args) -> int``), listed in :data:`COMMANDS` in the order ``--help`` shows them; adding one is a
module and a name here. Command modules import only the standard library at import time, and torch
only in the handlers that need it, so ``auxframe --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

#: The subcommands, each the module ``auxframe.commands.<name>``.
COMMANDS: tuple[str, ...] = ("run", "validate", "sweep", "report", "probe", "ls", "cp", "list", "describe", "labels")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="auxframe",
        description="Auxiliary learning: train a main task better with auxiliary tasks.",
        epilog="Example: auxframe run --gin quickstart.gin --gin-param 'train.steps=200'",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"auxframe.commands.{name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP[:1].upper() + module.HELP[1:] + ".",
                             epilog=getattr(module, "EPILOG", None))
        module.add_arguments(cmd)
        cmd.set_defaults(handler=module.main)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from auxframe.errors import AuxframeError

    try:
        return args.handler(args)
    except AuxframeError as err:
        # gin appends "In call to configurable ..." to errors raised inside configurables; drop it.
        message = "\n".join(ln for ln in str(err).splitlines() if not ln.startswith("  In call to configurable"))
        print(f"auxframe: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # a plugin's own error while gin built it: one line naming the plugin
        from auxframe.testing.dry import plugin_failure

        failure = plugin_failure(exc)
        if failure is None:
            raise
        print(f"auxframe: error: {failure}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(f"auxframe: {stop or 'interrupted'}. Continue with --resume.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `auxframe ls | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
