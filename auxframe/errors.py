"""The few exception types auxframe raises. Each message names what is wrong and how to fix it."""

from __future__ import annotations


class AuxframeError(Exception):
    """Base class of every error auxframe raises on purpose (the CLI prints these without a traceback)."""


class ConfigError(AuxframeError):
    """A gin file or binding is malformed, names something unknown, or misses a required value."""


class PluginError(AuxframeError):
    """A plugin name is unknown or ambiguous."""


class PluginLoadError(PluginError):
    """A plugin was found but could not be loaded (import error, wrong type).

    Attributes:
        kind: the plugin kind, e.g. ``"backbones"``.
        name: the entry-point name.
        dist: the distribution (package) that declared the entry point.
        value: the entry point's ``module:attr`` target.
        cause: the original exception, also chained as ``__cause__``.
    """

    def __init__(self, kind: str, name: str, dist: str, value: str, cause: BaseException | str):
        self.kind, self.name, self.dist, self.value, self.cause = kind, name, dist, value, cause
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(
            f"plugin {kind}.{name} (entry point '{name} = {value}' in group 'auxframe.{kind}' "
            f"of package '{dist}') failed to load: {reason}. Fix or uninstall '{dist}'; "
            f"the other plugins are unaffected."
        )


class ContractError(PluginError):
    """A plugin breaks its kind's contract (checked by :mod:`auxframe.testing`, and before a run
    writes anything): the message names the plugin, what is wrong and the fix."""


class TaskGraphError(AuxframeError):
    """The declared tasks do not form a valid task graph (main task, names, heads, losses, labels)."""


class DataError(AuxframeError):
    """A dataset or split cannot be built as asked (missing files, too few examples, empty split)."""


class RunDirError(AuxframeError):
    """The run directory cannot be used (holds another run, is locked by a running process)."""


class CheckpointError(AuxframeError):
    """A checkpoint is missing, unreadable, or belongs to another experiment."""


class TrainingError(AuxframeError):
    """Training cannot continue (a non-finite loss, weight or gradient)."""
