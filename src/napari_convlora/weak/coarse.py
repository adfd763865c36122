"""A coarse Labels layer -> one object per id per plane (box and mask), and points drawn afresh at every step.

The point sampling is WeSAM's (METHODS §3.2): per object, ``positive`` points uniformly **with replacement**
from its mask and ``negative`` points uniformly with replacement from the complement of that one object's mask
(the whole plane, other objects included), re-drawn at every training step.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from ..data.prompts import mask_box, random_points
from .objects import WeakLabelError, WeakLabels, WeakObject

#: WeSAM's points per object and step (``cfg.num_points = 5``): positive, negative.
WESAM_POINTS = (5, 5)
#: Above this fraction of the plane covered by the object, negatives are drawn from the listed complement
#: instead of by rejection.
REJECTION_LIMIT = 0.5


def _plane_objects(plane_labels: np.ndarray, plane: tuple[int, ...], layer: str) -> list[WeakObject]:
    ids, compact = np.unique(plane_labels, return_inverse=True)
    compact = compact.reshape(plane_labels.shape)
    if ids[0] != 0:  # no background on this plane: shift so that every id gets a slice
        compact = compact + 1
        ids = np.concatenate([[0], ids])
    objects = []
    for k, region in enumerate(ndimage.find_objects(compact), start=1):
        if region is None:
            continue
        mask = compact[region] == k
        origin = (region[0].start, region[1].start)
        box = mask_box(mask) + np.array([origin[1], origin[0]] * 2, np.float32)
        objects.append(WeakObject(plane, "coarse", box, mask=mask, mask_origin=origin, layer=layer,
                                  source=f"label {ids[k]}"))
    return objects


def weak_labels_from_coarse_labels(
    labels: np.ndarray, image_shape: Sequence[int] | None = None, *, layer: str = "coarse labels",
) -> WeakLabels:
    """One "coarse" object per nonzero id per plane of an integer Labels array ``(..., H, W)``: its box
    (``x0, y0, x1, y1`` on pixel edges, tight around its pixels) and its mask cropped to the box.

    image_shape: the image's shape without channels; when given, the Labels array must have it.
    The same id on two planes gives two objects. Raises WeakLabelError (naming the layer) for a wrong shape or
    dtype, negative ids, or no labelled pixel.
    """
    what = f"Labels layer {layer!r}"
    labels = np.asarray(labels)
    if image_shape is not None and labels.shape != tuple(int(n) for n in image_shape):
        raise WeakLabelError(f"{what} has shape {labels.shape}; expected the image's {tuple(image_shape)}")
    if labels.ndim < 2:
        raise WeakLabelError(f"{what} has {labels.ndim} axes; expected at least 2 (Y, X)")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise WeakLabelError(f"{what} has dtype {labels.dtype}; expected integer ids (0 = unlabelled)")
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise WeakLabelError(f"{what} has negative ids (smallest {labels.min()}); expected 0 and positive ids")
    objects = {}
    for plane in np.ndindex(labels.shape[:-2]):
        if labels[plane].any():
            objects[plane] = _plane_objects(labels[plane], plane, layer)
    if not objects:
        raise WeakLabelError(f"{what} has no labelled pixel: paint at least one object (ids above 0)")
    return WeakLabels(labels.shape, objects)


def _negatives(obj: WeakObject, plane_shape: tuple[int, int], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` pixel centres (x, y) drawn uniformly with replacement from outside the object's mask."""
    height, width = plane_shape
    inside = int(obj.mask.sum())
    if count == 0 or inside >= height * width:
        return np.zeros((0, 2), np.float32)
    if inside > REJECTION_LIMIT * height * width:
        return random_points(~obj.full_mask(plane_shape), count, rng)
    (r0, c0), (h, w) = obj.mask_origin, obj.mask.shape
    found: list[np.ndarray] = []
    total = 0
    while total < count:  # each candidate is outside with probability > 1 - REJECTION_LIMIT
        rows = rng.integers(0, height, 2 * count)
        cols = rng.integers(0, width, 2 * count)
        in_crop = (rows >= r0) & (rows < r0 + h) & (cols >= c0) & (cols < c0 + w)
        hit = np.zeros(rows.shape, bool)
        hit[in_crop] = obj.mask[rows[in_crop] - r0, cols[in_crop] - c0]
        outside = np.stack([cols[~hit] + 0.5, rows[~hit] + 0.5], axis=1)
        found.append(outside)
        total += len(outside)
    return np.concatenate(found)[:count].astype(np.float32)


def draw_points(
    obj: WeakObject,
    plane_shape: Sequence[int],
    rng: np.random.Generator,
    positive: int = WESAM_POINTS[0],
    negative: int = WESAM_POINTS[1],
) -> tuple[np.ndarray, np.ndarray]:
    """Fresh points for an object with a mask: ``positive x 2`` from its mask and ``negative x 2`` from the rest
    of the ``H x W`` plane, float32 ``(x, y)`` at pixel centres (``col + 0.5, row + 0.5``), drawn uniformly with
    replacement. When the mask covers the whole plane there are no negatives (``0 x 2``)."""
    if obj.mask is None:
        raise WeakLabelError(f"{obj.layer!r}, {obj.source}: a {obj.kind} prompt has no mask to draw points from")
    if positive < 0 or negative < 0:
        raise WeakLabelError(f"point counts must not be negative (got {positive} positive, {negative} negative)")
    plane_shape = (int(plane_shape[0]), int(plane_shape[1]))
    offset = np.array([obj.mask_origin[1], obj.mask_origin[0]], np.float32)
    pos = random_points(obj.mask, positive, rng) + offset
    return pos.astype(np.float32), _negatives(obj, plane_shape, negative, rng)


def step_points(
    obj: WeakObject,
    plane_shape: Sequence[int],
    rng: np.random.Generator,
    positive: int = WESAM_POINTS[0],
    negative: int = WESAM_POINTS[1],
) -> tuple[np.ndarray, np.ndarray]:
    """The point prompts of one training step: drawn afresh for an object with a mask (``draw_points``), the
    user's own points for a "points" object, none (``0 x 2`` each) for a box without a mask."""
    if obj.mask is not None:
        return draw_points(obj, plane_shape, rng, positive, negative)
    return obj.positive, obj.negative
