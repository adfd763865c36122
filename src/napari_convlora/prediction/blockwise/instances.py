"""Instance ids made global over blocks: an object that crosses a block border keeps one id.

numpy and scipy only. Each block labels the connected components of each class in its own pixels
(``prediction.tiling.instances_from_labels``: ids ``1..n`` unique across classes, full connectivity) and reports ``n`` and
its four edges (first and last row and column: class labels and local ids). Then, on the client:

1. **Offsets**: block ``b``'s local id ``i > 0`` becomes ``i + offset[b]``, where ``offset[b]`` is the number
   of ids of the blocks before it (in block order), so that ids of different blocks never collide.
2. **Border pairs**: along every border between two blocks of a plane, the full line of pixels just before the
   border and the line just after it are put together from the blocks' edges. Two pixels facing each other
   across the border, straight or diagonally (8-connectivity, as in ``instances_from_labels``), that hold the
   same class (not background) are one object: their two global ids are a pair. Diagonal neighbours at a
   corner where four blocks meet are among these pairs too.
3. **Union-find**: ids joined by pairs are merged (connected components of the graph whose edges are the
   pairs; ``scipy.sparse.csgraph``), and the merged objects are numbered ``1..N`` in the order of their
   smallest global id. The result is a lookup table from global id to final id; each block then maps its
   local ids through its slice of the table.

The ids are then consistent (one id per object, whatever blocks it spans) and the objects are exactly the
connected components of the whole plane; only their numbering differs from ``instances_from_labels`` on the
whole plane.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .tiles import Block


@dataclass
class BlockEdges:
    """A block's edge pixels: ``labels`` and local instance ``ids`` of its ``top``, ``bottom`` rows and
    ``left``, ``right`` columns (1-D each), and ``count``: its local ids are ``1..count``."""

    count: int
    top: tuple[np.ndarray, np.ndarray]
    bottom: tuple[np.ndarray, np.ndarray]
    left: tuple[np.ndarray, np.ndarray]
    right: tuple[np.ndarray, np.ndarray]

    @classmethod
    def of(cls, labels: np.ndarray, ids: np.ndarray) -> "BlockEdges":
        """labels, ids: the block's ``h x w`` class labels and local instance ids."""
        return cls(int(ids.max(initial=0)), (labels[0].copy(), ids[0].copy()), (labels[-1].copy(), ids[-1].copy()),
                   (labels[:, 0].copy(), ids[:, 0].copy()), (labels[:, -1].copy(), ids[:, -1].copy()))


def id_offsets(counts: Sequence[int]) -> np.ndarray:
    """``offset[b]`` = the ids of blocks ``0..b-1``; one more entry at the end: the total."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])


def _global(ids: np.ndarray, offset: int) -> np.ndarray:
    return np.where(ids > 0, ids.astype(np.int64) + offset, 0)


def border_pairs(blocks: Sequence[Block], edges: Sequence[BlockEdges], offsets: np.ndarray,
                 background: int) -> np.ndarray:
    """``P x 2`` int64 pairs of global ids that touch across block borders within a plane (see the module)."""
    by_place = {(b.plane, b.row, b.col): (b, e, int(offsets[b.index])) for b, e in zip(blocks, edges)}
    planes = sorted({b.plane for b in blocks})
    rows = max(b.row for b in blocks) + 1
    cols = max(b.col for b in blocks) + 1
    pairs = []
    for plane in planes:
        for r in range(rows - 1):  # the border under block row r: rows of the full plane width
            before = [by_place[(plane, r, c)] for c in range(cols)]
            after = [by_place[(plane, r + 1, c)] for c in range(cols)]
            pairs.append(_facing(_line(before, "bottom"), _line(after, "top"), background))
        for c in range(cols - 1):  # the border right of block column c: columns of the full plane height
            before = [by_place[(plane, r, c)] for r in range(rows)]
            after = [by_place[(plane, r, c + 1)] for r in range(rows)]
            pairs.append(_facing(_line(before, "right"), _line(after, "left"), background))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)


def _line(parts: list[tuple[Block, BlockEdges, int]], side: str) -> tuple[np.ndarray, np.ndarray]:
    """One side of a border, the blocks' edges joined: (labels, global ids)."""
    labels = np.concatenate([getattr(e, side)[0] for _, e, _ in parts])
    ids = np.concatenate([_global(getattr(e, side)[1], offset) for _, e, offset in parts])
    return labels, ids


def _facing(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], background: int) -> np.ndarray:
    """Pairs of ids of pixels ``a[i]`` and ``b[i + d]`` (d = -1, 0, 1) of the same class, not background."""
    (la, ia), (lb, ib) = a, b
    n, found = len(la), []
    for d in (-1, 0, 1):
        i = np.arange(max(0, -d), min(n, n - d))
        same = (la[i] == lb[i + d]) & (la[i] != background) & (ia[i] > 0) & (ib[i + d] > 0)
        found.append(np.stack([ia[i][same], ib[i + d][same]], axis=1))
    return np.unique(np.concatenate(found), axis=0)


def merge_ids(total: int, pairs: np.ndarray) -> np.ndarray:
    """The lookup table global id -> final id (``total + 1`` entries, uint32, 0 -> 0): ids joined by ``pairs``
    (union-find) share one final id; final ids are ``1..N`` in the order of each object's smallest global id."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = total + 1
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, components = connected_components(graph, directed=False)
    # components are numbered in order of each one's smallest node: 0 is the background (node 0, no pairs)
    return components.astype(np.uint32)
