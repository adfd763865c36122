"""Boundary IoU (HQ-SAM's), checked against slow explicit implementations and hand-computed cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from napari_convlora.boundary import BoundaryCounts, boundary_iou, boundary_width, mask_boundary
from napari_convlora.constants import IGNORE_INDEX
from napari_convlora.metrics import ConfusionMatrix, evaluate_arrays


def _hq_sam_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """HQ-SAM's ``mask_to_boundary`` written out: pad with 1 px of zeros, erode ``d`` times with a 3 x 3 square
    (OpenCV's default border: neighbours outside the array are ignored), crop, mask minus eroded."""
    h, w = mask.shape
    d = max(1, int(round(dilation_ratio * math.sqrt(h**2 + w**2))))
    padded = np.zeros((h + 2, w + 2), bool)
    padded[1:-1, 1:-1] = mask
    for _ in range(d):
        eroded = np.zeros_like(padded)
        for y in range(h + 2):
            for x in range(w + 2):
                eroded[y, x] = all(padded[yy, xx] for yy in range(y - 1, y + 2) for xx in range(x - 1, x + 2)
                                   if 0 <= yy < h + 2 and 0 <= xx < w + 2)
        padded = eroded
    return mask & ~padded[1:-1, 1:-1]


def _hq_sam_iou(pred: np.ndarray, target: np.ndarray, dilation_ratio: float = 0.02) -> float:
    p, t = _hq_sam_boundary(pred, dilation_ratio), _hq_sam_boundary(target, dilation_ratio)
    union = (p | t).sum()
    return (p & t).sum() / union if union else math.nan


def _band_with_unknown(mask: np.ndarray, labelled: np.ndarray, d: int) -> np.ndarray:
    """The band on annotated pixels, pixel by pixel: a labelled mask pixel with, within ``d`` px (chessboard), the
    image border or a labelled pixel outside the mask."""
    h, w = mask.shape
    band = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            if not (mask[y, x] and labelled[y, x]):
                continue
            window = [(yy, xx) for yy in range(y - d, y + d + 1) for xx in range(x - d, x + d + 1)]
            band[y, x] = any(not (0 <= yy < h and 0 <= xx < w) or (labelled[yy, xx] and not mask[yy, xx])
                             for yy, xx in window)
    return band


def _blobs(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random rectangles and one-pixel lines (thin structures)."""
    mask = np.zeros(shape, bool)
    for _ in range(3):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        mask[y : y + rng.integers(1, 9), x : x + rng.integers(1, 9)] = True
    mask[rng.integers(0, shape[0]), :] ^= rng.random(shape[1]) < 0.7
    return mask


@pytest.mark.parametrize("shape, ratio", [((20, 20), 0.02), ((23, 17), 0.05), ((30, 12), 0.1), ((7, 40), 0.02),
                                          ((16, 16), 0.2)])
def test_the_band_and_its_iou_are_hq_sams(shape, ratio):
    rng = np.random.default_rng(sum(shape))
    for _ in range(4):
        pred, target = _blobs(rng, shape), _blobs(rng, shape)
        assert np.array_equal(mask_boundary(target, ratio), _hq_sam_boundary(target, ratio))
        assert boundary_iou(pred, target, ratio) == pytest.approx(_hq_sam_iou(pred, target, ratio))
    full = np.ones(shape, bool)  # the image border counts as outside: a frame d px wide
    assert np.array_equal(mask_boundary(full, ratio), _hq_sam_boundary(full, ratio))


def test_band_width_follows_the_diagonal():
    assert boundary_width((20, 20)) == 1  # 0.57 px
    assert boundary_width((100, 100)) == 3  # 2.83 px
    assert boundary_width((1024, 1024)) == 29
    assert boundary_width((4, 3)) == 1  # never below 1
    assert boundary_width((300, 400), 0.05) == 25
    assert boundary_width((3, 300, 400)) == 10  # the last two axes are the image


def test_hand_computed_square_shifted_by_one_pixel():
    """20 x 20 image: the band is 1 px wide, the 36-px ring of a 10 x 10 square. Shifted right by 1 px, the
    rings share 9 + 9 px of their top and bottom rows: 18 / (36 + 36 - 18)."""
    square = np.zeros((20, 20), bool)
    square[5:15, 5:15] = True
    assert mask_boundary(square).sum() == 36
    assert boundary_iou(square, square) == 1.0
    assert boundary_iou(np.roll(square, 1, axis=1), square) == pytest.approx(1 / 3)
    assert boundary_iou(np.zeros_like(square), square) == 0.0
    assert math.isnan(boundary_iou(np.zeros_like(square), np.zeros_like(square)))
    with pytest.raises(ValueError):
        boundary_iou(square, square[:-1])


def test_thin_structures_are_all_boundary():
    line = np.zeros((20, 20), bool)
    line[10, 2:18] = True
    assert np.array_equal(mask_boundary(line), line)
    assert boundary_iou(line, line) == 1.0
    assert boundary_iou(np.roll(line, 1, axis=0), line) == 0.0  # one pixel off: no shared boundary
    bar = np.zeros((100, 100), bool)  # d = 3: a bar 5 px wide is band all through
    bar[40:45, 10:90] = True
    assert np.array_equal(mask_boundary(bar), bar)
    thick = np.zeros((100, 100), bool)
    thick[40:46, 10:90] = True  # 6 px wide: every row is within 3 px of a pixel outside
    assert np.array_equal(mask_boundary(thick), thick)
    thick[40:47, 10:90] = True  # 7 px wide: the middle row (43) is 4 px from rows 39 and 47
    assert mask_boundary(thick)[38:49, 50].tolist() == [False, False, True, True, True, False, True, True, True,
                                                        False, False]


def test_unannotated_pixels_are_in_no_band_and_make_none():
    """Against the pixel-by-pixel definition, on sparse labels with random ignored areas."""
    rng = np.random.default_rng(0)
    for shape, ratio in [((20, 20), 0.02), ((18, 25), 0.1)]:
        d = boundary_width(shape, ratio)
        for _ in range(4):
            mask, labelled = _blobs(rng, shape), rng.random(shape) < 0.6
            labelled[: shape[0] // 2, : shape[1] // 2] = False  # and a large unannotated block
            band = mask_boundary(mask, ratio, unknown=~labelled)
            assert np.array_equal(band, _band_with_unknown(mask, labelled, d))
            assert not (band & ~labelled).any()


def _reference_counts(preds, targets, k, ratio=0.02):
    """Per-class (intersection, union) of the bands, summed over images, with the pixel-by-pixel band."""
    inter, union = np.zeros(k, np.int64), np.zeros(k, np.int64)
    for pred, target in zip(preds, targets):
        labelled, d = target != IGNORE_INDEX, boundary_width(target.shape, ratio)
        for c in range(1, k):
            p, t = _band_with_unknown(pred == c, labelled, d), _band_with_unknown(target == c, labelled, d)
            inter[c] += (p & t).sum()
            union[c] += (p | t).sum()
    return inter, union


def test_the_matrix_pools_boundary_counts_of_every_image_over_classes():
    """Three foreground classes, one of them absent everywhere; sparse labels; a batch of two images and one more:
    per class the pooled intersections over the pooled unions, the mean over the classes that have one."""
    rng = np.random.default_rng(5)
    k, shape = 5, (24, 24)
    targets = [rng.integers(0, 3, size=shape) for _ in range(3)]  # classes 0, 1, 2 (3 and 4 never in labels)
    for t in targets:
        t[rng.random(shape) < 0.3] = IGNORE_INDEX
    preds = [np.where(rng.random(shape) < 0.8, np.maximum(t, 0), rng.integers(0, 4, size=shape)) for t in targets]
    cm = ConfusionMatrix(k, boundary_dilation_ratio=0.1)
    cm.update(np.stack(preds[:2]), np.stack(targets[:2]))
    cm.update(preds[2], targets[2])
    m = cm.compute()
    inter, union = _reference_counts(preds, targets, k, 0.1)
    assert union[1] and union[2] and union[3] and union[4] == 0  # class 3 only predicted, class 4 nowhere
    expected = [inter[c] / union[c] for c in (1, 2, 3)]
    assert math.isnan(m.per_class_boundary_iou[0]) and math.isnan(m.per_class_boundary_iou[4])
    assert m.per_class_boundary_iou[1:4] == pytest.approx(expected)
    assert m.per_class_boundary_iou[3] == 0.0
    assert m.boundary_iou == pytest.approx(np.mean(expected))
    ratios = [_reference_counts([p], [t], k, 0.1) for p, t in zip(preds, targets)]
    assert m.boundary_iou != pytest.approx(np.mean([[i[c] / u[c] for c in (1, 2, 3)] for i, u in ratios]))  # pooled
    cm.reset()
    assert math.isnan(cm.compute().boundary_iou)


def test_a_prediction_right_on_every_labelled_pixel_scores_one_whatever_it_says_elsewhere():
    """Sparse labels (scribbles) and a validation patch's unowned margin: only annotated pixels are scored."""
    rng = np.random.default_rng(2)
    truth = np.zeros((64, 64), np.int64)
    truth[10:30, 10:30], truth[40:60, 35:50] = 1, 2
    target = np.full_like(truth, IGNORE_INDEX)
    target[8:32, 5:40] = truth[8:32, 5:40]  # a block cutting through the objects
    target[45, :] = truth[45, :]  # a scribble across one
    noise = rng.integers(0, 3, size=truth.shape)
    for pred in (np.where(target == IGNORE_INDEX, noise, truth), np.where(target == IGNORE_INDEX, 0, truth)):
        m = evaluate_arrays(pred, target, 3)
        assert m.per_class_boundary_iou[1:] == [1.0, 1.0] and m.boundary_iou == 1.0
    wrong = truth.copy()
    wrong[10:30, 10:12] = 0  # thinner on the left, inside the labelled block
    assert evaluate_arrays(wrong, target, 3).per_class_boundary_iou[1] < 1.0
    nothing = evaluate_arrays(np.zeros((4, 4), int), np.full((4, 4), IGNORE_INDEX), 2)
    assert math.isnan(nothing.boundary_iou)


def test_flat_pixel_lists_have_no_boundaries():
    m = evaluate_arrays(np.array([0, 1, 1]), np.array([0, 1, 0]), 2)
    assert m.per_class_iou[1] == 0.5 and math.isnan(m.boundary_iou)
    counts = BoundaryCounts(2)
    counts.update(np.array([1, 1]), np.array([1, 1]))
    assert counts.union.tolist() == [0, 0]


def test_boundary_iou_in_the_record_the_table_and_the_line():
    from napari_convlora.metrics import format_line

    pred = np.zeros((20, 20), int)
    pred[5:15, 6:16] = 1
    target = np.roll(pred, -1, axis=1)  # the shifted square: 1/3
    m = evaluate_arrays(pred, target, 2)
    record = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert record["per_class_boundary_iou"] == [None, pytest.approx(1 / 3)]
    assert record["boundary_iou"] == pytest.approx(1 / 3)
    table = m.format(["background", "cell"])
    assert table.splitlines()[0].split() == ["class", "IoU", "Dice", "bIoU", "pixels"]
    assert table.splitlines()[2].split()[3] == "0.333" and table.splitlines()[1].split()[3] == "-"
    assert "boundary IoU 0.333" in table
    assert ", boundary IoU 33.3%, " in format_line(record)
