"""From (image, labels) arrays as napari layers hold them to what the training loop consumes, as a
:class:`~napari_convlora.config.TrainRecipe` says.

Validates every pair before anything trains, encodes labels (dense / sparse / instances), keeps the
2D planes of stacks that carry labels, holds out part of the labelled area for validation (a block of every class
that can spare one), builds the patch sampler (class-balanced in the class modes) and the validation patches, and
collects warnings: classes too rare to learn or left without validation, instance ids in a class mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..config import TrainRecipe
from ..constants import IGNORE_INDEX
from ..instances import object_classes, separate_objects
from ..metrics import class_labels
from .images import ImageLayout
from .label_checks import (instance_id_warning, pixels_per_class, rare_class_warnings, reused_id_warning,
                           unvalidated_class_warnings)
from .labels import SPARSE_MODES, LabelEncoding, make_label_encoding, validate_pair
from .pairs import labelled_plane_pairs
from .sampling import PatchSampler, validation_patches
from .split import split_by_class

#: Label modes whose patches are class-balanced (``PatchSampler(class_balanced=True)``): the modes with classes of
#: their own, where a rare class (a lesion on 0.65 % of the pixels) is in almost no uniformly placed patch. The
#: instance modes have one object class, placed as before.
CLASS_BALANCED_MODES = ("dense", "sparse")


@dataclass
class TrainingPair:
    """One Image layer's data and its Labels layer's data (same spatial shape), and how to read the image's axes."""

    image: np.ndarray
    labels: np.ndarray
    layout: ImageLayout = field(default_factory=ImageLayout)


@dataclass
class PreparedData:
    """Everything the loop needs, prepared for one :class:`TrainRecipe` (kept as ``recipe``): label encoding,
    patch sampler and validation patches, cut at the recipe's input size from planes made as the model sees
    them (normalised and rescaled by the recipe's input spec)."""

    recipe: TrainRecipe
    encoding: LabelEncoding
    sampler: PatchSampler
    validation: list[tuple[np.ndarray, np.ndarray]]
    train_planes: list[tuple[np.ndarray, np.ndarray]]
    #: For each image (training images, then validation images): (planes with labels used, planes in all).
    plane_counts: list[tuple[int, int]] = field(default_factory=list)
    #: Class indices with training pixels but no validation pixels (empty without validation).
    unvalidated_classes: tuple[int, ...] = ()
    #: One line each, to show before training: rare classes, classes left without validation, instance ids.
    warnings: list[str] = field(default_factory=list)
    #: True when the sampler's and the validation patches' targets are object ids (IGNORE_INDEX, 0 background,
    #: > 0 an object; for an instance head: ``recipe.trains_instance_head``), not class indices; ``train_planes``
    #: always holds class indices.
    object_ids: bool = False
    #: With object ids: the median equivalent radius (sqrt(area / pi), pixels as the model sees them) of the
    #: annotated objects, whole as painted (before the validation split); None without objects.
    object_radius: float | None = None

    def summary(self) -> str:
        """What trains, before it trains: the planes used of each image and the pixels of each class."""
        names = class_labels(self.recipe.class_names, self.encoding.num_classes)
        train = pixels_per_class(self.train_planes, self.encoding.num_classes)
        parts = []
        for index, (used, total) in enumerate(self.plane_counts):
            if total > 1:
                skipped = "skipped as not annotated" if self.recipe.unpainted_planes == "skip" else "background"
                parts.append(f"image {index + 1}: {used} of {total} planes"
                             + (f" (unpainted planes {skipped})" if used < total else ""))
        pixels = ", ".join(f"{name} {int(t):,} / {int(v):,}" for name, t, v in
                           zip(names, train, self.validation_pixels()))
        objects = [] if self.object_radius is None else [
            f"objects of median radius {self.object_radius:.1f} px: an instance head learns to separate them"]
        return "; ".join(parts + [f"pixels per class (training / validation): {pixels}"] + objects)

    def validation_pixels(self) -> np.ndarray:
        """Labelled validation pixels per class (int64, K)."""
        patches = [(im, object_classes(t)) for im, t in self.validation] if self.object_ids else self.validation
        return pixels_per_class(patches, self.encoding.num_classes)

    def steps_per_epoch(self) -> int:
        """Optimizer steps for as many patches as it takes to tile every training plane once."""
        size = self.recipe.input_size
        patches = sum(math.ceil(t.shape[0] / size) * math.ceil(t.shape[1] / size) for _, t in self.train_planes)
        return max(1, math.ceil(patches / self.recipe.patches_per_step))


def prepare_training_data(
    pairs: Sequence[TrainingPair],
    recipe: TrainRecipe,
    validation_pairs: Sequence[TrainingPair] | None = None,
) -> PreparedData:
    """Check and assemble training data as ``recipe`` says (input size, input spec, label mode and background
    value, class names, validation fraction, augmentation, seed).

    Args:
        pairs: the annotated images. Stacks and time series train on the planes that carry labels.
        validation_pairs: images kept for validation only; without them ``recipe.val_fraction`` of the
            labelled area of ``pairs`` is held out, in blocks.

    Raises:
        ValueError: with a message naming the problem (and the image), before any training starts.
    """
    if not pairs:
        raise ValueError("no training images given: choose at least one Image layer with its Labels layer")
    validation_pairs = list(validation_pairs or [])
    for index, pair in enumerate([*pairs, *validation_pairs]):
        try:
            validate_pair(pair.image, pair.labels, pair.layout, recipe.label_mode, recipe.input)
        except ValueError as e:
            raise ValueError(f"image {index + 1}: {e}") from None
    encoding = make_label_encoding([p.labels for p in [*pairs, *validation_pairs]], recipe.label_mode,
                                   recipe.background_value)
    if recipe.class_names is not None and len(recipe.class_names) != encoding.num_classes:
        raise ValueError(
            f"{len(recipe.class_names)} class names given but the labels hold {encoding.num_classes} classes "
            f"(label values {list(encoding.class_values)})"
        )

    plane_counts = []
    objects = recipe.trains_instance_head
    ids_of: dict[int, np.ndarray] = {}  # id(plane) -> its object ids, when an instance head trains

    def planes_of(some_pairs: Sequence[TrainingPair]) -> list[tuple[np.ndarray, np.ndarray]]:
        planes = []
        for p in some_pairs:
            found = labelled_plane_pairs(p.image, p.labels, p.layout, recipe.input, encoding, recipe.unpainted_planes,
                                         objects=objects)
            plane_counts.append((len(found), int(np.prod(np.shape(p.labels)[:-2], dtype=np.int64))))
            if objects:
                ids_of.update((id(plane), ids) for plane, ids in found)
                found = [(plane, object_classes(ids)) for plane, ids in found]
            planes += found
        return planes

    def targets_for_patches(planes: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Class planes as the split left them -> the same planes with object ids where an instance head trains."""
        if not objects:
            return planes
        return [(plane, np.where(t == IGNORE_INDEX, IGNORE_INDEX, ids_of[id(plane)])) for plane, t in planes]

    if validation_pairs:
        train_planes, val_planes = planes_of(pairs), planes_of(validation_pairs)
        val_pixels = pixels_per_class(val_planes, encoding.num_classes)
        unvalidated = {c: "not_in_validation_images" for c in range(encoding.num_classes) if val_pixels[c] == 0}
    else:
        block = max(16, round(recipe.input_size / 4))
        split = split_by_class(planes_of(pairs), recipe.val_fraction, recipe.seed, block)
        train_planes, val_planes, unvalidated = split.train_pairs, split.val_pairs, split.unvalidated
    train_planes = [(im, t) for im, t in train_planes if (t != IGNORE_INDEX).any()]
    if not train_planes:
        raise ValueError("no labelled pixel is left for training after the validation split; lower the fraction")
    size = recipe.input_size
    train_pixels = pixels_per_class(train_planes, encoding.num_classes)
    unvalidated = {c: why for c, why in unvalidated.items() if train_pixels[c] > 0}
    warnings = [line for index, pair in enumerate([*pairs, *validation_pairs], start=1)
                for check in (instance_id_warning, reused_id_warning)
                if (line := check(pair.labels, encoding, index)) is not None]
    warnings += rare_class_warnings(train_planes, encoding, recipe.class_names, size)
    warnings += unvalidated_class_warnings(unvalidated, train_pixels, encoding, recipe.class_names)
    return PreparedData(
        recipe=recipe,
        encoding=encoding,
        sampler=PatchSampler(targets_for_patches(train_planes), size,
                             labelled_weighting=recipe.label_mode in SPARSE_MODES, augment=recipe.augment,
                             class_balanced=recipe.label_mode in CLASS_BALANCED_MODES),
        validation=validation_patches(targets_for_patches([(im, t) for im, t in val_planes
                                                           if (t != IGNORE_INDEX).any()]), size),
        train_planes=train_planes,
        plane_counts=plane_counts,
        unvalidated_classes=tuple(sorted(unvalidated)),
        warnings=warnings,
        object_ids=objects,
        object_radius=median_object_radius(list(ids_of.values())) if objects else None,
    )


def median_object_radius(planes: Sequence[np.ndarray]) -> float | None:
    """The median over every object of planes of object ids (IGNORE_INDEX, 0 background, > 0 ids; an object is a
    connected piece of one id, ``instances.separate_objects``) of its equivalent radius ``sqrt(area / pi)``; None
    without objects."""
    areas = [np.bincount(objects.ravel())[1:] for objects in map(separate_objects, planes)]
    areas = np.concatenate(areas) if areas else np.zeros(0)
    return float(np.sqrt(np.median(areas) / np.pi)) if areas.size else None
