"""Plugin registry: every backbone, head, dataset, weighting, ... is found through entry points.

Built-in plugins are declared in auxframe's own ``pyproject.toml`` exactly as a third-party package
declares its own, so there is one path of discovery. Finding reads package metadata only
(:meth:`Registry.find`); loading imports lazily, on first use (:meth:`Registry.get`). A loaded plugin
is registered with gin as ``<kind>.<name>`` so that gin files can say ``@backbones.small_cnn``
without the plugin importing gin.

Example:
    >>> from auxframe.registry import registry
    >>> [p.name for p in registry.find("weightings")]       # metadata only, nothing imported
    ['equal', 'fixed', 'stl', ...]
    >>> Equal = registry.get("weightings", "equal")          # imports the plugin, registers it in gin

This module imports neither torch nor gin at import time, so ``auxframe --help`` stays fast.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Iterable

from auxframe.errors import PluginError, PluginLoadError

#: The plugin kinds; each is the entry-point group ``auxframe.<kind>``.
KINDS: tuple[str, ...] = (
    "backbones",
    "heads",
    "datasets",
    "signals",
    "weightings",
    "auxnets",
    "labelgens",
    "losses",
    "metrics",
)

KIND_DESCRIPTIONS = {
    "backbones": "shared feature extractors: factory(input_shape, **params) -> nn.Module",
    "heads": "task heads: factory(feature_shape, num_outputs, **params) -> nn.Module",
    "datasets": "data sources: factory(**params) -> auxframe.data.ImageDataset",
    "signals": "self-supervised label sources: object with num_classes and "
    "__call__(images, generator=None, train=True) -> (images, labels)",
    "weightings": "loss-weighting algorithms: subclasses of auxframe.weighting.Weighting",
    "auxnets": "auxiliary networks that combine losses or generate labels: nn.Module",
    "labelgens": "auxiliary-label generators: factory(input_shape, num_classes, **params) -> nn.Module "
    "mapping (images, main labels) to soft labels over num_classes * classes_per_main classes",
    "losses": "per-sample losses: fn(output, target) -> unreduced tensor with a batch dimension",
    "metrics": "metrics: class with update(output, target) and compute() -> dict (a new one per evaluation)",
}

_SINGULAR = {k: ("loss" if k == "losses" else k[:-1]) for k in KINDS}


def group_of(kind: str) -> str:
    """The entry-point group of a plugin kind, e.g. ``auxframe.backbones``."""
    return f"auxframe.{kind}"


@dataclass(frozen=True)
class PluginInfo:
    """A plugin as found in package metadata; nothing has been imported to make it.

    Attributes:
        kind: plugin kind, one of :data:`KINDS`.
        name: the entry-point name, the name used in gin (``@<kind>.<name>``).
        value: the entry point's target, ``module:attr``.
        dist: name of the distribution (package) that declares it.
        version: that distribution's version.
    """

    kind: str
    name: str
    value: str
    dist: str
    version: str
    entry_point: Any = None

    @property
    def qualified_name(self) -> str:
        return f"{self.kind}.{self.name}"


def _type_checks() -> dict[str, Callable[[Any], str | None]]:
    """Per kind: a check returning None when ``obj`` is acceptable, else the reason it is not.

    Imports torch, so it runs only when a plugin is loaded.
    """
    import torch.nn as nn

    from auxframe.weighting.base import Weighting

    def module_or_factory(obj: Any) -> str | None:
        if inspect.isclass(obj) and not issubclass(obj, nn.Module):
            return f"{obj.__qualname__} is a class but not a torch.nn.Module"
        if not callable(obj):
            return f"{obj!r} is not callable (expected an nn.Module class or a factory function)"
        return None

    def weighting(obj: Any) -> str | None:
        if inspect.isclass(obj) and not issubclass(obj, Weighting):
            return f"{obj.__qualname__} does not subclass auxframe.weighting.Weighting"
        if not callable(obj):
            return f"{obj!r} is not callable (expected a Weighting subclass or a factory)"
        return None

    def metric(obj: Any) -> str | None:
        if inspect.isclass(obj):
            missing = [m for m in ("update", "compute") if not callable(getattr(obj, m, None))]
            if missing:
                return f"{obj.__qualname__} lacks method(s) {', '.join(missing)}"
            return None
        return None if callable(obj) else f"{obj!r} is not callable"

    def any_callable(obj: Any) -> str | None:
        return None if callable(obj) else f"{obj!r} is not callable"

    return {
        "backbones": module_or_factory,
        "heads": module_or_factory,
        "auxnets": module_or_factory,
        "labelgens": module_or_factory,
        "weightings": weighting,
        "metrics": metric,
        "datasets": any_callable,
        "signals": any_callable,
        "losses": any_callable,
    }


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "<unknown package>", "?"
    return dist.metadata["Name"] or dist.name, dist.version


class Registry:
    """Finds plugins through entry points and loads them on demand.

    Args:
        entry_points: where to look. By default ``importlib.metadata.entry_points`` (every
            installed package); tests pass a callable ``group -> iterable of EntryPoint``.
        register_in_gin: whether loaded plugins are registered with gin as ``<kind>.<name>``.
    """

    def __init__(
        self,
        entry_points: Callable[[str], Iterable[metadata.EntryPoint]] | None = None,
        register_in_gin: bool = True,
    ):
        self._entry_points = entry_points or (lambda group: metadata.entry_points(group=group))
        self._register_in_gin = register_in_gin
        self._found: dict[str, list[PluginInfo]] = {}
        self._loaded: dict[tuple[str, str], Any] = {}
        self._failed: dict[tuple[str, str], PluginError] = {}

    def refresh(self) -> None:
        """Forget what was found and what failed (after ``pip install`` in this process); loaded plugins stay."""
        import importlib

        importlib.invalidate_caches()
        self._found.clear()
        self._failed.clear()

    # -- finding (metadata only) -------------------------------------------------------------
    def find(self, kind: str | None = None) -> list[PluginInfo]:
        """Every plugin of ``kind`` (or of every kind), sorted by name; imports nothing."""
        kinds = [self.check_kind(kind)] if kind is not None else list(KINDS)
        found: list[PluginInfo] = []
        for k in kinds:
            if k not in self._found:
                seen: dict[tuple[str, str, str], PluginInfo] = {}
                for ep in self._entry_points(group_of(k)):
                    dist, version = _dist_of(ep)
                    info = PluginInfo(k, ep.name, ep.value, dist, version, ep)
                    # The same distribution visible twice on sys.path is one plugin, not a clash.
                    seen.setdefault((ep.name, ep.value, dist), info)
                self._found[k] = sorted(seen.values(), key=lambda p: (p.name, p.dist))
            found.extend(self._found[k])
        return found

    def names(self, kind: str) -> list[str]:
        """Sorted, unique plugin names of ``kind``."""
        return sorted({p.name for p in self.find(kind)})

    def info(self, kind: str, name: str) -> PluginInfo:
        """The one plugin called ``name``; raises a clear error if unknown or declared twice."""
        matches = [p for p in self.find(kind) if p.name == name]
        if not matches:
            raise PluginError(self._unknown_message(kind, name))
        if len(matches) > 1:
            where = " and ".join(f"'{p.dist}' ({p.value})" for p in matches)
            raise PluginError(
                f"{kind}.{name} is declared by more than one package: {where}. Uninstall one of "
                f"them, or rename the entry point in one package's pyproject.toml."
            )
        return matches[0]

    def clashes(self, kind: str | None = None) -> list[str]:
        """One message per plugin name declared by more than one package (metadata only)."""
        out = []
        for k in [self.check_kind(kind)] if kind is not None else KINDS:
            for name in self.names(k):
                try:
                    self.info(k, name)
                except PluginError as err:
                    out.append(str(err))
        return out

    # -- loading -----------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Any:
        """Load (once) and return the plugin object; registers it in gin as ``<kind>.<name>``.

        Raises:
            PluginError: unknown name (with the closest match) or a name declared twice.
            PluginLoadError: the plugin raised on import or is not of its kind.
        """
        key = (kind, name)
        if key in self._loaded:
            return self._loaded[key]
        if key in self._failed:
            raise self._failed[key]
        info = self.info(kind, name)
        try:
            obj = info.entry_point.load()
        except Exception as exc:  # any import-time failure of third-party code
            err = PluginLoadError(kind, name, info.dist, info.value, exc)
            err.__cause__ = exc
            self._failed[key] = err
            raise err from exc
        reason = _type_checks()[kind](obj)
        if reason:
            err = PluginLoadError(kind, name, info.dist, info.value, f"not a {_SINGULAR[kind]}: {reason}")
            self._failed[key] = err
            raise err
        if self._register_in_gin:
            _register_in_gin(kind, name, obj)
        self._loaded[key] = obj
        return obj

    def load_all(self, kind: str | None = None) -> list[tuple[PluginInfo, Any, PluginError | None]]:
        """Try to load every plugin; returns ``(info, obj_or_None, error_or_None)`` per plugin."""
        out = []
        for info in self.find(kind):
            try:
                out.append((info, self.get(info.kind, info.name), None))
            except PluginError as err:
                out.append((info, None, err))
        return out

    def load_referenced(self, references: Iterable[tuple[str, str, str]]) -> None:
        """Load the plugins named in config text, given ``(kind, name, where)`` triples.

        ``where`` (e.g. ``"exp.gin:12"``) is added to the error for an unknown name.
        """
        for kind, name, where in references:
            try:
                self.get(kind, name)
            except PluginLoadError:
                raise
            except PluginError as err:
                raise PluginError(f"{where}: {err}") from None

    # -- helpers -----------------------------------------------------------------------------
    def check_kind(self, kind: str) -> str:
        """``kind`` if it is one of :data:`KINDS`, else a :class:`PluginError` with the closest kind."""
        if kind not in KINDS:
            close = difflib.get_close_matches(kind, KINDS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise PluginError(f"unknown plugin kind '{kind}'; kinds are: {', '.join(KINDS)}.{hint}")
        return kind

    def _unknown_message(self, kind: str, name: str) -> str:
        names = self.names(kind)
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        avail = ", ".join(names) if names else "(none installed)"
        return (
            f"unknown {kind} plugin '{name}'.{hint} Available {kind}: {avail}. "
            f"Run `auxframe list {kind}` to see them with their packages."
        )


def _register_in_gin(kind: str, name: str, obj: Any) -> None:
    """Make ``obj`` nameable in gin as ``<kind>.<name>`` (``@<kind>.<name>`` in gin files)."""
    import gin
    from gin import config as gin_config

    selector = f"{kind}.{name}"
    existing = gin_config._REGISTRY.get(selector)  # noqa: SLF001 - gin has no public lookup
    if existing is not None:
        if existing.wrapped is obj:
            return
        # A different object under the same name: a reloaded plugin (tests, notebooks). Replace it.
        del gin_config._REGISTRY[selector]  # noqa: SLF001
    # A plugin named by string in code (e.g. Task.head = 'classification') loads after gin has
    # finalised the config; registering a configurable does not change any binding.
    with gin.unlock_config():
        gin.register(name, module=kind)(obj)


def plugin_parameters(obj: Any) -> list[tuple[str, Any]]:
    """The parameters a user can set in gin for a plugin, as ``(name, default)`` pairs.

    ``inspect.Parameter.empty`` marks a parameter without a default.
    """
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    params = []
    for p in sig.parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        params.append((p.name, p.default))
    return params


#: The process-wide registry over installed packages.
registry = Registry()


