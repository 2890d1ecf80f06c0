"""auxframe: auxiliary learning — train a main task better with auxiliary tasks.

Importing this package is cheap: it does not import torch. The library lives in submodules
(``auxframe.registry``, ``auxframe.tasks``, ``auxframe.trainer``, ...).
"""

__version__ = "0.1.0"
