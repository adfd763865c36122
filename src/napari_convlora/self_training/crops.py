"""Training crops with the weak labels inside them, and the prompts SAM's prompt encoder takes for them.

numpy only (``sam_prompts`` makes torch tensors). A crop is an ``S x S`` window of one plane (float32 ``Y x X x 3`` in
0..255, ``data.to_sam_planes``), zero where it reaches past the plane (``valid`` says where the plane is), placed
around a randomly chosen object so that objects keep their pixel size (no resizing, unlike WeSAM's longest-side
resize to 1024: the plugin trains and predicts at the image's own scale, ``InputSpec.rescale`` aside).

Every object whose centre lies in the window comes with it: boxes clipped to the window, points outside it dropped
(a points object without a positive point left is dropped), coarse objects with points drawn afresh in their mask
at every step (WeSAM's per-step sampling), at most ``max_objects`` chosen at random (WeSAM's 40).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..weak import WeakObject, step_points

#: SAM's label of a padding point ("not a point"), used to bring the objects of one prompt call to one point count.
PAD_LABEL = -1


@dataclass
class CropPrompt:
    """One object's prompt in crop coordinates: box ``(4,)`` (x0, y0, x1, y1) or None, positive ``P x 2`` and
    negative ``M x 2`` points (x, y), and its weak label's kind."""

    kind: str
    box: np.ndarray | None
    positive: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    negative: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))


@dataclass
class PromptedCrop:
    """An ``S x S`` crop of plane ``plane_index`` at (top, left), its valid area and the prompts of the objects in it."""

    image: np.ndarray
    valid: np.ndarray
    prompts: list[CropPrompt]
    plane_index: int
    top: int
    left: int


def object_centre(obj: WeakObject) -> np.ndarray:
    """(x, y): the centre of the box, or the mean of the positive points of a points object."""
    if obj.box is not None:
        return np.array([(obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2], np.float32)
    return obj.positive.mean(axis=0).astype(np.float32)


def crop_plane(plane: np.ndarray, top: int, left: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``size x size`` window at (top, left) of a ``Y x X x 3`` plane, zero-padded, and its valid area."""
    image = np.zeros((size, size, 3), np.float32)
    valid = np.zeros((size, size), bool)
    window = plane[top : top + size, left : left + size]
    image[: window.shape[0], : window.shape[1]] = window
    valid[: window.shape[0], : window.shape[1]] = True
    return image, valid


def window_around(centre: np.ndarray, plane_shape: tuple[int, int], size: int, rng: np.random.Generator | None) -> tuple[int, int]:
    """(top, left) of a window of side ``size`` that holds ``centre`` (x, y), inside the plane where it fits: at a
    random place (``rng``) or centred on it (``rng=None``, for evaluation)."""
    corner = []
    for value, length in ((float(centre[1]), plane_shape[0]), (float(centre[0]), plane_shape[1])):
        if length <= size:
            corner.append(0)
            continue
        low, high = max(0, int(np.ceil(value)) - size), min(length - size, int(value))
        start = int(rng.integers(low, high + 1)) if rng is not None and high >= low else int(np.clip(value - size / 2, 0, length - size))
        corner.append(start)
    return corner[0], corner[1]


def _in_window(xy: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    x, y = xy[:, 0] - left, xy[:, 1] - top
    return (x >= 0) & (x < size) & (y >= 0) & (y < size)


def prompt_in_crop(
    obj: WeakObject, plane_shape: tuple[int, int], top: int, left: int, size: int, rng: np.random.Generator,
    positive: int, negative: int,
) -> CropPrompt | None:
    """``obj``'s prompt in the window at (top, left), or None when nothing of it is left there."""
    offset = np.array([left, top], np.float32)
    box = None
    if obj.box is not None:
        x0, y0, x1, y1 = obj.box - np.concatenate([offset, offset])
        box = np.clip(np.array([x0, y0, x1, y1], np.float32), 0, size)
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            return None
    pos, neg = step_points(obj, plane_shape, rng, positive, negative) if obj.kind != "box" else (obj.positive, obj.negative)
    pos = pos[_in_window(pos, top, left, size)] - offset if len(pos) else pos
    neg = neg[_in_window(neg, top, left, size)] - offset if len(neg) else neg
    if obj.kind == "points" and len(pos) == 0:
        return None
    return CropPrompt(obj.kind, box, pos.astype(np.float32), neg.astype(np.float32))


class CropSampler:
    """Random prompted crops from planes and their weak objects; all randomness from the ``rng`` passed in.

    Args:
        planes: float32 ``Y x X x 3`` planes in 0..255.
        objects: per plane, its weak objects (``WeakObject``, coordinates of that plane).
        size: S, the crop side (the model's input size).
        max_objects, positive, negative: at most this many objects per crop; points drawn in coarse masks.
    """

    def __init__(self, planes: Sequence[np.ndarray], objects: Sequence[Sequence[WeakObject]], size: int,
                 max_objects: int = 40, positive: int = 5, negative: int = 5) -> None:
        if len(planes) != len(objects):
            raise ValueError(f"{len(planes)} planes but weak objects for {len(objects)}")
        self.planes, self.objects = list(planes), [list(o) for o in objects]
        self.size, self.max_objects, self.positive, self.negative = size, max_objects, positive, negative
        counts = np.array([len(o) for o in self.objects], float)
        if counts.sum() == 0:
            raise ValueError("no weak label on any plane: draw boxes or points, or paint coarse labels, first")
        self.plane_weights = counts / counts.sum()

    def crop_at(self, index: int, top: int, left: int, rng: np.random.Generator) -> PromptedCrop:
        """The crop of plane ``index`` at (top, left) with every object whose centre lies in it."""
        plane = self.planes[index]
        shape = plane.shape[:2]
        image, valid = crop_plane(plane, top, left, self.size)
        inside = [o for o in self.objects[index]
                  if _in_window(object_centre(o)[None], top, left, self.size)[0]]
        if len(inside) > self.max_objects:
            inside = [inside[i] for i in sorted(rng.choice(len(inside), self.max_objects, replace=False))]
        prompts = [p for o in inside if (p := prompt_in_crop(o, shape, top, left, self.size, rng, self.positive,
                                                              self.negative)) is not None]
        return PromptedCrop(image, valid, prompts, index, top, left)

    def sample(self, rng: np.random.Generator) -> PromptedCrop:
        """A plane (in proportion to its objects), an object on it, and a window holding that object's centre."""
        index = int(rng.choice(len(self.planes), p=self.plane_weights))
        anchor = self.objects[index][int(rng.integers(len(self.objects[index])))]
        top, left = window_around(object_centre(anchor), self.planes[index].shape[:2], self.size, rng)
        return self.crop_at(index, top, left, rng)


def prompt_groups(prompts: Sequence[CropPrompt]) -> list[tuple[list[int], dict[str, np.ndarray | None]]]:
    """The objects of a crop in groups that one call of SAM's prompt encoder can take (the same kinds of prompt:
    box or not, points or not), as (object indices, {"boxes": N x 4, "points": N x P x 2, "labels": N x P}); point
    lists are padded to one length with SAM's padding label -1."""
    groups: dict[tuple[bool, bool], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault((p.box is not None, len(p.positive) + len(p.negative) > 0), []).append(i)
    out = []
    for (has_box, has_points), indices in groups.items():
        arrays: dict[str, np.ndarray | None] = {"boxes": None, "points": None, "labels": None}
        if has_box:
            arrays["boxes"] = np.stack([prompts[i].box for i in indices]).astype(np.float32)
        if has_points:
            count = max(len(prompts[i].positive) + len(prompts[i].negative) for i in indices)
            points = np.zeros((len(indices), count, 2), np.float32)
            labels = np.full((len(indices), count), PAD_LABEL, np.int64)
            for row, i in enumerate(indices):
                p = prompts[i]
                xy = np.concatenate([p.positive, p.negative]).reshape(-1, 2)
                points[row, : len(xy)] = xy
                labels[row, : len(p.positive)] = 1
                labels[row, len(p.positive) : len(xy)] = 0
            arrays["points"], arrays["labels"] = points, labels
        out.append((indices, arrays))
    return out
