"""What ``auxframe probe`` costs against one training run of the same experiment, measured side by side.

The issue's goal: the probe costs at most 5% of one training run. Both are timed in this process,
interleaved (run, probe, run, probe, ...; the order swapped every other repeat), wall clock around
``auxframe.experiment.train`` for the run (every step, evaluation and checkpoints as the recipe
has them, W&B off) and around ``auxframe.probe.run_probe`` for the probe (with its defaults unless
given), so that a busy machine slows both alike. Prints each pair and the median ratio.

    WANDB_MODE=disabled OMP_NUM_THREADS=1 .venv/bin/python bench/probe_cost.py --gin experiments/digits_min_data.gin
    ... --gin experiments/synthetic_equal.gin --repeats 3
    ... --probe-steps 40 --every 2          # another probe schedule
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def time_run(gin_files: list[str], params: list[str]) -> float:
    from auxframe import config
    from auxframe.experiment import train

    config.parse(gin_files, [*params, "train.progress = False"])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(run_dir=Path(tmp) / "run")
        return time.perf_counter() - start


def time_probe(gin_files: list[str], params: list[str], args: argparse.Namespace) -> tuple[float, list[str]]:
    from auxframe.probe import run_probe

    start = time.perf_counter()
    chosen = {"steps": args.probe_steps, "every": args.every, "start": args.start, "head_warmup": args.head_warmup}
    result = run_probe(gin_files, [*params, "train.progress = False"], **{k: v for k, v in chosen.items() if v is not None})
    return time.perf_counter() - start, result.ranking


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gin", action="append", required=True)
    p.add_argument("--gin-param", action="append", default=[])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--probe-steps", type=int, help="the probe's window (default: auxframe.probe's)")
    p.add_argument("--every", type=int)
    p.add_argument("--start", type=int)
    p.add_argument("--head-warmup", type=int)
    args = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    ratios = []
    for rep in range(args.repeats):
        order = ("run", "probe") if rep % 2 == 0 else ("probe", "run")
        times = {}
        for what in order:
            if what == "run":
                times["run"] = time_run(args.gin, args.gin_param)
            else:
                times["probe"], ranking = time_probe(args.gin, args.gin_param, args)
        ratios.append(times["probe"] / times["run"])
        print(f"repeat {rep}: run {times['run']:.1f}s, probe {times['probe']:.1f}s, ratio {ratios[-1]:.3f} "
              f"(ranking {', '.join(ranking)})", flush=True)
    print(f"probe / run: median {statistics.median(ratios):.3f} over {len(ratios)} repeats ({', '.join(args.gin)})")


if __name__ == "__main__":
    main()
