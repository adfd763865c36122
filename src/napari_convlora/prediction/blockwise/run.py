"""Predict an image larger than memory block by block on dask, from a Zarr / OME-Zarr store or a TIFF file into
Zarr stores: class labels, and optionally probabilities and instances.

Qt-free core; needs the optional ``large`` extra. The steps:

1. The image is opened lazily (:func:`io.zarr_stores.open_lazy`). Each used channel's intensity range comes from the
   same strided sample of the whole image that ``data.SamPlanes`` takes in memory (``data.images._strided_sample``:
   every ``step``-th pixel along each axis, at most ~4 million values), computed on dask; so the ranges, and with
   them the normalisation, are exactly those of the in-memory path.
2. The planes are cut into ``block_size`` blocks (``prediction.blockwise.tiles.BlockPlan``). One task per block reads the whole
   tiles of the plane's global tile grid that touch the block (the block plus a halo of up to one tile),
   prepares them tile by tile, predicts them, blends them exactly as ``predict_tiled`` does on the whole plane,
   and writes its block of labels (and probabilities, instances) into the outputs, whose chunks each block owns
   whole. Labels and probabilities therefore equal ``prediction.planes.predict_image`` of the whole image.
3. Instances: connected components per block, made global by offsets and a union-find over the pairs of ids that
   touch across block borders (``block_instances``), then relabelled by a second pass over the blocks.
4. The outputs are written under temporary names next to their final names and renamed at the end.

Workers load the model themselves, once per worker thread (``prediction.blockwise.worker_model.ModelSource``: file paths, never a
pickled model), so every path (image, model, outputs) must be readable / writable on the workers: the same machine, or
a shared file system for a cluster.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ...config import InputSpec
from ...data import ImageLayout, SamPlanes, label_dtype, spatial_shape
from ...data.images import _channel_axis, check_image_dtype
from ...data.sampling import MirroredBorder
from ...errors import ConfigError
from ...io.zarr_outputs import (ZarrOutput, check_outputs, create_output, ome_axes_for, ome_scale_for, read_region,
                                write_region)
from ...io.zarr_stores import ArrayReader, LazyImage
from .cluster import run_tasks
from .instances import BlockEdges, border_pairs, id_offsets, merge_ids
from .ranges import intensity_ranges
from .tiles import Block, BlockPlan, TileGrid, block_input_region, predict_block
from .worker_model import ModelSource, forget_models

__all__ = ["BlockJob", "BlockOutcome", "BlockwiseResult", "ModelSource", "check_outputs", "intensity_ranges",
           "predict_blockwise", "predict_one_block"]


@dataclass(frozen=True)
class BlockJob:
    """What every block task shares (a few kilobytes, sent with each task)."""

    reader: ArrayReader
    layout: ImageLayout
    spec: InputSpec
    ranges: tuple[tuple[float, float], ...]
    grid: TileGrid
    leading: tuple[int, ...]
    model: ModelSource
    class_values: tuple[int, ...]
    batch_size: int
    labels: tuple[str, str]
    probabilities: tuple[str, str] | None = None
    instances: tuple[str, str] | None = None
    should_stop: Callable[[], bool] | None = None  # in this process only (no client): not sent to workers


@dataclass
class BlockOutcome:
    """What a block task returns: class pixel counts (K,), tiles predicted, its edges for the instance merge,
    the worker (pid) and that process's peak resident memory in bytes so far, the task's seconds and, of them,
    those spent loading the model (0 once the worker has it)."""

    counts: np.ndarray
    tiles: int
    edges: BlockEdges | None
    pid: int
    peak_rss: int
    seconds: float
    load_seconds: float = 0.0


def _input_key(job: BlockJob, block: Block, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[slice, ...]:
    """The stored array's index of ``rows`` x ``cols`` of the block's plane (leading axes kept as length 1)."""
    axis = _channel_axis(job.reader.shape, job.layout)
    spatial = [a for a in range(job.reader.ndim) if a != axis]
    key = [slice(None)] * job.reader.ndim
    where = np.unravel_index(block.plane, job.leading) if job.leading else ()
    for a, coordinate in zip(spatial[:-2], where):
        key[a] = slice(int(coordinate), int(coordinate) + 1)
    key[spatial[-2]], key[spatial[-1]] = slice(*rows), slice(*cols)
    return tuple(key)


def _output_key(job: BlockJob, block: Block) -> tuple[Any, ...]:
    where = tuple(int(i) for i in np.unravel_index(block.plane, job.leading)) if job.leading else ()
    return where + (slice(*block.rows), slice(*block.cols))


def predict_one_block(job: BlockJob, block: Block) -> BlockOutcome:
    """A worker's task: predict ``block`` and write it into the outputs (see the module)."""
    from ...checkpoints.model_files import model_file
    from ..planes import make_prob_fn
    from ..tiling import instances_from_labels, probabilities_to_labels

    start = time.perf_counter()
    model = job.model.load()
    loaded = time.perf_counter() - start
    grid = job.grid
    region = block_input_region(grid, block)  # in the plane extended by its mirror border (and padded)
    border, mirrored, inside = grid.border, [], []
    for (start, stop), length in zip(region, (grid.height, grid.width)):
        inside.append((max(start - border, 0), min(stop - border, length)))  # the plane's own pixels
        mirrored.append((max(border - start, 0), max(min(stop, length + 2 * border) - (length + border), 0)))
    planes = SamPlanes(job.reader[_input_key(job, block, *inside)], job.layout, job.spec, job.ranges)
    view = MirroredBorder(planes.input_view(0), tuple(mirrored))  # the mirror of the plane's border, where cut
    (r0, r1), (c0, c1) = region
    if view.shape[:2] != (r1 - r0, c1 - c0):  # beyond the extended plane: padding of a plane < one tile
        padded = np.zeros((r1 - r0, c1 - c0, 3), dtype=np.float32)
        padded[: view.shape[0], : view.shape[1]] = view[:, :]
        view = padded
    height, width = block.shape
    labels = np.zeros((height, width), dtype=label_dtype(job.class_values))
    probabilities = np.zeros((model.num_classes, height, width), np.float32) if job.probabilities else None

    def write_rows(first: int, band: np.ndarray) -> None:
        rows = slice(first - block.rows[0], first - block.rows[0] + band.shape[1])
        labels[rows] = probabilities_to_labels(band, job.class_values)
        if probabilities is not None:
            probabilities[:, rows] = band

    source = model_file(model) or job.model.path  # the dock's model (LoadedModel): its file if it has one
    predict_block(make_prob_fn(model, next(model.parameters()).device), view, grid, block, model.num_classes,
                  job.batch_size, sink=write_rows, should_stop=job.should_stop, source=source)
    key = _output_key(job, block)
    write_region(job.labels, key, labels)
    if probabilities is not None:
        write_region(job.probabilities, (slice(None),) + key, probabilities)
    edges = None
    if job.instances is not None:
        ids = instances_from_labels(labels, background_value=job.class_values[0]).astype(np.uint32)
        write_region(job.instances, key, ids)
        edges = BlockEdges.of(labels, ids)
    per_class = np.array([np.count_nonzero(labels == value) for value in job.class_values], dtype=np.int64)
    return BlockOutcome(per_class, grid.tiles_for(block.rows, block.cols), edges, os.getpid(), _peak_rss(),
                        time.perf_counter() - start, loaded)


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: kilobytes


def relabel_block(target: tuple[str, str], key: tuple[Any, ...], lookup: np.ndarray) -> None:
    """Second instance pass: the block's local ids ``i`` -> ``lookup[i]`` (its slice of the global table)."""
    write_region(target, key, lookup[read_region(target, key)])


@dataclass
class BlockwiseResult:
    """outputs: kind (labels, probabilities, instances) -> Zarr store written. shape: the labels' shape.
    pixel_counts: class value -> pixels. tiles: predicted (a tile touching two blocks counts twice);
    unique_tiles: of the tile grid. seconds: the whole call; ranges_seconds: its intensity-range pass.
    instances: how many objects. peak_rss: worker pid -> peak resident bytes."""

    outputs: dict[str, Path]
    shape: tuple[int, ...]
    pixel_counts: dict[int, int]
    blocks: int
    tiles: int
    unique_tiles: int
    seconds: float
    ranges_seconds: float = 0.0
    instances: int | None = None
    peak_rss: dict[int, int] = field(default_factory=dict)


def predict_blockwise(
    model: ModelSource,
    image: LazyImage,
    out: str | os.PathLike,
    layout: ImageLayout | None = None,
    probabilities: str | os.PathLike | None = None,
    instances: str | os.PathLike | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
    block_size: int = 4096,
    client: Any | None = None,
    progress: Callable[[int, int, BlockOutcome], None] | None = None,
    ome: bool | None = None,
    planes: Sequence[int] | None = None,
    should_stop: Callable[[], bool] | None = None,
    pass_progress: Callable[[str, int, int], None] | None = None,
) -> BlockwiseResult:
    """Predict ``image`` (:func:`io.zarr_stores.open_lazy`) with the model of ``model`` into Zarr stores, block by block
    on ``client``'s workers (``prediction.blockwise.cluster.dask_client``; None: in this process).

    Args:
        out: labels, the image's spatial shape (its channel axis dropped), dtype ``data.label_dtype``.
        probabilities: ``K x (spatial shape)`` float32 (a plain Zarr array).
        instances: uint32 ids, ``1..N`` over the whole image, per plane for stacks (see ``block_instances``).
        layout: how to read the image's axes; default: an OME-Zarr's ``c`` axis is the channel axis.
        block_size: the side of a block in pixels (a task's memory grows with its square).
        progress: ``progress(done_blocks, total_blocks, outcome)`` as blocks finish.
        ome: write OME-Zarr metadata on labels and instances (default: when the input has it, or for an output
            named ``*.ome.zarr``).
        planes: for stacks, which planes to predict (leading axes flattened in C order, as ``predict_image``
            numbers them); the others stay 0. None: all.
        should_stop: without a client only: polled before each batch of tiles, each slab of chunks of the
            intensity-range pass and each block of the instance relabelling; when it returns True,
            ``prediction.tiling.PredictionCancelled`` is raised and nothing is left under the output names.
        pass_progress: the whole-image passes' progress, ``pass_progress("intensity range", chunks read, chunks)``
            (without a client) and ``pass_progress("instance ids", blocks relabelled, blocks)``.

    Raises:
        ConfigError / ValueError: one line naming the option or file; nothing is left under the output names.
            Among them ``prediction.tiling.NonFiniteProbabilities``: the first block whose probabilities are NaN or
            infinite stops the prediction before it writes that block.
    """
    from ..planes import PROMPTABLE_ONLY

    if should_stop is not None and client is not None:
        raise ValueError("should_stop is polled in this process only: predict without a client to use it")
    start = time.perf_counter()
    config = model.config()
    if config.promptable is not None:
        raise ValueError(PROMPTABLE_ONLY)
    if config.input.rescale != 1.0:
        raise ConfigError(f"{model.path}: the model rescales its input ({config.input.rescale:g}); blockwise "
                          "prediction needs a model trained without rescaling")
    check_outputs({"--out": out, "--probabilities": probabilities, "--instances": instances})
    if layout is None or (not layout.rgb and layout.channel_axis is None):
        layout = ImageLayout(channel_axis=image.channel_axis)
    reader = image.reader
    check_image_dtype(np.empty(0, dtype=reader.dtype))
    shape = spatial_shape(reader, layout)
    ranges = intensity_ranges(image, layout, config.input, client, should_stop,
                              None if pass_progress is None else lambda done, total: pass_progress(
                                  "intensity range", done, total))
    ranges_seconds = time.perf_counter() - start
    grid = TileGrid.of(shape[-2], shape[-1], config.input_size, overlap)
    leading = tuple(shape[:-2])
    plan = BlockPlan(grid, block_size, _chosen_planes(planes, int(np.prod(leading, dtype=np.int64))))
    blocks = plan.blocks()
    values = tuple(config.head.class_values)
    side = next((c for c in (1024, 512, 256) if block_size % c == 0), block_size)
    chunks = (1,) * len(leading) + (min(side, shape[-2]), min(side, shape[-1]))
    made: dict[str, ZarrOutput] = {}
    try:
        made["labels"] = create_output(out, shape, chunks, label_dtype(values), _ome_meta(image, out, shape, ome),
                                       image.zarr_format)
        if probabilities is not None:
            made["probabilities"] = create_output(probabilities, (len(values),) + shape, (len(values),) + chunks,
                                                  np.float32, zarr_format=image.zarr_format)
        if instances is not None:
            made["instances"] = create_output(instances, shape, chunks, np.uint32,
                                              _ome_meta(image, instances, shape, ome), image.zarr_format)
        job = BlockJob(reader, layout, config.input, ranges, grid, leading, model, values, batch_size,
                       made["labels"].target, made["probabilities"].target if probabilities is not None else None,
                       made["instances"].target if instances is not None else None, should_stop)
        outcomes = run_tasks(client, _BlockTask(job), blocks, progress)
        count = None
        if instances is not None:
            count = _make_ids_global(client, job, blocks, outcomes, pass_progress)
        written = _commit_all(made)
    finally:
        for output in made.values():
            output.discard()
        if client is None:  # the model loaded in this thread is not kept after the call
            forget_models()
    totals = np.sum([o.counts for o in outcomes], axis=0)
    peaks: dict[int, int] = {}
    for o in outcomes:
        peaks[o.pid] = max(peaks.get(o.pid, 0), o.peak_rss)
    return BlockwiseResult(written, shape, {v: int(n) for v, n in zip(values, totals)}, len(blocks),
                           sum(o.tiles for o in outcomes), grid.unique_tiles * len(plan.planes),
                           time.perf_counter() - start, ranges_seconds, count, peaks)


def _chosen_planes(planes: Sequence[int] | None, count: int) -> tuple[int, ...]:
    if planes is None:
        return tuple(range(count))
    bad = [p for p in planes if not 0 <= int(p) < count]
    if bad:
        raise ValueError(f"plane indices {bad} out of range: the image has {count} plane(s)")
    return tuple(int(p) for p in planes)


def _ome_meta(image: LazyImage, path: str | os.PathLike, shape: tuple[int, ...], ome: bool | None
              ) -> dict[str, Any] | None:
    """OME-Zarr metadata of a label output (its axes and scale from the image), or None for a bare array."""
    name = Path(str(path).rstrip("/\\")).name
    if ome is False or (ome is None and not image.ome and not name.lower().endswith(".ome.zarr")):
        return None
    return {"axes": ome_axes_for(image, len(shape)), "scale": ome_scale_for(image, len(shape)), "name": name,
            "labels": True}


def _commit_all(made: dict[str, ZarrOutput]) -> dict[str, Path]:
    """Rename every output to its final name; if one fails, the ones already renamed are removed again."""
    import shutil

    written: dict[str, Path] = {}
    try:
        for kind, output in made.items():
            written[kind] = output.commit()
    except BaseException:
        for path in written.values():
            shutil.rmtree(path, ignore_errors=True)
        raise
    return written


@dataclass(frozen=True)
class _BlockTask:
    """``predict_one_block`` with the shared job bound (picklable, unlike a closure)."""

    job: BlockJob

    def __call__(self, block: Block) -> BlockOutcome:
        return predict_one_block(self.job, block)


@dataclass(frozen=True)
class _RelabelTask:
    target: tuple[str, str]
    should_stop: Callable[[], bool] | None = None  # in this process only (no client), as ``BlockJob.should_stop``

    def __call__(self, item: tuple[tuple[Any, ...], np.ndarray]) -> None:
        if self.should_stop is not None and self.should_stop():
            from ..tiling import PredictionCancelled

            raise PredictionCancelled("stopped while relabelling the instances")
        relabel_block(self.target, *item)


def _make_ids_global(client: Any | None, job: BlockJob, blocks: list[Block], outcomes: list[BlockOutcome],
                     pass_progress: Callable[[str, int, int], None] | None = None) -> int:
    """Offsets, border pairs and union-find (``block_instances``), then each block relabelled (``should_stop``
    polled before each); returns N."""
    counts = [o.edges.count for o in outcomes]
    offsets = id_offsets(counts)
    pairs = border_pairs(blocks, [o.edges for o in outcomes], offsets, job.class_values[0])
    table = merge_ids(int(offsets[-1]), pairs)
    items = []
    for block, n in zip(blocks, counts):
        lookup = np.zeros(n + 1, dtype=np.uint32)
        lookup[1:] = table[offsets[block.index] + 1 : offsets[block.index] + n + 1]
        items.append((_output_key(job, block), lookup))
    run_tasks(client, _RelabelTask(job.instances, job.should_stop), items,
              None if pass_progress is None else lambda done, total, _: pass_progress("instance ids", done, total))
    return int(table.max(initial=0))
