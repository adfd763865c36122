"""A napari Shapes layer's data -> box prompts (and optional coarse masks), per plane.

Input is what ``layer.data`` and ``layer.shape_type`` hold: a list of ``V x D`` vertex arrays in data
coordinates (``D`` = the image's axes without channels; the last two are row, column) and one shape type each.

* rectangle -> a box (the axis-aligned bounds of its corners, so a rotated rectangle gives its bounding box);
* polygon -> its box, and with ``coarse_masks`` its inside rasterised with ``skimage.draw.polygon``;
* ellipse (napari stores the 4 corners of its bounding rectangle, possibly rotated) -> the box of the ellipse
  itself, and with ``coarse_masks`` its inside;
* path, line -> refused (they enclose nothing).

A shape's leading coordinates name its plane. Shapes partly outside the plane are clipped; shapes wholly outside
it, or on a plane the image does not have, are skipped and reported; a layer left with no shape is an error.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage.draw import polygon as fill_polygon

from .coordinates import CENTRE_TO_EDGE, box_pixels, clip_box, edge_xy, image_pixels, shape_plane
from .objects import WeakLabelError, WeakLabels, WeakObject, group_by_plane

#: Shape types that enclose an area and so give a prompt.
PROMPT_SHAPES = ("rectangle", "polygon", "ellipse")
#: Vertices at least on an ellipse's outline when it is rasterised, and at most.
ELLIPSE_VERTICES = (32, 4096)


def _ellipse(xy: np.ndarray, item: str) -> tuple[np.ndarray, np.ndarray]:
    """An ellipse's box ``x0, y0, x1, y1`` and its outline ``K x 2`` (x, y), from the 4 corners of its bounding
    rectangle in order around it (napari's ellipse data)."""
    if len(xy) != 4:
        raise WeakLabelError(f"{item} is an ellipse with {len(xy)} vertices; expected the 4 corners of its "
                             "bounding rectangle, as napari stores them")
    centre = xy.mean(axis=0)
    half_a, half_b = (xy[1] - xy[0]) / 2, (xy[3] - xy[0]) / 2
    extent = np.sqrt(half_a**2 + half_b**2)  # half-widths of the ellipse's axis-aligned box, per x / y
    box = np.concatenate([centre - extent, centre + extent])
    perimeter = 2 * np.pi * max(np.linalg.norm(half_a), np.linalg.norm(half_b))
    count = int(np.clip(np.ceil(2 * perimeter), *ELLIPSE_VERTICES))
    angles = np.linspace(0, 2 * np.pi, count, endpoint=False)[:, None]
    outline = centre + np.cos(angles) * half_a + np.sin(angles) * half_b
    return box, outline


def _outline_and_box(xy: np.ndarray, shape_type: str, item: str) -> tuple[np.ndarray | None, np.ndarray]:
    """The outline to rasterise (None for a rectangle) and the unclipped box, in SAM's (x, y)."""
    if shape_type == "ellipse":
        box, outline = _ellipse(xy, item)
        return outline, box
    least = 2 if shape_type == "rectangle" else 3
    if len(xy) < least:
        raise WeakLabelError(f"{item} is a {shape_type} with {len(xy)} vertices; expected at least {least}")
    box = np.concatenate([xy.min(axis=0), xy.max(axis=0)])
    return (None if shape_type == "rectangle" else xy), box


def _crop_mask(outline: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The pixels whose centres lie inside ``outline`` (x, y), over the pixels of the clipped ``box``:
    a bool ``h x w`` crop and its top-left ``(row, col)``."""
    row0, col0, row1, col1 = box_pixels(box)
    rows = outline[:, 1] - CENTRE_TO_EDGE - row0
    cols = outline[:, 0] - CENTRE_TO_EDGE - col0
    mask = np.zeros((row1 - row0, col1 - col0), bool)
    mask[fill_polygon(rows, cols, shape=mask.shape)] = True
    return mask, (row0, col0)


def _shape_types(shape_types: Sequence[str] | str, count: int, what: str) -> list[str]:
    types = [shape_types] * count if isinstance(shape_types, str) else [str(t) for t in shape_types]
    if len(types) != count:
        raise WeakLabelError(f"{what} has {count} shapes but {len(types)} shape types")
    return [t.strip().lower() for t in types]


def weak_labels_from_shapes(
    data: Sequence[np.ndarray],
    shape_types: Sequence[str] | str,
    image_shape: Sequence[int],
    *,
    layer: str = "shapes",
    coarse_masks: bool = False,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
) -> WeakLabels:
    """Box prompts (kind "box"), or with ``coarse_masks`` coarse masks for polygons and ellipses (kind
    "coarse"), from a Shapes layer's ``data`` (list of ``V x D`` vertex arrays) and ``shape_type``.

    image_shape: the image's shape without channels, ``(..., H, W)``; ``D`` must equal its length.
    layer: the layer's name, for messages. scale, translate: see ``coordinates.py`` (default: identity).
    A polygon or ellipse that covers no pixel centre gives a box only (noted in ``skipped``).
    Raises WeakLabelError (one line naming the layer and the shape) for an empty layer, a path or line, a shape
    between planes or across planes, or when every shape lies outside the image.
    """
    what = f"Shapes layer {layer!r}"
    shapes = list(data)
    if not shapes:
        raise WeakLabelError(f"{what} is empty: draw at least one rectangle, polygon or ellipse")
    types = _shape_types(shape_types, len(shapes), what)
    image_shape = tuple(int(n) for n in image_shape)
    leading_shape, plane_shape = image_shape[:-2], image_shape[-2:]
    objects: list[WeakObject] = []
    skipped: list[str] = []
    for index, (vertices, shape_type) in enumerate(zip(shapes, types)):
        item = f"{what}, shape {index}"
        if shape_type not in PROMPT_SHAPES:
            raise WeakLabelError(f"{item} is a {shape_type}, which encloses nothing: use rectangles, polygons or "
                                 "ellipses as prompts (or Points for points)")
        coords = image_pixels(vertices, image_shape, item, scale, translate)
        plane = shape_plane(coords[:, :-2], leading_shape, item)
        if plane is None:
            lead = tuple(int(round(v)) for v in coords[0, :-2])
            skipped.append(f"{item}: on plane {lead}, which the image (planes {leading_shape}) does not have")
            continue
        outline, box = _outline_and_box(edge_xy(coords[:, -2:]), shape_type, item)
        if box[2] <= box[0] or box[3] <= box[1]:
            skipped.append(f"{item}: the {shape_type} has no area")
            continue
        clipped = clip_box(box, plane_shape)
        if clipped is None:
            x0, y0, x1, y1 = (round(float(v), 1) for v in box)
            skipped.append(f"{item}: wholly outside the image (box x {x0}..{x1}, y {y0}..{y1}; "
                           f"the plane is {plane_shape[1]} x {plane_shape[0]} pixels)")
            continue
        mask, origin = None, (0, 0)
        if coarse_masks and outline is not None:
            mask, origin = _crop_mask(outline, clipped)
            if not mask.any():
                skipped.append(f"{item}: the {shape_type} covers no pixel centre, so it gives a box only")
                mask = None
        kind = "box" if mask is None else "coarse"
        objects.append(WeakObject(plane, kind, clipped, mask=mask, mask_origin=origin, layer=layer,
                                  source=f"shape {index}"))
    if not objects:
        raise WeakLabelError(f"{what}: no shape lies on the image ({skipped[0]}"
                             + (f"; and {len(skipped) - 1} more" if len(skipped) > 1 else "") + ")")
    return WeakLabels(image_shape, group_by_plane(objects), skipped)
