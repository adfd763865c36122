"""Weakly labelled objects and their container, grouped by plane (numpy only).

Coordinates are SAM's, in pixels of one 2-D plane of the image: ``x`` = column, ``y`` = row, on **pixel
edges**. Pixel ``(row r, column c)`` covers ``[c, c + 1) x [r, r + 1)``; its centre is ``(c + 0.5, r + 0.5)``.
A box ``x0, y0, x1, y1`` therefore encloses whole pixels: the box of a mask is ``(min col, min row,
max col + 1, max row + 1)`` (the ``mask_box`` of ``data.prompts``), and a box covering the whole plane is
``0, 0, W, H``. napari puts pixel centres on integers, so a napari coordinate converts with ``+ 0.5``
(see ``coordinates.py``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np

#: The kinds of weak label: a box alone; positive (and negative) points; a coarse mask with its box, from
#: which points are drawn afresh at every step.
KINDS = ("box", "points", "coarse")

Plane = tuple[int, ...]


class WeakLabelError(ValueError):
    """Weak labels that cannot be used; the one-line message names the layer or file and what was expected."""


def _points_array(points: np.ndarray | None) -> np.ndarray:
    """``N x 2`` float32 (x, y); an empty ``0 x 2`` array for None."""
    return np.zeros((0, 2), np.float32) if points is None else np.asarray(points, np.float32).reshape(-1, 2)


@dataclass(frozen=True, eq=False)
class WeakObject:
    """One weakly labelled object on one plane.

    plane: the leading indices of its plane, ``()`` for a 2-D image, ``(z,)`` for a stack, ``(t, z)``...
    kind: "box", "points" or "coarse" (``KINDS``).
    box: ``(4,)`` float32 ``x0, y0, x1, y1`` on pixel edges, within ``0..W`` and ``0..H``; None for "points".
    positive: ``P x 2`` float32 ``(x, y)`` positive points (pixel-edge coordinates; a pixel's centre is +0.5).
    negative: ``M x 2`` float32 ``(x, y)`` negative points.
    mask: for "coarse" (and optional for polygons/ellipses): the coarse mask **cropped** to its box's pixels,
        bool ``h x w``; its top-left pixel is ``mask_origin`` ``(row, col)`` of the plane. ``full_mask`` pastes it.
    layer, source: where it came from, for messages ("boxes", "shape 3"; "points", "point 5"; "labels", "label 7").
    """

    plane: Plane
    kind: str
    box: np.ndarray | None = None
    positive: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    negative: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    mask: np.ndarray | None = None
    mask_origin: tuple[int, int] = (0, 0)
    layer: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"weak label kind {self.kind!r} is not one of {', '.join(KINDS)}")
        object.__setattr__(self, "plane", tuple(int(i) for i in self.plane))
        object.__setattr__(self, "positive", _points_array(self.positive))
        object.__setattr__(self, "negative", _points_array(self.negative))
        if self.box is not None:
            object.__setattr__(self, "box", np.asarray(self.box, np.float32).reshape(4))
        if self.mask is not None:
            object.__setattr__(self, "mask", np.asarray(self.mask, bool))
            if self.mask.ndim != 2:
                raise ValueError(f"the mask of {self.source or 'an object'} has {self.mask.ndim} axes; expected 2")
        if self.kind in ("box", "coarse") and self.box is None:
            raise ValueError(f"a {self.kind} weak label needs a box ({self.source or 'no source'})")
        if self.kind == "coarse" and (self.mask is None or not self.mask.any()):
            raise ValueError(f"a coarse weak label needs a non-empty mask ({self.source or 'no source'})")
        if self.kind == "points" and len(self.positive) == 0:
            raise ValueError(f"a points weak label needs a positive point ({self.source or 'no source'})")

    def full_mask(self, plane_shape: Sequence[int]) -> np.ndarray | None:
        """The coarse mask pasted into a bool ``H x W`` plane, or None when the object has no mask."""
        if self.mask is None:
            return None
        full = np.zeros(tuple(int(n) for n in plane_shape), bool)
        r, c = self.mask_origin
        h, w = self.mask.shape
        full[r : r + h, c : c + w] = self.mask
        return full


@dataclass(frozen=True)
class WeakLabelSummary:
    """What one image's weak labels hold, for logs.

    per_kind: objects of each kind (every kind of ``KINDS`` present, 0 if none).
    per_plane: for each plane holding objects, the objects of each kind there.
    skipped: one line per thing left out (or only partly used), saying what and why.
    """

    per_kind: dict[str, int]
    per_plane: dict[Plane, dict[str, int]]
    skipped: tuple[str, ...]

    @property
    def total(self) -> int:
        return sum(self.per_kind.values())

    def lines(self) -> list[str]:
        """Readable lines: the totals, one line per plane, then one per skipped item."""
        def counts(by_kind: dict[str, int]) -> str:
            return ", ".join(f"{n} {kind}" for kind, n in by_kind.items() if n) or "none"

        out = [f"{self.total} weak object(s) on {len(self.per_plane)} plane(s): {counts(self.per_kind)}"]
        out += [f"plane {plane}: {counts(by_kind)}" for plane, by_kind in self.per_plane.items() if plane != ()]
        out += [f"skipped: {line}" for line in self.skipped]
        return out


@dataclass
class WeakLabels:
    """All weakly labelled objects of one image, grouped by plane.

    image_shape: the image's shape without its channel axis, ``(..., H, W)`` (``data.spatial_shape``).
    objects: plane -> the objects drawn on it (planes in C order; only planes holding objects).
    skipped: one line per prompt left out or only partly used, and why.
    dense_labels: an optional dense Labels array of ``image_shape`` used **for evaluation only**; the losses of
        weakly supervised adaptation never read it.
    """

    image_shape: tuple[int, ...]
    objects: dict[Plane, list[WeakObject]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    dense_labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(n) for n in self.image_shape)
        if len(self.image_shape) < 2:
            raise WeakLabelError(f"image shape {self.image_shape} has fewer than 2 axes (Y, X)")
        self.objects = {plane: list(objs) for plane, objs in sorted(self.objects.items()) if objs}

    @property
    def plane_shape(self) -> tuple[int, int]:
        """``(H, W)`` of every plane."""
        return self.image_shape[-2], self.image_shape[-1]

    @property
    def leading_shape(self) -> tuple[int, ...]:
        """The image's axes before ``H, W`` (``()`` for a 2-D image)."""
        return self.image_shape[:-2]

    def planes(self) -> list[Plane]:
        """The planes holding at least one object, in C order."""
        return list(self.objects)

    def on_plane(self, plane: Plane) -> list[WeakObject]:
        return list(self.objects.get(tuple(plane), []))

    def flat_plane_index(self, plane: Plane) -> int:
        """The plane's number counting the leading axes in C order (0 for a 2-D image), as the core numbers them."""
        return int(np.ravel_multi_index(tuple(plane), self.leading_shape)) if self.leading_shape else 0

    def __iter__(self) -> Iterator[WeakObject]:
        for objs in self.objects.values():
            yield from objs

    def __len__(self) -> int:
        return sum(len(objs) for objs in self.objects.values())

    def with_evaluation_labels(self, labels: np.ndarray, name: str = "labels") -> WeakLabels:
        """A copy holding a dense Labels array of ``image_shape`` for evaluation only (never for the loss)."""
        labels = np.asarray(labels)
        if labels.shape != self.image_shape:
            raise WeakLabelError(f"evaluation Labels layer {name!r} has shape {labels.shape}; "
                                 f"expected the image's {self.image_shape}")
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise WeakLabelError(f"evaluation Labels layer {name!r} has dtype {labels.dtype}; expected integers")
        return replace(self, objects=dict(self.objects), skipped=list(self.skipped), dense_labels=labels)

    def summary(self) -> WeakLabelSummary:
        per_plane = {}
        for plane, objs in self.objects.items():
            kinds = Counter(o.kind for o in objs)
            per_plane[plane] = {kind: kinds[kind] for kind in KINDS}
        kinds = Counter(o.kind for o in self)
        return WeakLabelSummary({kind: kinds[kind] for kind in KINDS}, per_plane, tuple(self.skipped))


def group_by_plane(objects: Sequence[WeakObject]) -> dict[Plane, list[WeakObject]]:
    grouped: dict[Plane, list[WeakObject]] = {}
    for obj in objects:
        grouped.setdefault(obj.plane, []).append(obj)
    return grouped


def combine_weak_labels(parts: Sequence[WeakLabels]) -> WeakLabels:
    """One image's weak labels from several layers or files (same ``image_shape``): objects and skipped lines
    concatenated in the given order; the first evaluation Labels array found is kept."""
    if not parts:
        raise WeakLabelError("no weak labels to combine: give at least one Shapes, Points or Labels layer")
    shape = parts[0].image_shape
    for part in parts[1:]:
        if part.image_shape != shape:
            raise WeakLabelError(f"weak labels for image shapes {shape} and {part.image_shape} cannot be combined")
    objects = group_by_plane([obj for part in parts for obj in part])
    skipped = [line for part in parts for line in part.skipped]
    dense = next((p.dense_labels for p in parts if p.dense_labels is not None), None)
    return WeakLabels(shape, objects, skipped, dense)
