"""What a label generator invented: a grid of examples per generated auxiliary class of a run.

``auxframe labels RUN_DIR --out grid.png`` rebuilds the run's dataset, split and label generator
from ``RUN_DIR/config.gin``, loads the generator from the run's latest checkpoint, labels the
images of a split pool (in eval mode) and draws one row per auxiliary class: the examples for which
it is the most likely class, most confident first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from auxframe.errors import CheckpointError, ConfigError


@dataclass
class GeneratedClasses:
    """Each example's most likely generated auxiliary class.

    Attributes:
        task: the generated-label task.
        num_classes: C, main classes.
        classes_per_main: k.
        indices: ``(N,)`` dataset indices of the examples labelled.
        main: ``(N,)`` their main-task labels.
        assigned: ``(N,)`` their most likely auxiliary class, ``main * k + j``.
        confidence: ``(N,)`` the probability of that class.
    """

    task: str
    num_classes: int
    classes_per_main: int
    indices: np.ndarray
    main: np.ndarray
    assigned: np.ndarray
    confidence: np.ndarray

    def counts(self) -> np.ndarray:
        """``(C, k)``: how many examples each auxiliary class got."""
        return np.bincount(self.assigned, minlength=self.num_classes * self.classes_per_main).reshape(
            self.num_classes, self.classes_per_main)


def _build(name: str, default=None):
    import gin

    try:
        ref = gin.query_parameter(name)
    except ValueError:
        if default is None:
            raise ConfigError(f"the run's config.gin does not set `{name}`; was it written by `auxframe run`?") from None
        return default
    return ref.scoped_configurable_fn() if hasattr(ref, "scoped_configurable_fn") else ref


@torch.no_grad()
def generated_classes(run_dir: str | Path, pool: str = "train", task: str | None = None,
                      batch_size: int = 512) -> tuple[GeneratedClasses, object]:
    """Label a pool of a finished (or stopped) run's split with its trained generator.

    Args:
        run_dir: the run directory (holds ``config.gin`` and ``checkpoints/``).
        pool: the split pool to label (``train``: every training image with its main label).
        task: the generated-label task (default: the only one).
        batch_size: images per generator call.

    Returns:
        ``(classes, dataset)``.

    Raises:
        ConfigError: the run has no generated-label task, or several and ``task`` is not given.
        CheckpointError: the run has no checkpoint holding the generator.
    """
    from auxframe import config
    from auxframe.checkpoint import latest_checkpoint, load_checkpoint
    from auxframe.data.loader import iterate_once
    from auxframe.data.splits import LowDataSplit
    from auxframe.experiment import resolve_tasks

    run_dir = Path(run_dir)
    if not (run_dir / "config.gin").is_file():
        raise ConfigError(f"{run_dir} is not an auxframe run directory (no config.gin).")
    config.parse([run_dir / "config.gin"])
    dataset, graph = _build("train.dataset"), _build("train.tasks")
    split = _build("train.split", LowDataSplit())(dataset)
    generated = [t.name for t in graph.aux if t.generator is not None]
    if task is None and len(generated) != 1:
        raise ConfigError(
            f"the run has {len(generated)} generated-label tasks ({', '.join(generated) or 'none'}); "
            + ("name one with --task." if generated else "train one with `Task.generator = @labelgens.default`.")
        )
    task = task or generated[0]
    if task not in generated:
        raise ConfigError(f"task '{task}' has no label generator; generated-label tasks: {', '.join(generated) or 'none'}.")
    source = resolve_tasks(graph, dataset)[task].generator
    path = latest_checkpoint(run_dir)
    state = load_checkpoint(path).get("label_generators", {}) if path is not None else {}
    if task not in state:
        raise CheckpointError(f"no checkpoint in {run_dir} holds the generator of task '{task}'; train the run first.")
    source.load_state_dict(state[task])
    field, k = graph.main.labels, source.classes_per_main
    indices = np.asarray(split.pool(pool))
    parts = []
    for images, labels in iterate_once(dataset, indices, batch_size):
        soft = source(images, labels[field], train=False)
        conf, best = soft.max(dim=1)
        parts.append((labels[field].numpy(), best.numpy(), conf.numpy()))
    main, assigned, confidence = (np.concatenate(p) for p in zip(*parts))
    keep = main >= 0
    classes = GeneratedClasses(task, source.num_classes, k, indices[keep], main[keep], assigned[keep], confidence[keep])
    return classes, dataset


def _montage(images: torch.Tensor | None, count: int, shape: Sequence[int], columns: int) -> np.ndarray:
    """``count`` of ``images (N, C, H, W)`` tiled ``columns`` wide with 1-pixel gaps, each min-max scaled.

    Returns ``(rows * (H + 1), columns * (W + 1), 3)`` in [0, 1]; empty tiles are white.
    """
    _, height, width = shape
    rows = max(1, -(-count // columns)) if count else 1
    canvas = np.ones((rows * (height + 1), columns * (width + 1), 3))
    for i in range(count):
        arr = images[i].float().numpy()
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)
        tile = np.repeat(arr[:1], 3, axis=0) if arr.shape[0] == 1 else arr[:3]
        r, c = divmod(i, columns)
        canvas[r * (height + 1):r * (height + 1) + height, c * (width + 1):c * (width + 1) + width] = tile.transpose(1, 2, 0)
    return canvas


def save_grid(classes: GeneratedClasses, dataset, out: str | Path, per_class: int = 8,
              main_classes: Sequence[int] | None = None, columns: int = 4) -> Path:
    """One row per main class, one panel per auxiliary class: its most confident examples.

    Each panel is titled ``aux j (n)``: the auxiliary class and how many examples of the pool it got.

    Args:
        classes: from :func:`generated_classes`.
        dataset: the dataset the indices refer to.
        out: the PNG to write.
        per_class: examples per auxiliary class (fewer when it has fewer).
        main_classes: which main classes to show (default: all when C <= 10, else the first 10).
        columns: examples per line inside a panel.

    Returns:
        The path written.

    Raises:
        ConfigError: a main class that does not exist.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = classes.classes_per_main
    shown = list(main_classes) if main_classes is not None else list(range(min(classes.num_classes, 10)))
    bad = [c for c in shown if not 0 <= c < classes.num_classes]
    if bad:
        raise ConfigError(f"main classes {bad} do not exist; the main task has classes 0..{classes.num_classes - 1}.")
    counts, columns = classes.counts(), max(1, min(columns, per_class))
    fig, axes = plt.subplots(len(shown), k, figsize=(1.3 * k + 0.6, 1.2 * len(shown) + 0.4), squeeze=False)
    for r, c in enumerate(shown):
        for j in range(k):
            members = np.flatnonzero(classes.assigned == c * k + j)
            members = members[np.argsort(-classes.confidence[members], kind="stable")][:per_class]
            images = dataset.get_batch(torch.as_tensor(classes.indices[members], dtype=torch.long))[0] if len(members) else None
            ax = axes[r, j]
            ax.imshow(_montage(images, len(members), dataset.input_shape, columns), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"aux {j} ({counts[c, j]})", fontsize=7, pad=2)
        axes[r, 0].set_ylabel(f"class {c}", fontsize=8)
    fig.suptitle(f"task '{classes.task}': most confident examples per generated class", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
