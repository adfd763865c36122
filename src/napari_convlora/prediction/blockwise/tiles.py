"""Blocks of a plane predicted on the plane's own tile grid, so that the blocks together equal ``predict_tiled``.

Core module: numpy and torch (no dask, no napari, no Qt). A plane larger than memory is cut into blocks, each a
rectangle of output pixels that a worker owns (``block_size`` x ``block_size``, the last ones shorter). A block is
not predicted as an image of its own: that would lay out other tiles and blend them with other weights. Instead
every block uses the global grid of :func:`prediction.tiling.predict_tiled` (the same tile starts, the same blending
windows) and predicts the whole tiles of that grid that touch its pixels. Its input is therefore a union of
whole tiles: the owned pixels plus a halo of up to one tile, read from the image around the block. The weighted
sums are accumulated in the same order (rows of tiles, top to bottom, tiles left to right) with the same float32
operations, so each owned pixel gets exactly the value ``predict_tiled`` gives it on the whole plane. The price
is the tiles that touch two blocks, predicted by both: about one extra row and column of tiles per block
(``BlockPlan.tiles_per_plane`` against ``TileGrid.unique_tiles``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ...data.sampling import mirror_margin
from ..tiling import (BandSums, PredictionCancelled, ProbFn, axis_windows, overlap_pixels, tile_probabilities,
                      tile_starts)


@dataclass(frozen=True)
class TileGrid:
    """The tile grid ``predict_tiled`` lays over a ``height`` x ``width`` plane extended by ``border`` pixels of its
    mirror image on every side (a side still shorter than a tile is padded to one tile): ``ys`` and ``xs`` are the
    tiles' start rows and columns in the extended plane, where the plane's pixel (r, c) is at (r + border,
    c + border)."""

    height: int
    width: int
    tile: int
    overlap: float
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    border: int = 0

    @classmethod
    def of(cls, height: int, width: int, tile: int, overlap: float, border: int | None = None) -> "TileGrid":
        """The grid of ``prediction.planes``: ``border`` None is ``mirror_margin(tile)``, as it predicts."""
        border = mirror_margin(tile) if border is None else border
        pad_h, pad_w = max(height + 2 * border, tile), max(width + 2 * border, tile)
        return cls(height, width, tile, overlap, tuple(tile_starts(pad_h, tile, overlap)),
                   tuple(tile_starts(pad_w, tile, overlap)), border)

    @property
    def extended(self) -> tuple[int, int]:
        """The plane's size with its mirror border."""
        return self.height + 2 * self.border, self.width + 2 * self.border

    @property
    def padded(self) -> tuple[int, int]:
        return max(self.extended[0], self.tile), max(self.extended[1], self.tile)

    def windows(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The 1-D float32 blending windows of every tile row and column (``prediction.tiling.axis_windows``)."""
        margin = overlap_pixels(self.tile, self.overlap)
        pad_h, pad_w = self.padded
        return (axis_windows(list(self.ys), self.tile, margin, pad_h),
                axis_windows(list(self.xs), self.tile, margin, pad_w))

    def touching(self, axis: int, start: int, stop: int) -> range:
        """Indices of the tiles along ``axis`` (0: rows, 1: columns) that overlap pixels ``[start, stop)`` of the
        extended plane."""
        starts = self.ys if axis == 0 else self.xs
        hits = [i for i, s in enumerate(starts) if s < stop and s + self.tile > start]
        return range(hits[0], hits[-1] + 1)

    def tiles_for(self, rows: tuple[int, int], cols: tuple[int, int]) -> int:
        """How many tiles overlap the plane's pixels ``rows`` x ``cols`` (``[start, stop)`` each)."""
        b = self.border
        return len(self.touching(0, rows[0] + b, rows[1] + b)) * len(self.touching(1, cols[0] + b, cols[1] + b))

    @property
    def unique_tiles(self) -> int:
        return len(self.ys) * len(self.xs)


@dataclass(frozen=True)
class Block:
    """The output pixels ``rows`` x ``cols`` (``[start, stop)`` each) of plane ``plane`` that one task owns.
    ``row``, ``col``: the block's place in its plane's grid of blocks."""

    index: int
    plane: int
    row: int
    col: int
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]


@dataclass(frozen=True)
class BlockPlan:
    """Every plane of an image cut into ``block_size`` squares, numbered plane by plane in row-major order."""

    grid: TileGrid
    block_size: int
    planes: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {self.block_size}")

    @property
    def block_rows(self) -> int:
        return -(-self.grid.height // self.block_size)

    @property
    def block_cols(self) -> int:
        return -(-self.grid.width // self.block_size)

    def blocks(self) -> list[Block]:
        size, out = self.block_size, []
        for plane in self.planes:
            for r in range(self.block_rows):
                for c in range(self.block_cols):
                    out.append(Block(len(out), plane, r, c, (r * size, min((r + 1) * size, self.grid.height)),
                                     (c * size, min((c + 1) * size, self.grid.width))))
        return out

    @property
    def tiles_per_plane(self) -> int:
        """Tiles predicted over one plane, a tile shared by blocks counted once per block that predicts it."""
        if not self.planes:
            return 0
        return sum(self.grid.tiles_for(b.rows, b.cols) for b in self.blocks() if b.plane == self.planes[0])


def block_input_region(grid: TileGrid, block: Block) -> tuple[tuple[int, int], tuple[int, int]]:
    """The pixels (rows, cols; ``[start, stop)``, in the extended and padded plane) of the whole tiles that ``block``
    needs."""
    b = grid.border
    iys = grid.touching(0, block.rows[0] + b, block.rows[1] + b)
    ixs = grid.touching(1, block.cols[0] + b, block.cols[1] + b)
    return ((grid.ys[iys[0]], grid.ys[iys[-1]] + grid.tile), (grid.xs[ixs[0]], grid.xs[ixs[-1]] + grid.tile))


def predict_block(
    prob_fn: ProbFn,
    view: np.ndarray,
    grid: TileGrid,
    block: Block,
    num_classes: int,
    batch_size: int = 4,
    sink: Callable[[int, np.ndarray], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    source: str | Path | None = None,
) -> np.ndarray | None:
    """Class probabilities of the pixels ``block`` owns, equal to ``predict_tiled`` on the whole plane there.

    Args:
        prob_fn: as for ``predict_tiled`` (``B x 3 x tile x tile`` 0..255 -> ``B x K x tile x tile``).
        view: the block's input region (:func:`block_input_region`) as ``h x w x 3`` float32 in 0..255: an
            array, or an object whose ``[rows, cols]`` slices are such arrays (``data.PlaneView`` in a
            ``data.sampling.MirroredBorder``); the grid's mirror border where the region passes the plane's
            border, then 0 where it passes the extended plane (a plane smaller than a tile).
        sink: called as ``sink(first_row, probabilities)`` (``K x n x block width`` float32, ``first_row`` in
            the plane's rows) for consecutive bands of the block's rows; then nothing is returned.
        should_stop: polled before each batch of tiles; when it returns True, ``prediction.tiling.PredictionCancelled``
            is raised.
        source: the model's file, named in the error when its probabilities are not finite
            (``prediction.tiling.NonFiniteProbabilities``, raised before a band with them reaches ``sink``).

    Returns:
        ``K x block height x block width`` float32, or None with ``sink``.
    """
    (top, _), (left, _) = block_input_region(grid, block)
    b = grid.border
    (y0, y1), (x0, x1) = (block.rows[0] + b, block.rows[1] + b), (block.cols[0] + b, block.cols[1] + b)
    tile = grid.tile
    y_windows, x_windows = grid.windows()
    iys, ixs = grid.touching(0, y0, y1), grid.touching(1, x0, x1)
    positions = [(iy, ix) for iy in iys for ix in ixs]
    width = view.shape[1]
    out = None if sink is not None else np.empty((num_classes, y1 - y0, x1 - x0), dtype=np.float32)
    band: BandSums | None = None  # plane rows band.top .. band.top + tile, where prob_fn's output is

    def finish(rows: int) -> None:
        """Hand over the owned part of the band's top ``rows`` rows (complete) and move the band down."""
        first, last = max(band.top, y0), min(band.top + rows, y1)
        done = band.finish(rows, first, last, slice(x0 - left, x1 - left))
        if done is None:
            return
        if sink is not None:
            sink(first - b, done)
        else:
            out[:, first - y0 : last - y0] = done

    for done, chunk in enumerate(_batches(positions, batch_size)):
        if should_stop is not None and should_stop():
            raise PredictionCancelled(f"block {block.index} stopped after {done * batch_size} of {len(positions)} "
                                      "tiles")
        batch = np.stack([view[grid.ys[iy] - top : grid.ys[iy] - top + tile,
                               grid.xs[ix] - left : grid.xs[ix] - left + tile] for iy, ix in chunk])
        probs = tile_probabilities(prob_fn, batch, num_classes)
        if band is None:
            band = BandSums.where(probs, num_classes, tile, width, top, source)
            y_windows, x_windows = band.windows(y_windows), band.windows(x_windows)
        for (iy, ix), tile_probs in zip(chunk, band.batch(probs)):
            if grid.ys[iy] > band.top:  # a new row of tiles: the rows above it are complete
                finish(grid.ys[iy] - band.top)
            band.add(tile_probs, grid.xs[ix] - left, y_windows[iy], x_windows[ix])
    finish(tile)
    return out


def _batches(items: list, size: int) -> Iterator[list]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for first in range(0, len(items), size):
        yield items[first : first + size]
