"""``auxframe describe``: a plugin's documentation and parameters."""

from __future__ import annotations

import argparse

HELP = "show a plugin's documentation and parameters"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plugin", metavar="KIND.NAME", help="e.g. backbones.small_cnn")


def main(args: argparse.Namespace) -> int:
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
