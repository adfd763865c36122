"""Segment everything (issue 23, item 3): SAM's automatic mask generator on the adapted model, for users without
instance labels.

``segment_anything.SamAutomaticMaskGenerator`` runs on the model's own ``Sam`` (its image encoder carries the
adapters, so the masks come from the adapted encoder; the decoder is SAM's as loaded, not the one the prompt-free
head trained (``AdaptedSAM.promptable_decoder_as_loaded``), without HQ fusion): a grid of
point prompts, masks kept by predicted IoU and stability (SAM's thresholds for its checkpoints, lower ones for small
bases: ``config.suggestions.everything_thresholds``), non-maximum suppression of their boxes. Images larger than
the model's input are covered with SAM's own crop layers (layer i: 2^i x 2^i overlapping crops, each seen at the
model's input size; boxes cut by a crop's edge dropped, NMS across crops), as many layers as make a crop about the
input's size. The model's input spec normalises each plane first, as for every other prediction. The masks become
one instance image per plane: larger masks first, so a smaller mask inside a larger one stays visible.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..config.suggestions import everything_thresholds
from ..data import ImageLayout
from ..data.images import SamPlanes
from ..modeling import AdaptedSAM
from .tiling import PredictionCancelled

#: SAM's defaults for its automatic mask generator (points per side of the grid, box NMS), and at most this many
#: crop layers for large planes. The predicted-IoU and stability thresholds follow the base
#: (``config.suggestions.everything_thresholds``: SAM's 0.88 and 0.95 for its checkpoints, lower for small bases).
POINTS_PER_SIDE = 32
BOX_NMS_THRESH = 0.7
MAX_CROP_LAYERS = 3


def crop_layers_for(plane_shape: tuple[int, int], input_size: int) -> int:
    """The crop layers that bring a crop of a ``plane_shape`` plane to about ``input_size`` (at most
    ``MAX_CROP_LAYERS``; 0 when the plane fits the input)."""
    longest = max(plane_shape)
    if longest <= 1.5 * input_size:
        return 0
    return min(MAX_CROP_LAYERS, math.ceil(math.log2(longest / (1.5 * input_size))))


def masks_to_instances(masks: list[dict], plane_shape: tuple[int, int], min_size: int = 0) -> np.ndarray:
    """The generator's records (``segmentation`` Y x X bool, ``area``) -> Y x X uint32 ids 1..N, larger masks painted
    first; a mask smaller than ``min_size`` is left out before painting (it leaves no hole in the mask under it),
    one left with fewer than ``min_size`` visible pixels after it is dropped; ids consecutive."""
    out = np.zeros(plane_shape, np.uint32)
    next_id = 0
    kept = [r for r in masks if int(r["area"]) >= min_size]
    for record in sorted(kept, key=lambda r: -int(r["area"])):
        next_id += 1
        out[record["segmentation"]] = next_id
    if next_id == 0:
        return out
    sizes = np.bincount(out.ravel(), minlength=next_id + 1)
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    lookup = np.zeros(next_id + 1, np.uint32)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return lookup[out]


@torch.no_grad()
def segment_everything(model: AdaptedSAM, image: np.ndarray, layout: ImageLayout | None = None,
                       planes: list[int] | None = None, device: str | torch.device = "cpu",
                       points_per_side: int = POINTS_PER_SIDE, min_size: int = 10,
                       progress: Callable[[int, int], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> dict[int, np.ndarray]:
    """Every object SAM finds in the chosen planes (flat indices; default all) -> flat plane index -> Y x X uint32
    ids (1..N per plane, 0 background). ``should_stop`` is polled before each plane (``PredictionCancelled``).

    Raises:
        ValueError: the model rescales images (the generator sees the image at its own scale) or
            ``points_per_side`` is below 1.
    """
    from segment_anything import SamAutomaticMaskGenerator

    if model.config.input.rescale != 1.0:
        raise ValueError("segment everything works at the image's own scale: this model rescales images "
                         f"({model.config.input.rescale}); choose another instance method")
    if points_per_side < 1:
        raise ValueError(f"points per side must be >= 1, got {points_per_side}")
    if model.prompt_head.unavailable:  # a version-1 bundle lacks SAM's mask tokens: no prompt can be answered
        raise ValueError(model.prompt_head.unavailable)
    sam_planes = SamPlanes(image, layout or ImageLayout(), model.config.input)
    chosen = list(range(len(sam_planes))) if planes is None else sam_planes.check_indices(planes)
    sam = model.to(device).eval().sam
    iou, stability = everything_thresholds(sum(p.numel() for p in sam.parameters()))
    generator = SamAutomaticMaskGenerator(
        sam, points_per_side=points_per_side, pred_iou_thresh=iou, stability_score_thresh=stability,
        box_nms_thresh=BOX_NMS_THRESH,
        crop_n_layers=crop_layers_for(sam_planes.shape, model.config.input_size))
    found: dict[int, np.ndarray] = {}
    with _model_normalisation(model), model.promptable_decoder_as_loaded():
        for done, index in enumerate(chosen):
            if should_stop is not None and should_stop():
                raise PredictionCancelled()
            rgb = np.clip(np.rint(sam_planes.normalised(index)), 0, 255).astype(np.uint8)
            found[index] = masks_to_instances(_generate(generator, rgb), sam_planes.shape, min_size)
            if progress is not None:
                progress(done + 1, len(chosen))
    return found


def _generate(generator, rgb: np.ndarray) -> list[dict]:
    """The generator's masks of one plane. segment_anything 1.0 fails with an IndexError (``box_area`` of an
    empty crop-box array) when crop layers are on and no mask passes its thresholds: that is no mask."""
    try:
        return generator.generate(rgb)
    except IndexError:
        if generator.crop_n_layers == 0:
            raise
        return []


class _model_normalisation:
    """SAM's own pixel mean and std set to the model's while the generator runs (they are equal unless the model's
    config says otherwise), then put back."""

    def __init__(self, model: AdaptedSAM) -> None:
        self.sam, self.model = model.sam, model

    def __enter__(self) -> None:
        self.saved = (self.sam.pixel_mean.clone(), self.sam.pixel_std.clone())
        self.sam.pixel_mean.copy_(self.model.pixel_mean.view_as(self.sam.pixel_mean))
        self.sam.pixel_std.copy_(self.model.pixel_std.view_as(self.sam.pixel_std))

    def __exit__(self, *exc: object) -> None:
        self.sam.pixel_mean.copy_(self.saved[0])
        self.sam.pixel_std.copy_(self.saved[1])
