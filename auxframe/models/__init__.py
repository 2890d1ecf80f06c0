"""Models: shared backbones, task heads and the multi-task model that joins them."""

from auxframe.models.multitask import MultiTaskModel

__all__ = ["MultiTaskModel"]
