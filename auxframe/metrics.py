"""Built-in metrics (plugin kind ``metrics``).

A metric plugin is a class with ``update(output, target)`` (called once per evaluation batch) and
``compute() -> dict[str, float]``; a new instance is made for every evaluation. Accumulating per
batch keeps evaluation memory flat. The first key of ``compute()`` is the task's main metric; the
class attribute ``higher_is_better`` (default True) says which way is better when the trainer picks
the best-on-validation model.
"""

from __future__ import annotations

import torch


class Accuracy:
    """Top-k classification accuracy (fraction of examples whose label is among the k best logits).

    For per-pixel outputs ``(B, C, H, W)`` and labels ``(B, H, W)`` it is pixel accuracy. Labels
    of ``-1`` are ignored.

    Args:
        topk: the k values to report; ``(1,)`` reports ``accuracy``, ``(1, 5)`` adds ``top5``.
    """

    higher_is_better = True

    def __init__(self, topk: tuple[int, ...] = (1,)):
        self.topk = tuple(topk)
        self.reset()

    def reset(self) -> None:
        self.correct = {k: 0 for k in self.topk}
        self.count = 0

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.ndim > 2:  # per-pixel: classes last, one row per pixel
            output = output.movedim(1, -1).reshape(-1, output.shape[1])
            target = target.reshape(-1)
        keep = target >= 0
        output, target = output[keep], target[keep]
        kmax = min(max(self.topk), output.shape[1])
        best = output.topk(kmax, dim=1).indices
        hits = best == target.unsqueeze(1)
        for k in self.topk:
            self.correct[k] += int(hits[:, :k].any(dim=1).sum())
        self.count += int(target.numel())

    def compute(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {("accuracy" if k == 1 else f"top{k}"): self.correct[k] / n for k in self.topk}
