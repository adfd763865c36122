"""Boundary IoU, as HQ-SAM evaluates mask edges (numpy and scipy only, no torch, no Qt).

HQ-SAM (SysCV/sam-hq, ``train/utils/misc.py``: ``mask_to_boundary``, ``boundary_iou``) scores a mask by the IoU of
its *boundary band*: for an ``h x w`` mask, ``d = max(1, round(dilation_ratio * sqrt(h^2 + w^2)))``; the mask,
padded with 1 px of zeros, is eroded ``d`` times with a 3 x 3 square and cropped; the band is the mask minus the
eroded mask, i.e. the mask pixels within ``d`` px (chessboard distance) of a pixel outside it or of the image
border. One erosion by a ``(2d + 1)`` square with zeros beyond the border gives the same band in a single pass.

Label images carry ``IGNORE_INDEX`` where nothing was annotated (sparse labels, the unowned margins of validation
patches). There, the truth is unknown, so an ignored pixel is in neither band and does not create one: a mask pixel
is in the band when an *annotated* pixel outside the mask, or the image border, lies within ``d`` px. Both bands are
built this way from the annotated pixels only, so a prediction is scored on the labelled pixels alone and one that
matches the labels wherever they are labelled scores 1.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .constants import IGNORE_INDEX

#: HQ-SAM's band width as a fraction of the image diagonal.
DILATION_RATIO = 0.02


def boundary_width(shape: tuple[int, ...], dilation_ratio: float = DILATION_RATIO) -> int:
    """Band width ``d`` in pixels for an ``h x w`` image: ``max(1, round(dilation_ratio * diagonal))`` (Python's
    ``round``, as HQ-SAM)."""
    height, width = shape[-2:]
    return max(1, int(round(dilation_ratio * math.sqrt(height * height + width * width))))


def mask_boundary(mask: np.ndarray, dilation_ratio: float = DILATION_RATIO,
                  unknown: np.ndarray | None = None) -> np.ndarray:
    """The boundary band of a ``Y x X`` bool mask (bool, ``Y x X``), HQ-SAM's ``mask_to_boundary``.

    ``unknown`` (``Y x X`` bool, optional): pixels whose truth is not known; they are left out of the mask and of
    the band, and do not erode the mask (see the module docstring)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2D mask (Y, X), got shape {mask.shape}")
    if unknown is not None:
        mask = mask & ~unknown
    if not mask.any():
        return mask.copy()
    solid = mask if unknown is None else mask | unknown
    size = 2 * boundary_width(mask.shape, dilation_ratio) + 1
    eroded = ndimage.minimum_filter(solid.view(np.uint8), size=size, mode="constant", cval=0)
    return mask & (eroded == 0)


def boundary_iou(pred: np.ndarray, target: np.ndarray, dilation_ratio: float = DILATION_RATIO) -> float:
    """HQ-SAM's boundary IoU of two ``Y x X`` bool masks: ``|Pb & Gb| / |Pb | Gb|`` of their boundary bands, in
    0..1; NaN when both bands are empty (both masks empty)."""
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
    pred_band, target_band = mask_boundary(pred, dilation_ratio), mask_boundary(target, dilation_ratio)
    union = np.count_nonzero(pred_band | target_band)
    return np.count_nonzero(pred_band & target_band) / union if union else math.nan


class BoundaryCounts:
    """Boundary intersections and unions per class, summed over 2D label images (as the confusion matrix pools
    pixels): ``int64`` arrays of ``K`` entries. Only foreground classes (``1..K-1``) are counted."""

    def __init__(self, num_classes: int, dilation_ratio: float = DILATION_RATIO) -> None:
        self.num_classes, self.dilation_ratio = int(num_classes), float(dilation_ratio)
        self.intersection = np.zeros(self.num_classes, dtype=np.int64)
        self.union = np.zeros(self.num_classes, dtype=np.int64)

    def reset(self) -> None:
        self.intersection[:] = 0
        self.union[:] = 0

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """Add label images: ``pred`` class indices ``0..K-1``, ``target`` the same or ``IGNORE_INDEX``, equal
        shapes ``(..., Y, X)``; every trailing ``Y x X`` plane is one image (a batch, a stack). Values are not
        checked here (:class:`~.metrics.ConfusionMatrix` does). Arrays of fewer than 2 dimensions hold no image
        and add nothing."""
        pred, target = np.asarray(pred), np.asarray(target)
        if pred.ndim < 2 or pred.size == 0:
            return
        planes = zip(pred.reshape(-1, *pred.shape[-2:]), target.reshape(-1, *target.shape[-2:]))
        for pred_plane, target_plane in planes:
            unknown = target_plane == IGNORE_INDEX
            if unknown.all():
                continue
            for c in range(1, self.num_classes):
                pred_mask, target_mask = (pred_plane == c) & ~unknown, target_plane == c
                if not (pred_mask.any() or target_mask.any()):
                    continue
                pred_band = mask_boundary(pred_mask, self.dilation_ratio, unknown)
                target_band = mask_boundary(target_mask, self.dilation_ratio, unknown)
                self.intersection[c] += np.count_nonzero(pred_band & target_band)
                self.union[c] += np.count_nonzero(pred_band | target_band)

    def per_class(self) -> np.ndarray:
        """Boundary IoU of each class (float64, ``K``): NaN for background (class 0, not scored) and for a class
        without any boundary pixel in prediction or target."""
        scores = np.full(self.num_classes, np.nan)
        counted = self.union > 0
        counted[:1] = False
        scores[counted] = self.intersection[counted] / self.union[counted]
        return scores
