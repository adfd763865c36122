"""Image layers held lazily (dask or Zarr data, a multiscale layer, or a numpy array over ``LARGE_BYTES``),
predicted block by block without loading them whole: the core's ``blockwise.predict_blockwise`` on the compute
thread (no dask cluster: one block after another in that thread), into a Zarr store that a Labels layer then
reads lazily.

A multiscale layer is predicted at level 0, its full resolution: the model segments at the pixel size it was
trained on, and the labels line up with the image pixel for pixel (a coarser level would be faster but segmented
at another scale). The store is the one the user chose (``<name>.zarr``, never overwritten) or, with none chosen,
a temporary one in this session's folder under the system's temporary folder, deleted when napari closes. Either
appears under its name only when complete: Stop or an error leaves nothing there.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator

import numpy as np
from napari.layers import Image, Labels

from ..zarr_io import check_outputs
from .jobs import Message, TileProgress
from .layers import METADATA_KEY, class_colormap, instances_name, prediction_name
from .native_libs import isolate_triton

#: A numpy Image layer larger than this (bytes) is predicted block by block too (no copy, bounded memory).
LARGE_BYTES = 1 << 30
#: A block's side in tiles of the model's input size: 4 predicts about 1.4x the tiles of the whole plane
#: (the tiles on block borders twice) and holds a few hundred MB for SAM's 1024 px.
BLOCK_TILES = 4
BATCH_SIZE = 4  # tiles per forward pass, as ``predict_image``
_session = {"folder": None}


def held_lazily(layer: Image) -> bool:
    """True for layers that must not be copied whole: multiscale, data that is not a numpy array (dask, Zarr,
    ...), or a numpy array over ``LARGE_BYTES``."""
    data = layer.data
    return bool(layer.multiscale) or not isinstance(data, np.ndarray) or data.nbytes > LARGE_BYTES


@dataclass
class LazyLayer:
    """What a block-wise job gets instead of a copy: the layer's full-resolution array itself."""

    name: str
    data: Any
    rgb: bool
    levels: int = 1  # of a multiscale layer; level 0 is predicted

    def describe(self) -> str:
        kind = type(self.data).__module__.split(".")[0]
        shape = " x ".join(map(str, self.data.shape))
        level = f", level 0 of {self.levels}: the full resolution" if self.levels > 1 else ""
        return f"{kind} array {shape}{level}"


def lazy_layer(layer: Image) -> LazyLayer:
    data = layer.data[0] if layer.multiscale else layer.data
    return LazyLayer(layer.name, data, bool(layer.rgb), len(layer.data) if layer.multiscale else 1)


@dataclass
class BlockOutputs:
    labels: Path
    instances: Path | None
    temporary: bool


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


def block_outputs(chosen: str, image_name: str, instances: bool) -> BlockOutputs:
    """The stores to write: ``chosen`` (and its ``-instances`` store), checked now; with none chosen, new names in
    :func:`session_folder`.

    Raises:
        ConfigError: one line: not ``*.zarr``, exists, or not writable.
    """
    from ..safety import check_writable

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


def predict_blockwise_job(
    model: Any,
    layer: LazyLayer,
    planes: list[int] | None,
    device: str,
    progress: TileProgress,
    outputs: BlockOutputs,
    stop: threading.Event | None = None,
) -> Generator[Message, None, BlockPredictResult | None]:
    """Predict the layer's array block by block into ``outputs`` (instances too when it names a store); None
    when stopped (nothing is written then). ``progress`` counts blocks."""
    isolate_triton()  # before torch: see native_libs
    from ..array_image import open_array
    from ..block_tiles import BlockPlan, TileGrid
    from ..blockwise import predict_blockwise
    from ..data import ImageLayout, spatial_shape
    from ..tiling import PredictionCancelled
    from ..worker_model import LoadedModel

    stop = stop or threading.Event()
    image, layout = open_array(layer.data, f"'{layer.name}'"), ImageLayout(rgb=layer.rgb)
    shape = spatial_shape(image.reader, layout)
    tile = model.config.input_size
    block_size = BLOCK_TILES * tile
    grid = TileGrid.of(shape[-2], shape[-1], tile, 0.25)
    chosen = planes if planes is not None else range(int(np.prod(shape[:-2], dtype=np.int64)))
    progress(0, len(BlockPlan(grid, block_size, tuple(chosen)).blocks()))
    where = "the whole image" if planes is None else f"plane {planes[0]}"
    yield Message(f"predicting {where} of '{layer.name}' ({layer.describe()}) block by block into "
                  f"{outputs.labels}, without loading it whole")
    try:
        result = predict_blockwise(LoadedModel(model, device), image, outputs.labels, layout,
                                   instances=outputs.instances, batch_size=BATCH_SIZE, block_size=block_size,
                                   progress=lambda done, total, _outcome: progress(done, total), planes=planes,
                                   should_stop=stop.is_set)
    except PredictionCancelled:
        return None
    head = model.config.head
    return BlockPredictResult(layer.name, outputs, planes, tuple(head.class_values), head.class_names,
                              head.background_value, result.pixel_counts, result.blocks, result.seconds,
                              result.instances)


def open_store(path: Path) -> Any:
    """The labels array of a store ``predict_blockwise`` wrote (a bare array, or level ``0`` of an OME-Zarr),
    opened for reading and writing: napari reads what it shows, and painting writes into the store."""
    import zarr

    node = zarr.open(str(path), mode="r+")
    return node if isinstance(node, zarr.Array) else node["0"]


def _replace(viewer, name: str) -> None:
    """Remove the layer ``name``; a temporary store it alone read is deleted with it."""
    if name not in viewer.layers:
        return
    old = viewer.layers[name]
    viewer.layers.remove(old)
    meta = old.metadata.get(METADATA_KEY, {})
    others = [layer.metadata.get(METADATA_KEY, {}).get("store") for layer in viewer.layers]
    if meta.get("temporary") and meta.get("store") not in others:
        shutil.rmtree(meta["store"], ignore_errors=True)


def write_lazy_prediction(viewer, image: Image, result: BlockPredictResult, colours: dict[int, str] | None
                          ) -> tuple[Labels, Labels | None]:
    """Add ``"<image> prediction"`` (and ``"<image> instances"``) read lazily from the stores written, replacing
    layers of those names; the store's path is in the layer's metadata."""
    import pandas as pd

    stores = {prediction_name(image.name): result.outputs.labels}
    if result.outputs.instances is not None:
        stores[instances_name(image.name)] = result.outputs.instances
    layers = []
    for name, store in stores.items():
        _replace(viewer, name)
        layer = viewer.add_labels(open_store(store), name=name, scale=image.scale, translate=image.translate)
        layer.metadata[METADATA_KEY] = {"image": image.name, "planes": result.planes, "store": str(store),
                                        "temporary": result.outputs.temporary}
        layers.append(layer)
    labels = layers[0]
    names = list(result.class_names or [f"class {i}" for i in range(len(result.class_values))])
    labels.colormap = class_colormap(result.class_values, result.background_value, colours)
    labels.features = pd.DataFrame({"index": list(result.class_values), "class": names})
    return labels, layers[1] if len(layers) > 1 else None


def stores_note(result: BlockPredictResult) -> str:
    """Where the prediction is, and for a temporary store how to keep it."""
    paths = " and ".join(str(p) for p in (result.outputs.labels, result.outputs.instances) if p is not None)
    if not result.outputs.temporary:
        return f"read lazily from {paths}"
    return (f"read lazily from the temporary store {paths}, deleted when napari closes: to keep it, choose a Zarr "
            "store under Predict ('large images to') and predict again, or copy that folder now")
