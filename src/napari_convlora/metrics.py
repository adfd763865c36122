"""Semantic-segmentation metrics from a confusion matrix (numpy only, no torch, no Qt).

Labels here are *class indices* ``0..K-1`` (class 0 is background); target pixels equal to
:data:`~napari_convlora.constants.IGNORE_INDEX` are not annotated and are skipped.

A class absent from both prediction and target has no defined IoU or Dice: it is reported
as NaN and left out of every mean, so an image without, say, class 3 neither rewards nor
punishes the model for class 3.

Boundary IoU (HQ-SAM's, see ``boundary.py``) scores the edges of each foreground class on every
2D image given, with its counts pooled over the images.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .boundary import DILATION_RATIO, BoundaryCounts
from .constants import IGNORE_INDEX


def _nanmean(values: np.ndarray) -> float:
    """Mean of the finite entries; NaN (without a RuntimeWarning) when there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@dataclass
class SegmentationMetrics:
    """Scores of a multi-class segmentation; every score in 0..1, NaN where undefined.

    ``per_class_*`` lists have one entry per class index ``0..K-1``. ``mean_iou`` and
    ``mean_dice`` average over all classes including background (0); ``mean_iou_foreground``
    over classes ``1..K-1``. NaN entries (class absent from prediction and target) are
    excluded from the means. ``num_pixels`` counts the annotated (non-ignored) pixels and
    ``per_class_pixels`` the annotated pixels of each target class.

    ``per_class_boundary_iou``: HQ-SAM's boundary IoU of each class, from boundary intersections and unions
    summed over the images (NaN for background, which is not scored, and for a class without boundary pixels);
    ``boundary_iou``: its mean over the foreground classes that have a value.
    """

    per_class_iou: list[float]
    per_class_dice: list[float]
    mean_iou: float
    mean_iou_foreground: float
    mean_dice: float
    pixel_accuracy: float
    num_pixels: int
    per_class_pixels: list[int] = field(default_factory=list)
    per_class_boundary_iou: list[float] = field(default_factory=list)
    boundary_iou: float = math.nan

    @property
    def num_classes(self) -> int:
        return len(self.per_class_iou)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (NaN becomes ``None``; plain Python floats and ints only)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, list):
                out[key] = [_json_float(v) if isinstance(v, float) else int(v) for v in value]
            elif isinstance(value, float):
                out[key] = _json_float(value)
            else:
                out[key] = int(value)
        return out

    def format(self, class_names: Sequence[str] | None = None) -> str:
        """A small human-readable table: one row per class, then the summary scores."""

        def num(value: float) -> str:
            return "   -  " if math.isnan(value) else f"{value:6.3f}"

        names = class_labels(class_names, self.num_classes)
        width = max([len("class")] + [len(n) for n in names[: self.num_classes]])
        pixels = self.per_class_pixels or [0] * self.num_classes
        boundary = self.per_class_boundary_iou or [math.nan] * self.num_classes
        lines = [f"{'class':<{width}}     IoU    Dice    bIoU  pixels"]
        for i in range(self.num_classes):
            lines.append(
                f"{names[i]:<{width}}  {num(self.per_class_iou[i])}  "
                f"{num(self.per_class_dice[i])}  {num(boundary[i])}  {pixels[i]}"
            )
        lines.append(
            f"mean IoU {num(self.mean_iou).strip()} "
            f"(foreground {num(self.mean_iou_foreground).strip()}), "
            f"mean Dice {num(self.mean_dice).strip()}, "
            f"boundary IoU {num(self.boundary_iou).strip()}, "
            f"pixel accuracy {num(self.pixel_accuracy).strip()}, "
            f"{self.num_pixels} pixels"
        )
        lines.append("bIoU: HQ-SAM's boundary IoU (foreground classes only)")
        return "\n".join(lines)


class ConfusionMatrix:
    """Accumulates a ``K x K`` int64 confusion matrix: rows = target class, columns = predicted.

    Call :meth:`update` once per image (or batch) and :meth:`compute` at the end; the
    result equals one update on all the pixels concatenated. Alongside, the boundary counts of every
    2D image (each trailing ``Y x X`` plane of an update) are summed for boundary IoU (``boundary.py``;
    ``boundary_dilation_ratio``: HQ-SAM's band width as a fraction of an image's diagonal).
    """

    def __init__(self, num_classes: int, boundary_dilation_ratio: float = DILATION_RATIO) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self._matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self._boundary = BoundaryCounts(self.num_classes, boundary_dilation_ratio)

    @property
    def matrix(self) -> np.ndarray:
        """Copy of the ``K x K`` int64 counts, ``matrix[target, pred]``."""
        return self._matrix.copy()

    def reset(self) -> None:
        self._matrix[:] = 0
        self._boundary.reset()

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """Add one prediction / target pair.

        Args:
            pred: integer class indices in ``0..K-1``, any shape; with 2 or more dimensions each
                trailing ``Y x X`` plane is an image whose boundaries are scored too.
            target: integer class indices in ``0..K-1`` or ``IGNORE_INDEX``, same shape as
                ``pred``. Ignored pixels are skipped whatever ``pred`` says there.
        """
        pred = np.asarray(pred)
        target = np.asarray(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
        for name, arr in (("pred", pred), ("target", target)):
            if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
                raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
        images = (pred, target)  # their planes, for the boundaries
        pred = pred.reshape(-1).astype(np.int64, copy=False)
        target = target.reshape(-1).astype(np.int64, copy=False)
        keep = target != IGNORE_INDEX
        pred, target = pred[keep], target[keep]
        k = self.num_classes
        if target.size and (target.min() < 0 or target.max() >= k):
            raise ValueError(f"target values must be in 0..{k - 1} or {IGNORE_INDEX}")
        if pred.size and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"pred values must be in 0..{k - 1}")
        counts = np.bincount(target * k + pred, minlength=k * k)
        self._matrix += counts.reshape(k, k)
        self._boundary.update(*images)

    def compute(self) -> SegmentationMetrics:
        """Scores of everything accumulated since construction or the last :meth:`reset`."""
        m = self._matrix.astype(np.float64)
        tp = np.diag(m)
        fp = m.sum(axis=0) - tp
        fn = m.sum(axis=1) - tp
        union = tp + fp + fn
        present = union > 0
        iou = np.full(self.num_classes, np.nan)
        dice = np.full(self.num_classes, np.nan)
        iou[present] = tp[present] / union[present]
        dice[present] = 2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])
        total = int(self._matrix.sum())
        boundary = self._boundary.per_class()
        return SegmentationMetrics(
            per_class_iou=[float(v) for v in iou],
            per_class_dice=[float(v) for v in dice],
            mean_iou=_nanmean(iou),
            mean_iou_foreground=_nanmean(iou[1:]),
            mean_dice=_nanmean(dice),
            pixel_accuracy=float(tp.sum() / total) if total else math.nan,
            num_pixels=total,
            per_class_pixels=[int(v) for v in self._matrix.sum(axis=1)],
            per_class_boundary_iou=[float(v) for v in boundary],
            boundary_iou=_nanmean(boundary[1:]),
        )


def selection_score(metrics: Mapping[str, Any] | None) -> float:
    """The score the best model is chosen on: mean IoU over the classes present in the validation labels,
    background included. Unlike foreground mIoU it cannot reward predicting one class everywhere (that scores
    at most 1/K), and it still moves when a rare class stays at 0. -inf without validation."""
    if not metrics:
        return -math.inf
    ious, pixels = metrics.get("per_class_iou") or [], metrics.get("per_class_pixels") or []
    present = [iou or 0.0 for iou, n in zip(ious, pixels) if n]
    return float(np.mean(present)) if present else -math.inf


def class_labels(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """The names to show for ``num_classes`` classes: ``class_names`` when there is one per class, else
    ``class 0``, ``class 1``, ... (names that do not match the classes would mislabel them)."""
    names = list(class_names or [])
    return names if len(names) == num_classes else [f"class {i}" for i in range(num_classes)]


def _percent(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def format_line(metrics: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """One line for logs and progress bars, from :meth:`SegmentationMetrics.to_dict` (or the object's fields):
    ``"mIoU 67.2% (background 92.9%, nucleus 75.2%, rod 33.3%), foreground 54.3%, boundary IoU 41.0%,
    pixel accuracy 95.1%"`` (boundary IoU only in records that have it). Classes are named by ``class_names``
    when there is one name per class, else ``class 0``, ``class 1``... A validation of an instance head adds its
    objects: ``"; objects F1@0.5 83.1% (P 85.0%, R 81.3%), mean F1@0.5:0.95 61.2% (foreground 0.5, seeds 3 px
    apart)"``."""
    ious = list(metrics.get("per_class_iou") or [])
    names = class_labels(class_names, len(ious))
    per_class = ", ".join(f"{name} {_percent(v)}" for name, v in zip(names, ious))
    boundary = f"boundary IoU {_percent(metrics['boundary_iou'])}, " if "boundary_iou" in metrics else ""
    objects = metrics.get("instances")
    found = "" if not objects else (
        f"; objects F1@0.5 {_percent(objects.get('f1_50'))} (P {_percent(objects.get('precision_50'))}, "
        f"R {_percent(objects.get('recall_50'))}), mean F1@0.5:0.95 {_percent(objects.get('mean_f1'))} "
        f"(foreground {objects.get('foreground')}, seeds {objects.get('min_distance')} px apart)")
    return (f"mIoU {_percent(metrics.get('mean_iou'))} ({per_class}), "
            f"foreground {_percent(metrics.get('mean_iou_foreground'))}, {boundary}"
            f"pixel accuracy {_percent(metrics.get('pixel_accuracy'))}{found}")


def evaluate_arrays(pred: np.ndarray, target: np.ndarray, num_classes: int) -> SegmentationMetrics:
    """Metrics of one prediction (class indices) against one target (indices or IGNORE_INDEX)."""
    matrix = ConfusionMatrix(num_classes)
    matrix.update(pred, target)
    return matrix.compute()


def class_pixel_counts(labels: np.ndarray, class_values: Sequence[int]) -> dict[int, int]:
    """Pixels (voxels) of each class in a label image of any shape: class value -> count, in the order of
    ``class_values``; 0 for a class that is absent. Values that are not class values are not counted."""
    flat = np.asarray(labels).ravel()
    if flat.dtype.kind in "ub" and flat.dtype.itemsize <= 2:  # label_dtype's uint8/uint16: one linear pass
        counts = np.bincount(flat, minlength=max(class_values) + 1)
        return {int(v): int(counts[v]) if v < len(counts) else 0 for v in class_values}
    values, counts = np.unique(flat, return_counts=True)
    found = dict(zip(values.tolist(), counts.tolist()))
    return {int(v): int(found.get(v, 0)) for v in class_values}
