"""Built-in losses (plugin kind ``losses``).

A loss plugin is ``fn(output, target) -> tensor`` that returns the loss *unreduced*, with the batch
as its first dimension (``(B,)`` per sample, ``(B, H, W)`` per pixel). Weightings see these
unreduced values, so networks over per-sample loss vectors (AuxiLearn) can be built on them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(output: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample softmax cross-entropy; ``target`` holds class indices (``-1`` entries give 0 loss).

    Args:
        output: logits ``(B, C)`` (or ``(B, C, H, W)`` for per-pixel classification).
        target: class indices ``(B,)`` (or ``(B, H, W)``), int64.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
    """
    return F.cross_entropy(output, target, reduction="none", ignore_index=-1, label_smoothing=label_smoothing)


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, averaged over every non-batch dimension."""
    diff = (output - target.to(output.dtype)).pow(2)
    return diff.reshape(diff.shape[0], -1).mean(dim=1)


# -- binary and focal ---------------------------------------------------------------------------------
def binary_logits(output: torch.Tensor, target: torch.Tensor, what: str) -> torch.Tensor:
    """``output`` as one logit per label, of ``target``'s shape (a trailing ``(B, 1)`` is squeezed).

    Raises:
        ValueError: the shapes do not match; ``what`` names the loss or metric in the message.
    """
    if output.ndim == target.ndim + 1 and output.shape[-1] == 1:
        output = output.squeeze(-1)
    if output.shape != target.shape:
        raise ValueError(
            f"{what} needs one logit per label: output {tuple(output.shape)} and labels {tuple(target.shape)} "
            f"differ. Use `heads.multilabel` (one logit for a binary label); a head with two class scores "
            f"goes with `losses.cross_entropy`."
        )
    return output


def _binary_pair(output: torch.Tensor, target: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    output = binary_logits(output, target, f"losses.{loss}")
    return output, target.to(output.dtype)


def _mean_valid(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over the valid entries of every non-batch dimension (0 if none is valid)."""
    if values.ndim == 1:
        return values * valid
    flat, keep = values.reshape(values.shape[0], -1), valid.reshape(valid.shape[0], -1).to(values.dtype)
    return (flat * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


def binary_cross_entropy(output: torch.Tensor, target: torch.Tensor, pos_weight: float | None = None) -> torch.Tensor:
    """Per-sample sigmoid binary cross-entropy on logits; labels ``-1`` (missing) give 0 loss.

    Args:
        output: logits ``(B,)`` for one binary label (``(B, 1)`` is accepted), or ``(B, A)`` for
            ``A`` labels per example.
        target: labels 0/1 of the same shape (int or float); ``-1`` marks a missing label.
        pos_weight: weight of the positive term (as in ``BCEWithLogitsLoss``), e.g. the ratio of
            negatives to positives for a rare attribute; None for 1.

    Returns:
        ``(B,)``: the loss of each example; for ``(B, A)`` the mean over its *present* labels
        (an example with every label missing gives 0).

    Raises:
        ValueError: output and target shapes differ.
    """
    output, target = _binary_pair(output, target, "binary_cross_entropy")
    valid = target >= 0
    weight = None if pos_weight is None else torch.tensor(float(pos_weight), dtype=output.dtype, device=output.device)
    per_label = F.binary_cross_entropy_with_logits(output, target.clamp_min(0), reduction="none", pos_weight=weight)
    return _mean_valid(per_label, valid)


def focal(output: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float | None = None) -> torch.Tensor:
    """Focal loss (Lin et al., 2017): ``-alpha_t (1 - p_t)^gamma log p_t``, unreduced.

    Two forms, chosen by the shapes. *Binary* (sigmoid): output logits of the same shape as
    0/1 targets (``(B,)`` or ``(B, A)``), ``p_t`` the probability given to the true value, the loss
    of an example being the mean over its present labels. *Multi-class* (softmax): logits
    ``(B, C)`` or ``(B, C, H, W)`` with class indices ``(B,)`` or ``(B, H, W)``, ``p_t`` the softmax
    probability of the true class. ``gamma = 0`` and no ``alpha`` give (binary) cross-entropy.
    Labels ``-1`` give 0 loss.

    Args:
        output: logits.
        target: 0/1 labels (binary form) or class indices (multi-class form).
        gamma: focusing parameter (2 in the paper); must be >= 0.
        alpha: binary form only: weight of positives (negatives get ``1 - alpha``; 0.25 in the
            paper); None for no weighting.

    Returns:
        ``(B,)`` per example, or ``(B, H, W)`` per pixel in the multi-class per-pixel form.

    Raises:
        ValueError: negative gamma, alpha with the multi-class form, or mismatched shapes.
    """
    if gamma < 0:
        raise ValueError(f"losses.focal.gamma = {gamma}: gamma must be >= 0 (2 in Lin et al.).")
    if output.ndim == target.ndim + 1 and output.shape[1] > 1:
        if alpha is not None:
            raise ValueError("losses.focal.alpha weights the positives of binary labels; unset it for class-index targets.")
        log_p = F.log_softmax(output, dim=1)
        log_pt = log_p.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)
        return -(1 - log_pt.exp()).pow(gamma) * log_pt * (target >= 0)
    output, target = _binary_pair(output, target, "focal")
    valid = target >= 0
    positive = target.clamp_min(0)
    log_pt = -F.binary_cross_entropy_with_logits(output, positive, reduction="none")
    loss = -(1 - log_pt.exp()).pow(gamma) * log_pt
    if alpha is not None:
        loss = loss * (alpha * positive + (1 - alpha) * (1 - positive))
    return _mean_valid(loss, valid)


# -- per-pixel regression -----------------------------------------------------------------------------
# Invalid pixels contribute exactly 0. With ``per_pixel=True`` (default) the loss is ``(B, H, W)``, as
# for per-pixel cross-entropy: a plain mean over it (what a weighting takes) divides by *all* pixels,
# so a batch's loss is its valid-pixel mean times its fraction of valid pixels. ``per_pixel=False``
# returns ``(B,)``, each image's mean over *its valid pixels* only (0 for an image with none).
def _dense_pair(output: torch.Tensor, target: torch.Tensor, channels: int, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    if target.ndim == 3 and channels == 1:
        target = target.unsqueeze(1)
    if output.ndim != 4 or output.shape != target.shape or output.shape[1] != channels:
        raise ValueError(
            f"losses.{loss} needs prediction and target of the same shape (B, {channels}, H, W); got output "
            f"{tuple(output.shape)} and target {tuple(target.shape)}. Use `heads.{'depth' if channels == 1 else 'normals'}` "
            f"with `output_size` set to the label maps' size if they differ."
        )
    return output, target.to(output.dtype)


def _pixel_reduce(per_pixel: torch.Tensor, valid: torch.Tensor, keep_pixels: bool) -> torch.Tensor:
    per_pixel = per_pixel * valid
    return per_pixel if keep_pixels else _mean_valid(per_pixel, valid)


def l1_depth(output: torch.Tensor, target: torch.Tensor, per_pixel: bool = True) -> torch.Tensor:
    """Absolute depth error on valid pixels; a target depth of 0 marks an invalid pixel.

    Args:
        output: predicted depth ``(B, 1, H, W)``.
        target: true depth ``(B, 1, H, W)`` (or ``(B, H, W)``), 0 where unknown.
        per_pixel: True: ``(B, H, W)`` with 0 at invalid pixels; False: ``(B,)``, each image's
            mean over its valid pixels (see the note above these losses).

    Raises:
        ValueError: shapes that are not ``(B, 1, H, W)`` alike.
    """
    output, target = _dense_pair(output, target, 1, "l1_depth")
    valid = (target != 0).squeeze(1)
    return _pixel_reduce((output - target).abs().squeeze(1), valid, per_pixel)


def cosine_normal(output: torch.Tensor, target: torch.Tensor, per_pixel: bool = True) -> torch.Tensor:
    """``1 - cos(angle)`` between predicted and true surface normals; an all-zero target is invalid.

    Both vectors are normalised per pixel (a unit prediction from ``heads.normals`` is unchanged),
    so the loss lies in ``[0, 2]``: 0 for the same direction, 1 at 90 degrees.

    Args:
        output: predicted normals ``(B, 3, H, W)``.
        target: true normals ``(B, 3, H, W)``, all-zero where unknown.
        per_pixel: True: ``(B, H, W)`` with 0 at invalid pixels; False: ``(B,)``, each image's
            mean over its valid pixels.

    Raises:
        ValueError: shapes that are not ``(B, 3, H, W)`` alike.
    """
    output, target = _dense_pair(output, target, 3, "cosine_normal")
    valid = (target != 0).any(dim=1)
    cos = F.cosine_similarity(output, target, dim=1, eps=1e-12)
    return _pixel_reduce(1 - cos, valid, per_pixel)


# -- metric learning ---------------------------------------------------------------------------------
def triplet(output: torch.Tensor, target: torch.Tensor, margin: float | None = None) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al., 2017), the Exemplar loss of S4L (Zhai et al., 2019).

    Each example is an anchor: its hardest positive is the farthest example with the same label,
    its hardest negative the nearest with another label, by Euclidean distance between
    embeddings. The loss is ``softplus(d_pos - d_neg)`` (the soft margin S4L uses) or, with a
    ``margin``, ``max(0, d_pos - d_neg + margin)``. Distances are ``sqrt(max(d^2, 1e-12))``, so
    identical embeddings have a finite gradient.

    Args:
        output: embeddings ``(N, D)``, e.g. ``n_views`` augmented copies of each image.
        target: instance ids ``(N,)`` (int); ``-1`` marks an example without one.
        margin: hinge margin; None for the soft margin.

    Returns:
        ``(N,)``: each anchor's loss; 0 for an anchor with no positive or no negative in the
        batch, or with label ``-1``. The loss depends on the whole batch, not on one example.

    Raises:
        ValueError: output not 2-d or target not ``(N,)``.
    """
    if output.ndim != 2 or target.shape != output.shape[:1]:
        raise ValueError(
            f"losses.triplet needs embeddings (N, D) and instance ids (N,); got {tuple(output.shape)} and "
            f"{tuple(target.shape)}. Use `heads.embedding` with a signal such as `signals.exemplar()`."
        )
    sq = output.pow(2).sum(dim=1)
    dist = (sq[:, None] + sq[None, :] - 2 * output @ output.T).clamp_min(1e-12).sqrt()
    labelled = target >= 0
    same = (target[:, None] == target[None, :]) & labelled[:, None] & labelled[None, :]
    same.fill_diagonal_(False)
    other = (target[:, None] != target[None, :]) & labelled[None, :]
    d_pos = torch.where(same, dist, torch.zeros_like(dist)).amax(dim=1)
    d_neg = torch.where(other, dist, torch.full_like(dist, float("inf"))).amin(dim=1)
    has_both = same.any(dim=1) & other.any(dim=1) & labelled
    gap = d_pos - torch.where(has_both, d_neg, d_pos)
    loss = F.softplus(gap) if margin is None else F.relu(gap + margin)
    return loss * has_both
