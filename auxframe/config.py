"""Parsing gin files and bindings, with plugins loaded on demand.

Before gin parses anything, the files (and the files they ``include``) and the bindings are scanned
for plugin references such as ``@backbones.small_cnn`` or ``heads.classification.hidden``; exactly
those plugins are loaded from the registry and registered in gin. An unknown plugin name is reported
with its file and line and the closest existing name. Unknown parameters are errors
(``skip_unknown=False``), reported with gin's file and line.

The shipped recipes live inside the package (``auxframe/configs/``). An ``include`` is looked up
in the working directory, the including file's folder (and an enclosing ``configs`` or
``gin_configs`` folder), then the package's recipes, so a gin file anywhere can
``include 'base/train.gin'``. A package path (``include 'auxframe/configs/base/train.gin'``, or a
plugin package's own ``'mypkg/configs/x.gin'``, whose folder has an ``__init__.py``) reads the
file from that installed package through gin's resource reader, as dopamine's recipes do. On the
command line, ``--gin quickstart.gin`` names a shipped recipe when no such file exists where you are
(:func:`resolve_gin_file`; :mod:`auxframe.recipes` lists and finds them).

A misspelt parameter or configurable gets the closest existing name ("Did you mean 'train.steps'?")
after gin's own message, which names the file and line.
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path
from typing import Sequence

import gin
from gin import config as gin_config

from auxframe import recipes
from auxframe.errors import ConfigError, PluginError
from auxframe.recipes import CONFIGS, package_resource
from auxframe.registry import KINDS, plugin_parameters, registry

_REFERENCE = re.compile(r"(?<![\w.])(" + "|".join(KINDS) + r")\.([A-Za-z_]\w*)")
_INCLUDE = re.compile(r"^\s*include\s+['\"]([^'\"]+)['\"]")
#: A binding's key by a bare configurable name (``arml.algorithm = ...``, ``scope/arml.x = ...``), as
#: gin's ``config_str`` writes it (the shortest unambiguous selector) into a run's ``config.gin``.
_BARE_KEY = re.compile(r"^\s*(?:[\w.]+/)*([A-Za-z_]\w*)\.[A-Za-z_]\w*\s*=")


_CONFIG_ROOTS = ("configs", "gin_configs")


def _folders_of(path: Path) -> list[Path]:
    """A gin file's own folder and the enclosing ``configs`` / ``gin_configs`` folder, if any."""
    path = path.resolve()
    return [path.parent] + [p for p in path.parents if p.name in _CONFIG_ROOTS and p != path.parent]


def _resolve_include(name: str, paths: Sequence[Path]) -> Path | None:
    p = Path(name)
    if p.is_absolute():
        return p if p.is_file() else None
    for base in [*paths, CONFIGS]:
        if (base / p).is_file():
            return base / p
    return package_resource(p)


def resolve_gin_file(name: str | Path) -> Path:
    """A ``--gin`` argument as a file: a path that exists, else a recipe shipped in the package
    (``quickstart.gin``, ``experiments/digits_arml`` with or without ``.gin``), else a package path.

    Raises:
        ConfigError: nothing of that name exists; says where it looked and how to list the recipes.
    """
    p = Path(name)
    if p.is_file():
        return p
    found = recipes.find(p)
    if found is not None:
        return found
    raise ConfigError(
        f"gin file {name} does not exist (looked from {Path.cwd()} and among the shipped recipes in {CONFIGS}). "
        f"`auxframe ls` lists the recipes; `auxframe cp RECIPE FILE` copies one to edit."
    )


def scan(gin_files: Sequence[str | Path], bindings: Sequence[str]) -> tuple[list[tuple[str, str, str]], list[Path]]:
    """Plugins named in the files, their includes and the bindings, and the include search paths.

    Returns:
        ``([(kind, name, where), ...], search_paths)``; ``where`` is ``file:line`` or the binding.
    """
    paths: list[Path] = [Path.cwd()]
    refs: list[tuple[str, str, str]] = []
    seen_files: set[Path] = set()

    def add_paths(path: Path) -> None:
        for folder in _folders_of(path):
            if folder not in paths:
                paths.append(folder)

    def scan_text(text: str, label: str, numbered: bool = True) -> None:
        for lineno, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            m = _INCLUDE.match(code)
            if m:
                inc = _resolve_include(m.group(1), paths)
                if inc is None:
                    raise ConfigError(
                        f"{label}:{lineno}: include '{m.group(1)}' not found; searched "
                        f"{', '.join(str(p) for p in paths)}."
                    )
                scan_file(inc)
                continue
            where = f"{label}:{lineno}" if numbered else label
            for kind, name in _REFERENCE.findall(code):
                refs.append((kind, name, where))
            bare = _BARE_KEY.match(code)
            if bare and bare.group(1) not in KINDS:
                refs.extend((kind, bare.group(1), where) for kind in _kinds_named(bare.group(1)))

    def scan_file(path: Path) -> None:
        path = path.resolve()
        if path in seen_files:
            return
        seen_files.add(path)
        add_paths(path)
        scan_text(path.read_text(), str(path))

    for f in gin_files:
        add_paths(Path(f))
    for f in gin_files:
        scan_file(Path(f))
    for b in bindings:
        scan_text(b, f"--gin-param {b!r}", numbered=False)
    return refs, paths


def _kinds_named(name: str) -> list[str]:
    """The one plugin kind that has a plugin called ``name`` (from metadata; nothing is imported), or
    none: a bare ``name.param`` key is that plugin's binding only when the name is unambiguous, as gin
    wrote it. A run's ``config.gin`` keeps the bindings of a plugin the run replaced (the ARML settings
    of a recipe run with ``--gin weightings/stl.gin``) by bare name, and nothing else names the plugin
    for the scan to load; gin would then reject the file it wrote."""
    kinds = [kind for kind in KINDS if any(p.name == name for p in registry.find(kind))]
    return kinds if len(kinds) == 1 else []


def parse(gin_files: Sequence[str | Path], bindings: Sequence[str] = (), finalize: bool = True) -> None:
    """Parse gin files then bindings (replacing any earlier config), loading the plugins they name.

    Raises:
        ConfigError: a missing file, an unknown plugin, configurable or parameter, or bad syntax.
        PluginLoadError: a plugin the config names fails to load.
    """
    import auxframe.experiment  # noqa: F401 - registers train, Task, TaskGraph, optimizers with gin

    gin_files = [resolve_gin_file(f) for f in gin_files]
    gin.clear_config()
    references, paths = scan(gin_files, bindings)
    try:
        registry.load_referenced(references)
    except PluginError as err:
        if type(err) is PluginError:  # unknown or ambiguous name: a config mistake
            raise ConfigError(str(err)) from None
        raise
    # gin looks an include up in its search paths, in order: make them this parse's, exactly, so that
    # gin reads the files the scan found (folders left by earlier parses in this process would
    # otherwise come first; gin has no public call to remove one).
    gin_config._LOCATION_PREFIXES[:] = list(dict.fromkeys(["", *(str(p) for p in [*paths, CONFIGS])]))  # noqa: SLF001
    quiet = _DropGinPathProbes()
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(
            [str(f) for f in gin_files], list(bindings), finalize_config=finalize, skip_unknown=False
        )
    except (ValueError, KeyError, TypeError, SyntaxError, ImportError, IOError) as exc:
        raise ConfigError(_gin_message(exc)) from exc
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropGinPathProbes(logging.Filter):
    """gin logs an error for every search path it probes while looking for an include; drop those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")


def _gin_message(exc: BaseException) -> str:
    msg = str(exc).strip().strip('"')
    if isinstance(exc, KeyError) and msg.startswith("'") and msg.endswith("'"):
        msg = msg[1:-1]
    msg = msg.replace("\\n", "\n")
    first, _, rest = msg.partition("\n")
    hint = _did_you_mean(first)
    return f"{first}{hint}\n{rest}".rstrip("\n") if hint else msg


_UNKNOWN_PARAMETER = re.compile(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'")
_DENYLISTED = re.compile(r"Configurable '([^']+)' has denylisted kwarg '([^']+)'")
_UNKNOWN_CONFIGURABLE = re.compile(r"No configurable matching (?:reference )?'@?([^'(]+)(?:\(\))?'")


def _did_you_mean(message: str) -> str:
    """A hint for gin's unknown-parameter and unknown-configurable errors (empty when none fits)."""
    m = _UNKNOWN_PARAMETER.search(message)
    if m:
        selector, name = m.groups()
        found = configurable(selector)
        names = [p for p, _ in parameters(found)] if found is not None else []
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        if close:
            return f" Did you mean '{selector}.{close[0]}'?"
        if found is None:
            return ""
        return f" Its parameters: {', '.join(names)}." if names else f" {selector} takes no parameters."
    m = _DENYLISTED.search(message)
    if m:
        selector, name = m.groups()
        via = " (`auxframe run` sets it from its command line)" if selector == "train" else ""
        return f" '{name}' cannot be set in gin{via}."
    m = _UNKNOWN_CONFIGURABLE.search(message)
    if m:
        close = difflib.get_close_matches(m.group(1), configurable_names(), n=1, cutoff=0.6)
        return f" Did you mean '{close[0]}'?" if close else " `auxframe describe NAME` shows what can be configured."
    return ""


def configurable(name: str) -> gin_config.Configurable | None:
    """The gin configurable registered under ``name`` (``train``, ``weightings.fixed``, ...), or None."""
    return gin_config._REGISTRY.get_match(name)  # noqa: SLF001 - gin has no public lookup


def configurable_names() -> list[str]:
    """The gin name of every registered configurable (gin's own excluded), sorted."""
    found = [c for _, c in gin_config._REGISTRY.items()]  # noqa: SLF001
    return sorted(gin_name(c) for c in found if c.module != "gin")


def gin_name(found: gin_config.Configurable) -> str:
    """The name gin files use for a configurable: ``train`` and ``LowDataSplit`` (auxframe's core,
    registered without a module), ``torch.optim.Adam``, ``weightings.fixed``."""
    if found.module == found.wrapped.__module__ and found.module.split(".")[0] == "auxframe":
        return gin_config._REGISTRY.minimal_selector(found.selector)  # noqa: SLF001
    return found.selector


def parameters(found: gin_config.Configurable) -> list[tuple[str, object]]:
    """The parameters gin may set on a configurable, as ``(name, default)`` pairs
    (``inspect.Parameter.empty`` marks one without a default); its allow- and denylist applied."""
    params = plugin_parameters(found.wrapped)
    if found.allowlist:
        params = [p for p in params if p[0] in found.allowlist]
    return [p for p in params if p[0] not in (found.denylist or ())]


def operative_config() -> str:
    """What the run actually used: every parameter of every configurable that was called."""
    return gin.operative_config_str()


def reset() -> None:
    """Clear every gin binding (between runs in one process, and in tests)."""
    gin.clear_config()

