"""Shared fixtures: W&B disabled, gin cleared around each test, the shipped recipes' folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")

from helpers import GIN  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_gin():
    import gin

    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def gin_dir() -> Path:
    return GIN
