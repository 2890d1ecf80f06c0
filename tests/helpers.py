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
    # AUXFRAME_TEST_CUDA_GRAPH=auto runs AuxiLearn's outer steps from a CUDA graph wherever it
    # applies (scripts/gpu_session.sh: the suite on CUDA with cuda_graph on); a test's own binding wins.
    if os.environ.get("AUXFRAME_TEST_CUDA_GRAPH"):
        b["weightings.auxilearn.cuda_graph"] = _cuda_graph(os.environ["AUXFRAME_TEST_CUDA_GRAPH"])
    b.update(extra)
    return [f"{k} = {v}" for k, v in b.items()]


def _cuda_graph(value: str) -> str:
    """``AUXFRAME_TEST_CUDA_GRAPH`` as a gin value: 'auto', True or False."""
    choices = {"auto": "'auto'", "1": "True", "true": "True", "0": "False", "false": "False"}
    if value.lower() not in choices:
        raise ValueError(f"AUXFRAME_TEST_CUDA_GRAPH must be one of {sorted(choices)}, got {value!r}")
    return choices[value.lower()]
