"""``auxframe report``: a results table and plots over runs and sweeps (:mod:`auxframe.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "tabulate and plot runs and sweeps: mean and 95-percent interval over seeds, paired differences to baselines"
EPILOG = ("Example: auxframe report sweeps/stl sweeps/stl_plus sweeps/arml --baseline stl --baseline stl_plus "
          "--percent --out docs --name results_digits")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="RUN_DIR|SWEEP_DIR",
                   help="run directories, sweep directories, or folders holding them; LABEL=PATH names the "
                        "method (default: a sweep's folder name, a run's parent folder name)")
    p.add_argument("--baseline", action="append", default=[], metavar="METHOD",
                   help="compare every row with this method's row of the same setting: paired differences over "
                        "the same seeds, 95%% CI, wins/ties/losses (repeatable, e.g. stl and stl_plus)")
    p.add_argument("--metric", default="best_test",
                   help="best_test (test metric of the best-on-validation state; default), test, best_val, val, "
                        "or a key of metrics.json's 'metrics' such as test/parity/accuracy")
    p.add_argument("--tie", type=float, default=0.0, metavar="EPS",
                   help="differences of at most EPS are ties (default 0)")
    p.add_argument("--percent", action="store_true", help="show the metric in percent (one decimal)")
    p.add_argument("--out", metavar="DIR",
                   help="where NAME.md, NAME.csv and the PNGs go (default: the one path given, else report/)")
    p.add_argument("--name", default="report", help="file name stem of what is written (default: report)")
    p.add_argument("--no-plots", action="store_true", help="write the table only")


def main(args: argparse.Namespace) -> int:
    from auxframe import report

    rep = report.build_report(args.paths, args.baseline, args.metric, args.tie)
    only = report.split_label(args.paths[0])[1] if len(args.paths) == 1 else None
    out = args.out or (only if only is not None and only.is_dir() else Path("report"))
    written = report.write_report(rep, out, args.name, percent=args.percent, plots=not args.no_plots)
    print(report.markdown(rep, args.percent), end="")
    print()
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0
