"""An image array already open in this process (a napari layer's dask, Zarr or numpy array) read region by region,
for blockwise prediction without a client (``prediction.blockwise.run.predict_blockwise``).

Core module: numpy; dask from the optional ``large`` extra. Nothing is read when the image is made; a block task
reads its region (one dask compute of that slice, on this thread), and the intensity-range pass reads the array
chunk by chunk. Unlike :class:`io.zarr_stores.ArrayReader` the array itself is held, not a path, so it is not sent to
dask workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .zarr_stores import LazyImage, require_large

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
    names it in messages. Raises ValueError in one line when the ``large`` extra (dask, zarr) is missing."""
    require_large("dask.array")
    require_large("zarr", "predictions written into Zarr stores")
    return OpenArrayImage(OpenArrayReader(array, name))


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
