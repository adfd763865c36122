"""From (image, labels) arrays as napari layers hold them to what the training loop consumes, as a
:class:`~napari_convlora.config.TrainRecipe` says.

Validates every pair before anything trains, encodes labels (dense / sparse / instances), keeps the
2D planes of stacks that carry labels, holds out part of the labelled area for validation, and
builds the patch sampler and the validation patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..config import TrainRecipe
from ..constants import IGNORE_INDEX
from .images import ImageLayout
from ..metrics import class_labels
from .labels import SPARSE_MODES, LabelEncoding, make_label_encoding, validate_pair
from .pairs import labelled_plane_pairs
from .sampling import PatchSampler, validation_patches
from .split import split_pairs


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

    def summary(self) -> str:
        """What trains, before it trains: the planes used of each image and the pixels of each class."""
        names = class_labels(self.recipe.class_names, self.encoding.num_classes)
        train = np.zeros(self.encoding.num_classes, dtype=np.int64)
        for _, targets in self.train_planes:
            train += np.bincount(targets[targets != IGNORE_INDEX], minlength=self.encoding.num_classes)
        parts = []
        for index, (used, total) in enumerate(self.plane_counts):
            if total > 1:
                skipped = "skipped as not annotated" if self.recipe.unpainted_planes == "skip" else "background"
                parts.append(f"image {index + 1}: {used} of {total} planes"
                             + (f" (unpainted planes {skipped})" if used < total else ""))
        pixels = ", ".join(f"{name} {int(t):,} / {int(v):,}" for name, t, v in
                           zip(names, train, self.validation_pixels()))
        return "; ".join(parts + [f"pixels per class (training / validation): {pixels}"])

    def validation_pixels(self) -> np.ndarray:
        """Labelled validation pixels per class (int64, K)."""
        counts = np.zeros(self.encoding.num_classes, dtype=np.int64)
        for _, targets in self.validation:
            labelled = targets[targets != IGNORE_INDEX]
            counts += np.bincount(labelled, minlength=self.encoding.num_classes)
        return counts

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

    def planes_of(some_pairs: Sequence[TrainingPair]) -> list[tuple[np.ndarray, np.ndarray]]:
        planes = []
        for p in some_pairs:
            found = labelled_plane_pairs(p.image, p.labels, p.layout, recipe.input, encoding, recipe.unpainted_planes)
            plane_counts.append((len(found), int(np.prod(np.shape(p.labels)[:-2], dtype=np.int64))))
            planes += found
        return planes

    if validation_pairs:
        train_planes, val_planes = planes_of(pairs), planes_of(validation_pairs)
    else:
        block = max(16, round(recipe.input_size / 4))
        train_planes, val_planes = split_pairs(planes_of(pairs), recipe.val_fraction, recipe.seed, block)
    train_planes = [(im, t) for im, t in train_planes if (t != IGNORE_INDEX).any()]
    if not train_planes:
        raise ValueError("no labelled pixel is left for training after the validation split; lower the fraction")
    size = recipe.input_size
    return PreparedData(
        recipe=recipe,
        encoding=encoding,
        sampler=PatchSampler(train_planes, size, labelled_weighting=recipe.label_mode in SPARSE_MODES,
                             augment=recipe.augment),
        validation=validation_patches([(im, t) for im, t in val_planes if (t != IGNORE_INDEX).any()], size),
        train_planes=train_planes,
        plane_counts=plane_counts,
    )
