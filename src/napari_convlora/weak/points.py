"""A napari Points layer's data and features -> point prompts, per plane.

Input is what ``layer.data`` (``N x D`` coordinates, the last two row, column) and ``layer.features`` (a
pandas DataFrame, or a dict of columns) hold.

* ``label`` feature: True/False, 1/0 or "positive"/"negative" (also "pos"/"neg", "foreground"/"background");
  without the column every point is positive.
* ``instance`` feature: the points (positive and negative) sharing an instance id **on one plane** form one object;
  the same id on another plane is another object. An instance with no positive point is skipped and reported.
* without ``instance``: one object per positive point; the negative points of its plane are attached to **every**
  object of that plane. A plane with negative points but no positive point is skipped and reported.

Points outside the image (in the plane, or on a plane the image does not have) are dropped and reported. A layer
that is empty or has no positive point inside the image is an error.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .coordinates import edge_xy, image_pixels, inside_leading, inside_plane, whole_leading_indices
from .objects import Plane, WeakLabelError, WeakLabels, WeakObject, group_by_plane

POSITIVE_WORDS = ("positive", "pos", "foreground", "fg", "true", "yes", "1")
NEGATIVE_WORDS = ("negative", "neg", "background", "bg", "false", "no", "0")


def _label_value(value: Any) -> bool | None:
    """True for a positive point, False for a negative one, None when the value means neither."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1):
        return bool(value == 1)
    if isinstance(value, str):
        word = value.strip().lower()
        return True if word in POSITIVE_WORDS else False if word in NEGATIVE_WORDS else None
    return None


def point_labels(column: Sequence[Any] | None, count: int, what: str, name: str = "label") -> np.ndarray:
    """``(N,)`` bool, True for positive points, from a ``label`` feature column (None: all positive)."""
    if column is None:
        return np.ones(count, bool)
    values = np.asarray(column, dtype=object).reshape(-1)
    labels = np.empty(len(values), bool)
    for i, value in enumerate(values):
        label = _label_value(value)
        if label is None:
            raise WeakLabelError(f"{what}: feature {name!r} of point {i} is {value!r}; expected True/False, 1/0 or "
                                 "'positive'/'negative'")
        labels[i] = label
    return labels


def _features(features: pd.DataFrame | Mapping[str, Sequence[Any]] | None, count: int, what: str) -> pd.DataFrame:
    table = pd.DataFrame() if features is None else pd.DataFrame(features)
    if len(table.columns) and len(table) != count:
        raise WeakLabelError(f"{what} has {count} points but its features have {len(table)} rows")
    return table.reset_index(drop=True)


def _instances(column: pd.Series, what: str, name: str) -> np.ndarray:
    values = column.to_numpy(dtype=object)
    missing = np.flatnonzero(pd.isna(column).to_numpy())
    if len(missing):
        raise WeakLabelError(f"{what}: feature {name!r} of point {missing[0]} is empty; give every point an instance")
    return values


def _objects_by_instance(
    planes: list[Plane], xy: np.ndarray, positive: np.ndarray, instances: np.ndarray, what: str, layer: str,
) -> tuple[list[WeakObject], list[str]]:
    groups: dict[tuple[Plane, Any], list[int]] = {}
    for i, (plane, instance) in enumerate(zip(planes, instances)):
        groups.setdefault((plane, instance), []).append(i)
    objects, skipped = [], []
    for (plane, instance), members in groups.items():
        members = np.asarray(members)
        pos, neg = members[positive[members]], members[~positive[members]]
        if len(pos) == 0:
            skipped.append(f"{what}, instance {instance!r} on plane {plane}: {len(neg)} negative point(s) and no "
                           "positive one")
            continue
        objects.append(WeakObject(plane, "points", positive=xy[pos], negative=xy[neg], layer=layer,
                                  source=f"instance {instance!r}"))
    return objects, skipped


def _objects_per_positive_point(
    planes: list[Plane], xy: np.ndarray, positive: np.ndarray, what: str, layer: str, ids: np.ndarray,
) -> tuple[list[WeakObject], list[str]]:
    objects, skipped = [], []
    for plane in dict.fromkeys(planes):
        here = np.asarray([p == plane for p in planes])
        negatives = xy[here & ~positive]
        pos = np.flatnonzero(here & positive)
        if len(pos) == 0:
            skipped.append(f"{what}, plane {plane}: {len(negatives)} negative point(s) and no positive one")
        for i in pos:
            objects.append(WeakObject(plane, "points", positive=xy[i : i + 1], negative=negatives, layer=layer,
                                      source=f"point {ids[i]}"))
    return objects, skipped


def weak_labels_from_points(
    data: np.ndarray,
    features: pd.DataFrame | Mapping[str, Sequence[Any]] | None,
    image_shape: Sequence[int],
    *,
    layer: str = "points",
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    label_column: str = "label",
    instance_column: str = "instance",
) -> WeakLabels:
    """Point prompts (kind "points") from a Points layer's ``N x D`` data and its features (see the module).

    image_shape: the image's shape without channels, ``(..., H, W)``; ``D`` must equal its length.
    layer: the layer's name, for messages. scale, translate: see ``coordinates.py`` (default: identity).
    Objects' points are SAM's ``(x, y)`` on pixel edges (a point on a napari pixel centre lands at ``+0.5``).
    Raises WeakLabelError (one line naming the layer) for an empty layer, a bad ``label`` value, a point between
    planes, or no positive point inside the image.
    """
    what = f"Points layer {layer!r}"
    image_shape = tuple(int(n) for n in image_shape)
    coords = np.asarray(data, np.float64)
    if coords.size == 0:
        raise WeakLabelError(f"{what} is empty: add at least one positive point")
    coords = image_pixels(coords, image_shape, what, scale, translate)
    table = _features(features, len(coords), what)
    positive = point_labels(table[label_column] if label_column in table else None, len(coords), what, label_column)
    if not positive.any():
        raise WeakLabelError(f"{what} has no positive point: set feature {label_column!r} to True (positive) on at "
                             "least one point per object")
    leading_shape, plane_shape = image_shape[:-2], image_shape[-2:]
    lead = whole_leading_indices(coords[:, :-2], what)
    xy = edge_xy(coords[:, -2:])
    keep = inside_leading(lead, leading_shape) & inside_plane(xy, plane_shape)
    skipped = []
    if not keep.all():
        dropped = np.flatnonzero(~keep)
        listed = ", ".join(str(i) for i in dropped[:10]) + (", ..." if len(dropped) > 10 else "")
        skipped.append(f"{what}: {len(dropped)} point(s) outside the image dropped (points {listed})")
    ids = np.flatnonzero(keep)
    planes = [tuple(int(i) for i in row) for row in lead[keep]]
    if instance_column in table:
        instances = _instances(table[instance_column], what, instance_column)[keep]
        objects, more = _objects_by_instance(planes, xy[keep], positive[keep], instances, what, layer)
    else:
        objects, more = _objects_per_positive_point(planes, xy[keep], positive[keep], what, layer, ids)
    skipped += more
    if not objects:
        raise WeakLabelError(f"{what} has no positive point inside the image (shape {image_shape}); "
                             + "; ".join(line.split(": ", 1)[-1] for line in skipped[:2]))
    return WeakLabels(image_shape, group_by_plane(objects), skipped)
