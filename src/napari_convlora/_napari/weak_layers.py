"""Weak-label layers in, prompted instances out, on the main thread: Shapes, Points and coarse Labels layers read
as weak labels (``weak``), the prompt layers of interactive prompting, and the instances and class layers written
back. No torch, no Qt: jobs get the copies made here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
from napari.layers import Image, Labels, Points, Shapes

from ..weak import (
    WeakLabelError,
    WeakLabels,
    combine_weak_labels,
    weak_labels_from_coarse_labels,
    weak_labels_from_points,
    weak_labels_from_shapes,
)
from ..weak.classes import class_features, class_labels_from_instances
from ..weak.coordinates import edge_xy, image_pixels, inside_leading, inside_plane, whole_leading_indices
from ..weak.points import point_labels
from .layers import METADATA_KEY, LayerCopy, class_colormap, copy_image, instances_name, spatial_shape

#: The layers interactive prompting adds (or uses): a click in the first, a rectangle drawn in the second.
PROMPT_POINTS, PROMPT_BOXES = "prompt points", "prompt boxes"
POSITIVE_COLOUR, NEGATIVE_COLOUR = "#00e676", "#ff1744"


def unadapted_name(image_name: str) -> str:
    return f"{instances_name(image_name)} (unadapted)"


def classes_name(image_name: str) -> str:
    return f"{image_name} classes"


@dataclass
class WeakInput:
    """One image's weak labels read from its layers, with the image copied for a job and each weak layer's
    features (for the class of each object)."""

    image: LayerCopy | None
    weak: WeakLabels
    features: dict[str, pd.DataFrame] = field(default_factory=dict)


def _to_image_pixels(layer, image: Image) -> tuple[np.ndarray | None, np.ndarray | None]:
    """scale and translate from the layer's data coordinates to the image's pixels (None: the same); None too
    when the dimensions differ (the reader then says so)."""
    if layer.ndim != image.ndim:
        return None, None
    pixel = np.asarray(image.scale, float)
    scale = np.asarray(layer.scale, float) / pixel
    translate = (np.asarray(layer.translate, float) - np.asarray(image.translate, float)) / pixel
    same = np.allclose(scale, 1) and np.allclose(translate, 0)
    return (None, None) if same else (scale, translate)


def read_weak_layer(layer, image: Image, coarse_masks: bool = False) -> WeakLabels:
    """A Shapes layer's rectangles, polygons and ellipses, a Points layer's points (``label``, ``instance``
    features) or a Labels layer's ids (coarse masks), as weak labels of ``image``; WeakLabelError when unusable."""
    shape = spatial_shape(image)
    scale, translate = _to_image_pixels(layer, image)
    if isinstance(layer, Shapes):
        return weak_labels_from_shapes(list(layer.data), list(layer.shape_type), shape, layer=layer.name,
                                       coarse_masks=coarse_masks, scale=scale, translate=translate)
    if isinstance(layer, Points):
        return weak_labels_from_points(np.asarray(layer.data), layer.features, shape, layer=layer.name, scale=scale,
                                       translate=translate)
    if isinstance(layer, Labels):
        return weak_labels_from_coarse_labels(np.asarray(layer.data), shape, layer=layer.name)
    raise WeakLabelError(f"layer {layer.name!r} is a {type(layer).__name__} layer; weak labels are Shapes, Points or "
                         "Labels layers")


def read_weak_input(image: Image, layers: Sequence, coarse_masks: bool = False,
                    evaluation: Labels | None = None, copy: bool = True) -> WeakInput:
    """The weak labels of ``image`` from ``layers`` (and dense evaluation labels, never used by the loss), with
    copies for a job (the image's only with ``copy``). Raises WeakLabelError (one line naming the layer) when they
    cannot be used."""
    if not layers:
        raise WeakLabelError(f"choose at least one weak-label layer (Shapes, Points or Labels) for {image.name!r}")
    weak = combine_weak_labels([read_weak_layer(layer, image, coarse_masks) for layer in layers])
    if evaluation is not None:
        weak = weak.with_evaluation_labels(np.asarray(evaluation.data), evaluation.name)
    features = {layer.name: pd.DataFrame(layer.features).copy() for layer in layers}
    return WeakInput(copy_image(image) if copy else None, weak, features)


def plane_tuple(image: Image, flat: int | None) -> tuple[int, ...]:
    """A flat plane index (``layers.current_plane``) as the leading indices ``weak`` uses (``()`` in 2-D)."""
    lead = spatial_shape(image)[:-2]
    return () if flat is None or not lead else tuple(int(i) for i in np.unravel_index(flat, lead))


# ---- writing instances -------------------------------------------------------------------------------------
def _classes(layer: Labels) -> dict[int, str | None]:
    return dict(layer.metadata.get(METADATA_KEY, {}).get("classes", {}))


def write_prompted_instances(viewer, image: Image, labels: np.ndarray, classes: dict[int, str | None],
                             planes: Sequence[int] | None, name: str, added: Sequence[int] = ()) -> Labels:
    """Add or update the instances Labels layer ``name`` (ids 1..n of ``labels``, int32). With ``planes`` (flat
    indices), an existing layer keeps its other planes and the new objects take ids after the ids kept; on the
    planes ``added`` (objects carried through a stack) it keeps what it holds but the objects of the replaced planes,
    and the new objects fill the pixels no object holds; without ``planes``, its data are replaced. The layer's metadata keeps each id's class
    (None: no class)."""
    layer = viewer.layers[name] if name in viewer.layers else None
    fits = isinstance(layer, Labels) and layer.data.shape == labels.shape
    if fits and planes is None:
        layer.data = labels.astype(np.int32)
    elif fits:
        data = np.asarray(layer.data).astype(np.int32, copy=True)
        flat, new = data.reshape(-1, *data.shape[-2:]), labels.reshape(-1, *labels.shape[-2:])
        replaced = np.unique(np.concatenate([flat[plane].ravel() for plane in planes])) if planes else []
        replaced = [int(i) for i in replaced if i > 0]
        for plane in planes:
            flat[plane] = 0
        for plane in added:  # an object replaced on its own plane goes on the planes it was carried to, too
            flat[plane][np.isin(flat[plane], replaced)] = 0
        offset = int(data.max(initial=0))
        present = set(np.unique(data).tolist())
        kept = {i: c for i, c in _classes(layer).items() if i in present}
        classes = kept | {i + offset: c for i, c in classes.items()}
        for plane in planes:
            flat[plane] = np.where(new[plane] > 0, new[plane] + offset, 0)
        for plane in added:
            flat[plane] = np.where((new[plane] > 0) & (flat[plane] == 0), new[plane] + offset, flat[plane])
        layer.data = data
    else:
        if layer is not None:
            viewer.layers.remove(layer)
        layer = viewer.add_labels(labels.astype(np.int32), name=name, scale=image.scale, translate=image.translate)
    layer.metadata[METADATA_KEY] = {"image": image.name, "classes": {int(i): c for i, c in classes.items()}}
    layer.refresh()
    return layer


def add_instance(viewer, image: Image, plane: int, mask: np.ndarray, object_id: int | None = None) -> int:
    """Paint a 2-D bool ``mask`` on flat plane ``plane`` of ``"<image> instances"`` as a new object, or as object
    ``object_id`` again (its old pixels cleared); one undo step (Ctrl+Z). Returns the object's id."""
    name = instances_name(image.name)
    shape = spatial_shape(image)
    layer = viewer.layers[name] if name in viewer.layers else None
    if not isinstance(layer, Labels) or layer.data.shape != shape:
        if layer is not None:
            viewer.layers.remove(layer)
        layer = viewer.add_labels(np.zeros(shape, np.int32), name=name, scale=image.scale, translate=image.translate)
        layer.metadata[METADATA_KEY] = {"image": image.name, "classes": {}}
    data = np.asarray(layer.data)
    oid = object_id if object_id is not None else int(data.max(initial=0)) + 1
    if oid > np.iinfo(data.dtype).max:
        layer.data = data = data.astype(np.int32)
    current = data.reshape(-1, *shape[-2:])[plane]
    change = mask | (current == object_id) if object_id is not None else mask
    rows, cols = np.nonzero(change)
    lead = np.unravel_index(plane, shape[:-2]) if len(shape) > 2 else ()
    coords = tuple(np.full(rows.size, i) for i in lead) + (rows, cols)
    layer.data_setitem(coords, np.where(mask[rows, cols], oid, 0).astype(data.dtype))
    layer.metadata.setdefault(METADATA_KEY, {"image": image.name}).setdefault("classes", {})[oid] = None
    return oid


def write_class_labels(viewer, image: Image, instances: Labels) -> tuple[Labels, tuple[str, ...], int]:
    """``"<image> classes"`` from an instances layer: each instance's class value (its class from the weak layers'
    ``class`` feature, else one class "object"), 0 background, the class names as features (``index``, ``class``:
    what Training data reads). Returns (layer, class names with background first, instances converted)."""
    data = np.asarray(instances.data)
    count = int(np.count_nonzero(np.unique(data)))
    labels, names = class_labels_from_instances(data, _classes(instances))
    name = classes_name(image.name)
    if name in viewer.layers:
        viewer.layers.remove(name)
    layer = viewer.add_labels(labels, name=name, scale=image.scale, translate=image.translate)
    layer.features = class_features(names)
    layer.colormap = class_colormap(list(range(len(names))), 0)
    return layer, names, count


# ---- interactive prompting ---------------------------------------------------------------------------------
def _prompt_layer(viewer, name: str, kind: type, image: Image, **kwargs):
    if name in viewer.layers:
        layer = viewer.layers[name]
        if not isinstance(layer, kind) or layer.ndim != image.ndim:
            raise WeakLabelError(f"layer {name!r} is not a {kind.__name__} layer with the {image.ndim} dimensions of "
                                 f"{image.name!r}: rename or remove it")
        return layer
    add = viewer.add_points if kind is Points else viewer.add_shapes
    return add(name=name, ndim=image.ndim, scale=image.scale, translate=image.translate, **kwargs)


def prompt_layers(viewer, image: Image) -> tuple[Points, Shapes]:
    """The Points layer ``"prompt points"`` (feature ``label``: True positive, False negative) and the Shapes
    layer ``"prompt boxes"``, added over ``image`` when missing; the points layer is left in add mode."""
    points = _prompt_layer(viewer, PROMPT_POINTS, Points, image, features=pd.DataFrame(
        {"label": pd.Series([], dtype=bool)}), feature_defaults={"label": True}, face_color=POSITIVE_COLOUR, size=6)
    boxes = _prompt_layer(viewer, PROMPT_BOXES, Shapes, image, edge_color="#ffd600", face_color="transparent",
                          edge_width=1)
    if "label" not in points.features.columns:
        points.features = points.features.assign(label=True)
        points.feature_defaults = {**points.feature_defaults, "label": True}
    return points, boxes


def set_negative_points(points: Points, negative: bool) -> None:
    """Points added from now on are negative (red) or positive (green)."""
    points.selected_data = set()  # the current colour would recolour the selected points
    points.feature_defaults = {**points.feature_defaults, "label": not negative}
    points.current_face_color = NEGATIVE_COLOUR if negative else POSITIVE_COLOUR


def added_indices(layer, event) -> list[int]:
    """The rows of ``layer.data`` a data event with action "added" names (napari gives -1 for the last)."""
    if str(getattr(event, "action", "")) != "added":
        return []
    count = len(layer.data)
    indices = [int(i) for i in (getattr(event, "data_indices", ()) or ())]
    return sorted({i % count for i in indices if -count <= i < count})


def point_prompt(points: Points, index: int, image: Image) -> tuple[int, np.ndarray, bool]:
    """Point ``index`` of ``points`` as (flat plane index, ``(x, y)`` on pixel edges, positive); WeakLabelError
    when it lies outside the image or between planes."""
    shape = spatial_shape(image)
    what = f"the point in {points.name!r}"
    scale, translate = _to_image_pixels(points, image)
    coords = image_pixels(np.asarray(points.data)[index : index + 1], shape, what, scale, translate)
    lead = whole_leading_indices(coords[:, :-2], what)
    xy = edge_xy(coords[:, -2:])
    if not (inside_leading(lead, shape[:-2])[0] and inside_plane(xy, shape[-2:])[0]):
        where = ", ".join(f"{v:.0f}" for v in coords[0])
        raise WeakLabelError(f"{what} at ({where}) is outside {image.name!r} (shape {shape}): click on the image")
    column = points.features["label"].iloc[index : index + 1] if "label" in points.features.columns else None
    positive = bool(point_labels(column, 1, what)[0])
    plane = int(np.ravel_multi_index(tuple(lead[0]), shape[:-2])) if len(shape) > 2 else 0
    return plane, xy[0].astype(np.float32), positive


def box_prompt(boxes: Shapes, index: int, image: Image) -> tuple[int, np.ndarray]:
    """Shape ``index`` of ``boxes`` as (flat plane index, box ``x0, y0, x1, y1`` clipped to the plane);
    WeakLabelError when it lies outside the image, on another plane, or encloses nothing."""
    scale, translate = _to_image_pixels(boxes, image)
    try:
        weak = weak_labels_from_shapes([np.asarray(boxes.data[index])], [boxes.shape_type[index]], spatial_shape(image),
                                       layer=boxes.name, scale=scale, translate=translate)
    except WeakLabelError as e:  # read alone, the shape is "shape 0": name it by its row
        raise WeakLabelError(str(e).replace("shape 0", f"shape {index}")) from None
    obj = next(iter(weak))
    return weak.flat_plane_index(obj.plane), obj.box
