"""Hold out part of the labelled area of each plane for validation, in square blocks.

Pure numpy. Validation pixels are taken in whole blocks (not scattered pixels) so that validation
measures generalisation to unseen regions rather than to the neighbours of training pixels.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..constants import IGNORE_INDEX


def _labelled_counts_per_block(labelled: np.ndarray, block: int) -> np.ndarray:
    """``ceil(Y/block) x ceil(X/block)`` int64 counts of labelled pixels per block."""
    height, width = labelled.shape
    rows, cols = math.ceil(height / block), math.ceil(width / block)
    padded = np.zeros((rows * block, cols * block), dtype=np.int64)
    padded[:height, :width] = labelled
    return padded.reshape(rows, block, cols, block).sum(axis=(1, 3))


def _choose_blocks(counts: np.ndarray, fraction: float, rng: np.random.Generator) -> list[int]:
    """Flat indices of the blocks to hold out: a random order, greedily kept while it brings the
    held-out count closer to ``fraction`` of the total; at least one block, never all of them."""
    candidates = np.flatnonzero(counts)
    flat_counts = counts.reshape(-1)
    target = fraction * flat_counts.sum()
    chosen: list[int] = []
    held_out = 0
    for index in rng.permutation(candidates):
        count = int(flat_counts[index])
        if abs(held_out + count - target) < abs(held_out - target):
            chosen.append(int(index))
            held_out += count
    if not chosen:  # every block alone overshoots by more than the target: take the smallest one
        chosen = [int(candidates[np.argmin(flat_counts[candidates])])]
    if len(chosen) == len(candidates):
        chosen.pop()
    return chosen


def split_train_validation(
    targets: np.ndarray, fraction: float, seed: int, block: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Split the labelled pixels of one plane into training and validation targets.

    targets: int64 ``Y x X`` class indices, ``IGNORE_INDEX`` where unlabelled.
    fraction: in [0, 1): the share of the labelled pixels to hold out (approximately: whole blocks
        are held out). 0 -> validation is all IGNORE_INDEX.
    seed: the same seed and targets always give the same split.
    block: side of the square blocks, on a grid anchored at (0, 0). While fewer than 2 blocks hold
        labelled pixels, the block side is halved (down to 1 pixel) so that both sides get labels;
        with a single labelled pixel everything stays in training.
    Returns ``(train, val)``: int64 ``Y x X`` copies of ``targets``, each IGNORE_INDEX where the
        other one is labelled; together they hold exactly the labelled pixels of ``targets``.
    """
    targets = np.asarray(targets)
    if targets.ndim != 2:
        raise ValueError(f"expected a 2D plane of targets (Y, X), got shape {targets.shape}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    train = targets.astype(np.int64, copy=True)
    val = np.full_like(train, IGNORE_INDEX)
    labelled = train != IGNORE_INDEX
    if fraction == 0.0 or labelled.sum() < 2:
        return train, val

    counts = _labelled_counts_per_block(labelled, block)
    while np.count_nonzero(counts) < 2 and block > 1:
        block //= 2
        counts = _labelled_counts_per_block(labelled, block)

    rng = np.random.default_rng(seed)
    held_out_blocks = np.zeros(counts.size, dtype=bool)
    held_out_blocks[_choose_blocks(counts, fraction, rng)] = True
    held_out = np.repeat(np.repeat(held_out_blocks.reshape(counts.shape), block, 0), block, 1)
    held_out = held_out[: train.shape[0], : train.shape[1]] & labelled
    val[held_out] = train[held_out]
    train[held_out] = IGNORE_INDEX
    return train, val


def split_pairs(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], fraction: float, seed: int, block: int = 64
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]:
    """:func:`split_train_validation` on every (planes ``Y x X x 3``, targets ``Y x X``) pair.

    Plane i uses seed ``seed + i``. Returns (train pairs, validation pairs); the images are shared,
    not copied, and a side whose targets are all IGNORE_INDEX is left out of its list.
    """
    train_pairs, val_pairs = [], []
    for i, (image, targets) in enumerate(pairs):
        train, val = split_train_validation(targets, fraction, seed + i, block)
        if (train != IGNORE_INDEX).any():
            train_pairs.append((image, train))
        if (val != IGNORE_INDEX).any():
            val_pairs.append((image, val))
    return train_pairs, val_pairs
