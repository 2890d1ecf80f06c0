"""Ready-made contract tests: ``from auxframe.testing.contracts import *`` in a test module of a
package whose tests load :mod:`auxframe.testing.plugin`.

Each test runs once per installed entry point of its kind (see the plugin for choosing which).
A dataset that cannot be built here (its files are not on this machine) is skipped with the reason.
"""

from __future__ import annotations

import pytest

from auxframe.errors import DataError
from auxframe.testing.checks import check_backbone, check_dataset, check_head, check_weighting

__all__ = ["test_weighting_contract", "test_dataset_contract", "test_backbone_contract", "test_head_contract"]


def test_weighting_contract(auxframe_weighting, auxframe_params):
    """setup contract, scalar combine, gradients, device, determinism, exact resume."""
    check_weighting(auxframe_weighting, **auxframe_params.get(auxframe_weighting.qualified_name, {}))


def test_dataset_contract(auxframe_dataset, auxframe_params):
    """fields, shapes and dtypes of batches, seeded training batches, the batch on the device."""
    try:
        check_dataset(auxframe_dataset, **auxframe_params.get(auxframe_dataset.qualified_name, {}))
    except DataError as err:
        pytest.skip(f"{auxframe_dataset.qualified_name} cannot be built here: {err}")


def test_backbone_contract(auxframe_backbone, auxframe_params):
    """an nn.Module; batch first; gradients reach every parameter; deterministic, per-example eval."""
    check_backbone(auxframe_backbone, **auxframe_params.get(auxframe_backbone.qualified_name, {}))


def test_head_contract(auxframe_head, auxframe_params):
    """num_outputs honoured; gradients reach every parameter; deterministic, per-example eval."""
    check_head(auxframe_head, **auxframe_params.get(auxframe_head.qualified_name, {}))
