"""``auxframe run``: train the experiment described by gin files."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from auxframe.commands import add_gin_arguments

HELP = "train the experiment described by gin files"
EPILOG = "Example: auxframe run --gin quickstart.gin --gin-param 'train.steps=200'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_gin_arguments(p)
    p.add_argument("--run-dir", metavar="DIR",
                   help="where the run's files go (default: runs/<config name>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its latest checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="parse, build and check everything (one dry forward pass), print the operative config, "
                        "and stop: nothing is trained or written (same as `auxframe validate`)")
    p.add_argument("--job-type", default=None, metavar="TYPE",
                   help="the W&B job type (default: train; sweep under a W&B sweep agent and for `auxframe sweep`'s points)")
    p.add_argument("bindings", nargs="*", metavar="KEY=VALUE",
                   help="more gin bindings, applied after --gin-param (as a W&B sweep agent passes them)")


def default_run_dir(gin_files: list[str]) -> str:
    """``runs/<last gin file's name>-<time>``; under a W&B sweep agent its run id keeps parallel
    agents' directories apart."""
    suffix = f"-{os.environ['WANDB_RUN_ID']}" if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID") else ""
    return str(Path("runs") / f"{Path(gin_files[-1]).stem}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}")


def main(args: argparse.Namespace) -> int:
    from auxframe import config
    from auxframe.errors import ConfigError

    if args.resume and not args.run_dir:
        raise ConfigError("--resume needs --run-dir (the run to continue).")
    config.parse(args.gin, [*args.gin_param, *args.bindings])
    from auxframe.experiment import train

    if args.dry_run:  # the run directory is checked only when named
        print_dry_run(train(run_dir=args.run_dir, resume=args.resume, dry_run=True), config.operative_config())
        return 0
    job_type = args.job_type or ("sweep" if os.environ.get("WANDB_SWEEP_ID") else "train")
    result = train(run_dir=args.run_dir or default_run_dir(args.gin), resume=args.resume, job_type=job_type)
    print_result(result)
    return 0


def print_dry_run(summary: dict, operative: str) -> None:
    """The operative config, then what was built; says that nothing was written."""
    print(operative.rstrip())
    print()
    pools = ", ".join(f"{name} {n}" for name, n in summary["pools"].items())
    aux = ", ".join(summary["aux_tasks"]) or "none"
    print(f"main task '{summary['main_task']}', auxiliary tasks: {aux}")
    print(f"split: {pools}")
    print(f"model: {summary['parameters']:,} parameters on {summary['device']}; weighting {summary['weighting']}; "
          f"{summary['steps']} steps")
    where = f"; run directory {summary['run_dir']} is usable" if summary["run_dir"] else ""
    print(f"dry run: the config builds and every task passed its dry forward pass{where}. Nothing was written.")


def print_result(result: dict) -> None:
    """The per-task metrics table, the main task's line, the best-on-validation state, the run directory."""
    print_task_table(result["metrics"])
    print(
        f"main task '{result['main_task']}': test {result['main_metric']} = {result['test']:.4f} "
        f"(validation {result['val']:.4f}) after {result['steps']} steps in {result['wall_time_s']:.1f}s"
    )
    best = result["best"]
    if best["step"] != result["steps"]:
        print(
            f"best on validation: step {best['step']}, validation {best['val']:.4f}, "
            f"test {result['main_metric']} = {best['test']:.4f}"
        )
    if result.get("run_dir"):
        print(f"run directory: {result['run_dir']}")


def print_task_table(metrics: dict) -> None:
    """Validation and test metrics per task, one line per task and metric."""
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in metrics.items():
        split, task, name = key.split("/", 2)
        rows.setdefault((task, name), {})[split] = value
    print(f"{'task':<14}{'metric':<14}{'val':>9}{'test':>9}")
    for (task, name), v in rows.items():
        print(f"{task:<14}{name:<14}{v.get('val', float('nan')):>9.4f}{v.get('test', float('nan')):>9.4f}")
