"""The classical instance baselines of ``instances.py`` (issue 23): Otsu's threshold, then connected components or
a watershed of the distance transform. numpy, scipy and scikit-image only; nothing trains, and no parameter is fitted
to an image (``min_size`` and ``min_distance`` are chosen once per family from its typical object size).

- :func:`otsu_foreground`: the image (grey, Y x X, objects brighter than the background, as in fluorescence) smoothed
  by a Gaussian of :data:`SMOOTHING_SIGMA` px, thresholded at Otsu's value of the smoothed image (foreground:
  above it), holes filled, 8-connected pieces under ``min_size`` pixels removed.
- :func:`otsu_components`: that foreground's 8-connected components, one object each (touching objects merge).
- :func:`otsu_watershed`: the same foreground; its Euclidean distance transform, smoothed by a Gaussian of
  :data:`DISTANCE_SIGMA` px (so that a flat ridge gives one peak, not many); the local maxima of the smoothed
  distance at least ``min_distance`` px apart within each component (``skimage.feature.peak_local_max`` with the
  components as ``labels``, borders included) as markers, one per peak; ``skimage.segmentation.watershed`` of the
  negated smoothed distance from those markers inside the foreground. A component without a peak keeps its own id.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

SMOOTHING_SIGMA = 1.0  # px, before Otsu's threshold
DISTANCE_SIGMA = 1.0  # px, on the distance transform before its peaks are found
EIGHT_CONNECTED = np.ones((3, 3), bool)


def _check_grey(image: np.ndarray) -> None:
    if image.ndim != 2:
        raise ValueError(f"the classical baselines take one grey Y x X image, got shape {image.shape}")


def otsu_foreground(image: np.ndarray, min_size: int) -> np.ndarray:
    """Y x X bool: the bright objects of a grey Y x X image (any real dtype); see the module docstring."""
    _check_grey(image)
    smoothed = ndimage.gaussian_filter(image.astype(np.float64), SMOOTHING_SIGMA)
    if smoothed.max() == smoothed.min():  # a flat image has no objects
        return np.zeros(image.shape, bool)
    foreground = ndimage.binary_fill_holes(smoothed > threshold_otsu(smoothed))
    parts, _ = ndimage.label(foreground, EIGHT_CONNECTED)
    sizes = np.bincount(parts.ravel())
    return (sizes >= min_size)[parts] & foreground


def otsu_components(image: np.ndarray, min_size: int) -> np.ndarray:
    """Y x X int32 instance ids 1..n (0 background): the 8-connected components of :func:`otsu_foreground`."""
    return ndimage.label(otsu_foreground(image, min_size), EIGHT_CONNECTED)[0].astype(np.int32)


def otsu_watershed(image: np.ndarray, min_size: int, min_distance: int) -> np.ndarray:
    """Y x X int32 instance ids 1..n (0 background): :func:`otsu_foreground` split by a watershed of its distance
    transform, one object per distance peak (peaks at least ``min_distance`` px apart); see the module docstring."""
    foreground = otsu_foreground(image, min_size)
    components, count = ndimage.label(foreground, EIGHT_CONNECTED)
    if count == 0:
        return components.astype(np.int32)
    distance = ndimage.gaussian_filter(ndimage.distance_transform_edt(foreground), DISTANCE_SIGMA)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(image.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    without_peak = np.setdiff1d(np.arange(1, count + 1), components[tuple(peaks.T)])
    for index, component in enumerate(without_peak, start=len(peaks) + 1):
        markers[components == component] = index
    instances = watershed(-distance, markers, mask=foreground)
    return _consecutive(instances)


def _consecutive(instances: np.ndarray) -> np.ndarray:
    """The same objects numbered 1..n in the order of their ids (int32)."""
    ids, inverse = np.unique(instances, return_inverse=True)
    numbered = inverse.reshape(instances.shape).astype(np.int32)
    return numbered if ids[0] == 0 else numbered + 1
