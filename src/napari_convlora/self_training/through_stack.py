"""Prompts carried through a stack (issue 23, item 4): an object prompted on one plane is segmented there, and its
mask becomes the prompt of the neighbouring planes (its bounding box and a positive point at its innermost pixel),
plane after plane, until the object ends: micro-sam's idea of segmenting in 3D from one annotated slice.

Planes are taken along the last leading axis of the image (z of a ``Z x Y x X`` stack; z within each t of a
``T x Z x Y x X`` one). The carrying of an object stops at the first plane where

- its mask is empty, or overlaps the previous plane's mask with IoU below ``iou_threshold`` (the object ended,
  or SAM's answer jumped to something else), or
- more than half of its mask lies on another object there (one the user prompted on that plane, or one carried
  there from the other side: that object takes over).

An object keeps its id through the stack (one 3D instance). On a plane, a prompted object's pixels are never
taken by a carried one; carried objects decoded on the same plane share it by their logits (as prompted objects
do); a plane reached from both sides keeps the pixels of the side that reached it first (planes above the
prompts are carried upwards first). All planes are decoded with the cached window embeddings of
``prompting.EmbeddingCache``: an object's window follows its mask's centre.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..constants import STACK_IOU
from ..data.prompts import central_point, mask_box
from ..weak import WeakLabels, WeakObject
from .crops import CropPrompt
from .prompting import EmbeddingCache, grid_window, segment_in_window, segment_weak_labels


@dataclass
class StackSpan:
    """Where object ``label`` (an id of the labels returned) was found: its prompt's plane and the first and last
    positions along the carried axis."""

    label: int
    prompted: tuple[int, ...]
    first: int
    last: int


def mask_prompt(mask: np.ndarray, top: int, left: int) -> CropPrompt:
    """A plane's bool mask (``Y x X``, not empty) as the prompt of the next plane, in the coordinates of the window
    at (top, left): its bounding box on pixel edges and a positive point at its centre (``data.prompts``)."""
    shift = np.array([left, top], np.float32)
    return CropPrompt("box", mask_box(mask) - np.tile(shift, 2), central_point(mask)[None] - shift)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def segment_through_stack(cache: EmbeddingCache, weak: WeakLabels, planes: Sequence[tuple[int, ...]] | None = None,
                          adapters: bool = True, iou_threshold: float = STACK_IOU,
                          on_plane: Callable[[int, int], None] | None = None
                          ) -> tuple[np.ndarray, list[WeakObject], list[StackSpan]]:
    """The prompts of ``planes`` (default: every plane with prompts) segmented on their planes and carried through
    the stack.

    Args:
        cache: the image's ``prompting.EmbeddingCache`` (model, planes, window features).
        weak: the prompts (a stack: at least one leading axis).
        adapters: False segments with the SAM as loaded (adapters off), to compare.
        iou_threshold: the smallest IoU of neighbouring planes' masks that carries an object on.
        on_plane: called as ``on_plane(done, total)`` after each plane decoded (progress; it may raise to stop).

    Returns:
        (instance labels of the image's spatial shape, int32: object k + 1 is ``objects[k]`` on every plane it
        reached; the objects; where each was found).

    Raises:
        ValueError: the image is a single plane, or ``iou_threshold`` is not in (0, 1].
    """
    if not weak.leading_shape:
        raise ValueError("prompts are carried through a stack: this image is a single plane")
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"the stack IoU threshold must be in (0, 1], got {iou_threshold}")
    labels, objects = segment_weak_labels(cache, weak, planes=planes, adapters=adapters)
    depth = weak.leading_shape[-1]
    seeds: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # outer index -> (seed z, label)
    for k, obj in enumerate(objects, 1):
        plane = tuple(obj.plane)
        if np.any(labels[plane] == k):
            seeds.setdefault(plane[:-1], []).append((plane[-1], k))
    spans = {k: StackSpan(k, tuple(obj.plane), obj.plane[-1], obj.plane[-1]) for k, obj in enumerate(objects, 1)}
    total = sum(max(z for z, _ in group) - min(z for z, _ in group) + depth + 1 for group in seeds.values())
    done = 0
    for outer, group in seeds.items():
        for step in (1, -1):
            ordered = sorted(group, key=lambda s: step * s[0])
            start = ordered[0][0]
            active: dict[int, np.ndarray] = {}
            z = start
            pending = list(ordered)
            while 0 <= z < depth and (active or pending):
                plane = outer + (z,)
                out = labels[plane]
                if active:
                    _carry(cache, weak.flat_plane_index(plane), out, active, iou_threshold, adapters)
                    for k in active:
                        spans[k].first, spans[k].last = min(spans[k].first, z), max(spans[k].last, z)
                while pending and pending[0][0] == z:
                    k = pending.pop(0)[1]
                    active[k] = out == k
                z += step
                done += 1
                if on_plane is not None:
                    on_plane(min(done, total), total)
    return labels, objects, [spans[k] for k in sorted(spans)]


def _carry(cache: EmbeddingCache, index: int, out: np.ndarray, active: dict[int, np.ndarray],
           iou_threshold: float, adapters: bool) -> None:
    """Decode the ``active`` objects (label -> previous plane's mask) on flat plane ``index``, write those that go
    on into ``out`` (this plane's labels) and keep them in ``active`` with their new masks; drop the others."""
    size = cache.model.config.input_size
    shape = cache.plane_shape
    owned = out > 0  # prompted objects (and those carried here from the other side) keep their pixels
    windows: dict[tuple[int, int], list[tuple[int, CropPrompt]]] = {}
    for k, previous in active.items():
        rows, cols = np.nonzero(previous)
        top, left = grid_window(np.array([cols.mean() + 0.5, rows.mean() + 0.5]), shape, size)
        windows.setdefault((top, left), []).append((k, mask_prompt(previous, top, left)))
    decoded: list[tuple[int, int, int, np.ndarray]] = []  # (label, top, left, logits h x w) of those that go on
    for (top, left), items in windows.items():
        logits = segment_in_window(cache, index, top, left, [p for _, p in items], adapters)
        h, w = min(size, shape[0] - top), min(size, shape[1] - left)
        for (k, _), logit in zip(items, logits[:, :h, :w]):
            mask = np.zeros(shape, bool)
            mask[top : top + h, left : left + w] = logit > 0
            taken = np.count_nonzero(mask & owned) * 2 > np.count_nonzero(mask)
            if not mask.any() or taken or _iou(mask, active[k]) < iou_threshold:
                del active[k]
                continue
            active[k] = mask
            decoded.append((k, top, left, logit))
    best = np.full(shape, -np.inf, np.float32)
    for k, top, left, logit in decoded:  # carried objects share the plane by their logits, as prompted ones do
        h, w = logit.shape
        region, chosen, free = best[top : top + h, left : left + w], out[top : top + h, left : left + w], \
            ~owned[top : top + h, left : left + w]
        wins = (logit > 0) & (logit > region) & free
        chosen[wins] = k
        region[wins] = logit[wins]
