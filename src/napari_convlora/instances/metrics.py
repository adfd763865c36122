"""Instance-segmentation scores: how well predicted objects match ground-truth objects (numpy and scipy only).

Both images are *instance* label images: 0 is background and every other integer is one object, whatever its
value (ids need not be consecutive; uint32 ids above 65535 are fine). The array is one image or one volume: in
a 3D stack an id found on several planes is one 3D object, so to score per-plane objects pass the planes one at
a time (for example to :class:`InstanceScoreAccumulator`).

What is measured. The intersection over union (IoU) of every predicted object with every true object it
overlaps is read from the joint histogram of (predicted id, true id) over the pixels, so only overlapping pairs
are ever stored. At each IoU threshold ``t`` the objects are matched one to one; a pair qualifies when its
IoU >= t (greater *or equal*, as in StarDist's ``matching``), and the matching has as many qualifying pairs as
possible and, among those, the largest total IoU, which is how StarDist's ``matching`` and cellpose's average
precision match objects at each threshold. From t > 0.5 on this is simply every qualifying pair, as an object
can have IoU > 0.5 with at most one object of the other image. A matched pair is a true positive (TP), an
unmatched predicted object a false positive (FP), an unmatched true object a false negative (FN):

- precision TP / (TP + FP), recall TP / (TP + FN), F1 2 TP / (2 TP + FP + FN);
- average precision TP / (TP + FP + FN): cellpose's "average precision" and StarDist's "accuracy".

Undefined scores (0 / 0) are NaN: precision without predicted objects, recall without true objects, F1 and
average precision with neither; with only one side empty, F1 and average precision are 0.

Pixels marked in ``ignore`` are not annotated, so the truth there is unknown: they count in no area and no IoU,
a true object is scored on its annotated pixels only (and not at all when it has none), and a predicted object
with more than half of its pixels ignored is dropped (neither a true nor a false positive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
"""0.5, 0.55, ..., 0.95: the thresholds of the COCO-style mean over IoU thresholds."""


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@dataclass(frozen=True)
class InstanceScores:
    """Object counts at each IoU threshold and the scores derived from them (each in 0..1, NaN if undefined).

    ``true_positives``, ``false_positives`` and ``false_negatives`` have one entry per threshold in
    ``thresholds``; ``num_true`` and ``num_predicted`` count the objects scored (predicted objects mostly in
    ignored pixels are not); ``mean_matched_iou`` is the mean IoU of the pairs matched at the first threshold
    (NaN if none). Scores are looked up by threshold value; asking for a threshold that was not scored raises
    ``ValueError``.
    """

    thresholds: tuple[float, ...]
    true_positives: tuple[int, ...]
    false_positives: tuple[int, ...]
    false_negatives: tuple[int, ...]
    num_true: int
    num_predicted: int
    mean_matched_iou: float

    def _counts(self, threshold: float) -> tuple[int, int, int]:
        for i, scored in enumerate(self.thresholds):
            if abs(scored - threshold) < 1e-9:
                return self.true_positives[i], self.false_positives[i], self.false_negatives[i]
        listed = ", ".join(f"{t:g}" for t in self.thresholds)
        raise ValueError(f"IoU threshold {threshold:g} was not scored (scored: {listed})")

    def _scored(self, threshold: float) -> bool:
        return any(abs(scored - threshold) < 1e-9 for scored in self.thresholds)

    def precision(self, threshold: float = 0.5) -> float:
        """TP / (TP + FP) at ``threshold``; NaN without predicted objects."""
        tp, fp, _ = self._counts(threshold)
        return _ratio(tp, tp + fp)

    def recall(self, threshold: float = 0.5) -> float:
        """TP / (TP + FN) at ``threshold``; NaN without true objects."""
        tp, _, fn = self._counts(threshold)
        return _ratio(tp, tp + fn)

    def f1(self, threshold: float = 0.5) -> float:
        """2 TP / (2 TP + FP + FN) at ``threshold``; NaN without any object, 0 when one side has none."""
        tp, fp, fn = self._counts(threshold)
        return _ratio(2 * tp, 2 * tp + fp + fn)

    def average_precision(self, threshold: float = 0.5) -> float:
        """TP / (TP + FP + FN) at ``threshold`` (cellpose's AP, StarDist's accuracy); NaN without any object."""
        tp, fp, fn = self._counts(threshold)
        return _ratio(tp, tp + fp + fn)

    @property
    def f1_50(self) -> float:
        """F1 at IoU 0.5 (``ValueError`` if 0.5 was not scored)."""
        return self.f1(0.5)

    @property
    def mean_f1(self) -> float:
        """Mean of F1 over all the thresholds (NaN without any object)."""
        return float(np.mean([self.f1(t) for t in self.thresholds]))

    @property
    def mean_average_precision(self) -> float:
        """Mean of the average precision over all the thresholds (NaN without any object)."""
        return float(np.mean([self.average_precision(t) for t in self.thresholds]))

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe summary: plain floats and ints, NaN as ``None``; the ``*_50`` scores are ``None`` when 0.5
        was not scored. Per-threshold lists follow ``thresholds``."""

        def at_half(score: Any) -> float | None:
            return _json_float(score(0.5)) if self._scored(0.5) else None

        def per_threshold(score: Any) -> list[float | None]:
            return [_json_float(score(t)) for t in self.thresholds]

        return {
            "f1_50": at_half(self.f1),
            "precision_50": at_half(self.precision),
            "recall_50": at_half(self.recall),
            "ap_50": at_half(self.average_precision),
            "mean_f1": _json_float(self.mean_f1),
            "mean_ap": _json_float(self.mean_average_precision),
            "mean_matched_iou": _json_float(self.mean_matched_iou),
            "num_true": int(self.num_true),
            "num_predicted": int(self.num_predicted),
            "thresholds": [float(t) for t in self.thresholds],
            "true_positives": [int(v) for v in self.true_positives],
            "false_positives": [int(v) for v in self.false_positives],
            "false_negatives": [int(v) for v in self.false_negatives],
            "precision": per_threshold(self.precision),
            "recall": per_threshold(self.recall),
            "f1": per_threshold(self.f1),
            "average_precision": per_threshold(self.average_precision),
        }


@dataclass(frozen=True)
class _Overlaps:
    """The overlapping (predicted, true) pairs of one image: ``E`` pairs, objects indexed from 0."""

    num_predicted: int
    num_true: int
    predicted: np.ndarray  # (E,) int64 predicted object of each pair
    true: np.ndarray  # (E,) int64 true object of each pair
    iou: np.ndarray  # (E,) float64 in (0, 1]


@dataclass(frozen=True)
class _Tally:
    """What one image adds to a pooled score: TP per threshold (T,), object counts, matched IoU at the first."""

    true_positives: np.ndarray
    num_true: int
    num_predicted: int
    matched_iou_sum: float

    def scores(self, thresholds: tuple[float, ...]) -> InstanceScores:
        tp = [int(v) for v in self.true_positives]
        return InstanceScores(
            thresholds=thresholds,
            true_positives=tuple(tp),
            false_positives=tuple(self.num_predicted - v for v in tp),
            false_negatives=tuple(self.num_true - v for v in tp),
            num_true=self.num_true,
            num_predicted=self.num_predicted,
            mean_matched_iou=_ratio(self.matched_iou_sum, tp[0]),
        )


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if not values or not all(0.0 < t <= 1.0 for t in values):
        raise ValueError(f"IoU thresholds must be one or more values in (0, 1], got {list(thresholds)}")
    return values


def _check_inputs(
    predicted: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted shape {predicted.shape} != truth shape {truth.shape}")
    if predicted.dtype.kind not in "iub" or truth.dtype.kind not in "iub":
        raise ValueError(f"instance labels must hold integer ids, got predicted {predicted.dtype} "
                         f"and truth {truth.dtype}")
    for name, labels in (("predicted", predicted), ("truth", truth)):
        if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
            raise ValueError(f"{name} has negative ids (min {labels.min()}); ids are >= 0 with 0 = background")
    if ignore is not None:
        ignore = np.asarray(ignore)
        if ignore.shape != truth.shape:
            raise ValueError(f"ignore shape {ignore.shape} != truth shape {truth.shape}")
        if ignore.dtype.kind not in "iub":
            raise ValueError(f"ignore must be a boolean mask, got dtype {ignore.dtype}")
        ignore = ignore.astype(bool, copy=False)
    return predicted, truth, ignore


def _consecutive(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Flat int64 ids ``1..N`` for the ``N`` objects of ``labels`` (any shape, ids >= 0), in the order of the
    original ids; background stays 0."""
    flat = labels.ravel()
    if flat.dtype == bool:
        flat = flat.view(np.uint8)
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    top = int(flat.max())
    if top <= max(flat.size, 1 << 16):  # a lookup table no longer than the image: linear time
        present = np.zeros(top + 1, dtype=bool)
        present[flat] = True
        present[0] = False
        lookup = np.cumsum(present, dtype=np.int64)
        return lookup[flat], int(lookup[-1])
    ids, inverse = np.unique(flat, return_inverse=True)  # huge ids: sort instead
    inverse = inverse.reshape(-1).astype(np.int64, copy=False)
    return (inverse, len(ids) - 1) if ids[0] == 0 else (inverse + 1, len(ids))


def _overlaps(predicted: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None) -> _Overlaps:
    """IoU of every overlapping pair, on the annotated pixels, after dropping mostly ignored predictions."""
    pred_ids, num_pred = _consecutive(predicted)
    true_flat = truth.ravel()
    if ignore is not None:
        ignored = ignore.ravel()
        pixels = np.bincount(pred_ids, minlength=num_pred + 1)
        ignored_pixels = np.bincount(pred_ids[ignored], minlength=num_pred + 1)
        kept = 2 * ignored_pixels <= pixels
        kept[0] = False
        renumber = np.where(kept, np.cumsum(kept), 0)
        annotated = ~ignored
        pred_ids, true_flat = renumber[pred_ids[annotated]], true_flat[annotated]
        num_pred = int(kept.sum())
    true_ids, num_true = _consecutive(true_flat)
    pred_area = np.bincount(pred_ids, minlength=num_pred + 1)
    true_area = np.bincount(true_ids, minlength=num_true + 1)
    both = (pred_ids > 0) & (true_ids > 0)
    pair_keys, intersection = np.unique(pred_ids[both] * (num_true + 1) + true_ids[both], return_counts=True)
    pred_of_pair, true_of_pair = np.divmod(pair_keys, num_true + 1)
    iou = intersection / (pred_area[pred_of_pair] + true_area[true_of_pair] - intersection)
    return _Overlaps(num_pred, num_true, pred_of_pair - 1, true_of_pair - 1, iou)


def _best_matching(pred: np.ndarray, true: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Bool (E,): a one-to-one choice among the ``E`` candidate pairs with the most pairs and, among those, the
    largest total IoU. Solved as a sparse assignment, never as a dense (predicted x true) matrix."""
    rows, pred_local = np.unique(pred, return_inverse=True)
    cols, true_local = np.unique(true, return_inverse=True)
    n_rows, n_cols, n_pairs = len(rows), len(cols), len(pred)
    gain = 1.0 + iou / (2 * min(n_rows, n_cols))  # the IoU terms add up to < 1: one more pair always wins
    # A perfect matching of (predicted, then one dummy per true object) with (true, then one dummy per predicted
    # object): an object left unmatched takes its own dummy, and the dummies of a matched pair take each other.
    # Every edge costs 2 - its gain (pairs) or 2 (dummies), so the cheapest perfect matching has the most gain.
    size = n_rows + n_cols
    row = np.concatenate([pred_local, np.arange(n_rows), n_rows + np.arange(n_cols), n_rows + true_local])
    col = np.concatenate([true_local, n_cols + np.arange(n_rows), np.arange(n_cols), n_cols + pred_local])
    cost = np.concatenate([2.0 - gain, np.full(n_rows + n_cols + n_pairs, 2.0)])
    row_ind, col_ind = min_weight_full_bipartite_matching(sparse.csr_matrix((cost, (row, col)), shape=(size, size)))
    col_of_row = np.empty(size, dtype=np.int64)
    col_of_row[row_ind] = col_ind
    return col_of_row[pred_local] == true_local


def _matched(overlaps: _Overlaps, threshold: float) -> np.ndarray:
    """Bool (E,): the pairs matched at ``threshold`` (IoU >= threshold, one to one, most pairs)."""
    candidate = np.flatnonzero(overlaps.iou >= threshold)
    pred, true = overlaps.predicted[candidate], overlaps.true[candidate]
    # A pair whose two objects have no other candidate is matched (every pair with IoU > 0.5 is such a pair);
    # only the rest, groups of objects that share candidates, needs an assignment.
    alone = ((np.bincount(pred, minlength=overlaps.num_predicted)[pred] == 1)
             & (np.bincount(true, minlength=overlaps.num_true)[true] == 1))
    chosen = alone.copy()
    if not alone.all():
        shared = ~alone
        chosen[shared] = _best_matching(pred[shared], true[shared], overlaps.iou[candidate][shared])
    matched = np.zeros(len(overlaps.iou), dtype=bool)
    matched[candidate[chosen]] = True
    return matched


def _tally(predicted: np.ndarray, truth: np.ndarray, thresholds: tuple[float, ...],
           ignore: np.ndarray | None) -> _Tally:
    overlaps = _overlaps(*_check_inputs(predicted, truth, ignore))
    true_positives = np.zeros(len(thresholds), dtype=np.int64)
    matched_iou_sum = 0.0
    for i, threshold in enumerate(thresholds):
        matched = _matched(overlaps, threshold)
        true_positives[i] = int(matched.sum())
        if i == 0:
            matched_iou_sum = float(overlaps.iou[matched].sum())
    return _Tally(true_positives, overlaps.num_true, overlaps.num_predicted, matched_iou_sum)


def instance_scores(
    predicted: np.ndarray,
    truth: np.ndarray,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
    ignore: np.ndarray | None = None,
) -> InstanceScores:
    """Match the objects of ``predicted`` to those of ``truth`` at each IoU threshold and count them.

    Args:
        predicted: ``HxW`` image or ``ZxHxW`` volume (any shape) of integer instance ids, 0 = background.
        truth: the true instance ids, same shape, any integer dtype.
        thresholds: IoU thresholds in (0, 1]; a pair matches at ``t`` when its IoU >= ``t``.
        ignore: optional bool mask, same shape, True where the truth is not annotated (see the module docstring).

    Raises:
        ValueError: shapes differ, ids are not integers or negative, or a threshold is outside (0, 1].
    """
    thresholds = _check_thresholds(thresholds)
    return _tally(predicted, truth, thresholds, ignore).scores(thresholds)


class InstanceScoreAccumulator:
    """Pools several images (or planes of a stack): TP per threshold and the object counts are summed, like a
    confusion matrix, so :meth:`compute` scores all the objects together (images with many objects weigh more
    than a mean of per-image scores would let them)."""

    def __init__(self, thresholds: Sequence[float] = IOU_THRESHOLDS) -> None:
        self.thresholds = _check_thresholds(thresholds)
        self.reset()

    def reset(self) -> None:
        self._true_positives = np.zeros(len(self.thresholds), dtype=np.int64)
        self._num_true = 0
        self._num_predicted = 0
        self._matched_iou_sum = 0.0

    def update(self, predicted: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None = None) -> InstanceScores:
        """Add one image (arguments as for :func:`instance_scores`); returns that image's own scores."""
        tally = _tally(predicted, truth, self.thresholds, ignore)
        self._true_positives += tally.true_positives
        self._num_true += tally.num_true
        self._num_predicted += tally.num_predicted
        self._matched_iou_sum += tally.matched_iou_sum
        return tally.scores(self.thresholds)

    def compute(self) -> InstanceScores:
        """Scores of all the objects added since construction or the last :meth:`reset`."""
        pooled = _Tally(self._true_positives.copy(), self._num_true, self._num_predicted, self._matched_iou_sum)
        return pooled.scores(self.thresholds)


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"


def format_instance_line(scores: InstanceScores) -> str:
    """One line for logs, at the first threshold and over all of them: ``"instances: F1@0.5 83.1% (P 85.0%,
    R 81.3%), mean F1@0.5:0.95 61.2%, AP@0.5 71.1%, 67 true / 64 predicted"`` (undefined scores read n/a)."""
    first = scores.thresholds[0]
    mean = (f"mean F1@{min(scores.thresholds):g}:{max(scores.thresholds):g} {_percent(scores.mean_f1)}, "
            if len(scores.thresholds) > 1 else "")
    return (f"instances: F1@{first:g} {_percent(scores.f1(first))} (P {_percent(scores.precision(first))}, "
            f"R {_percent(scores.recall(first))}), {mean}AP@{first:g} {_percent(scores.average_precision(first))}, "
            f"{scores.num_true} true / {scores.num_predicted} predicted")
