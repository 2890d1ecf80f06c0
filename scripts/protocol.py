"""The digits low-label protocol (../shared/RESULTS_PROTOCOL.md) as sweeps and reports.

Each method is a gin experiment; ``run`` trains it as one ``auxframe sweep`` over
``LowDataSplit.labels_per_class`` (``--n``) and ``--seeds`` seeds (each seed sets ``train.seed``
and ``LowDataSplit.seed``, so the intervals include split-to-split variation and every method sees
the same splits) into ``<out>/<method>/``; rerunning skips finished runs and resumes interrupted
ones. ``report`` is ``auxframe report`` over those sweeps with STL and STL+ as baselines.

    python scripts/protocol.py run --methods stl,stl_plus,equal_rotation --n 5 10 --seeds 5 --jobs 2
    python scripts/protocol.py tune --methods arml,gradnorm,ol_aux --n 10 --seeds 3
    python scripts/protocol.py timing --methods stl,stl_plus,equal_rotation
    python scripts/protocol.py report --methods stl,stl_plus,equal_rotation --n 5 10 --seeds 5 --plots docs

The same without this script, for one method::

    auxframe sweep --gin experiments/digits_arml.gin --gin-param "train.progress = False" \\
        --grid "LowDataSplit.labels_per_class=[5, 10]" --seeds 0 1 2 3 4 --sweep-dir runs/protocol/arml
    auxframe report runs/protocol/stl runs/protocol/stl_plus runs/protocol/arml \\
        --baseline stl --baseline stl_plus --percent

``--setting`` runs the same protocol in one of the seed papers' favourable settings instead of the
low-label graph above: every method is the setting's own recipe with its weighting's gin included
(``include 'weightings/<name>.gin'``, the hyperparameters those files hold), STL the same recipe
with ``weightings/stl.gin`` and STL+ that plus ``digit/Task.pool = 'labeled+aux'``. Baselines and
methods therefore parse the same dataset and split bindings and see the same split (``splits``
checks it: the labelled, auxiliary-set, validation and test indices of every method's run against
STL's, per seed)::

    python scripts/protocol.py run --setting min_data --methods stl,stl_plus,equal,arml --seeds 5 --jobs 1
    python scripts/protocol.py splits --setting min_data --methods stl,stl_plus,equal,arml --seeds 5
    python scripts/protocol.py report --setting min_data --methods stl,stl_plus,equal,arml --seeds 5 --plots docs

``tune`` picks each method's own hyperparameter on validation (a sweep over its ``TUNING`` values,
the configuration with the best mean best-validation accuracy) into ``<out>/tuned.json``, which
``run`` and ``report`` read. ``timing`` measures each method's training step time relative to STL
back to back (the sweeps' own wall times depend on whatever else ran beside each run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from auxframe import report as reports
from auxframe import sweep
from auxframe.errors import AuxframeError

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
    "equal_all": Method("Equal", "experiments/digits_equal_all.gin", "rotation, parity, ge5"),
    "auxilearn_linear": Method("AuxiLearn (linear)", "experiments/digits_auxilearn_linear.gin",
                               "rotation, parity, ge5"),
    "auxilearn_nonlinear": Method("AuxiLearn (nonlinear)", "experiments/digits_auxilearn_nonlinear.gin",
                                  "rotation, parity, ge5"),
    **{key: Method(label, f"experiments/digits_{key}.gin", "rotation, parity, ge5") for key, label in [
        ("arml", "ARML"), ("uncertainty", "Uncertainty"), ("adaloss", "AdaLoss"), ("dwa", "DWA"),
        ("gradnorm", "GradNorm"), ("gcs", "GCS"), ("ol_aux", "OL_AUX"), ("pcgrad", "PCGrad"),
        # issue 15 (auxframe/weighting/: auxinash, forkmerge, metabalance, auto_lambda, famo, rlw, jacobian_descent)
        ("auxinash", "AuxiNash"), ("forkmerge", "ForkMerge"), ("metabalance", "MetaBalance"), ("auto_lambda", "Auto-λ"),
        ("famo", "FAMO"), ("rlw", "RLW"), ("gradvac", "GradVac"), ("upgrad", "UPGrad"), ("mgda", "MGDA"),
        ("cagrad", "CAGrad"), ("nash_mtl", "Nash-MTL"), ("imtl_g", "IMTL-G"), ("aligned_mtl", "Aligned-MTL"),
        ("dualproj", "DualProj")]},
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


@dataclass(frozen=True)
class Setting:
    """A favourable setting of the seed papers (RESULTS_PROTOCOL.md, "Settings"): one recipe whose
    weighting each method replaces."""

    label: str
    gin: str
    aux_tasks: str
    n: int


SETTINGS: dict[str, Setting] = {
    "min_data": Setting("minimum data", "experiments/digits_min_data.gin",
                        "parity, ge5, loops, closed_loops, slant, thick (every training image)", 5),
    "s4l": Setting("S4L", "experiments/digits_s4l_arml.gin", "rotation, exemplar (every training image)", 5),
    "domains": Setting("few-shot DA", "experiments/digits_domains.gin",
                       "inverted, thick, noisy, elastic (source domains, own images)", 5),
}

#: The weightings run in every setting: key -> (label, gin under auxframe/configs/weightings/, extra bindings).
WEIGHTINGS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "stl": ("STL", "stl", ()),
    "stl_plus": ("STL+", "stl", ("digit/Task.pool = 'labeled+aux'",)),
    "equal": ("Equal", "equal", ()),
    "arml": ("ARML", "arml", ()),
    "auxilearn_linear": ("AuxiLearn (linear)", "auxilearn_linear", ()),
    "auxilearn_nonlinear": ("AuxiLearn (nonlinear)", "auxilearn_nonlinear", ()),
    **{key: (label, key, ()) for key, label in [
        ("gcs", "GCS"), ("ol_aux", "OL_AUX"), ("gradnorm", "GradNorm"), ("pcgrad", "PCGrad"),
        ("uncertainty", "Uncertainty"), ("dwa", "DWA"), ("adaloss", "AdaLoss"), ("famo", "FAMO"), ("rlw", "RLW"),
        ("auto_lambda", "Auto-λ"), ("metabalance", "MetaBalance"), ("auxinash", "AuxiNash"),
        ("forkmerge", "ForkMerge"), ("upgrad", "UPGrad"), ("gradvac", "GradVac"), ("mgda", "MGDA"),
        ("cagrad", "CAGrad"), ("nash_mtl", "Nash-MTL"), ("imtl_g", "IMTL-G"), ("aligned_mtl", "Aligned-MTL"),
        ("dualproj", "DualProj")]},
}


def setting_methods(setting: Setting) -> dict[str, Method]:
    """Every weighting of :data:`WEIGHTINGS` as a method of ``setting``."""
    return {key: Method(label, setting.gin, "none" if name == "stl" and not extra else
                        "none (labels + aux set)" if name == "stl" else setting.aux_tasks,
                        (f"include 'weightings/{name}.gin'", *extra))
            for key, (label, name, extra) in WEIGHTINGS.items()}


#: Each method's own hyperparameter, chosen on validation with the same budget for every method
#: (3 values, n = 10, seeds 0-2, by mean best validation accuracy; ``tune``). AuxiLearn's outer
#: learning rates were chosen the same way (docs/results.md).
TUNING: dict[str, tuple[str, tuple[str, ...]]] = {
    "arml": ("weightings.arml.weight_lr", ("0.01", "0.05", "0.2")),
    "gradnorm": ("weightings.gradnorm.alpha", ("0.5", "1.5", "3.0")),
    "ol_aux": ("weightings.ol_aux.weight_lr", ("0.1", "1.0", "10.0")),
    "auxinash": ("weightings.auxinash.meta_lr", ("5e-3", "5e-2", "5e-1")),
    "auto_lambda": ("weightings.auto_lambda.meta_lr", ("1e-4", "1e-3", "1e-2")),
    "forkmerge": ("weightings.forkmerge.merge_every", ("50", "100", "250")),
}
TUNED_FILE = "tuned.json"


def tuned(method_key: str, out: Path, methods: dict[str, Method] | None = None) -> Method:
    """The method (of ``methods``, default :data:`METHODS`) with its validation-chosen
    hyperparameter (from ``<out>/tuned.json``), if any."""
    method = (METHODS if methods is None else methods)[method_key]
    f = out / TUNED_FILE
    chosen = json.loads(f.read_text()).get(method_key) if f.is_file() else None
    if chosen is None:
        return method
    return Method(method.label, method.gin, method.aux_tasks, (*method.params, f"{chosen['binding']} = {chosen['value']}"))


def params(method: Method, extra: tuple[str, ...] = ()) -> list[str]:
    """The bindings of every run of ``method``."""
    return ["train.progress = False", *method.params, *extra]


def command(method: Method, n: int, seed: int, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The ``auxframe run`` of one run of ``method`` (what ``timing`` runs)."""
    cmd = ["auxframe", "run", "--gin", method.gin]
    for p in [f"LowDataSplit.labels_per_class = {n}", f"train.seed = {seed}", f"LowDataSplit.seed = {seed}",
              *params(method, extra)]:
        cmd += ["--gin-param", p]
    return cmd + ["--run-dir", str(run_dir)]


def _sweep(method: Method, sweep_dir: Path, axes: list, args: argparse.Namespace, extra: tuple[str, ...] = ()) -> dict:
    os.environ.setdefault("WANDB_MODE", "disabled")
    return sweep.run_sweep([method.gin], params(method, (*args.param, *extra)), axes, sweep_dir, jobs=args.jobs)


def run_grid(args: argparse.Namespace) -> None:
    """One sweep per method over ``--n`` and ``--seeds``, into ``<out>/<method>``."""
    axes = [sweep.parse_grid(f"LowDataSplit.labels_per_class=[{', '.join(map(str, args.n))}]"),
            sweep.seeds_axis(range(args.seeds))]
    failed = []
    for key in args.methods:
        print(f"== {key}", flush=True)
        try:
            _sweep(tuned(key, args.out, args.catalog), args.out / key, axes, args)
        except AuxframeError as exc:  # one method's bad config does not stop the others
            print(f"== {key} failed: {exc}", flush=True)
            failed.append(key)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def tune(args: argparse.Namespace) -> None:
    """Sweep every TUNING value of the chosen methods at ``--n`` (first value) over ``--seeds`` seeds
    under ``<out>/tune/<method>``; the configuration with the best mean best-validation accuracy is
    written to ``<out>/tuned.json`` (read by ``run`` and ``report``)."""
    n = args.n[0]
    f = args.out / TUNED_FILE
    chosen = json.loads(f.read_text()) if f.is_file() else {}
    for key in [k for k in args.methods if k in TUNING]:
        binding, values = TUNING[key]
        axes = [sweep.parse_grid(f"{binding}=[{', '.join(values)}]"), sweep.seeds_axis(range(args.seeds))]
        out = _sweep(args.catalog[key], args.out / "tune" / key, axes, args, (f"LowDataSplit.labels_per_class = {n}",))
        means = {c.values[binding]: 100 * c.interval("best_val").mean for c in out["configurations"]}
        if out["best"] is not None:
            best = out["best"].values[binding]
            chosen[key] = {"binding": binding, "value": best, "val_mean": means, "n": n, "seeds": args.seeds}
            print(f"{key}: {binding} = {best}  (mean best val: " + ", ".join(f"{v}: {m:.1f}" for v, m in means.items()) + ")")
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
                cmd = command(tuned(key, args.out, args.catalog), args.n[-1], 0, run_dir, tuple(args.param) + extra)
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


def split_fingerprint(gin_files: list[str | Path], bindings: list[str] = ()) -> dict[str, str]:
    """The split an experiment trains on, built from its dataset and ``LowDataSplit`` bindings
    (nothing is trained): a SHA-1 of each part's indices, and for image datasets of the labelled
    images' pixels too (so two datasets that index differently cannot pass as one split)."""
    import hashlib

    import gin
    import numpy as np

    from auxframe import config

    config.reset()
    try:
        config.parse(gin_files, bindings)
        dataset = gin.query_parameter("train.dataset").scoped_configurable_fn()
        split = gin.query_parameter("train.split").scoped_configurable_fn()(dataset)
    finally:
        config.reset()
    out = {part: hashlib.sha1(np.ascontiguousarray(getattr(split, part)).tobytes()).hexdigest()[:12]
           for part in ("labeled", "aux", "val", "test")}
    images = getattr(dataset, "images", None)
    if images is not None:
        pixels = np.ascontiguousarray(np.asarray(images)[split.labeled])
        out["labeled images"] = hashlib.sha1(pixels.tobytes()).hexdigest()[:12]
    return out


def run_split(run_dir: Path) -> dict[str, str]:
    """:func:`split_fingerprint` of a finished run, from its ``config.gin``."""
    return split_fingerprint([run_dir / "config.gin"])


def check_splits(args: argparse.Namespace) -> None:
    """Every finished run of each method trained on the same split as STL's run with the same
    seed (labelled, auxiliary-set, validation and test indices). Exits 1 on a mismatch."""
    found = [k for k in args.methods if (args.out / k / sweep.SWEEP_FILE).is_file()]
    if "stl" not in found:
        sys.exit(f"no STL sweep under {args.out}; run `--methods stl` first")

    def runs(key: str) -> dict[str, Path]:
        return {_seed(d): d
                for d in sorted((args.out / key).iterdir()) if (d / "metrics.json").is_file()}

    reference = {seed: run_split(d) for seed, d in runs("stl").items()}
    bad = 0
    for key in found:
        for seed, d in runs(key).items():
            mine = run_split(d)
            same = mine == reference.get(seed)
            bad += not same
            print(f"{key:20s} seed {seed}: {'same split as STL' if same else 'DIFFERENT: ' + str(mine)}")
    print(f"{'all' if not bad else bad} {'runs agree with STL' if not bad else 'runs differ from STL'} "
          f"({', '.join(reference[min(reference)])} per seed)")
    if bad:
        sys.exit(1)


def _seed(run_dir: Path) -> str:
    """``train.seed`` / ``LowDataSplit.seed`` of a run, from its config.gin."""
    from auxframe.runconfig import config_bindings

    b = config_bindings((run_dir / "config.gin").read_text())
    return f"{b.get('train.seed')}/{b.get('LowDataSplit.seed')}/n={b.get('LowDataSplit.labels_per_class')}"


def setting_table(rep: reports.Report, setting: Setting, args: argparse.Namespace) -> str:
    """The report of one setting as RESULTS_PROTOCOL.md's rows: the method's label and aux tasks,
    paired differences to STL, STL+ (and Equal), the test errors relative to STL+'s, and the
    command (the sweep of 5 seeds, paths relative to the repository)."""

    def diff(row: reports.Row, base: str) -> tuple[str, str]:
        d = row.versus.get(base)
        if d is None or d.n == 0:
            return "—", "—"
        return f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]", d.record

    plus = next((r for r in rep.rows if r.method == "stl_plus"), None)
    plus_err = 1 - plus.interval.mean if plus is not None and plus.interval and plus.interval.n else None
    bases = [b for b in ("stl", "stl_plus", "equal") if b in rep.baselines]
    names = {"stl": "STL", "stl_plus": "STL+", "equal": "Equal"}
    head = ["data", "n/class", "method", "aux tasks", "seeds", "test acc mean ± 95% CI",
            *(c for b in bases for c in (f"Δ vs {names[b]} (95% CI)", f"W/T/L vs {names[b]}")),
            "test errors vs STL+", "final weights (mean)", "time vs STL", "command"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rep.rows:
        method = args.catalog[row.method]
        ci = row.interval
        errors = (f"{100 * ((1 - ci.mean) / plus_err - 1):+.0f}%" if plus_err and ci and ci.n and row.method != "stl_plus"
                  else "—")
        weights = ", ".join(f"{t} {w:.2f}" for t, w in row.mean_weights().items()) if row.method not in ("stl", "stl_plus") else ""
        command = row.command.replace(f"{REPO}/", "")
        cells = [f"digits, {setting.label}", dict(row.setting).get("LowDataSplit.labels_per_class", "—"), method.label,
                 method.aux_tasks, f"{len(row.values)}/{len(row.runs)}", ci.format(1, 100) if ci and ci.n else "—",
                 *(c for b in bases for c in diff(row, b)), errors, weights or "—",
                 f"{row.time_ratio:.2f}x" if row.time_ratio else "—", f"`{command}`"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    if rep.notes:
        lines += ["", *(f"- {n}" for n in rep.notes)]
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace) -> None:
    """``auxframe report`` over the methods' sweeps, with STL and STL+ as baselines where they ran."""
    found = [k for k in args.methods if (args.out / k / sweep.SWEEP_FILE).is_file()]
    setting = SETTINGS.get(args.setting)
    baselines = [b for b in ("stl", "stl_plus", *(("equal",) if setting else ())) if b in found]
    rep = reports.build_report([f"{k}={args.out / k}" for k in found], baselines, f"best_{args.split}")
    rep.rows = [r for r in rep.rows if dict(r.setting).get("LowDataSplit.labels_per_class") in map(str, args.n)]
    if setting is not None:
        print(setting_table(rep, setting, args))
    else:
        print(reports.markdown(rep, percent=True))
        print("| method | label | aux tasks |\n|---|---|---|")
        for k in found:
            print(f"| {k} | {tuned(k, args.out, args.catalog).label} | {tuned(k, args.out, args.catalog).aux_tasks} |")
    timing_file = args.out / "timing.json"
    if timing_file.is_file():
        timed = json.loads(timing_file.read_text())
        print("\nstep time vs STL, back to back (timing): " +
              ", ".join(f"{k} {timed[k]['vs_stl']:.2f}x" for k in found if timed.get(k, {}).get("vs_stl")))
    if args.plots:  # the PNGs only (the table is printed above, for docs/results.md)
        from auxframe import report_plots

        args.plots.mkdir(parents=True, exist_ok=True)
        written = [report_plots.plot_metric(rep, args.plots / f"{args.plot_prefix}_accuracy.png", True),
                   report_plots.plot_weights(rep, args.plots / f"{args.plot_prefix}_weights.png")]
        print("\nwrote " + ", ".join(str(p) for p in written if p is not None))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["tune", "run", "report", "timing", "splits"])
    p.add_argument("--setting", choices=["low_label", *SETTINGS], default="low_label",
                   help="low_label: each method's own digits_<name>.gin (the quickstart's graph); else the "
                        "setting's recipe with each method's weighting (default --n: 5, --out: runs/protocol/<setting>)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=None)
    p.add_argument("--n", type=int, nargs="+", default=None)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--plots", type=Path, default=None, help="folder for the PNG plots (e.g. docs)")
    p.add_argument("--plot-prefix", default=None,
                   help="file name prefix of the plots (default results_digits, or results_digits_<setting>)")
    p.add_argument("--param", action="append", default=[], help="extra gin binding for every run (repeatable)")
    p.add_argument("--timing-repeats", type=int, default=2)
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="report the best state's test accuracy (results) or validation accuracy (selection)")
    args = p.parse_args()
    setting = SETTINGS.get(args.setting)
    args.catalog = METHODS if setting is None else setting_methods(setting)
    args.methods = list(args.catalog) if args.methods is None else args.methods
    args.n = args.n or ([5, 10] if setting is None else [setting.n])
    args.out = args.out or REPO / "runs" / "protocol" / ("" if setting is None else args.setting)
    args.plot_prefix = args.plot_prefix or ("results_digits" if setting is None else f"results_digits_{args.setting}")
    unknown = [m for m in args.methods if m not in args.catalog]
    if unknown:
        p.error(f"unknown method(s) {unknown} for --setting {args.setting}; known: {', '.join(args.catalog)}")
    {"tune": tune, "run": run_grid, "report": report, "timing": timing, "splits": check_splits}[args.action](args)


if __name__ == "__main__":
    main()
