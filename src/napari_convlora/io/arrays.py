"""An image array already open in this process (a napari layer's dask, Zarr or numpy array) read region by region,
for blockwise prediction without a client (``prediction.blockwise.run.predict_blockwise``).

Core module: numpy; dask from the optional ``large`` extra. Nothing is read when the image is made; a block task
reads its region (one dask compute of that slice, on this thread), and the intensity-range pass reads the array
chunk by chunk. Unlike :class:`io.zarr_stores.ArrayReader` the array itself is held, not a path, so it is not sent to
dask workers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .safety import Claim, check_numeric
from .zarr_stores import LazyImage, check_stored_claim, require_large, zarr_claim

#: A stored chunk holding more pixels than this many blocks is warned about (see :func:`chunk_warning`).
CHUNK_WARNING_BLOCKS = 4


@dataclass(frozen=True, eq=False)
class OpenArrayReader:
    """Reads regions of ``array`` (anything with ``shape``, ``dtype`` and numpy-style slicing) as numpy arrays.
    ``path`` names the image in messages."""

    array: Any
    path: str = "the image"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> str:
        return str(np.dtype(self.array.dtype))

    def open(self) -> Any:
        return self.array

    def __getitem__(self, key: Any) -> np.ndarray:
        part = self.array[key]
        compute = getattr(part, "compute", None)  # a dask slice: computed here, on this thread, chunk by chunk
        return np.asarray(compute(scheduler="synchronous") if callable(compute) else part)


class OpenArrayImage(LazyImage):
    """A :class:`io.zarr_stores.LazyImage` over an :class:`OpenArrayReader`: a dask array is used as it is (its own
    chunks), anything else is wrapped chunk by chunk (a Zarr array's stored chunks, else ~16 MiB ones)."""

    def to_dask(self, chunks: int | tuple[int, ...] | str = "auto") -> Any:
        da = require_large("dask.array")
        if isinstance(self.reader.array, da.Array):
            return self.reader.array
        return super().to_dask(chunks)


def open_array(array: Any, name: str = "the image") -> OpenArrayImage:
    """``array`` (2D, a stack, RGB or with channels, as a napari Image layer holds it) as a lazy image; ``name``
    names it in messages. An array read from local Zarr stores (a Zarr array, or a dask array made from them) over
    1 GB or 10^6 chunks is believed only when they hold at least 1/1000 of it (:func:`io.safety.check_claim`).

    Raises:
        ValueError: one line: the ``large`` extra (dask, zarr) missing, values that are not numbers, or a Zarr
            header that claims far more than its store holds.
    """
    require_large("dask.array")
    require_large("zarr", "predictions written into Zarr stores")
    check_numeric(name, array.dtype)
    sources = _zarr_sources(array)
    if sources:
        shape = tuple(int(n) for n in array.shape)
        chunks = zarr_claim(sources[0][0], shape).chunks if len(sources) == 1 else None
        check_stored_claim(name, Claim(shape, array.dtype, chunks), [folder for _, folder in sources])
    return OpenArrayImage(OpenArrayReader(array, name))


def _zarr_sources(array: Any) -> list[tuple[Any, Path]]:
    """The Zarr arrays ``array`` reads, each with its folder: itself, or those a dask array was made from
    (``da.from_zarr``, ``da.from_array``: each held whole in a graph layer named ``original-...``); none when there
    are none, or when one is not in a local folder (what it holds cannot be counted)."""
    zarr = sys.modules.get("zarr")
    if zarr is None:
        return []
    if isinstance(array, zarr.Array):
        sources = [array]
    else:
        layers = getattr(getattr(array, "dask", None), "layers", None) or {}
        sources = [value for name, layer in layers.items() if str(name).startswith("original-") and len(layer) == 1
                   for value in layer.values() if isinstance(value, zarr.Array)]
    roots = [_local_root(source.store) for source in sources]
    if any(root is None for root in roots):
        return []
    return [(source, root / source.path) for root, source in zip(roots, sources)]


def _local_root(store: Any) -> Path | None:
    """The folder of a Zarr store on this machine: a ``LocalStore``, or an ``FsspecStore`` on the local file system
    (what ``da.from_zarr(path)`` opens); else None."""
    if getattr(store, "root", None) is not None:
        return Path(store.root)
    protocol = getattr(getattr(store, "fs", None), "protocol", None)
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol or ())
    return Path(store.path) if "file" in protocols and isinstance(getattr(store, "path", None), str) else None


def chunk_warning(array: Any, block_size: int, name: str = "the image", channel_axis: int | None = None
                  ) -> str | None:
    """One line when ``array``'s chunks (dask or Zarr) hold more than ``CHUNK_WARNING_BLOCKS`` times the pixels of a
    ``block_size`` x ``block_size`` block, else None. A block reads every chunk it touches whole (one dask compute
    or Zarr read), so such chunks are read once per block that touches them: a dask-image ``imread`` stack, one
    chunk per plane, is read whole about (plane / block) times. ``channel_axis`` is not counted as pixels."""
    chunks = getattr(array, "chunks", None)
    if isinstance(array, np.ndarray) or not chunks:
        return None
    sides = [max(c, default=0) if isinstance(c, tuple) else int(c) for c in chunks]  # dask: per-axis tuples
    if channel_axis is not None:
        del sides[channel_axis]
    pixels = int(np.prod(sides, dtype=np.int64))
    if pixels <= CHUNK_WARNING_BLOCKS * block_size**2:
        return None
    return (f"{name} is stored in chunks of {' x '.join(map(str, sides))} pixels, {pixels / block_size**2:.0f} times "
            f"a block of {block_size} x {block_size}: each block reads every chunk it touches whole, so prediction "
            "reads the image many times over; rechunk it (dask: data.rechunk) or save it to Zarr in chunks of about "
            "1024 x 1024 and open that")
