"""Run and report the planted benchmark (docs/synthetic.md): every built-in weighting on
``experiments/synthetic_equal.gin`` (the main task plus one helpful, redundant, noise and
adversarial task), 5 seeds, and the final weight each gives each kind of task.

Each method is one ``auxframe sweep`` over the seeds (``train.seed`` and ``LowDataSplit.seed``; the
planted dataset itself is ``datasets.synthetic.seed = 0``), in ``<out>/<method>``; a finished point
is never run again, so the grid can be stopped and continued.

    python scripts/planted.py run --methods stl,equal,arml,auxilearn_linear
    python scripts/planted.py report                  # the table of docs/synthetic.md
    python scripts/planted.py commands                # the sweep command of every method

``report`` prints, per method, the main task's test accuracy (best-on-validation state; mean and 95%
t interval over the seeds, and the paired difference to Equal), the mean final weight of each task
kind with its range over the seeds, and in how many seeds the noise and the adversarial task end
with the two lowest auxiliary weights (both below the helpful and the redundant task).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("helpful_0", "redundant_0", "noise_0", "adversarial_0")
EXPERIMENT = "experiments/synthetic_equal.gin"
STEPS = "train.steps = 2_000"  # (the recipe's 500 suit Equal; the adaptive weightings need longer to move)


@dataclass(frozen=True)
class Method:
    """One row of the table: a weighting recipe and the bindings it runs with."""

    label: str
    gin: str
    params: tuple[str, ...] = field(default_factory=tuple)


METHODS: dict[str, Method] = {
    "stl": Method("STL", "weightings/stl.gin"),
    "equal": Method("Equal", "weightings/equal.gin"),
    "arml": Method("ARML", "weightings/arml.gin"),
    "arml_official": Method("ARML (official schedule)", "weightings/arml_official.gin"),
    "uncertainty": Method("Uncertainty", "weightings/uncertainty.gin"),
    "uncertainty_anchor": Method("Uncertainty (main anchored)", "weightings/uncertainty.gin",
                                 ("weightings.uncertainty.anchor_main = True",)),
    "adaloss": Method("AdaLoss", "weightings/adaloss.gin"),
    "adaloss_anchor": Method("AdaLoss (main anchored)", "weightings/adaloss.gin",
                             ("weightings.adaloss.anchor_main = True",)),
    "dwa": Method("DWA", "weightings/dwa.gin"),
    "dwa_anchor": Method("DWA (main anchored)", "weightings/dwa.gin", ("weightings.dwa.anchor_main = True",)),
    "gradnorm": Method("GradNorm", "weightings/gradnorm.gin"),
    "gradnorm_anchor": Method("GradNorm (main anchored)", "weightings/gradnorm.gin",
                              ("weightings.gradnorm.anchor_main = True",)),
    "gcs": Method("GCS", "weightings/gcs.gin"),
    "ol_aux": Method("OL_AUX", "weightings/ol_aux.gin"),
    "ol_aux_normalized": Method("OL_AUX (normalised)", "weightings/ol_aux.gin",
                                ("weightings.ol_aux.normalize = True",)),
    "pcgrad": Method("PCGrad", "weightings/pcgrad.gin"),
    "auxilearn_linear": Method("AuxiLearn (linear)", "weightings/auxilearn_linear.gin"),
    "auxilearn_linear_stale_alpha": Method("AuxiLearn (linear, alpha estimated once)", "weightings/auxilearn_linear.gin",
                                           ("weightings.auxilearn.alpha_refresh = 0",)),
    "auxilearn_nonlinear": Method("AuxiLearn (nonlinear)", "weightings/auxilearn_nonlinear.gin"),
}


def sweep_command(name: str, out: Path, seeds: int) -> list[str]:
    """The ``auxframe sweep`` command of one method."""
    method = METHODS[name]
    cmd = ["auxframe", "sweep", "--gin", EXPERIMENT, "--gin", method.gin]
    for param in (STEPS, *method.params):
        cmd += ["--gin-param", param]
    return cmd + ["--seeds", *[str(s) for s in range(seeds)], "--sweep-dir", str(out / name)]


def run(names: list[str], out: Path, seeds: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    exe = str(Path(sys.executable).with_name("auxframe"))
    for name in names:
        cmd = sweep_command(name, out, seeds)
        print(shlex.join(cmd), flush=True)
        subprocess.run([exe, *cmd[1:]], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)


def results(name: str, out: Path) -> dict[int, dict]:
    """seed -> metrics.json of one method's finished points."""
    found = {}
    for metrics in sorted((out / name).glob("*/metrics.json")):
        seed = int(metrics.parent.name.split("seed=")[-1].split(",")[0])
        found[seed] = json.loads(metrics.read_text())
    return found


def separated(weights: dict[str, float]) -> bool:
    """Whether the noise and adversarial tasks have the two lowest auxiliary weights."""
    return max(weights["noise_0"], weights["adversarial_0"]) < min(weights["helpful_0"], weights["redundant_0"])


def report(names: list[str], out: Path) -> str:
    from auxframe.stats import mean_ci, paired

    equal = {s: m["best"]["test"] for s, m in results("equal", out).items()}
    lines = ["| weighting | main test acc (95% CI) | vs Equal (95% CI, w/t/l) | main | helpful | redundant | noise "
             "| adversarial | noise & adversarial lowest | command |", "|" + "---|" * 10]
    for name in names:
        found = results(name, out)
        if not found:
            continue
        acc = {s: m["best"]["test"] for s, m in found.items()}
        ci = mean_ci(list(acc.values()))
        diff = paired(acc, equal) if name != "equal" else None
        cells = []
        for task in ("main", *KINDS):
            values = [m["weights"].get(task) for m in found.values()]
            if any(v is None for v in values):
                cells.append("—")
                continue
            low, high = min(values), max(values)
            spread = f" ({low:.2f}-{high:.2f})" if high - low >= 0.005 else ""
            cells.append(f"{sum(values) / len(values):.2f}{spread}")
        has_all = all(t in m["weights"] for m in found.values() for t in KINDS) and name != "stl"
        sep = f"{sum(separated(m['weights']) for m in found.values())}/{len(found)}" if has_all else "—"
        versus = f"{diff.format(3)} ({diff.record})" if diff is not None and diff.n else "—"
        command = shlex.join(sweep_command(name, out, len(found)))
        lines.append(f"| {METHODS[name].label} | {ci.format(3)} | {versus} | {' | '.join(cells)} | {sep} | `{command}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "report", "commands"])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated names (default: all)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("sweeps/planted"))
    args = parser.parse_args(argv)
    names = [n for n in args.methods.split(",") if n]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.action == "run":
        run(names, args.out, args.seeds)
    elif args.action == "report":
        print(report(names, args.out))
    else:
        print("\n".join(shlex.join(sweep_command(n, args.out, args.seeds)) for n in names))


if __name__ == "__main__":
    main()
