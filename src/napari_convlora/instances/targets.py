"""What an instance head learns, made from instance ids (numpy and scipy).

For every object (a connected set of pixels sharing an id) three maps, each in 0..1 (the maps of micro-sam's
instance decoder, with "distance" turned into "closeness" so that every map is high inside an object):

- foreground: 1 on objects, 0 on background;
- centre: ``1 - d_c / max(d_c)``, ``d_c`` the Euclidean distance to the object's centre (its innermost pixel, the
  one farthest from its edge: inside the object even when it is not convex), the maximum taken over the object;
- depth: ``d_e / max(d_e)``, ``d_e`` the distance to the nearest pixel outside the object (background or another
  object: two touching objects are each other's edge), so 1 at the innermost pixel and 1 / max at the edge.

Maps are made per training patch, after it was cut: an object cut by the patch's side has its centre and depth
measured on the part in the patch (as micro-sam's label transform does), so the targets agree with what the model
sees. Unannotated pixels (IGNORE_INDEX) are not in any object and are left out of the loss (``valid``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import label

from ..constants import IGNORE_INDEX


def separate_objects(ids: np.ndarray) -> np.ndarray:
    """Object ids -> one id per object, an object being a connected piece (8-connected) of one id: an id painted on
    two separate blobs (every nucleus painted with label 1, say) is two objects, and touching objects of different
    ids stay apart. ids: Y x X integers (IGNORE_INDEX and 0: no object). Returns Y x X int64, 0 outside objects,
    objects numbered 1..N."""
    ids = np.asarray(ids)
    return label(np.where(ids > 0, ids, 0), background=0, connectivity=2).astype(np.int64, copy=False)


def object_classes(ids: np.ndarray) -> np.ndarray:
    """Instance ids (IGNORE_INDEX not annotated, 0 background, > 0 object) -> class indices (IGNORE_INDEX, 0, 1),
    int64, same shape."""
    ids = np.asarray(ids)
    return np.where(ids > 0, 1, ids).astype(np.int64, copy=False)


def _edges(ids: np.ndarray) -> np.ndarray:
    """Y x X bool: object pixels with a 4-neighbour of another value (background, another object, not annotated)
    or on the image's side."""
    padded = np.pad(ids, 1, mode="constant", constant_values=0)
    centre = padded[1:-1, 1:-1]
    differs = np.zeros(ids.shape, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded[dy : dy + ids.shape[0], dx : dx + ids.shape[1]] != centre
    return differs & (ids > 0)


def object_maps(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The targets of an instance head for one plane.

    Args:
        ids: Y x X integers: IGNORE_INDEX not annotated, 0 background, > 0 an object's id (ids need not be
            consecutive; an id on two separate blobs makes two objects).

    Returns:
        (maps float32 3 x Y x X: foreground, centre, depth as the module says; valid bool Y x X: annotated pixels).
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"expected a Y x X plane of instance ids, got shape {ids.shape}")
    valid = ids != IGNORE_INDEX
    inside = ids > 0
    maps = np.zeros((3, *ids.shape), dtype=np.float32)
    maps[0] = inside
    if not inside.any():
        return maps, valid
    # Touching objects stay separate because each pixel's distance is to the nearest pixel that is not inside its
    # own object (edges are 1 px deep).
    objects = separate_objects(ids)
    n = int(objects.max())
    depth = ndimage.distance_transform_edt(~_edges(objects * inside)) + 1.0
    depth[~inside] = 0.0
    index = np.arange(1, n + 1)
    deepest = np.asarray(ndimage.maximum(depth, objects, index), dtype=np.float64)
    centres = ndimage.maximum_position(depth, objects, index)  # the innermost pixel of each object
    cy = np.zeros(n + 1)
    cx = np.zeros(n + 1)
    cy[1:] = [c[0] for c in centres]
    cx[1:] = [c[1] for c in centres]
    yy, xx = np.indices(ids.shape)
    to_centre = np.hypot(yy - cy[objects], xx - cx[objects])
    to_centre[~inside] = 0.0
    farthest = np.zeros(n + 1)
    farthest[1:] = np.asarray(ndimage.maximum(to_centre, objects, index), dtype=np.float64)
    scale = np.maximum(farthest[objects], 1.0)
    maps[1] = np.where(inside, 1.0 - to_centre / scale, 0.0)
    maps[2] = np.where(inside, depth / np.maximum(np.concatenate([[1.0], deepest])[objects], 1.0), 0.0)
    return maps, valid
