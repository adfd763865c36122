"""Objects from an instance head's maps: a seeded watershed (numpy, scipy, scikit-image).

The foreground is where the foreground probability passes its threshold. Its Euclidean distance transform is the
classical cue for touching round objects (the Otsu + distance-transform watershed baseline); alone it splits
touching objects only where their outline is pinched. Weighted by the head's centre and depth maps, which the head
learns to drop at the seam between touching objects whatever the outline, it becomes the surface used here:
``edt(foreground) x (centre + depth) / 2``, smoothed by a 1 px Gaussian. Each of its local maxima at least
``min_distance`` apart within a connected foreground region seeds one object, grown by a watershed of the surface
inside the foreground. Foreground that no seed reaches becomes an object of its own; objects below ``min_size``
pixels are dropped.

Chosen by measurement (``benchmarks/instances.py``; BENCHMARKS.md, issue 23): on the nuclei image, from one trained
head, seeds where the centre and depth maps pass a threshold reached F1@0.5 0.77 at best; peaks of the depth map
alone 0.78; peaks of this surface 0.82-0.85 over min_distance 2-7 px (one trained model, before the distance
transform was padded and growth made 8-connected; three seeds after: 0.835 +- 0.015).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from ..config.instances import InstanceConfig

#: The Gaussian smoothing of the seed surface, pixels at the model's input scale.
SURFACE_SIGMA = 1.0


def seed_surface(maps: np.ndarray, mask: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``edt(mask) x (centre + depth) / 2``, smoothed (see the module): float64 Y x X, 0 outside ``mask``. The
    distance is to the nearest background pixel or the plane's side (the mask is padded with background: a plane
    all foreground would otherwise have no distance to measure)."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    surface = distance * (maps[1] + maps[2]) / 2
    return np.where(mask, ndimage.gaussian_filter(surface, SURFACE_SIGMA * scale), 0.0)


def instances_from_maps(maps: np.ndarray, config: InstanceConfig | None = None,
                        scale: float = 1.0) -> np.ndarray:
    """Objects of one plane.

    Args:
        maps: 3 x Y x X float (foreground, centre, depth; each in 0..1), an instance head's maps of one plane.
        config: foreground threshold, seed distance and minimum size (default: ``InstanceConfig()``).
        scale: pixels of ``maps`` per pixel of the model's input (a plane predicted with ``rescale`` 2 and resized
            back has ``scale`` 0.5): ``min_distance``, ``min_size`` and the smoothing are given at the model's scale.

    Returns:
        Y x X uint32 object ids 1..N (0 background), numbered in raster order of their first pixel.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != 3:
        raise ValueError(f"expected maps 3 x Y x X (foreground, centre, depth), got shape {maps.shape}")
    config = config or InstanceConfig()
    mask = maps[0] > config.foreground
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.uint32)
    surface = seed_surface(maps, mask, scale)
    regions, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    peaks = peak_local_max(surface, min_distance=max(1, round(config.min_distance * scale)), labels=regions,
                           exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    count = len(peaks)
    grown = watershed(-surface, markers=markers, mask=mask, connectivity=2) if count else \
        np.zeros(mask.shape, np.int32)
    rest, extra = ndimage.label(mask & (grown == 0), structure=np.ones((3, 3)))
    objects = np.where(rest > 0, rest + count, grown).astype(np.int64)
    sizes = np.bincount(objects.ravel(), minlength=count + extra + 1)
    keep = sizes >= config.min_size * scale * scale
    keep[0] = False
    return _raster_order(np.where(keep[objects], objects, 0))


def _raster_order(objects: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..N in the raster order of each object's first pixel (uint32)."""
    flat = objects.ravel()
    present = flat > 0
    if not present.any():
        return np.zeros(objects.shape, dtype=np.uint32)
    ids, first = np.unique(flat[present], return_index=True)
    order = np.argsort(np.flatnonzero(present)[first])
    lookup = np.zeros(int(ids.max()) + 1, dtype=np.uint32)
    lookup[ids[order]] = np.arange(1, len(ids) + 1, dtype=np.uint32)
    return lookup[objects]
