"""From napari layer data to the 2D training pairs that the split and the sampler take.

numpy and scikit-image: no torch, no napari, no Qt.
"""

from __future__ import annotations

import numpy as np

from ..config import InputSpec
from .images import ImageLayout, SamPlanes
from .labels import LabelEncoding, label_planes, labelled_plane_indices, validate_pair
from .rescale import rescale_targets


def labelled_plane_pairs(
    image: np.ndarray,
    labels: np.ndarray,
    layout: ImageLayout,
    spec: InputSpec,
    encoding: LabelEncoding,
    unpainted_planes: str = "skip",
    objects: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The labelled 2D planes of one (image, labels) layer pair, validated, encoded and prepared as the model
    sees them (``SamPlanes.model_input``: normalised over the whole image, then rescaled by ``spec.rescale``).

    image, labels: as the napari Image and Labels layers hold them (see :class:`ImageLayout`).
    Returns [(planes float32 ``Y' x X' x 3`` in 0..255, targets int64 ``Y' x X'``), ...] for every plane
    with a labelled pixel, in plane order; targets are rescaled by nearest neighbour. Unlabelled planes of a
    stack are never converted. One rule for every mode: in a stack, a plane where nothing was painted (all 0) is
    not annotated (``unpainted_planes="skip"``: people label a few slices of a stack, not every one) or, with
    ``"background"``, a real negative whose every pixel trains as background (dense and instances modes; in
    the sparse modes 0 always means not annotated). With ``objects`` (instance modes) the targets are object ids
    (``LabelEncoding.encode_objects``) instead of class indices.
    """
    validate_pair(image, labels, layout, encoding.mode, spec)
    encoded = encoding.encode_objects(labels) if objects else encoding.encode(labels)
    indices = labelled_plane_indices(encoded)
    if unpainted_planes == "skip" and label_planes(encoded).shape[0] > 1:
        painted = label_planes(np.asarray(labels)).any(axis=(1, 2))
        indices = [i for i in indices if painted[i]]
    if not indices:
        return []
    planes = SamPlanes(image, layout, spec)
    targets = label_planes(encoded)
    return [(planes.model_input(i), rescale_targets(targets[i], planes.input_shape)) for i in indices]
