"""Image layers held lazily (dask or Zarr data, a multiscale layer, or a numpy array over ``layers.LARGE_BYTES``),
predicted block by block without loading them whole: the core's ``prediction.blockwise.run.predict_blockwise`` on the compute
thread (no dask cluster: one block after another in that thread), into a Zarr store that a Labels layer then
reads lazily.

A multiscale layer is predicted at level 0, its full resolution: the model segments at the pixel size it was
trained on, and the labels line up with the image pixel for pixel (a coarser level would be faster but segmented
at another scale). The store is the one the user chose (``<name>.zarr``, never overwritten) or, with none chosen,
a temporary one in this session's folder under the system's temporary folder, deleted when napari closes. Either
appears under its name only when complete: Stop or an error leaves nothing there.

Predicting again, a plane or the whole image, adds to the prediction layer of the image as the in-memory path does
(``layers.write_prediction``): when ``"<image> prediction"`` reads a store of the same shape (and no other store is
chosen), the planes predicted go into a fresh temporary store first, then the job copies them into the layer's store
(the planes not predicted, and what was painted on them, stay) and removes the fresh one. A store a user painted in
is never deleted; a temporary one nobody painted in is deleted when its layer is replaced.

The main-thread rule holds with one difference: the job gets the layer's array itself, not a copy (a copy would
be the whole image). dask arrays never change; a Zarr or numpy array changed by someone while it is predicted
gives a prediction of the mixture.
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator

import numpy as np
from napari.components import ViewerModel
from napari.layers import Image, Labels

from ..io.zarr_outputs import check_outputs, clear_interrupted
from .jobs import Message, TileProgress
from .layers import (METADATA_KEY, class_colormap, describe_data, full_resolution, instances_name, prediction_name,
                     spatial_shape)
from .native_libs import isolate_triton

#: A block's side in tiles of the model's input size: 4 predicts about 1.4x the tiles of the whole plane
#: (the tiles on block borders twice) and holds a few hundred MB for SAM's 1024 px.
BLOCK_TILES = 4
BATCH_SIZE = 4  # tiles per forward pass, as ``predict_image``
#: The progress bar's text while blocks are predicted, and during the two whole-image passes of ``blockwise``.
BLOCKS_TEXT = "block %v / %m"
PASS_TEXTS = {"intensity range": "intensity range: chunk %v / %m", "instance ids": "instance ids: block %v / %m"}
_session = {"folder": None}
_chunks_warned: set[tuple[str, int]] = set()  # (layer name, id of its array): the chunk warning is given once


@dataclass
class LazyLayer:
    """What a block-wise job gets instead of a copy: the layer's full-resolution array itself."""

    name: str
    data: Any
    rgb: bool
    levels: int = 1  # of a multiscale layer; level 0 is predicted

    def describe(self) -> str:
        level = f", level 0 of {self.levels}: the full resolution" if self.levels > 1 else ""
        return describe_data(self.data) + level


def lazy_layer(layer: Image) -> LazyLayer:
    return LazyLayer(layer.name, full_resolution(layer), bool(layer.rgb), len(layer.data) if layer.multiscale else 1)


@dataclass
class AddTo:
    """The store of an existing prediction layer of the image that receives the planes predicted."""

    store: Path
    planes: list[int] | None  # the planes it held a prediction of before (None: all)
    temporary: bool


@dataclass
class BlockOutputs:
    """The stores ``predict_blockwise`` writes; ``add_to``: per kind (``"labels"``, ``"instances"``), an existing
    store the predicted planes are then copied into (the fresh stores are temporary then)."""

    labels: Path
    instances: Path | None
    temporary: bool
    add_to: dict[str, AddTo] = field(default_factory=dict)


def session_folder() -> Path:
    """This session's folder for temporary stores (made once, removed when Python exits)."""
    if _session["folder"] is None:
        _session["folder"] = Path(tempfile.mkdtemp(prefix="napari-convlora-"))
        atexit.register(shutil.rmtree, _session["folder"], True)
    return _session["folder"]


def instances_store(labels: Path) -> Path:
    """``cells.zarr`` -> ``cells-instances.zarr`` (``.ome.zarr`` kept)."""
    suffix = ".ome.zarr" if labels.name.lower().endswith(".ome.zarr") else ".zarr"
    return labels.with_name(labels.name[: -len(suffix)] + "-instances" + suffix)


def existing_stores(viewer: ViewerModel, image: Image) -> dict[str, AddTo]:
    """The stores a new prediction of ``image`` adds to: per kind, the store read by ``"<image> prediction"`` (or
    ``"<image> instances"``) when that layer was predicted block by block from ``image`` and has its shape."""
    found = {}
    labels_shape = spatial_shape(image)
    for kind, name in (("labels", prediction_name(image.name)), ("instances", instances_name(image.name))):
        layer = viewer.layers[name] if name in viewer.layers else None
        meta = layer.metadata.get(METADATA_KEY, {}) if isinstance(layer, Labels) else {}
        if (meta.get("store") and meta.get("image") == image.name and Path(meta["store"]).is_dir()
                and tuple(layer.data.shape) == labels_shape):
            found[kind] = AddTo(Path(meta["store"]), meta.get("planes"), bool(meta.get("temporary")))
    return found


def block_outputs(chosen: str, image_name: str, instances: bool, existing: dict[str, AddTo] | None = None
                  ) -> BlockOutputs:
    """The stores to write: ``chosen`` (and its ``-instances`` store), checked now; with none chosen, new names in
    :func:`session_folder`. With ``existing`` labels (:func:`existing_stores`) and no other store chosen, the
    prediction adds to them: fresh temporary stores, copied into ``existing`` by the job.

    Raises:
        ConfigError: one line: not ``*.zarr``, exists, or not writable.
    """
    from ..io.safety import check_writable

    existing = existing or {}
    if "labels" in existing and (not chosen or _same_path(chosen, existing["labels"].store)):
        outputs = block_outputs("", image_name, instances)
        outputs.add_to = {kind: add for kind, add in existing.items() if kind == "labels" or instances}
        return outputs
    if chosen:
        labels = Path(chosen.rstrip("/\\")).expanduser()
        paths = {"the output store": labels, "its instances store": instances_store(labels) if instances else None}
        check_outputs(paths)
        for what, path in paths.items():
            if path is not None:
                check_writable(path, what)
        return BlockOutputs(labels, paths["its instances store"], False)
    stem = re.sub(r"[^\w.-]+", "_", prediction_name(image_name)).strip("._") or "prediction"
    folder, n = session_folder(), 1
    while (folder / f"{stem}-{n}.zarr").exists() or (folder / f"{stem}-{n}-instances.zarr").exists():
        n += 1
    labels = folder / f"{stem}-{n}.zarr"
    return BlockOutputs(labels, instances_store(labels) if instances else None, True)


def _same_path(chosen: str, store: Path) -> bool:
    return Path(chosen.rstrip("/\\")).expanduser().resolve() == store.expanduser().resolve()


@dataclass
class BlockPredictResult:
    image_name: str
    outputs: BlockOutputs
    planes: list[int] | None
    class_values: tuple[int, ...]
    class_names: tuple[str, ...] | None
    background_value: int
    pixel_counts: dict[int, int]
    blocks: int
    seconds: float
    instances: int | None = None
    added: dict[str, AddTo] = field(default_factory=dict)  # the kinds whose planes went into an existing store


def predict_blockwise_job(
    model: Any,
    layer: LazyLayer,
    planes: list[int] | None,
    device: str,
    progress: TileProgress,
    outputs: BlockOutputs,
    stop: threading.Event | None = None,
) -> Generator[Message, None, BlockPredictResult | None]:
    """Predict the layer's array block by block into ``outputs`` (instances too when it names a store), then copy
    the planes predicted into ``outputs.add_to``'s stores; None when stopped (nothing is written then).
    ``progress`` counts blocks, and chunks and blocks in the whole-image passes (its text says which)."""
    isolate_triton()  # before torch: see native_libs
    from ..io.arrays import chunk_warning, open_array
    from ..prediction.blockwise.tiles import BlockPlan, TileGrid
    from ..prediction.blockwise.run import predict_blockwise
    from ..data import ImageLayout, spatial_shape
    from ..prediction.tiling import PredictionCancelled
    from ..prediction.blockwise.worker_model import LoadedModel

    stop = stop or threading.Event()
    image, layout = open_array(layer.data, f"'{layer.name}'"), ImageLayout(rgb=layer.rgb)
    shape = spatial_shape(image.reader, layout)
    tile = model.config.input_size
    block_size = BLOCK_TILES * tile
    grid = TileGrid.of(shape[-2], shape[-1], tile, 0.25)
    chosen = planes if planes is not None else range(int(np.prod(shape[:-2], dtype=np.int64)))
    progress(0, len(BlockPlan(grid, block_size, tuple(chosen)).blocks()), BLOCKS_TEXT)
    warning = chunk_warning(layer.data, block_size, f"'{layer.name}'", len(layer.data.shape) - 1 if layer.rgb else None)
    if warning and (layer.name, id(layer.data)) not in _chunks_warned:
        _chunks_warned.add((layer.name, id(layer.data)))
        yield Message(warning)
    where = "the whole image" if planes is None else f"plane {planes[0]}"
    into = outputs.add_to.get("labels")
    cleared = clear_interrupted({"labels": outputs.labels, "instances": outputs.instances})
    if cleared:
        yield Message(cleared)
    yield Message(f"predicting {where} of '{layer.name}' ({layer.describe()}) block by block into "
                  f"{outputs.labels}" + (f", then into {into.store}" if into else "") + ", without loading it whole")
    try:
        result = predict_blockwise(LoadedModel(model, device), image, outputs.labels, layout,
                                   instances=outputs.instances, batch_size=BATCH_SIZE, block_size=block_size,
                                   progress=lambda done, total, _outcome: progress(done, total, BLOCKS_TEXT),
                                   planes=planes, should_stop=stop.is_set,
                                   pass_progress=lambda name, done, total: progress(done, total, PASS_TEXTS[name]))
    except PredictionCancelled:
        return None
    progress(result.blocks, result.blocks, BLOCKS_TEXT)
    added = {}
    for kind, fresh in (("labels", outputs.labels), ("instances", outputs.instances)):
        target = outputs.add_to.get(kind)
        if fresh is not None and target is not None:
            yield Message(f"copying {where} into {target.store}")
            if copy_planes(fresh, target.store, planes):  # not stoppable: a store half copied would mix two models
                shutil.rmtree(fresh, ignore_errors=True)
                added[kind] = target
    head = model.config.head
    return BlockPredictResult(layer.name, outputs, planes, tuple(head.class_values), head.class_names,
                              head.background_value, result.pixel_counts, result.blocks, result.seconds,
                              result.instances, added)


def open_store(path: Path) -> Any:
    """The labels array of a store ``predict_blockwise`` wrote (a bare array, or level ``0`` of an OME-Zarr),
    opened for reading and writing: napari reads what it shows, and painting writes into the store."""
    import zarr

    node = zarr.open(str(path), mode="r+")
    return node if isinstance(node, zarr.Array) else node["0"]


def copy_planes(source: Path, target: Path, planes: list[int] | None) -> bool:
    """Copy ``planes`` (leading axes flattened in C order; None: all) of the store ``source`` into the store
    ``target``, a region of a few chunks at a time; False (nothing copied) when their shapes differ or ``target``'s
    dtype cannot hold ``source``'s values."""
    src, dst = open_store(source), open_store(target)
    if src.shape != dst.shape or not np.can_cast(src.dtype, dst.dtype):
        return False
    lead, (height, width) = src.shape[:-2], src.shape[-2:]
    rows, cols = (2 * int(c) for c in src.chunks[-2:])
    for plane in range(int(np.prod(lead, dtype=np.int64))) if planes is None else planes:
        index = tuple(int(i) for i in np.unravel_index(plane, lead)) if lead else ()
        for top in range(0, height, rows):
            for left in range(0, width, cols):
                key = index + (slice(top, top + rows), slice(left, left + cols))
                dst[key] = src[key]
    return True


def _mark_painted(event: Any) -> None:
    """A prediction layer was painted on (napari's ``paint`` event: a brush, fill, undo or ``data_setitem``)."""
    event.source.metadata.setdefault(METADATA_KEY, {})["painted"] = True


def _replace(viewer: ViewerModel, name: str) -> str | None:
    """Remove the layer ``name``; a temporary store it alone read is deleted with it unless it was painted on.
    Returns a note naming a painted store kept, else None."""
    if name not in viewer.layers:
        return None
    old = viewer.layers[name]
    viewer.layers.remove(old)
    meta = old.metadata.get(METADATA_KEY, {})
    others = [layer.metadata.get(METADATA_KEY, {}).get("store") for layer in viewer.layers]
    if not meta.get("temporary") or meta.get("store") in others:
        return None
    if meta.get("painted"):
        return (f"the painted store {meta['store']} of the replaced '{name}' is kept until napari closes: open it "
                "with napari to keep what was painted")
    shutil.rmtree(meta["store"], ignore_errors=True)
    return None


@dataclass
class LazyLayers:
    """What :func:`write_lazy_prediction` added or updated, and notes for the log."""

    labels: Labels
    instances: Labels | None
    notes: list[str]


def _merged(before: list[int] | None, planes: list[int] | None) -> list[int] | None:
    return None if before is None or planes is None else sorted(set(before) | set(planes))


def write_lazy_prediction(viewer: ViewerModel, image: Image, result: BlockPredictResult,
                          colours: dict[int, str] | None) -> LazyLayers:
    """Add ``"<image> prediction"`` (and ``"<image> instances"``) read lazily from the stores written, replacing
    layers of those names; or, for a store the prediction was added to (``result.added``), keep the layer that
    reads it and record the planes it now holds. The store's path, the planes predicted and whether the user
    painted on it are in the layer's metadata."""
    import pandas as pd

    fresh = {"labels": result.outputs.labels, "instances": result.outputs.instances}
    names = {"labels": prediction_name(image.name), "instances": instances_name(image.name)}
    layers, notes = [], []
    for kind, store in fresh.items():
        if store is None:
            continue
        name, added = names[kind], result.added.get(kind)
        meta = {"image": image.name, "planes": result.planes, "store": str(store),
                "temporary": result.outputs.temporary}
        if added is not None:
            meta.update(planes=_merged(added.planes, result.planes), store=str(added.store), temporary=added.temporary)
        layer = viewer.layers[name] if name in viewer.layers else None
        if layer is not None and layer.metadata.get(METADATA_KEY, {}).get("store") == meta["store"]:
            layer.refresh()  # the same store, with the planes predicted copied in
        else:
            note = _replace(viewer, name)
            notes += [note] if note else []
            layer = viewer.add_labels(open_store(Path(meta["store"])), name=name, scale=image.scale,
                                      translate=image.translate)
            layer.events.paint.connect(_mark_painted)
        layer.metadata[METADATA_KEY] = {**layer.metadata.get(METADATA_KEY, {}), **meta}
        layers.append(layer)
    labels = layers[0]
    class_names = list(result.class_names or [f"class {i}" for i in range(len(result.class_values))])
    labels.colormap = class_colormap(result.class_values, result.background_value, colours)
    labels.features = pd.DataFrame({"index": list(result.class_values), "class": class_names})
    return LazyLayers(labels, layers[1] if len(layers) > 1 else None, notes)


def stores_note(layer: Labels) -> str:
    """Where a prediction layer's store is, and for a temporary store how to keep it."""
    meta = layer.metadata.get(METADATA_KEY, {})
    if not meta.get("temporary"):
        return f"read lazily from {meta.get('store')}"
    return (f"read lazily from the temporary store {meta.get('store')}, deleted when napari closes: to keep it, "
            "choose a Zarr store under Predict ('large images to') and predict again, or copy that folder now")
