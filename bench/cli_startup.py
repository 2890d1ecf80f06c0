"""How long the ``auxframe`` commands take to answer, whole process, against yardsticks run beside them.

Each command is started as a fresh process, the commands interleaved round by round (A B C ... A B
C ...) so that a machine whose speed drifts slows them alike; the median wall time of each is
printed with its ratio to a yardstick measured in the same rounds:

- ``auxframe --help`` and ``auxframe list`` / ``auxframe ls`` against ``python -c pass`` (the
  interpreter's own start): these import no torch, no gin and no plugin;
- ``auxframe describe weightings.arml`` (and a backbone, a dataset, ``train``) against
  ``python -c 'import torch'``: describe imports the one plugin asked for, so its cost over torch's
  import is what auxframe adds;
- ``auxframe list --check``, which imports every plugin, for scale.

Goals (issue 14): ``list`` <= 1 s, ``describe KIND.NAME`` <= 2 s with torch.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/cli_startup.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

AUXFRAME = [sys.executable, "-m", "auxframe"]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "auxframe --help": [*AUXFRAME, "--help"],
    "auxframe list": [*AUXFRAME, "list"],
    "auxframe ls": [*AUXFRAME, "ls"],
    "auxframe describe weightings.arml": [*AUXFRAME, "describe", "weightings.arml"],
    "auxframe describe backbones.small_cnn": [*AUXFRAME, "describe", "backbones.small_cnn"],
    "auxframe describe train": [*AUXFRAME, "describe", "train"],
    "auxframe describe datasets.digits --fields": [*AUXFRAME, "describe", "datasets.digits", "--fields"],
    "auxframe list --check": [*AUXFRAME, "list", "--check"],
}
YARDSTICK = {name: "python -c 'import torch'" if ("describe" in name or "--check" in name) else "python -c pass"
             for name in COMMANDS if name.startswith("auxframe")}


def wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True,
                   cwd=Path(__file__).resolve().parent)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for r in range(args.rounds + 1):
        for name, cmd in COMMANDS.items():
            t = wall(cmd, env)
            if r:
                times[name].append(t)
    print(f"median wall seconds over {args.rounds} interleaved rounds ({os.cpu_count()} cores)")
    print(f"{'command':<46}{'median s':>9}{'min s':>8}{'max s':>8}   ratio to yardstick (median of per-round ratios)")
    for name, ts in times.items():
        ratio = ""
        if name in YARDSTICK:
            base = times[YARDSTICK[name]]
            ratio = f"{statistics.median(a / b for a, b in zip(ts, base)):6.2f} x {YARDSTICK[name]}"
        print(f"{name:<46}{statistics.median(ts):>9.3f}{min(ts):>8.3f}{max(ts):>8.3f}   {ratio}")


if __name__ == "__main__":
    main()
