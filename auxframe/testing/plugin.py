"""A pytest plugin that runs auxframe's contract checks over every installed plugin (opt-in).

It is not registered as a ``pytest11`` entry point (it would run in every pytest session of the
environment); turn it on where you want it::

    pytest -p auxframe.testing.plugin                     # once
    # or, in the conftest.py at the root of your tests:
    pytest_plugins = ["auxframe.testing.plugin"]

Then a test module that imports the ready-made contract tests runs them, one test per entry point,
as timm's ``tests/test_models.py`` runs one test per registered model::

    from auxframe.testing.contracts import *  # noqa: F401,F403

The fixtures ``auxframe_weighting``, ``auxframe_dataset``, ``auxframe_backbone`` and
``auxframe_head`` are parametrised over the installed entry points of their kind (their value is
the plugin's :class:`~auxframe.registry.PluginInfo`; test ids are ``weightings.NAME``), so a test of
your own can take them too. ``--auxframe-package NAME`` (repeatable) or the ini option
``auxframe_packages = NAME ...`` limits them to the plugins of those distributions, e.g. your own.
Override the ``auxframe_params`` fixture to give plugins the parameters a check should build them
with: ``{"datasets.my_data": {"root": "tests/data"}, "weightings.my_method": {"outer_every": 2}}``.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import pytest

from auxframe.registry import PluginInfo, registry

#: fixture -> the plugin kind it is parametrised over
FIXTURES = {"auxframe_weighting": "weightings", "auxframe_dataset": "datasets",
            "auxframe_backbone": "backbones", "auxframe_head": "heads"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(kind: str, packages: Iterable[str] | None = None) -> list[PluginInfo]:
    """The installed entry points of ``kind``, or only those of the distributions ``packages``."""
    found = registry.find(kind)
    if packages:
        wanted = {_normalise(p) for p in packages}
        found = [p for p in found if _normalise(p.dist) in wanted]
    return found


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("auxframe", "auxframe plugin contracts")
    group.addoption("--auxframe-package", action="append", dest="auxframe_packages", metavar="NAME",
                    help="check only the plugins of this distribution (repeatable; default: every installed one)")
    parser.addini("auxframe_packages", type="args", default=[],
                  help="distributions whose auxframe plugins the contract tests check (default: all)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    packages = metafunc.config.getoption("auxframe_packages") or metafunc.config.getini("auxframe_packages") or None
    for fixture, kind in FIXTURES.items():
        if fixture in metafunc.fixturenames:
            plugins = installed(kind, packages)
            metafunc.parametrize(fixture, plugins, ids=[p.qualified_name for p in plugins])


@pytest.fixture
def auxframe_params() -> dict[str, dict[str, Any]]:
    """``"kind.name" -> parameters`` a check builds that plugin with (override it in a conftest)."""
    return {}
