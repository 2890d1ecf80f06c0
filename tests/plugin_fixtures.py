"""Small plugin objects and fake packages for the registry tests (tests/test_registry.py).

Entry points in those tests point here, e.g. ``plugin_fixtures:TinyBackbone``; pytest puts the
``tests`` folder on ``sys.path``, so this module is importable by that name.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from auxframe.registry import Registry, group_of
from auxframe.weighting import StepContext, TaskLosses, Weighting

MODULE = __name__

# -- valid plugins ------------------------------------------------------------------------------


class TinyBackbone(nn.Module):
    """A backbone for tests: global average pooling then a linear layer.

    Args:
        input_shape: ``(channels, height, width)``.
        width: feature size.
    """

    def __init__(self, input_shape: Sequence[int], width: int = 4):
        super().__init__()
        self.width = width
        self.linear = nn.Linear(int(input_shape[0]), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


def tiny_backbone_factory(input_shape: Sequence[int], width: int = 4) -> nn.Module:
    """A backbone given as a factory function rather than a class."""
    return TinyBackbone(input_shape, width)


class TinyHead(nn.Module):
    """A head for tests: one linear layer."""

    def __init__(self, feature_shape: Sequence[int], num_outputs: int):
        super().__init__()
        self.linear = nn.Linear(int(feature_shape[0]), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class TinyWeighting(Weighting):
    """Equal weights, for tests."""

    def combine(self, losses: TaskLosses, ctx: StepContext) -> torch.Tensor:
        return losses.means().sum()


class TinyMetric:
    """A metric with ``update`` and ``compute``."""

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        pass

    def compute(self) -> dict[str, float]:
        return {}


def tiny_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """An unreduced loss."""
    return (output - target).abs().flatten(1).mean(dim=1)


# -- plugins of the wrong type ------------------------------------------------------------------


class NotAModule:
    """A class that is neither an ``nn.Module`` nor a ``Weighting``."""

    def __init__(self, input_shape: Sequence[int] = (1, 8, 8)):
        self.input_shape = tuple(input_shape)


class MetricWithoutCompute:
    """A metric class that forgot ``compute``."""

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        pass


NOT_CALLABLE = 42

# -- a plugin module that raises on import --------------------------------------------------------

#: How often the exploding module below was executed; proves that finding imports nothing.
IMPORT_ATTEMPTS = {"exploding": 0}

EXPLODING_MODULE_SOURCE = f"""\
import {MODULE}
{MODULE}.IMPORT_ATTEMPTS["exploding"] += 1
raise ImportError("this plugin needs the package 'missing-dependency'")
"""


def write_exploding_module(folder: Path, name: str) -> None:
    """Write ``<folder>/<name>.py``, a module that counts its import attempts and raises ImportError."""
    (folder / f"{name}.py").write_text(EXPLODING_MODULE_SOURCE)


# -- entry points and fake packages -------------------------------------------------------------


def entry_point(kind: str, name: str, attr: str, module: str = MODULE) -> metadata.EntryPoint:
    """A real EntryPoint ``name = module:attr`` in group ``auxframe.<kind>``; it has no distribution."""
    return metadata.EntryPoint(name, f"{module}:{attr}", group_of(kind))


def make_dist(
    root: Path, name: str, version: str, entry_points: Mapping[str, Mapping[str, str]]
) -> metadata.Distribution:
    """A distribution as pip installs it: ``<root>/<name>-<version>.dist-info`` with metadata.

    Its ``entry_points`` are real EntryPoint objects whose ``dist`` is this distribution, made by
    importlib.metadata itself (no private API).

    Args:
        root: folder to write the ``.dist-info`` folder into (need not be on ``sys.path``).
        name: the distribution name, e.g. ``"auxframe-foo"``.
        version: its version.
        entry_points: kind -> {entry-point name: ``module:attr``}.
    """
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for kind, eps in entry_points.items():
        lines.append(f"[{group_of(kind)}]")
        lines += [f"{ep_name} = {value}" for ep_name, value in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return metadata.PathDistribution(info)


def registry_over(
    entry_points: Iterable[metadata.EntryPoint] = (),
    dists: Iterable[metadata.Distribution] = (),
    register_in_gin: bool = True,
) -> Registry:
    """A Registry that sees exactly these entry points and distributions, nothing installed."""
    eps = list(entry_points)
    for d in dists:
        eps += list(d.entry_points)
    return Registry(entry_points=lambda group: [ep for ep in eps if ep.group == group],
                    register_in_gin=register_in_gin)
