"""Where the model is unsure, and where labelling would help most (issue 25). Pure numpy and scipy.

:func:`uncertainty_map`: per pixel, the entropy of the class probabilities divided by its largest value, log K:
0 where one class holds all the probability, 1 where all K classes are equally likely. (The margin between the two
most likely classes orders pixels almost alike; entropy also counts a third class that is not quite ruled out.)

:func:`suggest_regions`: the centres of a few square windows of highest mean uncertainty, spread out (no two
closer than a window's side), leaving out pixels the user has already labelled. ilastik's users know the loop:
label where the classifier hesitates, not where it is already right.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Uncertainty as one byte a pixel (``planes.predict_image``): 0 sure, this value all classes equally likely.
UNCERTAINTY_SCALE = 255
#: Windows suggested at once, and their side in pixels (about a brush stroke's reach at 1:1 zoom).
SUGGESTIONS = 5
SUGGESTION_WINDOW = 32


def uncertainty_map(probabilities: np.ndarray) -> np.ndarray:
    """probabilities: K x (spatial shape), each pixel summing to 1 over K >= 2 classes -> (spatial shape) float32
    in [0, 1], the normalised entropy."""
    if probabilities.ndim < 2 or probabilities.shape[0] < 2:
        raise ValueError(f"expected K >= 2 class probabilities first, got shape {probabilities.shape}")
    p = np.clip(probabilities.astype(np.float32, copy=False), 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(axis=0)
    return np.clip(entropy / np.float32(np.log(probabilities.shape[0])), 0.0, 1.0).astype(np.float32)


def suggest_regions(uncertainty: np.ndarray, labelled: np.ndarray | None = None, count: int = SUGGESTIONS,
                    window: int = SUGGESTION_WINDOW, min_uncertainty: float = 0.05) -> np.ndarray:
    """Where to label next on one plane.

    Args:
        uncertainty: Y x X float in [0, 1] (:func:`uncertainty_map`), or uint8 in 0..``UNCERTAINTY_SCALE``.
        labelled: Y x X bool, pixels already labelled (left out), or None.
        count: at most this many regions.
        window: the side of the square over which uncertainty is averaged; centres are at least this far apart.
        min_uncertainty: a window's mean uncertainty must exceed this (a model sure everywhere gets no suggestion).

    Returns:
        N x 2 float (row, column) centres, most uncertain first, N <= count.
    """
    if uncertainty.ndim != 2:
        raise ValueError(f"expected one Y x X plane of uncertainty, got shape {uncertainty.shape}")
    if labelled is not None and labelled.shape != uncertainty.shape:
        raise ValueError(f"labelled pixels have shape {labelled.shape}, the uncertainty {uncertainty.shape}")
    if uncertainty.dtype == np.uint8:
        uncertainty = uncertainty / np.float32(UNCERTAINTY_SCALE)
    open_ = np.ones(uncertainty.shape, bool) if labelled is None else ~labelled.astype(bool)
    score = np.where(open_, uncertainty, 0.0).astype(np.float64)
    side = max(1, min(window, *uncertainty.shape))
    mean = ndimage.uniform_filter(score, size=side, mode="constant")
    # A centre must itself be open, so that the user paints where the marker is.
    mean = np.where(open_, mean, -1.0)
    chosen: list[tuple[int, int]] = []
    while len(chosen) < count:
        y, x = np.unravel_index(int(np.argmax(mean)), mean.shape)
        if mean[y, x] <= min_uncertainty:
            break
        chosen.append((int(y), int(x)))
        mean[max(y - side + 1, 0):y + side, max(x - side + 1, 0):x + side] = -1.0  # no other centre this close
    return np.array(chosen, dtype=float).reshape(-1, 2)
