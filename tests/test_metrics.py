"""Tests of the confusion-matrix metrics (numpy only)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from napari_convlora.constants import IGNORE_INDEX
from napari_convlora.metrics import ConfusionMatrix, SegmentationMetrics, evaluate_arrays


def test_hand_computed_two_classes() -> None:
    target = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    m = evaluate_arrays(pred, target, num_classes=2)
    # class 0: tp 1, fp 0, fn 1 -> IoU 1/2, Dice 2/3; class 1: tp 2, fp 1, fn 0 -> 2/3, 4/5
    assert m.per_class_iou == pytest.approx([1 / 2, 2 / 3])
    assert m.per_class_dice == pytest.approx([2 / 3, 4 / 5])
    assert m.mean_iou == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m.mean_iou_foreground == pytest.approx(2 / 3)
    assert m.mean_dice == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m.pixel_accuracy == pytest.approx(3 / 4)
    assert m.num_pixels == 4
    assert m.per_class_pixels == [2, 2]


def test_hand_computed_three_classes_matrix() -> None:
    target = np.array([0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 2, 1, 0, 2, 2, 1])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    np.testing.assert_array_equal(cm.matrix, [[1, 0, 1], [1, 1, 0], [0, 1, 2]])
    m = cm.compute()
    # IoU = tp / (row + col - tp): class0 1/(2+2-1), class1 1/(2+2-1), class2 2/(3+3-2)
    assert m.per_class_iou == pytest.approx([1 / 3, 1 / 3, 1 / 2])
    assert m.pixel_accuracy == pytest.approx(4 / 7)


def test_ignore_index_pixels_change_nothing() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(32, 32))
    target[rng.random((32, 32)) < 0.3] = IGNORE_INDEX
    pred = rng.integers(0, 4, size=(32, 32))
    pred_changed = pred.copy()
    ignored = target == IGNORE_INDEX
    pred_changed[ignored] = (pred[ignored] + 1) % 4
    a = evaluate_arrays(pred, target, 4)
    b = evaluate_arrays(pred_changed, target, 4)
    assert a.to_dict() == b.to_dict()
    assert a.num_pixels == int((~ignored).sum())


def test_all_ignored_gives_nan_and_zero_pixels() -> None:
    m = evaluate_arrays(np.zeros((3, 3), int), np.full((3, 3), IGNORE_INDEX), 2)
    assert m.num_pixels == 0
    assert math.isnan(m.mean_iou) and math.isnan(m.pixel_accuracy)


def test_perfect_prediction_scores_one() -> None:
    rng = np.random.default_rng(1)
    target = rng.integers(0, 5, size=(20, 30))
    m = evaluate_arrays(target, target, 5)
    assert m.per_class_iou == pytest.approx([1.0] * 5)
    assert m.per_class_dice == pytest.approx([1.0] * 5)
    assert m.mean_iou == m.mean_iou_foreground == m.mean_dice == m.pixel_accuracy == 1.0


def test_absent_classes_are_nan_and_excluded_from_means() -> None:
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 0])
    m = evaluate_arrays(pred, target, num_classes=4)  # classes 2 and 3 never appear
    assert math.isnan(m.per_class_iou[2]) and math.isnan(m.per_class_iou[3])
    assert math.isnan(m.per_class_dice[2]) and math.isnan(m.per_class_dice[3])
    iou0, iou1 = 2 / 3, 1 / 2
    assert m.mean_iou == pytest.approx((iou0 + iou1) / 2)
    assert m.mean_iou_foreground == pytest.approx(iou1)
    assert m.mean_dice == pytest.approx((0.8 + 2 / 3) / 2)
    # A class predicted but not in the target is present: IoU 0, not NaN.
    m2 = evaluate_arrays(np.array([0, 2]), np.array([0, 0]), num_classes=3)
    assert m2.per_class_iou[2] == 0.0 and math.isnan(m2.per_class_iou[1])


def test_dice_iou_identity_per_class() -> None:
    rng = np.random.default_rng(2)
    target = rng.integers(0, 6, size=(40, 40))
    pred = np.where(rng.random((40, 40)) < 0.6, target, rng.integers(0, 6, size=(40, 40)))
    m = evaluate_arrays(pred, target, 7)  # class 6 absent
    for iou, dice in zip(m.per_class_iou, m.per_class_dice):
        if math.isnan(iou):
            assert math.isnan(dice)
        else:
            assert dice == pytest.approx(2 * iou / (1 + iou))


def test_accumulating_equals_concatenation() -> None:
    """The pixel scores; boundary IoU is scored per 2D image (test_boundary.py)."""
    rng = np.random.default_rng(3)
    preds = [rng.integers(0, 3, size=s) for s in [(5, 7), (11,), (2, 3, 4)]]
    targets = [rng.integers(-1, 3, size=p.shape) for p in preds]
    cm = ConfusionMatrix(3)
    for p, t in zip(preds, targets):
        cm.update(p, t)
    whole = evaluate_arrays(
        np.concatenate([p.ravel() for p in preds]), np.concatenate([t.ravel() for t in targets]), 3
    )
    per_image = ("per_class_boundary_iou", "boundary_iou")
    pixels = {k: v for k, v in cm.compute().to_dict().items() if k not in per_image}
    assert pixels == {k: v for k, v in whole.to_dict().items() if k not in per_image}
    cm.reset()
    assert cm.compute().num_pixels == 0 and math.isnan(cm.compute().boundary_iou)


def test_to_dict_is_json_safe_and_format_readable() -> None:
    m = evaluate_arrays(np.array([0, 1]), np.array([0, 1]), 3)
    d = m.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["per_class_iou"] == [1.0, 1.0, None]
    assert isinstance(d["num_pixels"], int)
    table = m.format(["background", "nucleus", "rod"])
    assert "background" in table and "nucleus" in table and "rod" in table
    assert "class 2" in m.format(["background", "nucleus"])  # names that do not match the classes are not used
    assert "mean IoU" in table
    assert isinstance(m, SegmentationMetrics)


def test_invalid_inputs_raise() -> None:
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError):
        cm.update(np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(ValueError):
        cm.update(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError):
        cm.update(np.array([0, 1]), np.array([0, 5]))
    with pytest.raises(TypeError):
        cm.update(np.array([0.0, 1.0]), np.array([0, 1]))


def test_one_line_summary_names_the_classes():
    from napari_convlora.metrics import format_line

    metrics = evaluate_arrays(np.array([[0, 1], [2, 2]]), np.array([[0, 1], [2, 1]]), 3).to_dict()
    line = format_line(metrics, ("background", "nucleus", "rod"))
    # 2 x 2: the boundary band is 1 px wide, every mask pixel is on it
    assert line == ("mIoU 66.7% (background 100.0%, nucleus 50.0%, rod 50.0%), foreground 50.0%, "
                    "boundary IoU 50.0%, pixel accuracy 75.0%")
    assert format_line(metrics, ("too", "few")).startswith("mIoU 66.7% (class 0 100.0%, class 1 50.0%")
    empty = evaluate_arrays(np.zeros((2, 2), int), np.full((2, 2), IGNORE_INDEX), 2).to_dict()
    assert format_line(empty) == ("mIoU n/a (class 0 n/a, class 1 n/a), foreground n/a, boundary IoU n/a, "
                                  "pixel accuracy n/a")
    del metrics["boundary_iou"]  # a record from before boundary IoU (an older run's history)
    assert format_line(metrics).endswith("foreground 50.0%, pixel accuracy 75.0%")


def test_the_best_model_is_chosen_on_every_class_present_in_validation():
    """Foreground mIoU chose, on a lesion task, a model frozen at step 30 that predicted nothing (its score was 0
    from the first check), and on a sparse EM task an all-interior model while the membrane class was at 0."""
    from napari_convlora.metrics import selection_score

    target = np.array([0] * 90 + [1] * 10)
    nothing = evaluate_arrays(np.zeros(100, int), target, 2).to_dict()  # predicts background everywhere
    something = evaluate_arrays(np.array([0] * 85 + [1] * 15), target, 2).to_dict()
    assert nothing["mean_iou_foreground"] == 0.0 and something["mean_iou_foreground"] > 0
    assert selection_score(something) > selection_score(nothing)
    later_nothing = evaluate_arrays(np.array([0] * 92 + [1] * 8), np.array([0] * 95 + [1] * 5), 2).to_dict()
    assert selection_score(later_nothing) != selection_score(nothing)  # moves even while foreground stays low
    three = np.array([0] * 50 + [1] * 45 + [2] * 5)
    all_interior = evaluate_arrays(np.array([0] * 50 + [1] * 50), three, 3).to_dict()  # membrane (2) at 0
    balanced = evaluate_arrays(np.array([0] * 50 + [1] * 43 + [2] * 7), three, 3).to_dict()
    assert selection_score(balanced) > selection_score(all_interior)
    only_two_present = evaluate_arrays(np.array([0, 1, 1]), np.array([0, 1, 1]), 3).to_dict()
    assert selection_score(only_two_present) == 1.0  # a class absent from validation does not count
    assert selection_score(None) == -math.inf
