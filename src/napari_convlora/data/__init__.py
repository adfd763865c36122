"""Data preparation: napari (image, labels) arrays -> normalised RGB planes, class targets, patches.

Pure numpy / scipy / scikit-image: no torch, no napari, no Qt. ``prepare_training_data(pairs, recipe)`` does it
all for the training loop; step by step::

    encoding = make_label_encoding(all_labels, mode="sparse")
    pairs = [p for img, lab in layers for p in labelled_plane_pairs(img, lab, layout, spec, encoding)]
    train_pairs, val_pairs = split_pairs(pairs, fraction=0.1, seed=0, block=64)
    sampler = PatchSampler(train_pairs, patch_size=256, labelled_weighting=True)
    images, targets = sampler.sample(rng, batch_size=4)  # B x 3 x S x S, B x S x S
    val = validation_patches(val_pairs, patch_size=256)
"""

from .images import ImageLayout, SamPlanes, intensity_range, spatial_shape, to_sam_planes, validate_image
from .labels import (
    DEFAULT_SPARSE_BACKGROUND,
    MAX_CLASSES,
    LabelEncoding,
    label_dtype,
    label_planes,
    labelled_plane_indices,
    make_label_encoding,
    validate_pair,
)
from .pairs import labelled_plane_pairs
from .rescale import rescale_image, rescale_probabilities, rescale_targets, scaled_shape
from .sampling import PatchSampler, crop_padded, validation_patches
from .split import split_pairs, split_train_validation
from .training_data import PreparedData, TrainingPair, prepare_training_data

__all__ = [
    "DEFAULT_SPARSE_BACKGROUND",
    "MAX_CLASSES",
    "ImageLayout",
    "LabelEncoding",
    "PatchSampler",
    "PreparedData",
    "SamPlanes",
    "TrainingPair",
    "crop_padded",
    "intensity_range",
    "label_planes",
    "labelled_plane_indices",
    "label_dtype",
    "labelled_plane_pairs",
    "make_label_encoding",
    "prepare_training_data",
    "rescale_image",
    "rescale_probabilities",
    "rescale_targets",
    "scaled_shape",
    "spatial_shape",
    "split_pairs",
    "split_train_validation",
    "to_sam_planes",
    "validate_image",
    "validate_pair",
    "validation_patches",
]
