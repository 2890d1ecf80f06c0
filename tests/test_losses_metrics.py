"""Losses and metrics against hand-computed values, masks included, and autograd sanity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from auxframe import losses, metrics
from auxframe.registry import registry

LOG2 = math.log(2.0)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# -- binary cross-entropy -----------------------------------------------------------------------------
def test_binary_cross_entropy_by_hand_with_missing_labels():
    out = losses.binary_cross_entropy(torch.tensor([0.0, 2.0, 5.0]), torch.tensor([1, 0, -1]))
    assert out.tolist() == pytest.approx([LOG2, softplus(2.0), 0.0])
    # (B, A): an example's loss is the mean over its present labels; all missing gives 0
    out = losses.binary_cross_entropy(torch.tensor([[0.0, 2.0], [1.0, 1.0]]), torch.tensor([[1, -1], [-1, -1]]))
    assert out.tolist() == pytest.approx([LOG2, 0.0])
    out = losses.binary_cross_entropy(torch.tensor([[0.0], [0.0]]), torch.tensor([1.0, 0.0]), pos_weight=3.0)
    assert out.tolist() == pytest.approx([3 * LOG2, LOG2])


def test_binary_cross_entropy_refuses_two_class_scores():
    with pytest.raises(ValueError, match="one logit per label.*losses.cross_entropy"):
        losses.binary_cross_entropy(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))


# -- focal --------------------------------------------------------------------------------------------
def test_focal_binary_by_hand():
    # logit 0: p_t = 1/2, so (1 - p_t)^2 * -log p_t = log(2) / 4; logit log(3), label 1: p_t = 3/4
    out = losses.focal(torch.tensor([0.0, math.log(3.0), 0.0]), torch.tensor([1, 1, -1]), gamma=2.0)
    assert out.tolist() == pytest.approx([LOG2 / 4, (1 / 16) * math.log(4 / 3), 0.0])
    weighted = losses.focal(torch.tensor([0.0, 0.0]), torch.tensor([1, 0]), gamma=2.0, alpha=0.25)
    assert weighted.tolist() == pytest.approx([0.25 * LOG2 / 4, 0.75 * LOG2 / 4])


def test_focal_multiclass_by_hand_and_per_pixel():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    out = losses.focal(logits, torch.tensor([0, 1]), gamma=2.0)
    assert out.tolist() == pytest.approx([0.25 * LOG2, 0.75**2 * math.log(4.0)])
    pixels = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, 0] = -1
    zero_gamma = losses.focal(pixels, target, gamma=0.0)
    assert zero_gamma.shape == (2, 4, 5) and zero_gamma[0, 0, 0] == 0
    assert torch.allclose(zero_gamma, losses.cross_entropy(pixels, target), atol=1e-6)


def test_focal_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        losses.focal(torch.zeros(2), torch.zeros(2), gamma=-1.0)
    with pytest.raises(ValueError, match="alpha weights the positives of binary labels"):
        losses.focal(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), alpha=0.25)


# -- depth and normals --------------------------------------------------------------------------------
def test_l1_depth_masks_invalid_pixels():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    target = torch.tensor([[[[1.5, 0.0], [2.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    per_pixel = losses.l1_depth(pred, target)
    assert per_pixel.shape == (2, 2, 2)
    assert per_pixel[0].tolist() == [[0.5, 0.0], [1.0, 0.0]] and per_pixel[1].abs().sum() == 0
    # per image: the mean over *its valid pixels* (0.5 + 1) / 2; an image without one gives 0
    assert losses.l1_depth(pred, target, per_pixel=False).tolist() == pytest.approx([0.75, 0.0])
    assert losses.l1_depth(pred, target[:, 0]).tolist() == per_pixel.tolist()  # (B, H, W) targets too


def test_l1_depth_gradient_is_zero_on_invalid_pixels():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    target = torch.tensor([[[[1.5, 0.0], [2.0, 0.0]]]])
    losses.l1_depth(pred, target, per_pixel=False).sum().backward()
    assert pred.grad[0, 0].tolist() == [[-0.5, 0.0], [0.5, 0.0]]  # d/dp |p - t| / n_valid


def test_cosine_normal_by_hand_with_mask():
    pred = torch.zeros(1, 3, 1, 3)
    target = torch.zeros(1, 3, 1, 3)
    pred[0, :, 0, 0], target[0, :, 0, 0] = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])  # 90 degrees
    pred[0, :, 0, 1], target[0, :, 0, 1] = torch.tensor([1.0, 1, 0]), torch.tensor([2.0, 0, 0])  # 45, unnormalised
    pred[0, :, 0, 2] = torch.tensor([0, 0, 1.0])  # target all-zero: invalid
    out = losses.cosine_normal(pred, target)
    assert out.shape == (1, 1, 3)
    assert out[0, 0].tolist() == pytest.approx([1.0, 1 - 1 / math.sqrt(2), 0.0])
    assert losses.cosine_normal(pred, target, per_pixel=False).tolist() == pytest.approx([(2 - 1 / math.sqrt(2)) / 2])


def test_dense_losses_name_the_expected_shapes():
    with pytest.raises(ValueError, match=r"losses.cosine_normal needs prediction and target of the same shape \(B, 3, H, W\)"):
        losses.cosine_normal(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 2, 2))


# -- triplet ------------------------------------------------------------------------------------------
def test_triplet_batch_hard_by_hand():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 1])
    # hardest positive / nearest negative: 0: 1 / 3, 1: 1 / 2, 3: 4 / 2, 7: 4 / 6
    gaps = [-2.0, -1.0, 2.0, -2.0]
    assert losses.triplet(x, ids).tolist() == pytest.approx([softplus(g) for g in gaps])
    assert losses.triplet(x, ids, margin=1.0).tolist() == pytest.approx([0.0, 0.0, 3.0, 0.0])


def test_triplet_anchors_without_positive_or_label_give_zero():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0], [9.0]], dtype=torch.float64)
    out = losses.triplet(x, torch.tensor([0, 0, 1, -1, 2]))
    # 3 (id 1) and 9 (id 2) are alone; 7 has no id and is nobody's negative or positive
    assert out[2:].tolist() == [0.0, 0.0, 0.0]
    assert out[:2].tolist() == pytest.approx([softplus(1 - 3), softplus(1 - 2)])
    assert losses.triplet(x[:2], torch.tensor([0, 0])).tolist() == [0.0, 0.0]  # no negative at all


def test_triplet_gradient_matches_finite_differences_and_is_finite_for_equal_views():
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.autograd.gradcheck(lambda e: losses.triplet(e, ids), (x,))
    same = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    losses.triplet(same, torch.tensor([0, 0, 1])).sum().backward()
    assert torch.isfinite(same.grad).all()


@pytest.mark.parametrize("name,make", [
    ("binary_cross_entropy", lambda: (torch.randn(4, 3), torch.tensor([[1, 0, -1]] * 4))),
    ("focal", lambda: (torch.randn(4, 3), torch.tensor([0, 2, 1, -1]))),
    ("l1_depth", lambda: (torch.rand(2, 1, 3, 3) + 2, torch.rand(2, 1, 3, 3) * (torch.rand(2, 1, 3, 3) > 0.3))),
    ("cosine_normal", lambda: (torch.randn(2, 3, 3, 3), torch.randn(2, 3, 3, 3) * (torch.rand(2, 1, 3, 3) > 0.3))),
])
def test_losses_gradients_match_finite_differences(name, make):
    torch.manual_seed(1)
    output, target = make()
    fn = registry.get("losses", name)
    output = output.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda o: fn(o, target.double() if target.is_floating_point() else target), (output,))


# -- accuracy -----------------------------------------------------------------------------------------
def test_accuracy_topk_by_hand():
    m = metrics.Accuracy(topk=(1, 2))
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    m.update(logits, torch.tensor([2, 0, 0, -1]))  # top-2 sets: {1, 2}, {0, 1}, {2, 1}
    assert m.compute() == pytest.approx({"accuracy": 1 / 3, "top2": 2 / 3})


def test_accuracy_of_a_single_binary_logit():
    m = metrics.Accuracy()
    m.update(torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.tensor([1, 1, 0, 0]))
    assert m.compute() == {"accuracy": 0.5}


def test_pixel_accuracy_ignores_unlabelled_pixels():
    m = metrics.PixelAccuracy()
    logits = F.one_hot(torch.tensor([[[0, 0], [1, 1]]]), 3).permute(0, 3, 1, 2).float()
    m.update(logits, torch.tensor([[[0, 1], [1, -1]]]))
    assert m.compute() == pytest.approx({"pixel_accuracy": 2 / 3})


# -- multi-label --------------------------------------------------------------------------------------
def test_average_precision_by_hand_with_ties():
    # ranks 1..3: P = 1 at R = 1/2, then P = 2/3 at R = 1
    assert metrics.average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # the two 0.5 scores enter together: P = 1/2 at R = 1/2, then P = 2/3 at R = 1
    assert metrics.average_precision(torch.tensor([0.5, 0.5, 0.1]), torch.tensor([1, 0, 1])) == pytest.approx(0.25 + 0.5 * 2 / 3)


def test_average_precision_agrees_with_scikit_learn():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 6, 50).astype(float), rng.integers(0, 2, 50)
    assert metrics.average_precision(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(average_precision_score(labels, scores))


def test_multilabel_map_over_batches_skipping_missing_and_positive_free_labels():
    m = metrics.MultiLabelMAP()
    m.update(torch.tensor([[0.9, 0.5, 0.3], [0.8, 0.5, 0.2]]), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    m.update(torch.tensor([[0.7, 0.1, 0.1], [0.6, 0.0, 0.9]]), torch.tensor([[1, 1, 0], [0, -1, 0]]))
    # column 0: AP 5/6; column 1 (scores .5, .5, .1; the -1 dropped): 7/12; column 2 has no positive
    assert m.compute() == pytest.approx({"map": (5 / 6 + 7 / 12) / 2})


def test_multilabel_metrics_take_one_logit_or_two_class_scores():
    one, two = metrics.MultiLabelMAP(), metrics.MultiLabelMAP()
    one.update(torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1, 0, 0]))
    two.update(torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.5]]), torch.tensor([1, 0, 0]))
    assert one.compute() == two.compute() == {"map": 1.0}


def test_multilabel_f1_macro_and_micro_by_hand():
    logits = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0], [-1.0, 1.0]])
    labels = torch.tensor([[1, 0], [1, 0], [1, -1], [0, 0]])
    # label 0: tp 2, fp 0, fn 1 -> F1 4/5; label 1: tp 0, fp 2, fn 0 -> F1 0
    macro, micro = metrics.MultiLabelF1(), metrics.MultiLabelF1(average="micro")
    macro.update(logits, labels)
    micro.update(logits, labels)
    assert macro.compute() == pytest.approx({"f1": 0.4})
    assert micro.compute() == pytest.approx({"f1": 4 / 7})  # tp 2, fp 2, fn 1
    strict = metrics.MultiLabelF1(threshold=0.8)  # logit 1 is p = 0.73 < 0.8: nothing predicted
    strict.update(logits, labels)
    assert strict.compute() == pytest.approx({"f1": 0.0})  # label 1 (undefined) left out
    with pytest.raises(ValueError, match="'macro' or 'micro'"):
        metrics.MultiLabelF1(average="weighted")


# -- segmentation -------------------------------------------------------------------------------------
def test_miou_by_hand_ignoring_minus_one_and_absent_classes():
    m = metrics.MeanIoU()
    logits = F.one_hot(torch.tensor([[[0, 0], [1, 1]]]), 3).permute(0, 3, 1, 2).float()
    m.update(logits, torch.tensor([[[0, 1], [1, -1]]]))
    # class 0: TP 1, FP 1, FN 0 -> 1/2; class 1: TP 1, FP 0, FN 1 -> 1/2; class 2 never occurs
    assert m.compute() == pytest.approx({"miou": 0.5, "pixel_accuracy": 2 / 3})
    m.update(logits, torch.tensor([[[2, 2], [1, 1]]]))  # accumulated over batches
    # class 0: TP 1, FP 3 -> 1/4; class 1: TP 3, FN 1 -> 3/4; class 2: FN 2 -> 0
    assert m.compute() == pytest.approx({"miou": (1 / 4 + 3 / 4 + 0) / 3, "pixel_accuracy": 4 / 7})


# -- depth and normals --------------------------------------------------------------------------------
def test_depth_error_over_valid_pixels():
    m = metrics.DepthError()
    m.update(torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[[[2.0, 0.0]]]]))
    m.update(torch.tensor([[[[3.0, 4.0]]]]), torch.tensor([[[[2.0, 8.0]]]]))
    # valid pairs (1, 2), (3, 2), (4, 8): abs 1, 1, 4; rel 1/2, 1/2, 1/2
    assert m.compute() == pytest.approx({"abs_err": 2.0, "rel_err": 0.5})
    assert metrics.DepthError.higher_is_better is False


def test_normal_angle_by_hand():
    def field(vectors):
        return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 3, 1, len(vectors))

    m = metrics.NormalAngle()
    # 0, 45 (unnormalised prediction), 90 degrees, and an invalid (all-zero) target
    m.update(field([[0, 0, 1], [1, 1, 0], [1, 0, 0], [1, 0, 0]]), field([[0, 0, 2], [1, 0, 0], [0, 1, 0], [0, 0, 0]]))
    got = m.compute()
    assert list(got)[0] == "mean_angle" and metrics.NormalAngle.higher_is_better is False
    assert got == pytest.approx({"mean_angle": 45.0, "median_angle": 45.0, "within_11.25": 1 / 3,
                                 "within_22.5": 1 / 3, "within_30": 1 / 3}, abs=0.01)
    ten = math.radians(10)
    m.update(field([[math.sin(ten), 0, math.cos(ten)]]), field([[0, 0, 1]]))  # angles now 0, 10, 45, 90
    got = m.compute()
    assert got["median_angle"] == pytest.approx(27.5, abs=0.01) and got["within_11.25"] == 0.5
    assert got["mean_angle"] == pytest.approx(145 / 4, abs=1e-4)


# -- retrieval ----------------------------------------------------------------------------------------
def test_retrieval_accuracy_by_hand():
    m = metrics.RetrievalAccuracy()
    # nearest other embedding: 0 -> 0.1 (same id), 0.1 -> 0.12 (other), 5 -> 0.12 (same), 0.12 -> 0.1 (other)
    m.update(torch.tensor([[0.0], [0.1], [5.0], [0.12], [20.0]]), torch.tensor([0, 0, 1, 1, 2]))
    assert m.compute() == {"retrieval_accuracy": 0.5}  # id 2 has a single view: not counted


@pytest.mark.parametrize("name,key,higher", [
    ("accuracy", "accuracy", True), ("pixel_accuracy", "pixel_accuracy", True), ("multilabel_map", "map", True),
    ("multilabel_f1", "f1", True), ("miou", "miou", True), ("depth_error", "abs_err", False),
    ("normal_angle", "mean_angle", False), ("retrieval", "retrieval_accuracy", True),
])
def test_registered_metrics_main_key_and_direction(name, key, higher):
    cls = registry.get("metrics", name)
    assert getattr(cls, "higher_is_better", True) is higher
    assert next(iter(cls().compute())) == key  # the first key is the main value, even before any update
