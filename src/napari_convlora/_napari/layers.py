"""Layer data in and out, on the main thread: copies for the jobs, predictions written back as Labels.

Nothing here imports torch or Qt. Jobs never see a layer: they get the copies made here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap

#: One colour per class after background (transparent); repeats past 10 classes.
CLASS_COLOURS = (
    "#e6194b", "#3cb44b", "#4363d8", "#ffe119", "#f58231",
    "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
)
METADATA_KEY = "napari_convlora"


@dataclass
class LayerCopy:
    """An Image layer's data (and its Labels layer's data, for training), copied for a worker thread."""

    name: str
    image: np.ndarray
    rgb: bool
    labels: np.ndarray | None = None


def _array(layer) -> np.ndarray:
    data = layer.data[0] if layer.multiscale else layer.data
    return np.array(data, copy=True)


def copy_image(layer: Image) -> LayerCopy:
    """Copy an Image layer's full-resolution data (call on the main thread, before a job starts)."""
    return LayerCopy(layer.name, _array(layer), bool(layer.rgb))


def copy_pair(image: Image, labels: Labels) -> LayerCopy:
    """Copy an annotated image: the Image layer and the Labels layer painted on it."""
    pair = copy_image(image)
    pair.labels = _array(labels)
    return pair


def spatial_shape(layer: Image) -> tuple[int, ...]:
    """The image's shape without the colour axis of an RGB(A) layer."""
    shape = tuple(layer.data[0].shape if layer.multiscale else layer.data.shape)
    return shape[:-1] if layer.rgb else shape


def current_plane(viewer, layer: Image) -> int | None:
    """Index of the 2D plane shown now, counting the planes of the leading axes in C order
    (the order in which the core numbers them); None for a 2D image."""
    shape = spatial_shape(layer)
    lead = shape[:-2]
    if not lead:
        return None
    coords = np.asarray(layer.world_to_data(viewer.dims.point))[: len(lead)]
    index = tuple(int(np.clip(round(float(c)), 0, n - 1)) for c, n in zip(coords, lead))
    return int(np.ravel_multi_index(index, lead))


def class_colormap(values: Sequence[int], background: int) -> DirectLabelColormap:
    colours: dict[int | None, str] = {None: "transparent", background: "transparent"}
    others = [v for v in values if v != background]
    for i, value in enumerate(others):
        colours[int(value)] = CLASS_COLOURS[i % len(CLASS_COLOURS)]
    return DirectLabelColormap(color_dict=colours)


def prediction_name(image_name: str) -> str:
    return f"{image_name} prediction"


def _plane_view(array: np.ndarray, plane: int) -> np.ndarray:
    """The 2D plane ``plane`` of an array whose leading axes are flattened in C order (a view)."""
    return array.reshape(-1, *array.shape[-2:])[plane]


def write_prediction(
    viewer,
    image: Image,
    labels: np.ndarray,
    class_values: Sequence[int],
    class_names: Sequence[str] | None,
    background_value: int = 0,
    planes: Sequence[int] | None = None,
) -> Labels:
    """Add or update the Labels layer ``"<image> prediction"``: one colour per class, the class names
    as features (napari shows them under the cursor). With ``planes``, only those planes of an existing
    layer are replaced; the layer remembers which planes hold a prediction."""
    name = prediction_name(image.name)
    names = list(class_names) if class_names else [f"class {i}" for i in range(len(class_values))]
    features = pd.DataFrame({"index": list(class_values), "class": names})
    layer = viewer.layers[name] if name in viewer.layers else None
    fits = isinstance(layer, Labels) and layer.data.shape == labels.shape
    if fits and planes is not None:
        data = np.asarray(layer.data)
        if data.dtype != labels.dtype:
            data = data.astype(np.promote_types(data.dtype, labels.dtype))
        for plane in planes:
            _plane_view(data, plane)[...] = _plane_view(labels, plane)
        labels = data
    if planes is None:
        done = None
    elif fits:
        before = _predicted_planes(layer)  # None: the whole stack was predicted before
        done = None if before is None else sorted(set(before) | set(planes))
    else:
        done = sorted(set(planes))
    if fits:
        layer.data = labels
    else:
        if layer is not None:
            viewer.layers.remove(layer)
        layer = viewer.add_labels(labels, name=name, scale=image.scale, translate=image.translate)
    layer.colormap = class_colormap(class_values, background_value)
    layer.features = features
    layer.metadata[METADATA_KEY] = {"image": image.name, "planes": done}
    layer.refresh()
    return layer


def _predicted_planes(layer: Labels) -> list[int] | None:
    return layer.metadata.get(METADATA_KEY, {}).get("planes")


def copy_prediction(prediction: Labels, target: Labels) -> int:
    """Copy the predicted planes into ``target`` (for correcting them by hand); undoable with Ctrl+Z.
    Returns the number of pixels changed."""
    if prediction.data.shape != target.data.shape:
        raise ValueError(
            f"'{prediction.name}' has shape {prediction.data.shape} but '{target.name}' has shape "
            f"{target.data.shape}; copy into the Labels layer painted on the same image"
        )
    source = np.asarray(prediction.data)
    planes = _predicted_planes(prediction)
    if source.ndim == 2 or planes is None:
        coords = np.nonzero(np.asarray(target.data) != source)
    else:
        lead, parts = source.shape[:-2], []
        for plane in planes:
            ys, xs = np.nonzero(_plane_view(np.asarray(target.data), plane) != _plane_view(source, plane))
            index = np.unravel_index(plane, lead)
            parts.append(tuple(np.full(ys.size, i) for i in index) + (ys, xs))
        coords = tuple(np.concatenate(axis) for axis in zip(*parts)) if parts else ()
    if not coords or coords[0].size == 0:
        return 0
    target.data_setitem(coords, source[coords].astype(np.asarray(target.data).dtype))
    return int(coords[0].size)


def find_labels_for(viewer, image_name: str, pairs: Sequence[tuple[str, str]]) -> Labels | None:
    """The training Labels layer paired with ``image_name`` in the dock's pairs, if any."""
    for image, labels in pairs:
        if image == image_name and labels in viewer.layers:
            return viewer.layers[labels]
    return None
