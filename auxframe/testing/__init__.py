"""A contract kit for auxframe plugins: builders of what a plugin meets in a run, and checks.

Use it from a plugin package's tests::

    from auxframe.testing import check_weighting, check_dataset, check_backbone, check_head

    def test_my_weighting():
        check_weighting(MyWeighting, start=1.0)          # parameters as gin would pass them

or let the pytest plugin run the checks over every installed entry point (``pytest -p
auxframe.testing.plugin``; see :mod:`auxframe.testing.plugin`). The builders
(:func:`weighting_setup`, :func:`task_losses`, :func:`step_context`, :class:`TinyRun`) give a
weighting's own unit tests realistic inputs.
"""

from auxframe.errors import ContractError
from auxframe.testing.builders import (
    TinyRun, batch, default_device, losses_of, step_context, task_losses, tiny_model, weighting_setup,
)
from auxframe.testing.checks import (
    check_backbone, check_dataset, check_head, check_weighting, combine_problem, dataset_problem,
    weighting_setup_problem,
)

__all__ = [
    "ContractError", "TinyRun", "batch", "check_backbone", "check_dataset", "check_head", "check_weighting",
    "combine_problem", "dataset_problem", "default_device", "losses_of", "step_context", "task_losses",
    "tiny_model", "weighting_setup", "weighting_setup_problem",
]
