"""Prompts drawn from instance masks, as SAM's training draws them (numpy only).

Coordinates are SAM's: ``(x, y)`` pixels of the model input. Boxes are ``x0, y0, x1, y1``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: SAM's box jitter: each coordinate moves by noise of std 10 % of the box side, at most 20 px.
BOX_NOISE = 0.1
BOX_NOISE_MAX = 20.0


def mask_box(mask: np.ndarray) -> np.ndarray:
    """The tight box ``x0, y0, x1, y1`` (float32, pixel edges) of a non-empty Y x X bool mask."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def noisy_box(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask's box with SAM's jitter, clipped to the image."""
    box = mask_box(mask)
    sides = np.array([box[2] - box[0], box[3] - box[1]] * 2, dtype=np.float32)
    noise = np.clip(rng.normal(0.0, 1.0, 4) * BOX_NOISE * sides, -BOX_NOISE_MAX, BOX_NOISE_MAX)
    height, width = mask.shape
    jittered = box + noise.astype(np.float32)
    jittered[[0, 2]] = np.clip(jittered[[0, 2]], 0, width)
    jittered[[1, 3]] = np.clip(jittered[[1, 3]], 0, height)
    if jittered[2] - jittered[0] < 1 or jittered[3] - jittered[1] < 1:
        return box
    return jittered


def random_points(mask: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` points (x, y) drawn uniformly from a non-empty mask's pixels (pixel centres), float32."""
    ys, xs = np.nonzero(mask)
    picks = rng.integers(0, ys.size, count)
    return np.stack([xs[picks] + 0.5, ys[picks] + 0.5], axis=1).astype(np.float32)


def central_point(mask: np.ndarray) -> np.ndarray:
    """The centre (x, y), float32, of a non-empty mask's pixel farthest from its boundary (of several, the one
    nearest the mask's centroid: the middle of a bar, not its end): the usual single-point prompt. Computed inside
    the mask's box (everything outside it is background)."""
    ys, xs = np.nonzero(mask)
    y0, x0 = ys.min(), xs.min()
    crop = mask[y0 : ys.max() + 1, x0 : xs.max() + 1]
    distance = ndimage.distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]
    deepest = np.argwhere(distance == distance.max())
    centroid = np.array([ys.mean() - y0, xs.mean() - x0])
    y, x = deepest[int(np.argmin(((deepest - centroid) ** 2).sum(axis=1)))]
    return np.array([x0 + x + 0.5, y0 + y + 0.5], dtype=np.float32)


def correction_point(prediction: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A point in the larger error region, as SAM's interactive training adds: in a missed part of the object
    (label 1) or in a false detection (label 0). Returns ((x, y) float32, label); a random object point when the
    prediction is already exact."""
    missed, extra = mask & ~prediction, prediction & ~mask
    region, label = (missed, 1) if missed.sum() >= extra.sum() else (extra, 0)
    if not region.any():
        return random_points(mask, 1, rng)[0], 1
    return random_points(region, 1, rng)[0], label
