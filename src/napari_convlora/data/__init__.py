"""Data preparation: napari (image, labels) arrays -> normalised RGB planes, class targets, patches.

Pure numpy / scipy / scikit-image: no torch, no napari, no Qt. The usual path::

    encoding = make_label_encoding(all_labels, mode="sparse")
    pairs = [p for img, lab in layers for p in labelled_plane_pairs(img, lab, layout, encoding)]
    train_pairs, val_pairs = split_pairs(pairs, fraction=0.1, seed=0, block=64)
    sampler = PatchSampler(train_pairs, patch_size=256, labelled_weighting=True)
    images, targets = sampler.sample(rng, batch_size=4)  # B x 3 x S x S, B x S x S
    val = validation_patches(val_pairs, patch_size=256)
"""

from .images import ImageLayout, intensity_range, spatial_shape, to_sam_planes, validate_image
from .labels import (
    DEFAULT_SPARSE_BACKGROUND,
    LABEL_MODES,
    MAX_CLASSES,
    LabelEncoding,
    label_planes,
    labelled_plane_indices,
    make_label_encoding,
    validate_pair,
)
from .pairs import labelled_plane_pairs
from .sampling import PatchSampler, crop_padded, rescale_pair, validation_patches
from .split import split_pairs, split_train_validation

__all__ = [
    "DEFAULT_SPARSE_BACKGROUND",
    "LABEL_MODES",
    "MAX_CLASSES",
    "ImageLayout",
    "LabelEncoding",
    "PatchSampler",
    "crop_padded",
    "intensity_range",
    "label_planes",
    "labelled_plane_indices",
    "labelled_plane_pairs",
    "make_label_encoding",
    "rescale_pair",
    "spatial_shape",
    "split_pairs",
    "split_train_validation",
    "to_sam_planes",
    "validate_image",
    "validate_pair",
    "validation_patches",
]
