"""Layer data in and out, on the main thread: copies for the jobs, predictions written back as Labels.

Nothing here imports torch or Qt. Jobs never see a layer: they get the copies made here.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap

from ..config.choices import LABEL_MODES, UNPAINTED_PLANES
from ..data.labels import SPARSE_MODES

#: One colour per class after background (transparent); repeats past 10 classes.
CLASS_COLOURS = (
    "#e6194b", "#3cb44b", "#4363d8", "#ffe119", "#f58231",
    "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
)
METADATA_KEY = "napari_convlora"
#: Layers larger than this (bytes, at full resolution) are never copied or read whole on the main thread: the dock
#: predicts them block by block (``block_predict``) and refuses the actions that read a layer whole.
LARGE_BYTES = 1 << 30


@dataclass
class LayerCopy:
    """An Image layer's data (and its Labels layer's data, for training), copied for a worker thread."""

    name: str
    image: np.ndarray
    rgb: bool
    labels: np.ndarray | None = None
    class_names: dict[int, str] | None = None  # from the Labels layer's features, where it names its values
    labels_name: str | None = None


def full_resolution(layer: Any) -> Any:
    """A layer's full-resolution array: level 0 of a multiscale layer, else its data (numpy, dask, Zarr, ...)."""
    return layer.data[0] if layer.multiscale else layer.data


def data_bytes(data: Any) -> int:
    """Bytes of ``data`` once read (its shape and dtype; nothing is read)."""
    return int(np.prod(data.shape, dtype=np.int64)) * np.dtype(data.dtype).itemsize


def describe_data(data: Any) -> str:
    """``"dask array 2 x 40000 x 40000"``: the array's library and shape, for messages."""
    return f"{type(data).__module__.split('.')[0]} array {' x '.join(map(str, data.shape))}"


def held_lazily(layer: Any) -> bool:
    """True for layers that must not be copied whole: multiscale, data that is not a numpy array (dask, Zarr,
    ...), or a numpy array over ``LARGE_BYTES``."""
    data = layer.data
    return bool(layer.multiscale) or not isinstance(data, np.ndarray) or data.nbytes > LARGE_BYTES


def check_readable_whole(layer: Any) -> None:
    """Refuse (ValueError, one line naming the layer) to read a lazily held layer (dask, Zarr, multiscale) whole
    when its full resolution is over ``LARGE_BYTES``; a smaller one is read whole (computed here). A numpy layer is
    in memory already and is copied whatever its size, as before."""
    data = full_resolution(layer)
    size = data_bytes(data)
    if size > LARGE_BYTES and not isinstance(data, np.ndarray):
        raise ValueError(f"layer '{layer.name}' ({describe_data(data)}, {size / 2**30:.1f} GiB) is too large to "
                         f"read whole, as training, evaluation and prompts do (up to {LARGE_BYTES / 2**30:.1f} GiB): "
                         "crop a region into a new layer first (Predict works on the whole layer, block by block)")


def _array(layer: Any) -> np.ndarray:
    check_readable_whole(layer)
    return np.array(full_resolution(layer), copy=True)


def copy_image(layer: Image) -> LayerCopy:
    """Copy an Image layer's full-resolution data (call on the main thread, before a job starts).

    Raises:
        ValueError: one line, when the layer is over ``LARGE_BYTES`` (:func:`check_readable_whole`).
    """
    return LayerCopy(layer.name, _array(layer), bool(layer.rgb))


def copy_plane(layer: Image, plane: int | None, side: int | None = None) -> LayerCopy:
    """Copy one plane of an Image layer (``plane``: leading axes flattened in C order, as :func:`current_plane`;
    None for a 2D image), or only its centre crop of at most ``side`` pixels a side: ``Y x X`` (``x 3/4`` for
    RGB). Only that region is read, so a dask or Zarr layer of any size is fine."""
    data = full_resolution(layer)
    lead = spatial_shape(layer)[:-2]
    index = tuple(int(i) for i in np.unravel_index(plane, lead)) if lead and plane is not None else (0,) * len(lead)
    height, width = spatial_shape(layer)[-2:]
    rows, cols = slice(None), slice(None)
    if side is not None:
        top, left = max(0, (height - side) // 2), max(0, (width - side) // 2)
        rows, cols = slice(top, top + side), slice(left, left + side)
    return LayerCopy(layer.name, np.array(data[index + (rows, cols)], copy=True), bool(layer.rgb))


def copy_pair(image: Image, labels: Labels) -> LayerCopy:
    """Copy an annotated image: the Image layer and the Labels layer painted on it (and its class names).

    Raises:
        ValueError: one line, when either layer is over ``LARGE_BYTES`` (:func:`check_readable_whole`).
    """
    pair = copy_image(image)
    pair.labels = _array(labels)
    pair.class_names = feature_class_names(labels)
    pair.labels_name = labels.name
    return pair


#: Columns of a Labels layer's features that may name its values (first found wins).
NAME_COLUMNS = ("class", "class_name", "name", "label_name")


def feature_class_names(labels: Labels) -> dict[int, str] | None:
    """``{label value: name}`` from the layer's features (napari's table of per-value properties): the value
    in an ``index`` column (else the row number) and the name in a ``class``/``name`` column; None without."""
    features = getattr(labels, "features", None)
    if features is None or len(features) == 0:
        return None
    column = next((c for c in NAME_COLUMNS if c in features.columns), None)
    if column is None:
        return None
    values = features["index"] if "index" in features.columns else pd.Series(range(len(features)))
    try:
        return {int(v): str(n) for v, n in zip(values, features[column]) if str(n).strip()}
    except (TypeError, ValueError):
        return None


def spatial_shape(layer: Image) -> tuple[int, ...]:
    """The image's shape without the colour axis of an RGB(A) layer."""
    shape = tuple(full_resolution(layer).shape)
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


def class_colours(values: Sequence[int], background: int, given: dict[int, str] | None = None) -> dict[int, str]:
    """A colour (hex) for each class value other than ``background``: ``given`` ones first, then the palette."""
    others = [int(v) for v in values if v != background]
    return {value: (given or {}).get(value) or CLASS_COLOURS[i % len(CLASS_COLOURS)] for i, value in enumerate(others)}


def class_colormap(values: Sequence[int], background: int, given: dict[int, str] | None = None) -> DirectLabelColormap:
    colours: dict[int | None, str] = {None: "transparent", background: "transparent"}
    colours.update(class_colours(values, background, given))
    return DirectLabelColormap(color_dict=colours)


def prediction_name(image_name: str) -> str:
    return f"{image_name} prediction"


def _plane_view(array: np.ndarray, plane: int) -> np.ndarray:
    """The 2D plane ``plane`` of an array whose leading axes are flattened in C order (a view)."""
    return array.reshape(-1, *array.shape[-2:])[plane]


@contextmanager
def selection_kept(viewer) -> Iterator[None]:
    """Leave the viewer's selected layers as they were (adding a layer selects it)."""
    selected, active = set(viewer.layers.selection), viewer.layers.selection.active
    try:
        yield
    finally:
        viewer.layers.selection.clear()
        viewer.layers.selection.update({layer for layer in selected if layer in viewer.layers})
        if active is not None and active in viewer.layers:
            viewer.layers.selection.active = active


def write_prediction(
    viewer,
    image: Image,
    labels: np.ndarray,
    class_values: Sequence[int],
    class_names: Sequence[str] | None,
    background_value: int = 0,
    planes: Sequence[int] | None = None,
    colours: dict[int, str] | None = None,
) -> Labels:
    """Add or update the Labels layer ``"<image> prediction"``: one colour per class (``colours`` where given,
    e.g. those of the training labels), the class names as features (napari shows them under the cursor).
    With ``planes``, only those planes of an existing layer are replaced; the layer remembers which planes
    hold a prediction."""
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
        with selection_kept(viewer):  # the user's brush stays on the layer they were painting
            if layer is not None:
                viewer.layers.remove(layer)
            layer = viewer.add_labels(labels, name=name, scale=image.scale, translate=image.translate)
    layer.colormap = class_colormap(class_values, background_value, colours)
    layer.features = features
    layer.metadata[METADATA_KEY] = {"image": image.name, "planes": done}
    layer.refresh()
    return layer


def instances_name(image_name: str) -> str:
    return f"{image_name} instances"


def write_instances(viewer, image: Image, instances: np.ndarray, planes: Sequence[int] | None = None) -> Labels:
    """Add or update the Labels layer ``"<image> instances"`` (objects numbered plane by plane in stacks).
    With ``planes``, only those planes of an existing layer of the same shape are replaced."""
    name = instances_name(image.name)
    layer = viewer.layers[name] if name in viewer.layers else None
    if isinstance(layer, Labels) and layer.data.shape == instances.shape:
        data = np.asarray(layer.data)
        if planes is not None:
            data = data.astype(np.promote_types(data.dtype, instances.dtype), copy=False)
            for plane in planes:
                _plane_view(data, plane)[...] = _plane_view(instances, plane)
            layer.data = data
        else:
            layer.data = instances
        layer.refresh()
        return layer
    with selection_kept(viewer):
        if layer is not None:
            viewer.layers.remove(layer)
        return viewer.add_labels(instances, name=name, scale=image.scale, translate=image.translate)


def _predicted_planes(layer: Labels) -> list[int] | None:
    return layer.metadata.get(METADATA_KEY, {}).get("planes")


#: What "Copy to training labels" may change: only pixels nobody painted, or every predicted pixel.
COPY_MODES = ("unpainted", "all")


def _painted(plane: np.ndarray, label_mode: str, empty_plane_unpainted: bool) -> np.ndarray:
    """Which pixels of one ``Y x X`` plane of training labels are painted, as training reads them: in the sparse
    modes the non-zero ones (0 is "not annotated"); in dense and instances modes every pixel (0 is background),
    except in a plane where nothing is painted when training skips such planes (``empty_plane_unpainted``)."""
    if label_mode in SPARSE_MODES:
        return plane != 0
    return np.full(plane.shape, not (empty_plane_unpainted and not plane.any()))


def _plane_changes(prediction: Labels, target: Labels, mode: str, label_mode: str, unpainted_planes: str
                   ) -> Iterator[tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]]:
    """For each predicted plane (all of a 2D layer, or of a stack predicted whole): its leading indices, the
    coordinates ``(ys, xs)`` of the target pixels a copy in ``mode`` would change, their new values, and which of
    them are painted (see :func:`_painted`). Only those planes are read, one at a time (a Zarr-backed prediction
    is never read whole).

    Raises:
        ValueError: one line: shapes differ, an unknown copy or label mode, or a layer held lazily whose predicted
            planes are over ``LARGE_BYTES``.
    """
    shape = tuple(prediction.data.shape)
    if shape != tuple(target.data.shape):
        raise ValueError(
            f"the prediction '{prediction.name}' has shape {shape} but the Labels layer '{target.name}' has shape "
            f"{tuple(target.data.shape)}; copy into the Labels layer painted on the same image"
        )
    if mode not in COPY_MODES:
        raise ValueError(f"copy mode must be one of {COPY_MODES}, got {mode!r}")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label mode must be one of {LABEL_MODES}, got {label_mode!r}")
    if unpainted_planes not in UNPAINTED_PLANES:
        raise ValueError(f"unpainted planes must be one of {UNPAINTED_PLANES}, got {unpainted_planes!r}")
    lead = shape[:-2]
    planes = _predicted_planes(prediction) if lead else None
    chosen = range(int(np.prod(lead, dtype=np.int64))) if planes is None else planes
    for layer in (prediction, target):
        size = len(chosen) * int(np.prod(shape[-2:], dtype=np.int64)) * np.dtype(layer.data.dtype).itemsize
        if not isinstance(layer.data, np.ndarray) and size > LARGE_BYTES:
            raise ValueError(f"'{layer.name}' is held lazily ({describe_data(layer.data)}): Copy to training labels "
                             f"reads its predicted planes, {size / 2**30:.1f} GiB here, over the "
                             f"{LARGE_BYTES / 2**30:.1f} GiB it reads at once; predict and copy the plane shown "
                             "(whole stack off), or crop a region into a new layer")
    # as training reads a stack: an empty plane is not annotated when such planes are skipped
    empty_plane_unpainted = unpainted_planes == "skip" and int(np.prod(lead, dtype=np.int64)) > 1
    for plane in chosen:
        index = tuple(int(i) for i in np.unravel_index(plane, lead)) if lead else ()
        source, current = np.asarray(prediction.data[index]), np.asarray(target.data[index])
        changed = current != source
        painted = _painted(current, label_mode, empty_plane_unpainted)
        if mode == "unpainted":
            changed &= ~painted
        ys, xs = np.nonzero(changed)
        yield index, (ys, xs), source[ys, xs], painted[ys, xs]


def painted_pixels_to_replace(prediction: Labels, target: Labels, *, label_mode: str,
                              unpainted_planes: str = "skip") -> int:
    """How many painted pixels of ``target`` (as ``label_mode`` and ``unpainted_planes`` say, see
    :class:`~napari_convlora.config.TrainRecipe`) a copy of every predicted pixel would change."""
    return sum(int(np.count_nonzero(painted))
               for *_, painted in _plane_changes(prediction, target, "all", label_mode, unpainted_planes))


@dataclass(frozen=True)
class CopyPlan:
    """What "Copy to training labels" is about to do: ``mode`` (one of ``COPY_MODES``) to pass to
    :func:`copy_prediction`, and ``painted``, the painted pixels it would replace: when > 0 the user is asked first
    (and nothing is copied unless they agree)."""

    mode: str
    painted: int
    label_mode: str


def plan_copy(prediction: Labels, target: Labels, mode: str, label_mode: str,
              unpainted_planes: str = "skip") -> CopyPlan:
    """Decide a copy of ``prediction`` into the training labels ``target``, read in ``label_mode``.

    In the sparse modes 0 means "not annotated": ``"unpainted"`` fills those pixels and replaces nothing painted;
    ``"all"`` replaces painted pixels too. In dense and instances modes 0 is painted background, so every pixel is
    painted (but those of a stack's empty planes that training skips): in either mode the copy makes the predicted
    planes equal to the prediction, and every painted pixel it changes is counted, to be asked for.

    Raises:
        ValueError: as :func:`copy_prediction`.
    """
    if label_mode not in SPARSE_MODES:
        mode = "all"  # "unpainted" would fill nothing painted, i.e. nothing but a stack's empty planes
    painted = painted_pixels_to_replace(prediction, target, label_mode=label_mode,
                                        unpainted_planes=unpainted_planes) if mode == "all" else 0
    return CopyPlan(mode, painted, label_mode)


def copy_prediction(prediction: Labels, target: Labels, mode: str = "unpainted", *, label_mode: str,
                    unpainted_planes: str = "skip") -> int:
    """Copy the predicted planes into ``target`` (for correcting them by hand); undoable with Ctrl+Z.

    mode: ``"unpainted"`` fills only the pixels of ``target`` nobody painted (what was painted stays; in dense and
        instances modes every pixel is painted, see :func:`plan_copy`); ``"all"`` makes the predicted planes equal
        to the prediction. Ask before ``"all"`` replaces painted pixels (:func:`plan_copy` counts them).
    label_mode, unpainted_planes: how the training reads ``target`` (:class:`~napari_convlora.config.TrainRecipe`).
    Returns the number of pixels changed.
    """
    coords: list[tuple[np.ndarray, ...]] = []
    values = []
    for index, (ys, xs), after, _ in _plane_changes(prediction, target, mode, label_mode, unpainted_planes):
        coords.append(tuple(np.full(ys.size, i) for i in index) + (ys, xs))
        values.append(after)
    count = sum(v.size for v in values)
    if count == 0:
        return 0
    where = tuple(np.concatenate(axis) for axis in zip(*coords))
    target.data_setitem(where, np.concatenate(values).astype(target.data.dtype))
    return count


def training_colours(labels: Labels | None, class_values: Sequence[int], background: int) -> dict[int, str] | None:
    """The colours a training Labels layer shows its class values in (hex), to colour predictions alike."""
    if labels is None:
        return None
    colours = {}
    for value in class_values:
        if value == background:
            continue
        rgba = np.asarray(labels.colormap.map(np.array([value])))[0]
        colours[int(value)] = "#" + "".join(f"{int(round(c * 255)):02x}" for c in rgba[:3])
    return colours


def find_labels_for(viewer, image_name: str, pairs: Sequence[tuple[str, str]]) -> Labels | None:
    """The training Labels layer paired with ``image_name`` in the dock's pairs, if any."""
    for image, labels in pairs:
        if image == image_name and labels in viewer.layers:
            return viewer.layers[labels]
    return None
