"""The intensity range of a lazy image for block-wise prediction: the same strided sample and percentiles as
``data.intensity_range`` on the image in memory, read on dask in slabs of whole chunks (stoppable, with progress).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ...config import InputSpec
from ...data import ImageLayout
from ...data.images import _channel_axis, _sample_step, _used_channels
from ...io.zarr_stores import LazyImage, require_large
from .cluster import compute


#: Without a client, the intensity-range pass reads about this many bytes (whole chunks) between two checks of
#: ``should_stop``.
RANGE_STEP_BYTES = 64 << 20


def intensity_ranges(image: LazyImage, layout: ImageLayout, spec: InputSpec, client: Any | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> tuple[tuple[float, float], ...]:
    """Each used channel's (low, high), as ``data.intensity_range`` computes it on the whole image in memory
    (the same strided sample, the same min..max fallback), computed on dask chunk by chunk.

    Without a client the image is read in slabs of whole chunks of about ``RANGE_STEP_BYTES``: ``should_stop`` is
    polled before each (``prediction.tiling.PredictionCancelled`` when it returns True) and ``progress(chunks read, chunks)``
    follows each. The slabs' strided samples together are the whole image's, so the ranges are the same.

    Raises:
        ValueError: NaN or infinite values in a float image (naming the file).
    """
    da = require_large("dask.array")
    lazy = image.to_dask()
    axis = _channel_axis(lazy.shape, layout)
    channels_last = lazy[..., None] if axis is None else da.moveaxis(lazy, axis, -1)
    used = _used_channels(channels_last.shape[-1], layout, spec, axis)
    if lazy.dtype == bool:
        return ((0.0, 1.0),) * len(used)
    step = _sample_step(channels_last.shape[:-1])
    regions = _range_regions(channels_last, RANGE_STEP_BYTES if client is None else None)
    total, done = sum(count for _, count in regions), 0
    parts: list[list[Any]] = []
    for region, count in regions:
        if should_stop is not None and should_stop():
            from ..tiling import PredictionCancelled

            raise PredictionCancelled("stopped while reading the intensity range")
        slab = channels_last[region]
        every = tuple(slice(-(r.start or 0) % step, None, step) for r in region)
        every += (slice(None, None, step),) * (slab.ndim - 1 - len(region))
        jobs = [part for c in used for part in (slab[..., c][every], slab[..., c].min(), slab[..., c].max())]
        if lazy.dtype.kind == "f":
            jobs += [slab.min(), slab.max()]
        parts.append(compute(client, jobs))
        done += count
        if progress is not None:
            progress(done, total)
    if lazy.dtype.kind == "f" and not all(np.isfinite(values[-2:]).all() for values in parts):
        raise ValueError(f"{image.reader.path}: the image contains NaN or infinite values; replace them first")
    ranges = []
    for index in range(len(used)):
        sample = np.concatenate([np.ravel(values[3 * index]) for values in parts])
        low_value = min(values[3 * index + 1] for values in parts)
        high_value = max(values[3 * index + 2] for values in parts)
        low, high = (float(v) for v in np.percentile(sample, spec.percentiles))
        ranges.append((low, high) if high > low else (float(low_value), float(high_value)))
    return tuple(ranges)


def _range_regions(channels_last: Any, budget: int | None) -> list[tuple[tuple[slice, ...], int]]:
    """Slabs of whole chunks of a dask array whose last axis holds the channels, in C order, each with the number
    of spatial chunks it holds: the first ``k`` spatial axes cut, the other axes whole, with ``k`` the smallest that
    keeps one chunk along the cut axes within ``budget`` bytes; along the last cut axis, as many chunks together
    as the budget allows. None: one slab, the whole array. Each slab is a tuple of slices over the first ``k`` axes."""
    spatial = channels_last.ndim - 1
    chunks, shape, numblocks = channels_last.chunks, channels_last.shape, channels_last.numblocks
    itemsize = channels_last.dtype.itemsize

    def largest(k: int) -> int:
        return math.prod(max(chunks[a]) for a in range(k)) * math.prod(shape[k:spatial]) * shape[-1] * itemsize

    k = 0
    while budget is not None and k < spatial and largest(k) > budget:
        k += 1
    if k == 0:
        return [((), math.prod(numblocks[:spatial]))]
    together = max(1, budget // largest(k))  # chunks along axis k - 1 in one slab
    borders = [np.cumsum((0,) + chunks[a]) for a in range(k)]
    inner = math.prod(numblocks[k:spatial])
    regions = []
    for index in np.ndindex(*numblocks[: k - 1]):
        outer = tuple(slice(int(borders[a][i]), int(borders[a][i + 1])) for a, i in enumerate(index))
        for first in range(0, numblocks[k - 1], together):
            last = min(first + together, numblocks[k - 1])
            cut = slice(int(borders[k - 1][first]), int(borders[k - 1][last]))
            regions.append((outer + (cut,), (last - first) * inner))
    return regions
