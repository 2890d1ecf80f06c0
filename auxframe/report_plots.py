"""The plots of ``auxframe report``: the metric per row with its interval, and task weights over training.

Kept apart from :mod:`auxframe.report` so that only drawing imports matplotlib (with the Agg
backend: no display is needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from auxframe.report import Report, Row


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(report: "Report") -> list[tuple[str, list["Row"]]]:
    """One panel per setting that several methods share (e.g. labels per class), else one panel."""
    settings: dict[tuple, list["Row"]] = {}
    for row in report.rows:
        settings.setdefault(row.setting, []).append(row)
    if len(settings) == len(report.rows):  # no two rows share a setting: one panel of every row
        return [("", report.rows)]
    return [(rows[0].setting_text(), rows) for rows in settings.values()]


def plot_metric(report: "Report", path: Path, percent: bool = False) -> Path | None:
    """Each row's mean and 95% interval as a bar, its seeds as dots; one panel per shared setting."""
    panels = [(title, [r for r in rows if r.values]) for title, rows in _panels(report)]
    panels = [(t, rows) for t, rows in panels if rows]
    if not panels:
        return None
    plt = _pyplot()
    scale = 100.0 if percent else 1.0
    height = max(len(rows) for _, rows in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.9 + 0.45 * height), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        means = [r.interval.mean * scale for r in rows]
        errs = [0.0 if math.isnan(r.interval.half_width) else r.interval.half_width * scale for r in rows]
        # a mean and its interval, not a bar: the axis does not start at zero
        ax.errorbar(means, range(len(rows)), xerr=errs, fmt="D", color="#4c72b0", capsize=4, markersize=5)
        for i, r in enumerate(rows):
            ax.scatter([v * scale for v in r.values.values()], [i + 0.18] * len(r.values), color="black", s=8,
                       alpha=0.6, zorder=3)
        ax.grid(axis="x", alpha=0.3)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        labels = [r.method if title or not r.setting else f"{r.method}\n{r.setting_text()}" for r in rows]
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        lows = [min([m - e, *(v * scale for v in r.values.values())]) for m, e, r in zip(means, errs, rows)]
        highs = [max([m + e, *(v * scale for v in r.values.values())]) for m, e, r in zip(means, errs, rows)]
        pad = 0.05 * (max(highs) - min(lows) or 1.0)
        ax.set_xlim(min(lows) - pad, max(highs) + pad)
        ax.set_xlabel(f"{report.metric}{' (%)' if percent else ''}: mean ± 95% CI, dots: seeds")
        if title:
            ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def weight_curves(row: "Row") -> dict[str, tuple[list[int], list[float]]]:
    """Task -> (steps, mean weight over the row's runs at each step), from their ``scalars.jsonl``."""
    by_task: dict[str, dict[int, list[float]]] = {}
    for run in row.runs:
        f = run.path / "scalars.jsonl"
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            try:
                scalars = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interrupted run
                continue
            for key, value in scalars.items():
                if key.startswith("weight/") and "step" in scalars:
                    by_task.setdefault(key[len("weight/"):], {}).setdefault(int(scalars["step"]), []).append(value)
    curves = {}
    for task, steps in by_task.items():
        xs = sorted(steps)
        curves[task] = (xs, [math.fsum(steps[x]) / len(steps[x]) for x in xs])
    return curves


def plot_weights(report: "Report", path: Path) -> Path | None:
    """Task weights over training (mean over seeds), one panel per row whose weights change."""
    moving = []
    for row in report.rows:
        curves = weight_curves(row)
        if any(max(ys) - min(ys) > 1e-9 for _, ys in curves.values()):
            moving.append((row, curves))
    if not moving:
        return None
    plt = _pyplot()
    cols = min(4, len(moving))
    nrows = -(-len(moving) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(moving):]:
        ax.axis("off")
    for ax, (row, curves) in zip(axes.flat, moving):
        for task, (xs, ys) in curves.items():
            ax.plot(xs, ys, label=task)
        setting = row.setting_text()
        ax.set_title(f"{row.method}{', ' + setting if setting else ''}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(f"weight (mean over {len(row.runs)} runs)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
