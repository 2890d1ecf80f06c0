"""``auxframe describe``: what a plugin, a plugin kind or a configurable is, and its parameters.

- ``describe KIND.NAME`` imports that plugin alone (and torch): its documentation, package and gin
  parameters. ``--fields`` builds a dataset and lists its label fields with their shapes.
- ``describe KIND``: what a plugin of that kind is, and the installed ones (metadata only).
- ``describe NAME``: a configurable of the core (``train``, ``Task``, ``TaskGraph``,
  ``LowDataSplit``, ``field_tasks``, ``WandbLogger``, ``torch.optim.Adam``, ...).
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any

from auxframe.commands import add_gin_arguments, print_table

HELP = "show what a plugin, plugin kind or configurable (train, Task, LowDataSplit, ...) is, and its parameters"
EPILOG = ("Examples: auxframe describe weightings.arml | auxframe describe train | "
          "auxframe describe datasets.digits --fields")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="KIND.NAME | KIND | NAME",
                   help="a plugin (backbones.small_cnn), a kind (weightings) or a configurable (train, Task, TaskGraph, "
                        "LowDataSplit, torch.optim.Adam)")
    p.add_argument("--fields", action="store_true",
                   help="for a dataset: build it and list its label fields with their shapes and dtypes")
    add_gin_arguments(p, required=False)
    p.epilog = None


def main(args: argparse.Namespace) -> int:
    from auxframe.errors import ConfigError
    from auxframe.registry import KINDS

    kind, _, name = args.name.partition(".")
    if args.fields and (kind != "datasets" or not name):
        raise ConfigError(f"--fields lists a dataset's label fields: name one as datasets.NAME (got '{args.name}').")
    if kind in KINDS and name:
        return _plugin(kind, name, args)
    if kind in KINDS:
        return _kind(kind)
    return _configurable(args.name)


def _plugin(kind: str, name: str, args: argparse.Namespace) -> int:
    from auxframe.registry import plugin_parameters, registry

    info = registry.info(kind, name)
    obj = registry.get(kind, name)
    _print_doc(f"{kind}.{name}  ({info.value}, package {info.dist} {info.version})",
               f"gin: @{kind}.{name}, parameters set as {kind}.{name}.PARAMETER = VALUE", obj, plugin_parameters(obj))
    if kind == "datasets":
        print()
        if args.fields:
            _print_fields(name, args)
        else:
            print(f"Label fields: `auxframe describe datasets.{name} --fields` builds the dataset and lists them "
                  f"(with --gin-param to point it at its data).")
    return 0


def _kind(kind: str) -> int:
    from auxframe.registry import KIND_DESCRIPTIONS, registry

    print(f"{kind}: {KIND_DESCRIPTIONS[kind]}")
    print(f"entry-point group: auxframe.{kind}; in gin: @{kind}.NAME")
    print()
    rows = [(p.name, p.dist, p.value) for p in registry.find(kind)]
    print_table(rows, ("NAME", "PACKAGE", "TARGET")) if rows else print("(none installed)")
    return 0


def _configurable(name: str) -> int:
    import difflib

    import auxframe.experiment  # noqa: F401 - registers train, Task, TaskGraph, LowDataSplit, ... with gin
    from auxframe import config
    from auxframe.errors import ConfigError
    from auxframe.registry import KINDS

    found = config.configurable(name)
    if found is None:
        known = config.configurable_names()
        close = difflib.get_close_matches(name, [*known, *KINDS], n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"nothing called '{name}' to describe.{hint} Name a plugin as KIND.NAME (e.g. backbones.small_cnn; "
            f"`auxframe list`), a kind ({', '.join(KINDS)}), or a configurable: "
            f"{', '.join(n for n in known if '.' not in n)}."
        )
    short = config.gin_name(found)
    where = f"{found.wrapped.__module__}.{found.wrapped.__qualname__}"
    _print_doc(f"{short}  ({where})", f"gin: {short}.PARAMETER = VALUE, or scoped: SCOPE/{short}.PARAMETER = VALUE",
               found.wrapped, config.parameters(found))
    return 0


def _print_doc(title: str, gin_line: str, obj: Any, params: list[tuple[str, Any]]) -> None:
    print(title)
    print(gin_line)
    print()
    print(inspect.getdoc(obj) or "(no docstring)")
    if params:
        print()
        print("Parameters:")
        for pname, default in params:
            shown = "(required)" if default is inspect.Parameter.empty else f"= {default!r}"
            print(f"  {pname} {shown}")


def _print_fields(name: str, args: argparse.Namespace) -> None:
    """Build the dataset under the given gin files and bindings, and list its label fields."""
    import gin
    import torch

    from auxframe import config
    from auxframe.errors import AuxframeError, DataError

    config.parse(args.gin, args.gin_param)
    try:
        dataset = gin.get_configurable(f"datasets.{name}")()
    except AuxframeError as err:
        raise DataError(f"cannot list the label fields of datasets.{name} without building it: {err}") from err
    _, labels = dataset.get_batch(torch.arange(1))
    official = getattr(dataset, "official_test", None)
    print(f"{len(dataset)} images of shape {tuple(dataset.input_shape)}; the split stratifies on "
          f"'{dataset.main_field}'" + (f"; {len(official)} official test images" if official is not None else ""))
    print()
    rows = []
    for field, spec in dataset.fields.items():
        size = f"{spec.num_classes} classes" if spec.kind != "regression" else f"{spec.channels} channels"
        label = labels[field]
        rows.append((field, spec.kind, size, f"{tuple(label.shape[1:])} {str(label.dtype).replace('torch.', '')}",
                     spec.description))
    print_table(rows, ("FIELD", "KIND", "OUTPUTS", "LABEL SHAPE", "DESCRIPTION"))
