"""Run and report the digits low-label protocol (../shared/RESULTS_PROTOCOL.md).

Each method is a gin experiment run for every n (labels per class) and seed; the seed sets both
``train.seed`` and ``LowDataSplit.seed``, so the intervals include split-to-split variation. Runs
go to ``<out>/<method>/n<n>/seed<s>`` and a finished run is never run again, so the grid can be
stopped and continued.

    python scripts/protocol.py run --methods stl,stl_plus,equal_rotation --n 5 10 --seeds 5
    python scripts/protocol.py tune --methods arml,gradnorm,ol_aux --n 10 --seeds 3
    python scripts/protocol.py timing --methods stl,stl_plus,equal_rotation
    python scripts/protocol.py report --methods stl,stl_plus,equal_rotation --n 5 10 --seeds 5

``timing`` measures each method's training step time relative to STL back to back (the grid's own
wall times depend on whatever else ran beside each run). ``report`` prints the markdown table of docs/results.md (mean and 95% confidence interval of the
main-task test accuracy of the best-on-validation state, final weights, wall time relative to STL,
and the command of each row) and writes the plots under docs/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Method:
    """One row family of the results table."""

    label: str
    gin: str
    aux_tasks: str
    params: tuple[str, ...] = field(default_factory=tuple)


METHODS: dict[str, Method] = {
    "stl": Method("STL", "experiments/digits_stl.gin", "none"),
    "stl_plus": Method("STL+", "experiments/digits_stl_plus.gin", "none (labels + aux set)"),
    "equal_rotation": Method("Equal", "experiments/digits_equal_rotation.gin", "rotation"),
    "equal_attributes": Method("Equal", "experiments/digits_equal_attributes.gin", "parity, ge5, loops"),
    "equal_all": Method("Equal", "quickstart.gin", "rotation, parity, ge5"),
    "auxilearn_linear": Method("AuxiLearn (linear)", "experiments/digits_auxilearn_linear.gin",
                               "rotation, parity, ge5"),
    "auxilearn_nonlinear": Method("AuxiLearn (nonlinear)", "experiments/digits_auxilearn_nonlinear.gin",
                                  "rotation, parity, ge5"),
    **{key: Method(label, f"experiments/digits_{key}.gin", "rotation, parity, ge5") for key, label in [
        ("arml", "ARML"), ("uncertainty", "Uncertainty"), ("adaloss", "AdaLoss"), ("dwa", "DWA"),
        ("gradnorm", "GradNorm"), ("gcs", "GCS"), ("ol_aux", "OL_AUX"), ("pcgrad", "PCGrad")]},
    # AuxiLearn with its Hessian-vector products on a random part of each training batch
    # (weightings.auxilearn.curvature_fraction): the speed/accuracy trade-off of that option.
    **{f"auxilearn_{net}_cf{pct}": Method(f"AuxiLearn ({net}, curvature on {pct}%)",
                                          f"experiments/digits_auxilearn_{net}.gin", "rotation, parity, ge5",
                                          (f"weightings.auxilearn.curvature_fraction = {pct / 100}",))
       for net in ("linear", "nonlinear") for pct in (100, 50, 25)},
    # ... and with Gauss-Newton curvature (weightings.auxilearn.curvature = 'gauss_newton').
    **{f"auxilearn_{net}_gn": Method(f"AuxiLearn ({net}, Gauss-Newton)",
                                     f"experiments/digits_auxilearn_{net}.gin", "rotation, parity, ge5",
                                     ("weightings.auxilearn.curvature = 'gauss_newton'",))
       for net in ("linear", "nonlinear")},
    "s4l_equal": Method("Equal", "experiments/digits_s4l_arml.gin", "rotation, exemplar",
                        ("train.weighting = @weightings.equal()",)),
    "s4l_arml": Method("ARML", "experiments/digits_s4l_arml.gin", "rotation, exemplar"),
    "generated_labels": Method("Generated labels (AuxiLearn)", "experiments/digits_generated_labels.gin",
                               "generated: 5 per digit, no hand-made task"),
}


#: Each method's own hyperparameter, chosen on validation with the same budget for every method
#: (3 values, n = 10, seeds 0-2, by mean best validation accuracy; ``tune``). AuxiLearn's outer
#: learning rates were chosen the same way (docs/results.md).
TUNING: dict[str, tuple[str, tuple[str, ...]]] = {
    "arml": ("weightings.arml.weight_lr", ("0.01", "0.05", "0.2")),
    "gradnorm": ("weightings.gradnorm.alpha", ("0.5", "1.5", "3.0")),
    "ol_aux": ("weightings.ol_aux.weight_lr", ("0.1", "1.0", "10.0")),
}
TUNED_FILE = "tuned.json"


def tuned(method_key: str, out: Path) -> Method:
    """The method with its validation-chosen hyperparameter (from ``<out>/tuned.json``), if any."""
    method = METHODS[method_key]
    f = out / TUNED_FILE
    chosen = json.loads(f.read_text()).get(method_key) if f.is_file() else None
    if chosen is None:
        return method
    return Method(method.label, method.gin, method.aux_tasks, (*method.params, f"{chosen['binding']} = {chosen['value']}"))


def command(method: Method, n: int, seed: int, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    params = [f"LowDataSplit.labels_per_class = {n}", f"train.seed = {seed}", f"LowDataSplit.seed = {seed}",
              "train.progress = False", *method.params, *extra]
    cmd = ["auxframe", "run", "--gin", method.gin]
    for p in params:
        cmd += ["--gin-param", p]
    return cmd + ["--run-dir", str(run_dir)]


def shown(cmd: list[str]) -> str:
    """A command as a user would type it (seed left as a variable)."""
    out = []
    for part in cmd:
        out.append(f'"{part}"' if " " in part else part)
    return " ".join(out)


def run_grid(args: argparse.Namespace) -> None:
    jobs = []
    for key in args.methods:
        for n in args.n:
            for seed in range(args.seeds):
                run_dir = args.out / key / f"n{n}" / f"seed{seed}"
                if not (run_dir / "metrics.json").is_file():
                    jobs.append((key, n, seed, run_dir))
    print(f"{len(jobs)} runs to do", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}

    def one(job):
        key, n, seed, run_dir = job
        if run_dir.exists():  # an interrupted run: start it again from scratch
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        cmd = command(tuned(key, args.out), n, seed, run_dir, tuple(args.param))
        _run_one(cmd, env, f"{key} n={n} seed={seed}")

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, jobs))


def _run_one(cmd: list[str], env: dict, name: str) -> None:
    cmd[0:1] = [sys.executable, "-m", "auxframe"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    status = "ok" if proc.returncode == 0 else f"FAILED\n{proc.stderr[-2000:]}"
    print(f"{name}: {status}", flush=True)


def tune(args: argparse.Namespace) -> None:
    """Run every TUNING value of the chosen methods at ``--n`` (first value) for ``--seeds`` seeds
    under ``<out>/tune/``, pick the value with the best mean best-validation accuracy, and write
    the choices to ``<out>/tuned.json`` (read by ``run`` and ``report``)."""
    n = args.n[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    grid = [(key, value, seed) for key in args.methods if key in TUNING
            for value in TUNING[key][1] for seed in range(args.seeds)]

    def run_dir(key, value, seed):
        return args.out / "tune" / key / value / f"n{n}" / f"seed{seed}"

    def one(job):
        key, value, seed = job
        d = run_dir(key, value, seed)
        if (d / "metrics.json").is_file():
            return
        subprocess.run(["rm", "-rf", str(d)], check=True)
        binding = f"{TUNING[key][0]} = {value}"
        _run_one(command(METHODS[key], n, seed, d, (*args.param, binding)), env, f"tune {key} {binding} seed={seed}")

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, grid))
    f = args.out / TUNED_FILE
    chosen = json.loads(f.read_text()) if f.is_file() else {}
    for key in [k for k in args.methods if k in TUNING]:
        binding, values = TUNING[key]
        means = {}
        for value in values:
            vals = [json.loads((run_dir(key, value, s) / "metrics.json").read_text())["best"]["val"]
                    for s in range(args.seeds) if (run_dir(key, value, s) / "metrics.json").is_file()]
            if vals:
                means[value] = 100 * sum(vals) / len(vals)
        if means:
            best = max(values, key=lambda v: means.get(v, -1.0))  # ties: the first listed
            chosen[key] = {"binding": binding, "value": best, "val_mean": means, "n": n, "seeds": args.seeds}
            print(f"{key}: {binding} = {best}  (mean best val: " +
                  ", ".join(f"{v}: {m:.1f}" for v, m in means.items()) + ")")
    f.write_text(json.dumps(chosen, indent=2) + "\n")


def timing(args: argparse.Namespace) -> None:
    """Per-step training time of each method relative to STL, measured back to back on one quiet
    machine (1 thread, evaluation and checkpoints off, first interval dropped as warm-up), the order
    of methods alternating between repeats. Written to ``<out>/timing.json``, read by ``report``."""
    import statistics
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    steps = {key: [] for key in args.methods}
    for rep in range(args.timing_repeats):
        order = args.methods if rep % 2 == 0 else args.methods[::-1]
        for key in order:
            with tempfile.TemporaryDirectory() as tmp:
                run_dir = Path(tmp) / "run"
                extra = ("train.steps = 300", "train.eval_every = 0", "train.checkpoint_every = 0", "train.log_every = 50")
                cmd = command(tuned(key, args.out), 10, 0, run_dir, tuple(args.param) + extra)
                cmd[0:1] = [sys.executable, "-m", "auxframe"]
                subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
                rows = [json.loads(x) for x in (run_dir / "scalars.jsonl").read_text().splitlines()]
                steps[key] += [r.get("time/step", r.get("time/step_ms")) for r in rows  # time/step_ms: older runs
                               if "time/step" in r or "time/step_ms" in r][1:]
    ms = {key: statistics.median(v) for key, v in steps.items()}
    out = {key: {"step_ms": ms[key], "vs_stl": ms[key] / ms["stl"] if "stl" in ms else None} for key in ms}
    (args.out / "timing.json").write_text(json.dumps(out, indent=2) + "\n")
    for key, v in out.items():
        print(f"{key:22s} {v['step_ms']:8.2f} ms/step  {v['vs_stl'] or float('nan'):5.2f}x STL")


def _ci95(values: list[float]) -> tuple[float, float]:
    from scipy import stats

    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return m, stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))


def collect(args: argparse.Namespace) -> dict[tuple[str, int], list[dict]]:
    out: dict[tuple[str, int], list[dict]] = {}
    for key in args.methods:
        for n in args.n:
            for seed in range(args.seeds):
                f = args.out / key / f"n{n}" / f"seed{seed}" / "metrics.json"
                if f.is_file():
                    out.setdefault((key, n), []).append(json.loads(f.read_text()))
    return out


def report(args: argparse.Namespace) -> None:
    results = collect(args)
    rows = ["| data | n/class | method | aux tasks | seeds | test acc mean ± 95% CI | final weights (mean) | time vs STL | command |",
            "|---|---|---|---|---|---|---|---|---|"]
    for n in args.n:
        timing_file = args.out / "timing.json"
        timed = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
        for key in args.methods:
            rs = results.get((key, n), [])
            if not rs:
                continue
            m = tuned(key, args.out)
            mean, ci = _ci95([100 * r["best"][args.split] for r in rs])
            weights = _mean_weights(rs)
            rel = f"{timed[key]['vs_stl']:.2f}x" if timed.get(key, {}).get("vs_stl") else "—"
            cmd = shown(command(m, n, 0, Path(f"runs/{key}-n{n}-seed0"), tuple(args.param)))
            rows.append(f"| digits | {n} | {m.label} | {m.aux_tasks} | {len(rs)} | {mean:.1f} ± {ci:.1f} | "
                        f"{weights} | {rel} | `{cmd}` |")
    print("\n".join(rows))
    if args.plots:
        _plot_accuracy(results, args)
        _plot_weights(args)


def _mean_weights(rs: list[dict]) -> str:
    keys = [k for k in rs[0]["weights"] if k != rs[0]["main_task"]]
    if not keys:
        return "—"
    return ", ".join(f"{k} {sum(r['weights'][k] for r in rs) / len(rs):.2f}" for k in keys)


def _plot_accuracy(results, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.n), figsize=(5 * len(args.n), 3.2), squeeze=False)
    for ax, n in zip(axes[0], args.n):
        labels, means, cis = [], [], []
        for key in args.methods:
            rs = results.get((key, n))
            if rs:
                mean, ci = _ci95([100 * r["best"]["test"] for r in rs])
                labels.append(f"{METHODS[key].label}\n({METHODS[key].aux_tasks})")
                means.append(mean)
                cis.append(ci)
        ax.barh(range(len(labels)), means, xerr=cis, color="#4c72b0", capsize=3)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        lo = min(m - c for m, c in zip(means, cis))
        ax.set_xlim(max(0, lo - 5), 100)
        ax.set_xlabel("main-task test accuracy (%), mean ± 95% CI")
        ax.set_title(f"digits, {n} labels per class")
    fig.tight_layout()
    path = args.plots / f"{args.plot_prefix}_accuracy.png"
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def _plot_weights(args) -> None:
    """Task weights over training (mean over seeds) for each method whose weights change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple[str, int], dict[str, dict[int, list[float]]]] = {}
    for key in args.methods:
        for n in args.n:
            for seed in range(args.seeds):
                f = args.out / key / f"n{n}" / f"seed{seed}" / "scalars.jsonl"
                if not f.is_file():
                    continue
                for line in f.read_text().splitlines():
                    row = json.loads(line)
                    for k, v in row.items():
                        if k.startswith("weight/"):
                            curves.setdefault((key, n), {}).setdefault(k[7:], {}).setdefault(row["step"], []).append(v)
    moving = {kn: c for kn, c in curves.items()
              if any(max(sum(v) / len(v) for v in s.values()) - min(sum(v) / len(v) for v in s.values()) > 1e-6
                     for s in c.values())}
    if not moving:
        return
    cols = min(4, len(moving))
    rows = -(-len(moving) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(moving):]:
        ax.axis("off")
    order = sorted(moving.items(), key=lambda kv: (kv[0][1], args.methods.index(kv[0][0])))
    for ax, ((key, n), tasks) in zip(axes.flat, order):
        for task, by_step in tasks.items():
            steps = sorted(by_step)
            ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=task)
        ax.set_title(f"{METHODS[key].label}, n={n}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("effective weight (mean over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = args.plots / f"{args.plot_prefix}_weights.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["tune", "run", "report", "timing"])
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--n", type=int, nargs="+", default=[5, 10])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "protocol")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--plots", type=Path, default=None, help="folder for the PNG plots (e.g. docs)")
    p.add_argument("--plot-prefix", default="results_digits", help="file name prefix of the plots")
    p.add_argument("--param", action="append", default=[], help="extra gin binding for every run (repeatable)")
    p.add_argument("--timing-repeats", type=int, default=2)
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="report the best state's test accuracy (results) or validation accuracy (selection)")
    args = p.parse_args()
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    {"tune": tune, "run": run_grid, "report": report, "timing": timing}[args.action](args)


if __name__ == "__main__":
    main()
