"""A run's configuration: its gin bindings read back from config text, and the name of the
configuration they make.

The *configuration* of a run is its config (``config.gin``, ``gin.config_str()``) without the seeds
(``train.seed``, ``LowDataSplit.seed``) and without what only logs (``train.progress``, the W&B
settings): the runs of one configuration are its seeds. ``auxframe sweep`` summarises over them,
``auxframe report`` makes one row of each, and W&B groups them under :func:`group_name`.

This module imports only gin's parser and the standard library, so every other module can use it.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from auxframe.errors import ConfigError

SEED_KEY = "train.seed"
SPLIT_SEED_KEY = "LowDataSplit.seed"
#: The parameters that only seed a run; runs that differ in nothing else form one configuration.
SEED_KEYS = (SEED_KEY, SPLIT_SEED_KEY)
#: Bindings that do not change what a run computes, left out of its configuration: what only logs.
NOT_CONFIG = ("train.progress", "train.wandb", "WandbLogger.")


@dataclass(frozen=True)
class _Ref:
    """A gin reference or macro inside a parsed value; ``repr`` gives its gin text back."""

    text: str

    def __repr__(self) -> str:
        return self.text


class _Delegate:
    """Parser delegate for ``gin.config_parser``: keeps references and macros as their text."""

    def configurable_reference(self, scoped_name: str, evaluate: bool) -> _Ref:
        return _Ref(f"@{scoped_name}{'()' if evaluate else ''}")

    def macro(self, name: str) -> _Ref:
        return _Ref(f"%{name}")


def gin_text(value: Any) -> str:
    """The gin text of a parsed value (Python literals, references, macros)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"grid value {value!r} cannot be written in gin; use finite numbers.")
    return repr(value)


def config_bindings(text: str) -> dict[str, str]:
    """A saved gin config (``config.gin``) as ``key -> gin text`` (``scope/Name.param``; macros as
    ``%NAME``), with macro references replaced by the macros' values."""
    from gin import config_parser

    out: dict[str, str] = {}
    for statement in config_parser.ConfigParser(text, _Delegate()):
        if not isinstance(statement, config_parser.BindingStatement):
            continue
        scope = f"{statement.scope}/" if statement.scope else ""
        key = f"{scope}{statement.selector}.{statement.arg_name}" if statement.arg_name else f"%{statement.selector}"
        out[key] = gin_text(statement.value)
    return {k: out.get(v, v) if v.startswith("%") else v for k, v in out.items()}


def configuration(bindings: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """A run's configuration: its bindings (:func:`config_bindings`) without the seeds and without
    what only logs, sorted. Runs that differ only in their seeds share it."""
    return tuple(sorted((k, v) for k, v in bindings.items()
                        if k not in SEED_KEYS and not k.startswith(NOT_CONFIG) and not k.startswith("%")))


def group_name(config: str) -> str:
    """A readable, stable name of a config's configuration: ``<dataset>-<weighting>-<hash>``, e.g.
    ``digits-arml-3f9c2a1b``. The same for every seed; another for any other change.

    Args:
        config: gin config text (``gin.config_str()``, or a run's ``config.gin``).
    """
    bindings = config_bindings(config)
    digest = hashlib.sha256("\n".join(f"{k} = {v}" for k, v in configuration(bindings)).encode()).hexdigest()[:8]
    dataset = plugin_named(bindings, "train.dataset", "datasets")
    return f"{dataset}-{plugin_named(bindings, 'train.weighting', 'weightings', 'equal')}-{digest}"


def plugin_named(bindings: Mapping[str, str], key: str, kind: str, default: str = "none") -> str:
    """The plugin name a binding refers to (``train.weighting = @weightings.arml()`` -> ``arml``)."""
    value = bindings.get(key)
    if value is None:
        return default
    m = re.search(rf"@(?:[\w.]+/)*{kind}\.(\w+)", value)
    return m.group(1) if m else re.sub(r"\W+", "_", value).strip("_")[:24] or default
