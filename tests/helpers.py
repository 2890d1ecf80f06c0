"""Helpers shared by the tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIN = REPO / "auxframe" / "configs"



def quick_bindings(steps: int = 4, **extra) -> list[str]:
    """Bindings that make any digits experiment train in a second."""
    b = {
        "train.steps": steps,
        "train.batch_size": 16,
        "train.eval_every": 0,
        "train.log_every": 2,
        "train.checkpoint_every": 0,
        "train.progress": False,
        # AUXFRAME_TEST_DEVICE=cuda runs the end-to-end tests on a GPU (tests/test_cuda.py, bench/README.md).
        "train.device": f"'{os.environ.get('AUXFRAME_TEST_DEVICE', 'cpu')}'",
        "backbones.small_cnn.channels": "(8, 8)",
    }
    b.update(extra)
    return [f"{k} = {v}" for k, v in b.items()]
