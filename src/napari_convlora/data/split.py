"""Hold out part of the labelled area of each plane for validation, in square blocks, so that every class that
can be validated is.

Pure numpy. Validation pixels are taken in whole blocks (not scattered pixels) so that validation
measures generalisation to unseen regions rather than to the neighbours of training pixels. Blocks are chosen in
two rounds over all planes together:

1. for each class, rarest first, that has no validation pixels yet: a block holding about ``fraction`` of its
   pixels (a random 10 % split once left a class with 16 validation pixels, so its score was noise);
2. plane by plane, random blocks while they bring the plane's held-out share nearer the fraction.

A block never goes to validation when it holds the last training pixels of a class or is its plane's last labelled
block: training keeps every class it had, so a class whose pixels all lie in one block is not validated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..constants import IGNORE_INDEX

Pair = tuple[np.ndarray, np.ndarray]
#: The first round may hold out up to this many times the validation fraction of all labelled pixels to give each
#: class validation pixels (a 10 % split then takes at most 20 %): an honest score for a rare class is worth some
#: training pixels, but not most of a small image cut in large blocks.
STRATIFY_LIMIT = 2.0


def _labelled_counts_per_block(labelled: np.ndarray, block: int) -> np.ndarray:
    """``ceil(Y/block) x ceil(X/block)`` int64 counts of labelled pixels per block."""
    height, width = labelled.shape
    rows, cols = math.ceil(height / block), math.ceil(width / block)
    padded = np.zeros((rows * block, cols * block), dtype=np.int64)
    padded[:height, :width] = labelled
    return padded.reshape(rows, block, cols, block).sum(axis=(1, 3))


class _Blocks:
    """The block grid of one plane of targets (int64 ``Y x X``): labelled pixels per block (``counts``, B), pixels of
    each class per block (``classes``, B x K), and which blocks are held out (``held``, B bool)."""

    def __init__(self, targets: np.ndarray, block: int, num_classes: int) -> None:
        labelled = targets != IGNORE_INDEX
        counts = _labelled_counts_per_block(labelled, block)
        several = np.count_nonzero(labelled) > 1  # a single labelled pixel stays in training
        while np.count_nonzero(counts) < 2 and block > 1 and several:
            block //= 2
            counts = _labelled_counts_per_block(labelled, block)
        self.block, self.grid, self.counts = block, counts.shape, counts.reshape(-1)
        rows, cols = self.grid
        height, width = targets.shape
        block_of = (np.arange(height) // block * cols)[:, None] + (np.arange(width) // block)[None, :]
        keys = block_of[labelled] * num_classes + targets[labelled]
        self.classes = np.bincount(keys, minlength=rows * cols * num_classes).reshape(rows * cols, num_classes)
        self.held = np.zeros(self.counts.size, dtype=bool)
        self.training_blocks = int(np.count_nonzero(self.counts))

    def held_out_mask(self, targets: np.ndarray) -> np.ndarray:
        """bool ``Y x X``: the labelled pixels of ``targets`` (those the grid was made of) in held-out blocks."""
        grid = self.held.reshape(self.grid)
        mask = np.repeat(np.repeat(grid, self.block, axis=0), self.block, axis=1)
        return mask[: targets.shape[0], : targets.shape[1]] & (targets != IGNORE_INDEX)


@dataclass
class _Holding:
    """The blocks of every plane and, per class, the blocks holding it still in training (K) and whether it has
    validation pixels (K bool)."""

    planes: list[_Blocks]
    training_blocks: np.ndarray
    validated: np.ndarray
    held_out: int = 0

    def may_hold(self, plane: int, block: int) -> bool:
        """Whether the block may go: its plane keeps a labelled block and every class in it keeps one in training."""
        blocks = self.planes[plane]
        present = blocks.classes[block] > 0
        return blocks.training_blocks >= 2 and bool((self.training_blocks[present] >= 2).all())

    def hold(self, plane: int, block: int) -> None:
        blocks = self.planes[plane]
        present = blocks.classes[block] > 0
        blocks.held[block] = True
        blocks.training_blocks -= 1
        self.training_blocks -= present
        self.validated |= present
        self.held_out += int(blocks.counts[block])


def _hold_one_block_per_class(holding: _Holding, fraction: float, rng: np.random.Generator) -> dict[int, str]:
    """Round 1: for each class (rarest first) without validation pixels, one block holding it that may go and keeps
    the held-out total within :data:`STRATIFY_LIMIT` times the fraction (the first block always fits): the one whose
    pixels of the class are nearest ``fraction`` of them (so a class keeps most of its pixels for training and
    gets more than a corner's worth for validation), ties chosen at random.
    Returns {class: why it got none} for the classes left without: ``"one_region"`` (all its pixels in one block),
    ``"needed"`` (each block holding it may not go) or ``"over_limit"``."""
    totals = sum(blocks.classes.sum(axis=0) for blocks in holding.planes)
    limit = STRATIFY_LIMIT * fraction * totals.sum()
    why: dict[int, str] = {}
    for cls in np.argsort(totals, kind="stable"):
        if totals[cls] == 0 or holding.validated[cls]:
            continue
        spots = [(i, int(b)) for i, blocks in enumerate(holding.planes) for b in np.flatnonzero(blocks.classes[:, cls])]
        allowed = [(i, b) for i, b in spots if holding.may_hold(i, b)]
        fitting = [(i, b) for i, b in allowed
                   if holding.held_out == 0 or holding.held_out + holding.planes[i].counts[b] <= limit]
        if fitting:  # its pixels in the block nearest its share of the fraction; ties in a random order
            want = max(1.0, fraction * totals[cls])
            gap = [abs(int(holding.planes[i].classes[b, cls]) - want) for i, b in fitting]
            holding.hold(*fitting[min(rng.permutation(len(fitting)), key=lambda k: gap[k])])
        else:
            why[int(cls)] = "one_region" if len(spots) < 2 else "needed" if not allowed else "over_limit"
    return why


def _fill_to_fraction(holding: _Holding, plane: int, fraction: float, rng: np.random.Generator) -> None:
    """Round 2 on one plane: random blocks, each kept while it brings the plane's held-out count nearer ``fraction``
    of its labelled pixels; at least one block (the smallest that may go) where any may."""
    blocks = holding.planes[plane]
    target = fraction * blocks.counts.sum()
    held_out = int(blocks.counts[blocks.held].sum())
    candidates = np.flatnonzero((blocks.counts > 0) & ~blocks.held)
    for block in rng.permutation(candidates):
        count = int(blocks.counts[block])
        if abs(held_out + count - target) < abs(held_out - target) and holding.may_hold(plane, int(block)):
            holding.hold(plane, int(block))
            held_out += count
    if not blocks.held.any():  # every block alone overshoots by more than the target: the smallest that may go
        allowed = [int(b) for b in candidates if holding.may_hold(plane, int(b))]
        if allowed:
            holding.hold(plane, min(allowed, key=lambda b: blocks.counts[b]))


def _check(targets: np.ndarray, fraction: float, block: int) -> None:
    if targets.ndim != 2:
        raise ValueError(f"expected a 2D plane of targets (Y, X), got shape {targets.shape}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")


def _split_targets(targets_list: Sequence[np.ndarray], fraction: float, seed: int,
                   block: int) -> tuple[list[np.ndarray], list[np.ndarray], dict[int, str]]:
    """(train targets, validation targets, {class: why it has no validation pixels}) of int64 ``Y x X`` planes."""
    targets_list = [np.asarray(t).astype(np.int64, copy=False) for t in targets_list]
    for targets in targets_list:
        _check(targets, fraction, block)
    trains = [t.copy() for t in targets_list]
    vals = [np.full_like(t, IGNORE_INDEX) for t in targets_list]
    if fraction == 0.0 or not targets_list:
        return trains, vals, {}
    num_classes = max(1, 1 + max(int(t.max()) if t.size else 0 for t in targets_list))
    planes = [_Blocks(t, block, num_classes) for t in targets_list]
    training = sum((blocks.classes > 0).sum(axis=0) for blocks in planes)
    holding = _Holding(planes, np.asarray(training, dtype=np.int64), np.zeros(num_classes, dtype=bool))
    rng = np.random.default_rng(seed)
    why = _hold_one_block_per_class(holding, fraction, rng)
    for index in range(len(planes)):
        _fill_to_fraction(holding, index, fraction, rng)
    for blocks, train, val in zip(planes, trains, vals):
        held_out = blocks.held_out_mask(train)
        val[held_out] = train[held_out]
        train[held_out] = IGNORE_INDEX
    return trains, vals, {cls: reason for cls, reason in why.items() if not holding.validated[cls]}


def split_train_validation(
    targets: np.ndarray, fraction: float, seed: int, block: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Split the labelled pixels of one plane into training and validation targets (see the module).

    targets: int64 ``Y x X`` class indices, ``IGNORE_INDEX`` where unlabelled.
    fraction: in [0, 1): the share of the labelled pixels to hold out (approximately: whole blocks
        are held out, and a rare class may add one). 0 -> validation is all IGNORE_INDEX.
    seed: the same seed and targets always give the same split.
    block: side of the square blocks, on a grid anchored at (0, 0). While fewer than 2 blocks hold
        labelled pixels, the block side is halved (down to 1 pixel) so that both sides get labels;
        with a single labelled pixel everything stays in training.
    Returns ``(train, val)``: int64 ``Y x X`` copies of ``targets``, each IGNORE_INDEX where the
        other one is labelled; together they hold exactly the labelled pixels of ``targets``.
    """
    (train,), (val,), _ = _split_targets([targets], fraction, seed, block)
    return train, val


@dataclass
class Split:
    """Training and validation pairs (see :func:`split_by_class`)."""

    train_pairs: list[Pair]
    val_pairs: list[Pair]
    #: {class index: why it has no validation pixels} for the classes in training left without them: "one_region",
    #: "needed" or "over_limit" (see ``label_checks.UNVALIDATED_WORDS``).
    unvalidated: dict[int, str] = field(default_factory=dict)


def split_by_class(pairs: Sequence[Pair], fraction: float, seed: int, block: int = 64) -> Split:
    """Split (planes ``Y x X x 3``, targets int64 ``Y x X``) pairs into training and validation pairs, reasoning
    over all planes together (see the module; each plane as :func:`split_train_validation` says otherwise).

    The images are shared, not copied, and a side whose targets are all IGNORE_INDEX is left out of its list.
    """
    trains, vals, unvalidated = _split_targets([targets for _, targets in pairs], fraction, seed, block)
    train_pairs = [(image, t) for (image, _), t in zip(pairs, trains) if (t != IGNORE_INDEX).any()]
    val_pairs = [(image, v) for (image, _), v in zip(pairs, vals) if (v != IGNORE_INDEX).any()]
    return Split(train_pairs, val_pairs, unvalidated)


def split_pairs(pairs: Sequence[Pair], fraction: float, seed: int,
                block: int = 64) -> tuple[list[Pair], list[Pair]]:
    """:func:`split_by_class`'s (train pairs, validation pairs)."""
    split = split_by_class(pairs, fraction, seed, block)
    return split.train_pairs, split.val_pairs
