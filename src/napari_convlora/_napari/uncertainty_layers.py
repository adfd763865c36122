"""The layers that show where a prediction is unsure and where to label next (issue 25): ``"<image> uncertainty"``
(an Image layer, uint8: 0 sure to 255 all classes equally likely; it remembers which planes hold a prediction) and
``"<image> suggestions"`` (a Points layer). Writing them never changes which layer the user has selected. Nothing
here imports torch or Qt.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from napari.layers import Image, Labels, Points

from ..data.labels import SPARSE_MODES
from ..prediction.uncertainty import UNCERTAINTY_SCALE, suggest_regions
from .layers import METADATA_KEY, selection_kept


def uncertainty_name(image_name: str) -> str:
    return f"{image_name} uncertainty"


def suggestions_name(image_name: str) -> str:
    return f"{image_name} suggestions"


def write_uncertainty(viewer, image: Image, uncertainty: np.ndarray, planes: Sequence[int] | None = None) -> Image:
    """Add or update ``"<image> uncertainty"`` (uint8, ``prediction.uncertainty.UNCERTAINTY_SCALE``), just above
    the image (under the prediction). With ``planes``, only those planes of an existing layer of the same shape are
    replaced; the layer remembers which planes hold a prediction (None: all)."""
    name = uncertainty_name(image.name)
    layer = viewer.layers[name] if name in viewer.layers else None
    with selection_kept(viewer):
        if isinstance(layer, Image) and layer.data.shape == uncertainty.shape:
            before = predicted_planes(layer)
            if planes is not None:
                data = np.asarray(layer.data)
                flat, new = data.reshape(-1, *data.shape[-2:]), uncertainty.reshape(-1, *uncertainty.shape[-2:])
                flat[list(planes)] = new[list(planes)]
                done = None if before is None else sorted(set(before) | set(planes))
            else:
                data, done = uncertainty, None
            layer.data = data
            layer.metadata[METADATA_KEY] = {"image": image.name, "planes": done}
            layer.refresh()
            return layer
        if layer is not None:
            viewer.layers.remove(layer)
        layer = viewer.add_image(uncertainty, name=name, scale=image.scale, translate=image.translate,
                                 colormap="magma", contrast_limits=(0, UNCERTAINTY_SCALE), opacity=0.6,
                                 blending="additive", metadata={METADATA_KEY: {
                                     "image": image.name, "planes": None if planes is None else sorted(planes)}})
        viewer.layers.move(viewer.layers.index(layer), viewer.layers.index(image) + 1)
    return layer


def predicted_planes(layer: Image) -> list[int] | None:
    """The planes of an uncertainty layer that hold a prediction (None: all)."""
    return layer.metadata.get(METADATA_KEY, {}).get("planes")


def labelled_pixels(labels: Labels | None, plane: int | None, label_mode: str) -> np.ndarray | None:
    """Y x X bool of one plane of training labels: the pixels the user labelled, which suggestions leave out.
    Sparse modes: the painted (non-zero) pixels. Dense and instance modes label every pixel of a plane they
    train on, so nothing is left out there: the suggestions then mark what is most worth checking and correcting.
    None without labels."""
    if labels is None or label_mode not in SPARSE_MODES:
        return None
    data = np.asarray(labels.data)
    planes = int(np.prod(data.shape[:-2], dtype=int)) if data.ndim > 2 else 1
    if (plane is None) != (data.ndim == 2) or (plane is not None and plane >= planes):
        raise ValueError(f"the training labels '{labels.name}' (shape {data.shape}) have no plane to match the image's "
                         f"{'plane ' + str(plane) if plane is not None else 'single plane'}")
    return (data if plane is None else data.reshape(-1, *data.shape[-2:])[plane]) != 0


def write_suggestions(viewer, image: Image, uncertainty: Image, plane: int | None, labelled: np.ndarray | None
                      ) -> Points:
    """Add or replace ``"<image> suggestions"``: the centres of the regions of one plane (``plane`` of a stack, or
    None for a 2D image) where labelling would help most (``prediction.uncertainty.suggest_regions``)."""
    data = np.asarray(uncertainty.data)
    done = predicted_planes(uncertainty)
    if plane is not None and done is not None and plane not in done:
        raise ValueError(f"plane {plane} of '{image.name}' has no prediction yet: predict it first")
    values = data if plane is None else data.reshape(-1, *data.shape[-2:])[plane]
    if labelled is not None and labelled.shape != values.shape:
        raise ValueError(f"the training labels' plane has shape {labelled.shape}, the uncertainty {values.shape}")
    centres = suggest_regions(values, labelled)
    if plane is not None:
        leading = np.unravel_index(plane, data.shape[:-2])
        centres = np.column_stack([np.full((len(centres), 1), c) for c in leading] + [centres])
    name = suggestions_name(image.name)
    with selection_kept(viewer):
        if name in viewer.layers:
            viewer.layers.remove(viewer.layers[name])
        points = viewer.add_points(centres.reshape(-1, data.ndim), name=name, scale=image.scale,
                                   translate=image.translate, size=24, symbol="ring", face_color="transparent",
                                   border_color="cyan", border_width=0.15, ndim=data.ndim)
    return points
