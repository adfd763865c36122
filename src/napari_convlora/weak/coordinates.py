"""napari layer coordinates -> (plane, SAM's pixel-edge ``x, y``).

Assumption: a Shapes or Points layer's data coordinates are the image's pixel coordinates (the layers share
scale and translate, which is what napari gives layers drawn over an image). Otherwise pass the transform from
the layer's data coordinates to the image's: ``pixel = data * scale + translate`` per axis, i.e.
``scale = layer.scale / image.scale`` and ``translate = (layer.translate - image.translate) / image.scale``.

napari places pixel centres on integer coordinates; SAM's coordinates (``objects.py``) place pixel edges on
integers. So ``x = column + 0.5`` and ``y = row + 0.5``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .objects import Plane, WeakLabelError

#: napari (pixel centres on integers) -> SAM's pixel-edge coordinates.
CENTRE_TO_EDGE = 0.5
#: How far a leading coordinate may be from a whole number and still name a plane (float32 rounding).
PLANE_TOLERANCE = 1e-3


def image_pixels(
    data: np.ndarray,
    image_shape: Sequence[int],
    what: str,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
) -> np.ndarray:
    """``N x D`` layer data coordinates -> ``N x D`` float64 image pixel coordinates (napari's convention).

    ``D`` must equal the image's number of axes without its channel axis; ``what`` names the layer in messages.
    """
    ndim = len(image_shape)
    coords = np.asarray(data, np.float64)
    if coords.ndim != 2 or coords.shape[1] != ndim:
        got = coords.shape[1] if coords.ndim == 2 else f"shape {coords.shape} of"
        raise WeakLabelError(f"{what} has {got} coordinate axes but the image has {ndim} (shape "
                             f"{tuple(image_shape)}); draw the prompts on a layer with the image's dimensions")
    for name, values in (("scale", scale), ("translate", translate)):
        if values is not None and len(values) != ndim:
            raise WeakLabelError(f"{what}: {name} has {len(values)} values; expected {ndim}, one per axis")
    if scale is not None:
        coords = coords * np.asarray(scale, np.float64)
    if translate is not None:
        coords = coords + np.asarray(translate, np.float64)
    if not np.all(np.isfinite(coords)):
        raise WeakLabelError(f"{what} has coordinates that are not finite numbers")
    return coords


def whole_leading_indices(lead: np.ndarray, what: str) -> np.ndarray:
    """``N x L`` leading coordinates -> ``N x L`` int64 plane indices; raises when one is not a whole number
    (a prompt drawn between planes, or in a 3-D view)."""
    rounded = np.round(lead)
    bad = np.argwhere(np.abs(lead - rounded) > PLANE_TOLERANCE)
    if len(bad):
        row, axis = bad[0]
        raise WeakLabelError(f"{what}: coordinate {lead[row, axis]:g} on axis {axis} is not a whole plane index; "
                             "draw prompts on the image's planes in the 2-D view")
    return rounded.astype(np.int64)


def inside_leading(indices: np.ndarray, leading_shape: Sequence[int]) -> np.ndarray:
    """``(N,)`` bool: whether each row of ``N x L`` plane indices names a plane of the image."""
    bounds = np.asarray(leading_shape, np.int64).reshape(1, -1)
    return np.all((indices >= 0) & (indices < bounds), axis=1)


def shape_plane(
    lead: np.ndarray, leading_shape: Sequence[int], what: str
) -> Plane | None:
    """The plane of a shape's ``V x L`` leading vertex coordinates; None when it lies outside the image's
    leading range. Raises when they are not whole numbers or differ between vertices."""
    indices = whole_leading_indices(lead, what)
    if len(indices) and np.any(indices != indices[:1]):
        axis = int(np.argwhere(np.any(indices != indices[:1], axis=0))[0, 0])
        raise WeakLabelError(f"{what} spans planes {indices[:, axis].min()} to {indices[:, axis].max()} of axis "
                             f"{axis}; draw each shape on one plane in the 2-D view")
    plane = tuple(int(i) for i in indices[0]) if len(indices) else ()
    return plane if inside_leading(np.asarray([plane], np.int64).reshape(1, -1), leading_shape)[0] else None


def edge_xy(rows_cols: np.ndarray) -> np.ndarray:
    """``N x 2`` napari ``(row, col)`` -> ``N x 2`` float64 SAM ``(x, y)`` on pixel edges."""
    rows_cols = np.asarray(rows_cols, np.float64).reshape(-1, 2)
    return rows_cols[:, ::-1] + CENTRE_TO_EDGE


def inside_plane(xy: np.ndarray, plane_shape: Sequence[int]) -> np.ndarray:
    """``(N,)`` bool: whether each ``(x, y)`` (pixel edges) lies on a pixel of an ``H x W`` plane."""
    height, width = plane_shape
    x, y = xy[:, 0], xy[:, 1]
    return (x >= 0) & (x < width) & (y >= 0) & (y < height)


def clip_box(box: np.ndarray, plane_shape: Sequence[int]) -> np.ndarray | None:
    """``x0, y0, x1, y1`` clipped to ``0..W, 0..H`` (float32), or None when nothing of it is left."""
    height, width = plane_shape
    x0, y0, x1, y1 = (float(v) for v in box)
    clipped = np.array([max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)], np.float32)
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None
    return clipped


def box_pixels(box: np.ndarray) -> tuple[int, int, int, int]:
    """The pixels a clipped box touches: ``row0, col0, row1, col1`` (ends exclusive)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return int(np.floor(y0)), int(np.floor(x0)), int(np.ceil(y1)), int(np.ceil(x1))
