"""From napari layer data to the 2D training pairs that the split and the sampler take.

Pure numpy: no torch, no napari, no Qt.
"""

from __future__ import annotations

import numpy as np

from .images import ImageLayout, to_sam_planes
from .labels import LabelEncoding, label_planes, labelled_plane_indices, validate_pair


def labelled_plane_pairs(
    image: np.ndarray, labels: np.ndarray, layout: ImageLayout, encoding: LabelEncoding
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The labelled 2D planes of one (image, labels) layer pair, validated, encoded and normalised.

    image, labels: as the napari Image and Labels layers hold them (see :class:`ImageLayout`).
    Returns [(planes float32 ``Y x X x 3`` in 0..255, targets int64 ``Y x X``), ...] for every
    plane with a labelled pixel, in plane order. The normalisation uses the whole image, so a plane
    looks the same as at prediction time; unlabelled planes of a stack are never converted.
    In dense mode a plane of a stack where nothing was painted (all 0) counts as not annotated:
    people label a few slices of a stack, not every one.
    """
    validate_pair(image, labels, layout, encoding.mode)
    encoded = encoding.encode(labels)
    indices = labelled_plane_indices(encoded)
    if encoding.mode == "dense" and len(indices) > 1:
        painted = label_planes(np.asarray(labels)).any(axis=(1, 2))
        indices = [i for i in indices if painted[i]]
    if not indices:
        return []
    planes = to_sam_planes(image, layout, plane_indices=indices)
    targets = label_planes(encoded)
    return [(planes[k], targets[i]) for k, i in enumerate(indices)]
