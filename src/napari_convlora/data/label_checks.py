"""Warnings about labels that would train or validate badly, each one line naming the class (or image) and what to
do: a class too rare to learn, a class that validation cannot measure, and instance ids painted in a class mode.

numpy, scipy and scikit-image: no torch, no napari, no Qt. Nothing here stops a run; the lines go to
``PreparedData.warnings``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage
from skimage.measure import label as connected_pieces

from ..constants import IGNORE_INDEX
from .labels import SPARSE_MODES, LabelEncoding, label_planes, present_values
from .split import STRATIFY_LIMIT

#: A class with fewer training pixels than this is too rare to learn from, wherever they lie.
MIN_CLASS_PIXELS = 20
#: A class whose training pixels are one connected spot smaller than this share of a patch's area is a single
#: example, seen at a single place: 1 % of a patch is 10 x 10 px at 100 px patches, 102 x 102 px at 1024.
SMALL_SPOT_SHARE = 0.01
#: Label images with at least this many values (besides background and "not annotated") may hold instance ids;
#: an atlas or a semantic labelling rarely has that many classes in one plane.
INSTANCE_MIN_VALUES = 16
#: ... when at least this share of those values are each one connected piece ...
INSTANCE_OBJECT_SHARE = 0.9
#: ... covering at most this share of the plane (an object, not a region).
INSTANCE_MAX_AREA = 0.05
#: Planes of a stack checked for instance ids, spread evenly over the painted ones: bounded work on long stacks.
INSTANCE_CHECK_PLANES = 3

#: Why a class has no validation pixels (the reasons of ``split.split_by_class`` and of explicit validation images).
UNVALIDATED_WORDS = {
    "one_region": "all its {pixels} pixels lie in one region",
    "needed": "every region holding it also holds the only training pixels of another class",
    "over_limit": "holding out one of its regions would take more than {limit:g} times the validation fraction",
    "not_in_validation_images": "it is not in the validation images",
}
CONNECTED = np.ones((3, 3), dtype=bool)  # 8-connectivity: pixels touching at a corner are one piece


def class_words(encoding: LabelEncoding, class_names: Sequence[str] | None, index: int) -> str:
    """How a warning names class ``index``: ``class 'lesion'`` with class names, else by its label value."""
    if class_names is not None and len(class_names) == encoding.num_classes:
        return f"class '{class_names[index]}'"
    if encoding.mode in ("instances", "sparse_instances"):
        return "the background" if index == 0 else "the objects"
    return f"label value {encoding.class_values[index]}"


def _pieces_of(targets: np.ndarray, cls: int, box: tuple[slice, slice]) -> int:
    """Connected pieces (8-connectivity) of class ``cls`` inside ``box`` of one plane of int64 targets."""
    return int(ndimage.label(targets[box] == cls, structure=CONNECTED)[1])


def rare_class_warnings(train_planes: Sequence[tuple[np.ndarray, np.ndarray]], encoding: LabelEncoding,
                        class_names: Sequence[str] | None, patch_size: int) -> list[str]:
    """A line for each class with no training pixels, fewer than :data:`MIN_CLASS_PIXELS`, or all of them in one
    connected spot smaller than :data:`SMALL_SPOT_SHARE` of a ``patch_size`` patch.

    train_planes: (planes ``Y x X x 3``, targets int64 ``Y x X``, class indices or IGNORE_INDEX) after the split.
    Work: one pass per plane for the counts, and connected pieces only inside the boxes of the rare classes.
    """
    num_classes = encoding.num_classes
    per_plane = [np.bincount((t + 1).reshape(-1), minlength=num_classes + 1)[1:] for _, t in train_planes]
    pixels = np.sum(per_plane, axis=0) if per_plane else np.zeros(num_classes, dtype=np.int64)
    spot = SMALL_SPOT_SHARE * patch_size**2
    rare = [c for c in range(num_classes) if 0 < pixels[c] < max(MIN_CLASS_PIXELS, spot)]
    places = dict.fromkeys(rare, 0)
    for (_, targets), counts in zip(train_planes, per_plane):
        here = [c for c in rare if counts[c] > 0]
        if here:
            boxes = ndimage.find_objects(targets + 1, max_label=num_classes)  # class c is value c + 1
            for cls in here:
                places[cls] += _pieces_of(targets, cls, boxes[cls])
    lines = []
    for cls in range(num_classes):
        who = class_words(encoding, class_names, cls)
        if pixels[cls] == 0:
            lines.append(f"{who} has no training pixels (it is only in the validation images): the model cannot "
                         "learn it; paint it in a training image")
        elif cls in places and (pixels[cls] < MIN_CLASS_PIXELS or places[cls] == 1):
            where = f"{places[cls]} place" + ("s" if places[cls] > 1 else "")
            lines.append(f"paint more examples of {who} ({int(pixels[cls]):,} training pixels in {where}): too few "
                         "to learn it from")
    return lines


def unvalidated_class_warnings(unvalidated: Mapping[int, str], train_pixels: np.ndarray, encoding: LabelEncoding,
                               class_names: Sequence[str] | None) -> list[str]:
    """A line for each class in training without validation pixels; ``unvalidated``: {class: a reason of
    :data:`UNVALIDATED_WORDS`}, ``train_pixels``: int64 ``K`` training pixels per class."""
    lines = []
    for cls, reason in sorted(unvalidated.items()):
        why = UNVALIDATED_WORDS[reason].format(pixels=f"{int(train_pixels[cls]):,}", limit=STRATIFY_LIMIT)
        lines.append(f"{class_words(encoding, class_names, cls)} has no validation pixels ({why}): its validation "
                     "score is not measured; paint it in another place too, or give validation images (--val-image)")
    return lines


def _instance_like(plane: np.ndarray, ignored: set[int]) -> tuple[int, int] | None:
    """(values, values that are one small connected piece) of a 2D label plane that looks like instance ids, else
    None. Values in ``ignored`` (background, not annotated) are not counted."""
    values = [v for v in present_values(plane).tolist() if v not in ignored]
    if len(values) < INSTANCE_MIN_VALUES:
        return None
    pieces = connected_pieces(plane, connectivity=2)  # neighbours of the same value are one piece; 0 is none
    value_of = np.zeros(int(pieces.max()) + 1, dtype=np.int64)
    value_of[pieces.reshape(-1)] = plane.reshape(-1)  # every pixel of a piece holds the same value
    sizes = np.bincount(pieces.reshape(-1))
    kept = ~np.isin(value_of, list(ignored))
    kept[0] = False  # pieces are numbered from 1
    found, index, count = np.unique(value_of[kept], return_inverse=True, return_counts=True)
    area = np.bincount(index, weights=sizes[kept])
    objects = int(np.count_nonzero((count == 1) & (area <= INSTANCE_MAX_AREA * plane.size)))
    return (found.size, objects) if objects >= INSTANCE_OBJECT_SHARE * found.size else None


def instance_id_warning(labels: np.ndarray, encoding: LabelEncoding, image_number: int) -> str | None:
    """A line when ``labels`` (a Labels layer's data, ``(..., Y, X)``) in dense or sparse mode look like instance
    ids: at least :data:`INSTANCE_MIN_VALUES` values, nearly each one small connected object. Checks up to
    :data:`INSTANCE_CHECK_PLANES` painted planes (one connected-piece labelling each)."""
    if encoding.mode not in ("dense", "sparse"):
        return None
    planes = label_planes(np.asarray(labels))
    painted = np.flatnonzero(planes.reshape(planes.shape[0], -1).any(axis=1))
    picks = np.unique(np.linspace(0, painted.size - 1, min(INSTANCE_CHECK_PLANES, painted.size)).round().astype(int))
    ignored = {0, encoding.background_value}
    for plane in painted[picks]:
        found = _instance_like(planes[plane], ignored)
        if found is not None:
            values, objects = found
            each = "each" if objects == values else f"{objects} of them"
            mode = "sparse_instances" if encoding.mode in SPARSE_MODES else "instances"
            return (f"image {image_number}: the labels hold {values} values, {each} one connected object: they look "
                    f"like instance ids; to segment objects of one class, use label mode '{mode}' (--label-mode "
                    f"{mode}, or Labels in the dock)")
    return None


def reused_id_warning(labels: np.ndarray, encoding: LabelEncoding, image_number: int) -> str | None:
    """A line when instance labels (instances or sparse instances mode) paint one value on separate blobs: each
    blob is an object of its own (an instance head learns them apart; scores count them apart), which is what a
    layer painted with one label for every nucleus means, but not what two pieces of one object cut apart by
    another mean. Checks up to :data:`INSTANCE_CHECK_PLANES` painted planes."""
    if encoding.mode not in ("instances", "sparse_instances"):
        return None
    planes = label_planes(np.asarray(labels))
    painted = np.flatnonzero(planes.reshape(planes.shape[0], -1).any(axis=1))
    picks = np.unique(np.linspace(0, painted.size - 1, min(INSTANCE_CHECK_PLANES, painted.size)).round().astype(int))
    ignored = [0] if encoding.mode == "instances" else [0, encoding.background_value]
    for plane in painted[picks]:
        values = np.where(np.isin(planes[plane], ignored), 0, planes[plane])
        pieces = connected_pieces(values, connectivity=2)
        value_of = np.zeros(int(pieces.max()) + 1, dtype=np.int64)
        value_of[pieces.reshape(-1)] = values.reshape(-1)
        found, count = np.unique(value_of[1:], return_counts=True)
        reused = found[count > 1]
        if reused.size:
            most = int(found[np.argmax(count)])
            return (f"image {image_number}: {reused.size} label value(s) are painted on separate blobs (value {most} "
                    f"on {int(count.max())}): each blob counts as an object of its own; give two pieces of one "
                    "object one connected stroke, or each object its own value, if that is not what you mean")
    return None


def pixels_per_class(planes: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int) -> np.ndarray:
    """Labelled pixels per class of (planes, targets int64 ``Y x X``) pairs: int64 ``K``."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for _, targets in planes:
        counts += np.bincount(targets[targets != IGNORE_INDEX], minlength=num_classes)
    return counts
