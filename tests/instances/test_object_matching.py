"""Tests of the instance-matching scores (numpy and scipy only): hand-computed IoUs, the matching rule, the
ignore rule, pooling, and a brute-force dense reference on random blob images."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from napari_convlora.instances.metrics import (
    IOU_THRESHOLDS,
    InstanceScoreAccumulator,
    InstanceScores,
    format_instance_line,
    instance_scores,
)


def boxes(shape: tuple[int, ...], *objects: tuple[int, tuple[slice, ...]], dtype: type = np.int32) -> np.ndarray:
    """A label image with each ``(id, region)`` painted in order."""
    labels = np.zeros(shape, dtype=dtype)
    for object_id, region in objects:
        labels[region] = object_id
    return labels


def test_thresholds_constant() -> None:
    assert IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_identical_images_score_one_everywhere() -> None:
    truth = boxes((30, 30), (7, np.s_[0:5, 0:5]), (300, np.s_[10:20, 3:9]), (12, np.s_[22:30, 20:30]))
    pred = np.where(truth == 7, 2, np.where(truth == 300, 9, np.where(truth == 12, 1, 0)))  # other ids
    for other in (truth, pred):
        s = instance_scores(other, truth)
        assert s.true_positives == (3,) * 10 and s.false_positives == (0,) * 10 and s.false_negatives == (0,) * 10
        assert [s.f1(t) for t in IOU_THRESHOLDS] == [1.0] * 10
        assert s.f1_50 == s.mean_f1 == s.mean_average_precision == s.mean_matched_iou == 1.0
        assert (s.num_true, s.num_predicted) == (3, 3)


def test_merge_of_two_touching_objects() -> None:
    # true 4x4 and 4x2 side by side, predicted as one 4x6 object: IoUs 16/24 = 2/3 and 8/24 = 1/3
    truth = boxes((6, 10), (1, np.s_[1:5, 1:5]), (2, np.s_[1:5, 5:7]))
    pred = boxes((6, 10), (5, np.s_[1:5, 1:7]))
    s = instance_scores(pred, truth)
    assert s.true_positives == (1, 1, 1, 1, 0, 0, 0, 0, 0, 0)  # 2/3 >= 0.65, < 0.7
    assert s.false_positives == (0, 0, 0, 0, 1, 1, 1, 1, 1, 1)
    assert s.false_negatives == (1, 1, 1, 1, 2, 2, 2, 2, 2, 2)
    assert s.mean_matched_iou == pytest.approx(2 / 3)
    assert s.precision() == 1.0 and s.recall() == 0.5 and s.f1() == pytest.approx(2 / 3)
    assert s.average_precision() == pytest.approx(1 / 2) and s.average_precision(0.7) == 0.0
    assert s.mean_f1 == pytest.approx(4 * (2 / 3) / 10)


def test_split_into_exact_halves_matches_once_at_half() -> None:
    # one true 4x6 object predicted as two 4x3 halves: both IoUs are exactly 0.5, only one may match
    truth = boxes((6, 8), (1, np.s_[1:5, 1:7]))
    pred = boxes((6, 8), (3, np.s_[1:5, 1:4]), (4, np.s_[1:5, 4:7]))
    s = instance_scores(pred, truth)
    assert s.true_positives[:2] == (1, 0)
    assert s.false_positives[:2] == (1, 2) and s.false_negatives[:2] == (0, 1)
    assert s.mean_matched_iou == 0.5


@pytest.mark.parametrize("width, shift, iou, matched_up_to",
                         [(20, 5, 0.6, 0.6), (12, 4, 0.5, 0.5), (10, 1, 9 / 11, 0.8)])
def test_shifted_object_crosses_thresholds(width: int, shift: int, iou: float, matched_up_to: float) -> None:
    # a 10 x width box shifted by `shift` columns: IoU (width - shift) / (width + shift), matched while IoU >= t
    truth = boxes((12, 40), (1, np.s_[1:11, 2 : 2 + width]))
    pred = boxes((12, 40), (1, np.s_[1:11, 2 + shift : 2 + shift + width]))
    s = instance_scores(pred, truth)
    assert s.true_positives == tuple(int(t <= matched_up_to) for t in IOU_THRESHOLDS)
    assert s.mean_matched_iou == pytest.approx(iou)


def test_low_threshold_maximises_the_number_of_matches() -> None:
    # 1D-like intervals (2 rows): true X = [0, 20), Y = [20, 40); predicted A = [6, 26), B = [0, 6).
    # IoU(A, X) = 14/26, IoU(A, Y) = 6/34 ~ 0.18, IoU(B, X) = 6/20 = 0.3. Greedy (or the largest total IoU)
    # keeps A-X alone; at 0.15 the matching has to pair A-Y and B-X instead, as StarDist and cellpose do.
    truth = boxes((2, 40), (1, np.s_[:, 0:20]), (2, np.s_[:, 20:40]))
    pred = boxes((2, 40), (1, np.s_[:, 6:26]), (2, np.s_[:, 0:6]))
    s = instance_scores(pred, truth, thresholds=(0.15, 0.2, 0.5, 0.55))
    assert s.true_positives == (2, 1, 1, 0)
    assert s.mean_matched_iou == pytest.approx((6 / 34 + 6 / 20) / 2)
    assert instance_scores(pred, truth, thresholds=(0.2,)).mean_matched_iou == pytest.approx(14 / 26)


@pytest.mark.parametrize("dtype, offset", [(np.uint32, 70_000), (np.uint32, 4_000_000_000), (np.uint16, 65_000),
                                           (np.int64, 2**40), (np.uint8, 200)])
def test_huge_and_non_consecutive_ids(dtype: type, offset: int) -> None:
    truth = boxes((20, 20), (1, np.s_[0:8, 0:8]), (2, np.s_[10:20, 10:20]), (3, np.s_[0:4, 12:20]))
    pred = boxes((20, 20), (1, np.s_[0:8, 1:8]), (2, np.s_[10:18, 10:20]), (3, np.s_[12:20, 0:4]))
    expected = instance_scores(pred, truth)
    big_truth = np.where(truth > 0, offset + 17 * truth.astype(np.int64), 0).astype(dtype)
    big_pred = np.where(pred > 0, offset + 5 * (4 - pred.astype(np.int64)), 0).astype(dtype)
    s = instance_scores(big_pred, big_truth)
    assert s == expected
    assert expected.true_positives == (2,) * 7 + (1, 0, 0)  # IoUs 7/8 and 4/5; the third box is an FP and an FN
    assert (s.num_true, s.num_predicted) == (3, 3)


def test_bool_labels_are_one_object() -> None:
    truth = np.zeros((5, 5), dtype=bool)
    truth[1:4, 1:4] = True
    assert instance_scores(truth, truth.astype(np.uint8) * 9).true_positives == (1,) * 10


def test_ignore_rule() -> None:
    ignore = np.zeros((10, 20), dtype=bool)
    ignore[:, 10:] = True  # only the left half is annotated
    truth = boxes((10, 20), (1, np.s_[0:4, 0:4]), (2, np.s_[6:10, 12:16]))  # object 2 lies in the ignored area
    pred = boxes(
        (10, 20),
        (1, np.s_[0:4, 0:4]),  # on object 1: a TP
        (2, np.s_[5:7, 6:14]),  # 8 of 16 pixels ignored, exactly half: kept, an FP
        (3, np.s_[8:10, 7:14]),  # 8 of 14 pixels ignored: dropped
        (4, np.s_[0:2, 14:20]),  # all ignored: dropped
    )
    s = instance_scores(pred, truth, ignore=ignore)
    assert (s.num_true, s.num_predicted) == (1, 2)
    assert s.true_positives == (1,) * 10 and s.false_positives == (1,) * 10 and s.false_negatives == (0,) * 10
    without = instance_scores(pred, truth)
    assert (without.num_true, without.num_predicted) == (2, 4)


def test_ignored_pixels_count_in_no_iou() -> None:
    # a 4x4 true box at the edge of the annotated area; the 4x6 prediction reaches 2 columns into the ignored
    # part (8 of 24 pixels, under half): IoU 16/16 on the annotated pixels, 16/24 without the mask
    ignore = np.zeros((6, 12), dtype=bool)
    ignore[:, 6:] = True
    truth = boxes((6, 12), (1, np.s_[1:5, 2:6]))
    pred = boxes((6, 12), (1, np.s_[1:5, 2:8]))
    assert instance_scores(pred, truth, ignore=ignore).mean_matched_iou == 1.0
    assert instance_scores(pred, truth, ignore=ignore).true_positives == (1,) * 10
    assert instance_scores(pred, truth).mean_matched_iou == pytest.approx(2 / 3)


def test_empty_images() -> None:
    empty = np.zeros((8, 8), dtype=np.uint16)
    one = boxes((8, 8), (4, np.s_[2:5, 2:5]), dtype=np.uint16)
    both = instance_scores(empty, empty)
    assert both.true_positives == (0,) * 10 and (both.num_true, both.num_predicted) == (0, 0)
    for value in (both.precision(), both.recall(), both.f1(), both.average_precision(), both.mean_f1,
                  both.mean_average_precision, both.mean_matched_iou):
        assert math.isnan(value)
    missed = instance_scores(empty, one)  # nothing predicted
    assert missed.f1() == 0.0 and missed.recall() == 0.0 and missed.average_precision() == 0.0
    assert math.isnan(missed.precision()) and missed.false_negatives == (1,) * 10
    spurious = instance_scores(one, empty)  # nothing to find
    assert spurious.f1() == 0.0 and spurious.precision() == 0.0 and math.isnan(spurious.recall())
    assert spurious.false_positives == (1,) * 10


def test_accumulator_sums_over_images() -> None:
    first = (boxes((6, 10), (5, np.s_[1:5, 1:7])), boxes((6, 10), (1, np.s_[1:5, 1:5]), (2, np.s_[1:5, 5:7])))
    second = (boxes((12, 40), (1, np.s_[1:11, 7:27])), boxes((12, 40), (9, np.s_[1:11, 2:22])))
    third = (np.zeros((4, 4), np.int32), boxes((4, 4), (3, np.s_[0:2, 0:2])))
    acc = InstanceScoreAccumulator()
    singles = []
    for pred, truth in (first, second, third):
        own = acc.update(pred, truth)
        assert own == instance_scores(pred, truth)
        singles.append(own)
    pooled = acc.compute()
    for field in ("true_positives", "false_positives", "false_negatives"):
        assert getattr(pooled, field) == tuple(np.sum([getattr(s, field) for s in singles], axis=0))
    assert pooled.num_true == 2 + 1 + 1 and pooled.num_predicted == 1 + 1 + 0
    assert pooled.true_positives == (2, 2, 2, 1, 0, 0, 0, 0, 0, 0)  # the merge's 2/3 and the shift's 0.6
    assert pooled.mean_matched_iou == pytest.approx((2 / 3 + 0.6) / 2)
    assert pooled.f1() == pytest.approx(2 * 2 / (2 * 2 + 0 + 2))
    acc.reset()
    assert acc.compute().true_positives == (0,) * 10 and math.isnan(acc.compute().f1())


def test_3d_volume_is_one_object_space() -> None:
    # one predicted id through both planes; the truth has a different id per plane: as a volume each true
    # object is exactly half of the prediction (IoU 0.5), plane by plane every object matches perfectly
    pred = np.zeros((2, 6, 6), dtype=np.uint32)
    pred[:, 1:5, 1:5] = 80_000
    truth = np.zeros_like(pred)
    truth[0, 1:5, 1:5], truth[1, 1:5, 1:5] = 3, 4
    volume = instance_scores(pred, truth)
    assert (volume.num_true, volume.num_predicted) == (2, 1)
    assert volume.true_positives[:2] == (1, 0) and volume.mean_matched_iou == 0.5
    acc = InstanceScoreAccumulator()
    for z in range(2):
        acc.update(pred[z], truth[z])
    assert acc.compute().true_positives == (2,) * 10


def test_format_line() -> None:
    scores = InstanceScores(thresholds=IOU_THRESHOLDS, true_positives=(40,) * 5 + (20,) * 5,
                            false_positives=(10,) * 5 + (30,) * 5, false_negatives=(20,) * 5 + (40,) * 5,
                            num_true=60, num_predicted=50, mean_matched_iou=0.8)
    # at 0.5: P 40/50, R 40/60, F1 80/110, AP 40/70; at 0.75+: F1 40/110 -> mean F1 60/110
    assert format_instance_line(scores) == (
        "instances: F1@0.5 72.7% (P 80.0%, R 66.7%), mean F1@0.5:0.95 54.5%, AP@0.5 57.1%, 60 true / 50 predicted")
    empty = instance_scores(np.zeros((3, 3), int), np.zeros((3, 3), int), thresholds=(0.3,))
    assert format_instance_line(empty) == "instances: F1@0.3 n/a (P n/a, R n/a), AP@0.3 n/a, 0 true / 0 predicted"


def test_as_dict_is_json_safe() -> None:
    truth = boxes((6, 10), (1, np.s_[1:5, 1:5]), (2, np.s_[1:5, 5:7]))
    d = instance_scores(boxes((6, 10), (5, np.s_[1:5, 1:7])), truth).as_dict()
    json.dumps(d, allow_nan=False)
    assert d["f1_50"] == pytest.approx(2 / 3) and d["precision_50"] == 1.0 and d["recall_50"] == 0.5
    assert d["mean_f1"] == pytest.approx(4 * (2 / 3) / 10) and d["mean_ap"] == pytest.approx(4 * 0.5 / 10)
    assert (d["num_true"], d["num_predicted"]) == (2, 1)
    assert d["true_positives"] == [1] * 4 + [0] * 6 and d["thresholds"] == list(IOU_THRESHOLDS)
    assert len(d["f1"]) == len(d["precision"]) == len(d["recall"]) == len(d["average_precision"]) == 10
    empty = instance_scores(np.zeros((3, 3), int), np.zeros((3, 3), int), thresholds=(0.3, 0.6)).as_dict()
    json.dumps(empty, allow_nan=False)
    assert empty["f1_50"] is None and empty["mean_f1"] is None and empty["f1"] == [None, None]


def test_errors_are_one_line_and_name_both_sides() -> None:
    with pytest.raises(ValueError, match=r"predicted shape \(3, 4\) != truth shape \(4, 3\)") as shape_error:
        instance_scores(np.zeros((3, 4), int), np.zeros((4, 3), int))
    with pytest.raises(ValueError, match="predicted float32 and truth int16") as dtype_error:
        instance_scores(np.zeros((3, 3), np.float32), np.zeros((3, 3), np.int16))
    assert "\n" not in str(shape_error.value) and "\n" not in str(dtype_error.value)
    with pytest.raises(ValueError, match=r"ignore shape \(2, 2\) != truth shape \(3, 3\)"):
        instance_scores(np.zeros((3, 3), int), np.zeros((3, 3), int), ignore=np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="negative ids"):
        instance_scores(np.full((2, 2), -1), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        instance_scores(np.zeros((2, 2), int), np.zeros((2, 2), int), thresholds=(0.0, 0.5))
    with pytest.raises(ValueError, match="0.3 was not scored"):
        instance_scores(np.zeros((2, 2), int), np.zeros((2, 2), int)).f1(0.3)


def random_blobs(rng: np.random.Generator, shape: tuple[int, int], count: int) -> np.ndarray:
    """Random boxes and discs, later ones painted over earlier ones, with scattered ids."""
    labels = np.zeros(shape, dtype=np.int64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for object_id in rng.choice(5000, size=count, replace=False) + 1:
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(2, 7)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if rng.random() < 0.5 else (
            (abs(yy - cy) <= r) & (abs(xx - cx) <= rng.integers(1, 7)))
        labels[mask] = object_id
    return labels


def reference(pred: np.ndarray, truth: np.ndarray, thresholds: tuple[float, ...],
              ignore: np.ndarray | None) -> tuple[list[int], int, int, float]:
    """Brute force: a dense IoU matrix from masks, one cellpose-style assignment per threshold."""
    annotated = np.ones(truth.shape, bool) if ignore is None else ~ignore
    pred_ids = [i for i in np.unique(pred) if i and 2 * np.sum((pred == i) & ~annotated) <= np.sum(pred == i)]
    true_ids = [j for j in np.unique(truth) if j and np.any((truth == j) & annotated)]
    iou = np.zeros((len(pred_ids), len(true_ids)))
    for a, i in enumerate(pred_ids):
        for b, j in enumerate(true_ids):
            p, t = (pred == i) & annotated, (truth == j) & annotated
            iou[a, b] = np.sum(p & t) / np.sum(p | t)
    tps, first_mean = [], math.nan
    for k, threshold in enumerate(thresholds):
        if iou.size == 0:
            tps.append(0)
            continue
        ok = iou >= threshold
        rows, cols = linear_sum_assignment(-ok.astype(float) - ok * iou / (2 * min(iou.shape)))
        hits = ok[rows, cols]
        tps.append(int(hits.sum()))
        if k == 0 and hits.any():
            first_mean = float(iou[rows, cols][hits].mean())
    return tps, len(pred_ids), len(true_ids), first_mean


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = random_blobs(rng, (32, 32), 14)
    pred = np.roll(truth, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1)) * 3  # shifted, other ids
    extra = random_blobs(rng, (32, 32), 6)
    pred = np.where(extra > 0, extra + 20000, pred)
    pred[rng.random(pred.shape) < 0.05] = 0
    ignore = (rng.random((32, 32)) < 0.3) if seed % 2 else None
    thresholds = (0.1, 0.2, 0.3, 0.4) + IOU_THRESHOLDS
    tps, num_pred, num_true, first_mean = reference(pred, truth, thresholds, ignore)
    s = instance_scores(pred.astype(np.uint32), truth.astype(np.uint32), thresholds, ignore)
    assert list(s.true_positives) == tps
    assert (s.num_predicted, s.num_true) == (num_pred, num_true)
    assert s.false_positives == tuple(num_pred - tp for tp in tps)
    assert s.false_negatives == tuple(num_true - tp for tp in tps)
    assert s.mean_matched_iou == pytest.approx(first_mean, nan_ok=True)


def test_many_objects_on_a_large_image() -> None:
    # 10,000 objects on 2048x2048: 20x20 cells, the last row and column 68 wide; predicted rolled by (5, 5).
    # An inner cell keeps IoU 225/575 ~ 0.39 with its own cell and reaches 75/725 ~ 0.103 with two neighbours,
    # so at 0.1 all candidates form one big group whose best matching is the identity.
    yy, xx = np.mgrid[:2048, :2048]
    truth = (np.minimum(yy // 20, 99) * 100 + np.minimum(xx // 20, 99) + 70_001).astype(np.uint32)
    pred = np.roll(truth, (5, 5), axis=(0, 1))
    s = instance_scores(pred, truth, thresholds=(0.1, 0.5))
    assert (s.num_true, s.num_predicted) == (10_000, 10_000)
    assert s.true_positives[0] == 10_000
    assert s.true_positives[1] == 99 + 99 + 1  # the wide cells: IoU 945/1775 ~ 0.53, the corner 3969/5279


def test_module_imports_neither_torch_nor_qt() -> None:
    code = "import sys, napari_convlora.instances.metrics; print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("torch", "napari", "qtpy", "PyQt5", "PySide2"):
        assert f"'{name}'" not in loaded
