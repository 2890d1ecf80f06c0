"""An example auxframe plugin package.

It declares two plugins through entry points in its ``pyproject.toml``:

* ``backbones.example_resnet``: :class:`auxframe_example.backbones.ExampleResNet`, a tiny residual CNN.
* ``weightings.aux_anneal``: :class:`auxframe_example.weighting.AuxAnneal`, auxiliary weights that
  decay over the run.

This module imports nothing, so that auxframe can list the plugins without importing torch; each
plugin module is imported only when a config names it.
"""

__version__ = "0.1.0"
