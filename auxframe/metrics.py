"""Built-in metrics (plugin kind ``metrics``).

A metric plugin is a class with ``update(output, target)`` (called once per evaluation batch) and
``compute() -> dict[str, float]``; a new instance is made for every evaluation. Accumulating per
batch keeps evaluation memory flat. The first key of ``compute()`` is the task's main metric; the
class attribute ``higher_is_better`` (default True) says which way is better when the trainer picks
the best-on-validation model.
"""

from __future__ import annotations

import math

import torch

from auxframe.losses import binary_logits


class Accuracy:
    """Top-k classification accuracy (fraction of examples whose label is among the k best logits).

    For per-pixel outputs ``(B, C, H, W)`` and labels ``(B, H, W)`` it is pixel accuracy. A single
    logit per example (output of the labels' shape, e.g. ``heads.multilabel`` on a binary label)
    predicts 1 where the logit is positive. Labels of ``-1`` are ignored. Soft labels ``(B, C)`` (a
    generated-label task's) count their most likely class as the label; all-zero rows are ignored.

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
        if target.is_floating_point() and output.ndim == 2 and target.shape == output.shape:  # soft labels
            target = torch.where(target.sum(dim=1) > 0, target.argmax(dim=1), -1)
        if output.shape == target.shape:  # one logit per example (binary head): scores (0, logit)
            output = torch.stack([torch.zeros_like(output), output], dim=1)
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


class PixelAccuracy(Accuracy):
    """Fraction of labelled pixels classified correctly, over the whole evaluation set.

    Output ``(B, C, H, W)`` logits, labels ``(B, H, W)`` with ``-1`` ignored. Reports
    ``pixel_accuracy`` (the same number as ``accuracy`` on per-pixel outputs).
    """

    def __init__(self):
        super().__init__(topk=(1,))

    def compute(self) -> dict[str, float]:
        return {"pixel_accuracy": self.correct[1] / max(self.count, 1)}


# -- multi-label (binary) ------------------------------------------------------------------------------
def _binary_scores(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (log-odds of label 1) and labels as ``(N, A)``, from one logit or two class scores."""
    if output.ndim == target.ndim + 1 and output.shape[1] == 2:  # two class scores: log-odds of class 1
        output = output[:, 1] - output[:, 0]
    output = binary_logits(output, target, "a multi-label metric")
    if output.ndim == 1:
        output, target = output[:, None], target[:, None]
    return output.detach().float().cpu(), target.detach().long().cpu()


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Average precision of one binary label: ``sum_n (R_n - R_{n-1}) P_n`` over score thresholds.

    The same definition as scikit-learn's ``average_precision_score`` (no interpolation; examples
    with equal scores enter at one threshold).

    Args:
        scores: ``(N,)`` scores, higher meaning more likely positive.
        labels: ``(N,)`` 0/1 labels with at least one 1.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], labels[order].double()
    tp, fp = y.cumsum(0), (1 - y).cumsum(0)
    last = torch.cat([torch.nonzero(s[1:] != s[:-1]).flatten(), torch.tensor([len(s) - 1])])
    tp, fp = tp[last], fp[last]
    precision, recall = tp / (tp + fp), tp / tp[-1]
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((steps * precision).sum())


class MultiLabelMAP:
    """Mean average precision over binary labels (mAP), e.g. CelebA attributes.

    Accepts one logit per label (``(B,)`` for one label, ``(B, A)`` for ``A``; labels of the same
    shape) or two class scores ``(B, 2)`` for a binary label ``(B,)``. Labels ``-1`` are ignored;
    a label with no positive example in the evaluation set has no AP and is left out of the mean
    (``nan`` when no label has a positive). Keeps every score (``N x A`` floats) until ``compute``.
    """

    higher_is_better = True

    def __init__(self):
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        scores, labels = _binary_scores(output, target)
        self.scores.append(scores)
        self.labels.append(labels)

    def compute(self) -> dict[str, float]:
        if not self.scores:
            return {"map": float("nan")}
        scores, labels = torch.cat(self.scores), torch.cat(self.labels)
        aps = []
        for a in range(scores.shape[1]):
            keep = labels[:, a] >= 0
            if bool((labels[keep, a] == 1).any()):
                aps.append(average_precision(scores[keep, a], labels[keep, a]))
        return {"map": sum(aps) / len(aps) if aps else float("nan")}


class MultiLabelF1:
    """F1 score of binary labels thresholded at a probability (0.5: a positive logit).

    Inputs as for :class:`MultiLabelMAP`; counts are accumulated per label, so memory stays flat.

    Args:
        threshold: predict 1 where ``sigmoid(logit) > threshold``.
        average: ``'macro'``: the mean of each label's F1 (labels with no positive and no positive
            prediction, whose F1 is undefined, are left out); ``'micro'``: F1 of the pooled counts.

    Raises:
        ValueError: an unknown ``average`` or a threshold outside ``(0, 1)``.
    """

    higher_is_better = True

    def __init__(self, threshold: float = 0.5, average: str = "macro"):
        if average not in ("macro", "micro"):
            raise ValueError(f"metrics.multilabel_f1.average = {average!r}: use 'macro' or 'micro'.")
        if not 0 < threshold < 1:
            raise ValueError(f"metrics.multilabel_f1.threshold = {threshold}: a probability in (0, 1), e.g. 0.5.")
        self.logit_threshold = math.log(threshold / (1 - threshold))
        self.average = average
        self.counts: torch.Tensor | None = None  # (3, A): true positives, false positives, false negatives

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        scores, labels = _binary_scores(output, target)
        keep = labels >= 0
        pred, true = (scores > self.logit_threshold) & keep, (labels == 1) & keep
        counts = torch.stack([(pred & true).sum(0), (pred & ~true).sum(0), (~pred & true).sum(0)])
        self.counts = counts if self.counts is None else self.counts + counts

    def compute(self) -> dict[str, float]:
        if self.counts is None:
            return {"f1": float("nan")}
        tp, fp, fn = self.counts.double()
        if self.average == "micro":
            tp, fp, fn = tp.sum(), fp.sum(), fn.sum()
        denom = 2 * tp + fp + fn
        defined = denom > 0
        if not bool(defined.any()):
            return {"f1": float("nan")}
        return {"f1": float((2 * tp[defined] / denom[defined]).mean())}


# -- segmentation -------------------------------------------------------------------------------------
class MeanIoU:
    """Mean intersection over union of per-pixel classes, from a confusion matrix over the set.

    IoU of class ``c`` is ``TP / (TP + FP + FN)`` over every labelled pixel of the evaluation set;
    the mean is over classes that occur in the labels or the predictions (others have no IoU).
    Note: MTAN's and AuxiLearn's NYUv2 scripts average a per-image mIoU instead; the set-level
    confusion matrix is the standard definition (and what MTAN's later code uses). Also reports
    ``pixel_accuracy``. Output ``(B, C, H, W)`` logits, labels ``(B, H, W)``, ``-1`` ignored.
    """

    higher_is_better = True

    def __init__(self):
        self.confusion: torch.Tensor | None = None  # rows: true class, columns: predicted class

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.ndim != target.ndim + 1:
            raise ValueError(f"metrics.miou needs logits (B, C, ...) and class labels (B, ...); got "
                             f"{tuple(output.shape)} and {tuple(target.shape)}.")
        classes = output.shape[1]
        pred = output.argmax(dim=1)
        keep = target >= 0
        index = (target[keep] * classes + pred[keep]).cpu()
        counts = torch.bincount(index, minlength=classes * classes).reshape(classes, classes)
        self.confusion = counts if self.confusion is None else self.confusion + counts

    def compute(self) -> dict[str, float]:
        if self.confusion is None:
            return {"miou": float("nan"), "pixel_accuracy": float("nan")}
        c = self.confusion.double()
        tp = c.diag()
        union = c.sum(0) + c.sum(1) - tp
        present = union > 0
        miou = float((tp[present] / union[present]).mean()) if bool(present.any()) else float("nan")
        return {"miou": miou, "pixel_accuracy": float(tp.sum() / c.sum().clamp_min(1))}


# -- dense regression ---------------------------------------------------------------------------------
class DepthError:
    """Absolute and relative depth error, averaged over every valid pixel of the evaluation set.

    ``abs_err = mean |d_pred - d|`` and ``rel_err = mean |d_pred - d| / d`` over pixels whose
    true depth ``d`` is not 0 (0 marks an invalid pixel), as in MTAN's and AuxiLearn's NYUv2 code
    (which average per batch; here every valid pixel counts once). Lower is better; ``abs_err`` is
    the main value. Output and target ``(B, 1, H, W)``.
    """

    higher_is_better = False

    def __init__(self):
        self.abs_sum, self.rel_sum, self.count = 0.0, 0.0, 0

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.shape != target.shape:
            raise ValueError(f"metrics.depth_error needs prediction and target of one shape; got "
                             f"{tuple(output.shape)} and {tuple(target.shape)}.")
        valid = target != 0
        err = (output[valid] - target[valid]).abs().double()
        self.abs_sum += float(err.sum())
        self.rel_sum += float((err / target[valid].abs().double()).sum())
        self.count += int(valid.sum())

    def compute(self) -> dict[str, float]:
        n = self.count
        if not n:
            return {"abs_err": float("nan"), "rel_err": float("nan")}
        return {"abs_err": self.abs_sum / n, "rel_err": self.rel_sum / n}


class NormalAngle:
    """Angle in degrees between predicted and true surface normals over valid pixels.

    Reports ``mean_angle`` (main value; lower is better), ``median_angle`` and the fraction of
    pixels within 11.25, 22.5 and 30 degrees (``within_11.25``, ...), the NYUv2 normal metrics of
    MTAN and AuxiLearn. A pixel whose true normal is all-zero is invalid. Both vectors are
    normalised, so the prediction need not be a unit vector. The median comes from a histogram of
    0.01-degree bins (memory stays flat over the evaluation set): it is exact to 0.005 degrees.
    Output and target ``(B, 3, H, W)``.
    """

    higher_is_better = False
    bin_width = 0.01
    thresholds = (11.25, 22.5, 30.0)

    def __init__(self):
        self.histogram = torch.zeros(int(round(180 / self.bin_width)), dtype=torch.long)
        self.angle_sum, self.count = 0.0, 0
        self.within = [0 for _ in self.thresholds]

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.ndim != 4 or output.shape != target.shape or output.shape[1] != 3:
            raise ValueError(f"metrics.normal_angle needs prediction and target of shape (B, 3, H, W); got "
                             f"{tuple(output.shape)} and {tuple(target.shape)}.")
        valid = (target != 0).any(dim=1)
        cos = torch.nn.functional.cosine_similarity(output.double(), target.double(), dim=1, eps=1e-12)[valid]
        angle = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0))).cpu()
        self.angle_sum += float(angle.sum())
        self.count += int(angle.numel())
        for i, t in enumerate(self.thresholds):
            self.within[i] += int((angle < t).sum())
        bins = (angle / self.bin_width).long().clamp(max=self.histogram.numel() - 1)
        self.histogram += torch.bincount(bins, minlength=self.histogram.numel())

    def _quantile_bin(self, rank: int) -> float:
        """Centre of the bin holding the ``rank``-th smallest angle (1-based)."""
        index = int(torch.searchsorted(self.histogram.cumsum(0), torch.tensor(rank)))
        return (index + 0.5) * self.bin_width

    def compute(self) -> dict[str, float]:
        n = self.count
        if not n:
            return {"mean_angle": float("nan"), "median_angle": float("nan"),
                    **{f"within_{t:g}": float("nan") for t in self.thresholds}}
        median = (self._quantile_bin((n + 1) // 2) + self._quantile_bin(n // 2 + 1)) / 2
        return {"mean_angle": self.angle_sum / n, "median_angle": median,
                **{f"within_{t:g}": w / n for t, w in zip(self.thresholds, self.within)}}


# -- embeddings ---------------------------------------------------------------------------------------
class RetrievalAccuracy:
    """Nearest-neighbour instance retrieval, the evaluation of an Exemplar (embedding) task.

    Within each evaluation batch (e.g. the augmented views ``signals.exemplar`` makes), the
    fraction of embeddings whose nearest other embedding (Euclidean) has the same instance id.
    Embeddings with no other view of their instance in the batch, or with id ``-1``, are not
    counted. Output ``(N, D)``, labels ``(N,)``.
    """

    higher_is_better = True

    def __init__(self):
        self.correct, self.count = 0, 0

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.ndim != 2 or target.shape != output.shape[:1]:
            raise ValueError(f"metrics.retrieval needs embeddings (N, D) and ids (N,); got "
                             f"{tuple(output.shape)} and {tuple(target.shape)}.")
        dist = torch.cdist(output.float(), output.float())
        dist.fill_diagonal_(float("inf"))
        same = target[:, None] == target[None, :]
        same.fill_diagonal_(False)
        counted = same.any(dim=1) & (target >= 0)
        hit = target[dist.argmin(dim=1)] == target
        self.correct += int((hit & counted).sum())
        self.count += int(counted.sum())

    def compute(self) -> dict[str, float]:
        return {"retrieval_accuracy": self.correct / self.count if self.count else float("nan")}
