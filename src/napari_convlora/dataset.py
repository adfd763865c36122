"""From (image, labels) arrays as napari layers hold them to what the training loop consumes.

Validates every pair before anything trains, encodes labels (dense / sparse / instances), keeps the
2D planes of stacks that carry labels, holds out part of the labelled area for validation, and
builds the patch sampler and the validation patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .config import Normalisation
from .constants import IGNORE_INDEX
from .data import (
    ImageLayout,
    LabelEncoding,
    PatchSampler,
    labelled_plane_pairs,
    make_label_encoding,
    split_pairs,
    validate_pair,
    validation_patches,
)


@dataclass
class TrainingPair:
    """One Image layer's data and its Labels layer's data (same spatial shape)."""

    image: np.ndarray
    labels: np.ndarray
    layout: ImageLayout = field(default_factory=ImageLayout)


@dataclass
class PreparedData:
    """Everything the loop needs: label encoding, patch sampler, validation patches, normalisation."""

    encoding: LabelEncoding
    sampler: PatchSampler
    validation: list[tuple[np.ndarray, np.ndarray]]
    normalisation: Normalisation
    class_names: tuple[str, ...] | None
    train_planes: list[tuple[np.ndarray, np.ndarray]]
    patch_size: int

    @property
    def labelled_pixels(self) -> int:
        return int(sum((t != IGNORE_INDEX).sum() for _, t in self.train_planes))

    def steps_per_epoch(self, patches_per_step: int) -> int:
        """Optimizer steps for as many patches as it takes to tile every training plane once."""
        factor = self.normalisation.rescale
        patches = sum(
            math.ceil(t.shape[0] * factor / self.patch_size) * math.ceil(t.shape[1] * factor / self.patch_size)
            for _, t in self.train_planes
        )
        return max(1, math.ceil(patches / patches_per_step))


def prepare_training_data(
    pairs: Sequence[TrainingPair],
    label_mode: str = "dense",
    background_value: int | None = None,
    patch_size: int = 1024,
    val_fraction: float = 0.1,
    validation_pairs: Sequence[TrainingPair] | None = None,
    rescale: float = 1.0,
    augment: bool = True,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> PreparedData:
    """Check and assemble training data.

    Args:
        pairs: the annotated images. Stacks and time series train on the planes that carry labels.
        label_mode: ``"dense"`` (0 = background class), ``"sparse"`` (0 = not annotated, ignored;
            ``background_value`` is the background class) or ``"instances"`` (every non-zero id = foreground).
        val_fraction: part of the labelled area held out for validation (ignored when
            ``validation_pairs`` are given).
        class_names: one name per class, background first.

    Raises:
        ValueError: with a message naming the problem, before any training starts.
    """
    if not pairs:
        raise ValueError("no training images given: choose at least one Image layer with its Labels layer")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    if rescale <= 0:
        raise ValueError(f"rescale must be positive, got {rescale}")
    validation_pairs = list(validation_pairs or [])
    for index, pair in enumerate([*pairs, *validation_pairs]):
        try:
            validate_pair(pair.image, pair.labels, pair.layout, label_mode)
        except ValueError as e:
            raise ValueError(f"image {index + 1}: {e}") from None
    encoding = make_label_encoding([p.labels for p in [*pairs, *validation_pairs]], label_mode, background_value)
    if class_names is not None:
        class_names = tuple(str(n) for n in class_names)
        if len(class_names) != encoding.num_classes:
            raise ValueError(
                f"{len(class_names)} class names given but the labels hold {encoding.num_classes} classes "
                f"(label values {list(encoding.class_values)})"
            )

    def planes_of(some_pairs: Sequence[TrainingPair]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [pl for p in some_pairs for pl in labelled_plane_pairs(p.image, p.labels, p.layout, encoding)]

    if validation_pairs:
        train_planes, val_planes = planes_of(pairs), planes_of(validation_pairs)
    else:
        block = max(16, round(patch_size / (4 * rescale)))
        train_planes, val_planes = split_pairs(planes_of(pairs), val_fraction, seed, block)
    train_planes = [(im, t) for im, t in train_planes if (t != IGNORE_INDEX).any()]
    if not train_planes:
        raise ValueError("no labelled pixel is left for training after the validation split; lower the fraction")
    percentiles = pairs[0].layout.percentiles
    return PreparedData(
        encoding=encoding,
        sampler=PatchSampler(train_planes, patch_size, rescale=rescale,
                             labelled_weighting=label_mode == "sparse", augment=augment),
        validation=validation_patches([(im, t) for im, t in val_planes if (t != IGNORE_INDEX).any()],
                                      patch_size, rescale=rescale),
        normalisation=Normalisation(percentiles=percentiles, rescale=rescale),
        class_names=class_names,
        train_planes=train_planes,
        patch_size=patch_size,
    )
