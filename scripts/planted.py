"""Run and report the planted benchmark (docs/synthetic.md): every built-in weighting on
``experiments/synthetic_equal.gin`` (the main task plus one helpful, redundant, noise and
adversarial task), 5 seeds, and the final weight each gives each kind of task.

Each method is one ``auxframe sweep`` over the seeds (``train.seed`` and ``LowDataSplit.seed``; the
planted dataset itself is ``datasets.synthetic.seed = 0``), in ``<out>/<method>``; a finished point
is never run again, so the grid can be stopped and continued.

    python scripts/planted.py run --methods stl,equal,arml,auxilearn_linear
    python scripts/planted.py report                  # the table of docs/synthetic.md
    python scripts/planted.py seeds --methods arml,auxilearn_linear   # per seed, with diagnostics
    python scripts/planted.py commands                # the sweep command of every method

``report`` prints, per method, the main task's test accuracy (best-on-validation state; mean and 95%
t interval over the seeds, and the paired differences to STL, STL+ and Equal over the same seeds), the mean final weight of each task
kind with its range over the seeds, and in how many seeds the noise and the adversarial task end
with the two lowest auxiliary weights (both below the helpful and the redundant task). ``seeds``
prints the same per seed, with each run's diagnostics (AuxiLearn: how often its Neumann series
diverged; ARML: how steadily each weight's gradient pushes it).

``auxframe report`` gives the accuracy columns and the mean final weights too, but not the weights
per task kind with their spread, the separation count or these diagnostics, which is what this
benchmark is read by.
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
    "stl_plus": Method("STL+", "weightings/stl.gin", ("main/Task.pool = 'labeled+aux'",)),
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
    "auxinash": Method("AuxiNash", "weightings/auxinash.gin"),
    "forkmerge": Method("ForkMerge", "weightings/forkmerge.gin"),
    "metabalance": Method("MetaBalance", "weightings/metabalance.gin"),
    "auto_lambda": Method("Auto-λ", "weightings/auto_lambda.gin"),
    "famo": Method("FAMO", "weightings/famo.gin"),
    "rlw": Method("RLW", "weightings/rlw.gin"),
    "gradvac": Method("GradVac", "weightings/gradvac.gin"),
    "upgrad": Method("UPGrad", "weightings/upgrad.gin"),
    "mgda": Method("MGDA", "weightings/mgda.gin"),
    "cagrad": Method("CAGrad", "weightings/cagrad.gin"),
    "imtl_g": Method("IMTL-G", "weightings/imtl_g.gin"),
    "aligned_mtl": Method("Aligned-MTL", "weightings/aligned_mtl.gin"),
    "dualproj": Method("DualProj", "weightings/dualproj.gin"),
    "nash_mtl": Method("Nash-MTL", "weightings/nash_mtl.gin"),
    "auxilearn_linear": Method("AuxiLearn (linear)", "weightings/auxilearn_linear.gin"),
    "auxilearn_linear_stale_alpha": Method("AuxiLearn (linear, alpha estimated once)", "weightings/auxilearn_linear.gin",
                                           ("weightings.auxilearn.alpha_refresh = 0",)),
    "auxilearn_official": Method("AuxiLearn (linear, official SGD outer step)", "weightings/auxilearn_official.gin"),
    "auxilearn_official_main": Method("AuxiLearn (linear, official SGD outer step, normalize='main')",
                                      "weightings/auxilearn_official.gin", ("weightings.auxilearn.normalize = 'main'",)),
    "auxilearn_linear_free": Method("AuxiLearn (linear, scale free)", "weightings/auxilearn_linear.gin",
                                    ("weightings.auxilearn.normalize = None",)),
    "auxilearn_linear_shared": Method("AuxiLearn (linear, W = backbone)", "weightings/auxilearn_linear.gin",
                                      ("weightings.auxilearn.inner_params = 'shared'",)),
    "arml_gramian": Method("ARML (log_gramian: the same run, with gradient norms and cosines)", "weightings/arml.gin",
                           ("weightings.arml.log_gramian = True",)),
    "arml_official_gramian": Method("ARML (official schedule, log_gramian)", "weightings/arml_official.gin",
                                    ("weightings.arml.log_gramian = True",)),
    "arml_langevin": Method("ARML (Algorithm 1, Langevin burn-in)", "weightings/arml_langevin.gin"),
    "auxilearn_aux20": Method("AuxiLearn (linear, auxiliary set of 20 per class)", "weightings/auxilearn_linear.gin",
                              ("LowDataSplit.aux_per_class = 20",)),
    "auxilearn_gauss_newton": Method("AuxiLearn (linear, Gauss-Newton curvature)", "weightings/auxilearn_linear.gin",
                                     ("weightings.auxilearn.curvature = 'gauss_newton'",)),
    "auxilearn_every5": Method("AuxiLearn (linear, outer step every 5, lr 0.03)", "weightings/auxilearn_linear.gin",
                               ("weightings.auxilearn.outer_every = 5", "weightings.auxilearn.outer_lr = 0.03")),
    "auxilearn_500": Method("AuxiLearn (linear, 500 steps)", "weightings/auxilearn_linear.gin", ("train.steps = 500",)),
    "arml_500": Method("ARML (500 steps)", "weightings/arml.gin", ("train.steps = 500",)),
    "arml_every1": Method("ARML (a weight step every step, lr 0.01)", "weightings/arml.gin",
                          ("weightings.arml.update_every = 1", "weightings.arml.weight_lr = 0.01")),
    "auxilearn_lr003": Method("AuxiLearn (linear, outer_lr 0.03)", "weightings/auxilearn_linear.gin",
                              ("weightings.auxilearn.outer_lr = 0.03",)),
    "auxilearn_lr001": Method("AuxiLearn (linear, outer_lr 0.01)", "weightings/auxilearn_linear.gin",
                              ("weightings.auxilearn.outer_lr = 0.01",)),
    "auxilearn_lr001_aux20": Method("AuxiLearn (linear, outer_lr 0.01, auxiliary set of 20 per class)",
                                    "weightings/auxilearn_linear.gin",
                                    ("weightings.auxilearn.outer_lr = 0.01", "LowDataSplit.aux_per_class = 20")),
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


BASELINES = ("stl", "stl_plus", "equal")  # the paired-difference columns of the report


def report(names: list[str], out: Path) -> str:
    from auxframe.stats import mean_ci, paired

    base = {b: {s: m["best"]["test"] for s, m in results(b, out).items()} for b in BASELINES}
    versus_heads = " | ".join(f"vs {METHODS[b].label} (95% CI, w/t/l)" for b in BASELINES)
    lines = [f"| weighting | main test acc (95% CI) | {versus_heads} | main | helpful | redundant | noise "
             "| adversarial | noise & adversarial lowest | command |", "|" + "---|" * (9 + len(BASELINES))]
    for name in names:
        found = results(name, out)
        if not found:
            continue
        acc = {s: m["best"]["test"] for s, m in found.items()}
        ci = mean_ci(list(acc.values()))
        versus = []
        for b in BASELINES:
            diff = paired(acc, base[b]) if name != b and base[b] else None
            versus.append(f"{diff.format(3)} ({diff.record})" if diff is not None and diff.n else "—")
        cells = []
        for task in ("main", *KINDS):
            values = [m["weights"].get(task) for m in found.values()]
            if any(v is None for v in values):
                cells.append("—")
                continue
            low, high = min(values), max(values)
            spread = f" ({low:.2f}-{high:.2f})" if high - low >= 0.005 else ""
            cells.append(f"{sum(values) / len(values):.2f}{spread}")
        has_all = all(t in m["weights"] for m in found.values() for t in KINDS) and not name.startswith("stl")
        sep = f"{sum(separated(m['weights']) for m in found.values())}/{len(found)}" if has_all else "—"
        command = shlex.join(sweep_command(name, out, len(found)))
        lines.append(f"| {METHODS[name].label} | {ci.format(3)} | {' | '.join(versus)} | {' | '.join(cells)} | {sep} "
                     f"| `{command}` |")
    return "\n".join(lines)


def per_seed(names: list[str], out: Path) -> str:
    """One row per method and seed: the final weight of each task kind, whether noise and
    adversarial are the two lowest, and the run's own diagnostics from ``scalars.jsonl``: for
    AuxiLearn the fraction of outer steps whose Neumann series diverged, for ARML the mean of each
    weight's gradient over the weight updates divided by its standard deviation (near 0: the
    weight random-walks; large: a steady push)."""
    lines = ["| weighting | seed | main | helpful | redundant | noise | adversarial | lowest | diagnostics |",
             "|" + "---|" * 9]
    for name in names:
        for seed, m in sorted(results(name, out).items()):
            w = m["weights"]
            if not all(t in w for t in KINDS):
                continue
            cells = " | ".join(f"{w[t]:.2f}" for t in ("main", *KINDS))
            lines.append(f"| {METHODS[name].label} | {seed} | {cells} | {'yes' if separated(w) else 'no'} "
                         f"| {diagnostics(out / name / f'seed={seed}')} |")
    return "\n".join(lines)


def diagnostics(run_dir: Path) -> str:
    """The run's diagnostic line for :func:`per_seed` (empty for methods without one)."""
    scalars = run_dir / "scalars.jsonl"
    if not scalars.is_file():
        return ""
    rows = [json.loads(line) for line in scalars.read_text().splitlines() if line.strip()]
    diverged = [r["auxilearn/diverged_fraction"] for r in rows if "auxilearn/diverged_fraction" in r]
    if diverged:
        return f"series diverged in {100 * diverged[-1]:.0f}% of outer steps"
    grads: dict[str, list[float]] = {}
    for r in rows:
        for key, value in r.items():
            if key.startswith("arml/weight_grad/"):
                grads.setdefault(key.removeprefix("arml/weight_grad/"), []).append(value)
    parts = []
    for task in KINDS:
        g = grads.get(task, [])
        if len(g) > 1:
            mean = sum(g) / len(g)
            std = (sum((x - mean) ** 2 for x in g) / (len(g) - 1)) ** 0.5
            parts.append(f"{task.split('_')[0]} {mean / std if std else float('inf'):+.2f}")
    line = ("dL/dw mean/sd: " + ", ".join(parts)) if parts else ""
    gram = []
    for task in ("main", *KINDS):
        norms = [r[f"arml/grad_norm/{task}"] for r in rows if f"arml/grad_norm/{task}" in r]
        cosines = [r[f"arml/cos/{task}"] for r in rows if f"arml/cos/{task}" in r]
        if norms:
            cos = f", cos {sum(cosines) / len(cosines):+.2f}" if cosines else ""
            gram.append(f"{task.split('_')[0]} ‖g‖ {sum(norms) / len(norms):.2f}{cos}")
    return "; ".join(x for x in (line, "mean over updates: " + ", ".join(gram) if gram else "") if x)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "report", "seeds", "commands"])
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
    elif args.action == "seeds":
        print(per_seed(names, args.out))
    else:
        print("\n".join(shlex.join(sweep_command(n, args.out, args.seeds)) for n in names))


if __name__ == "__main__":
    main()
