"""Predict label images of any size with a fine-tuned model: planes of a stack, tiles of a plane."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import ImageLayout, LabelEncoding, spatial_shape, to_sam_planes, validate_pair
from .metrics import ConfusionMatrix, SegmentationMetrics
from .devices import autocast_context, resolve_device
from .model import ConvLoRASAM
from .tiling import instances_from_labels, predict_tiled, probabilities_to_labels


@dataclass
class Prediction:
    """labels: the input's spatial shape (Y x X, or Z x Y x X), uint8 or uint16 label values.
    probabilities: K x (spatial shape) float32, when asked for.
    instances: connected components per class with ids unique across classes, when asked for."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    instances: np.ndarray | None = None


def class_values(model: ConvLoRASAM) -> tuple[int, ...]:
    """Label value written for each class index (the values the user painted)."""
    return model.config.head.class_values or tuple(range(model.num_classes))


def make_prob_fn(model: ConvLoRASAM, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function B x 3 x S x S (0..255, any device) -> B x K x S x S probabilities, run on ``device``."""

    def prob_fn(batch: torch.Tensor) -> torch.Tensor:
        with autocast_context(device):
            return model.class_probabilities(batch.to(device, non_blocking=True)).float()

    return prob_fn


def _rescale_plane(plane: np.ndarray, factor: float) -> np.ndarray:
    """Y x X x 3 -> resized by ``factor`` (bilinear), for objects much larger or smaller than SAM expects."""
    t = torch.from_numpy(np.ascontiguousarray(plane)).permute(2, 0, 1)[None]
    size = [max(2, round(s * factor)) for s in plane.shape[:2]]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


def predict_plane_probabilities(
    model: ConvLoRASAM,
    plane: np.ndarray,
    device: torch.device,
    overlap: float = 0.25,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """plane: Y x X x 3 float32 0..255 (normalised) -> K x Y x X float32 probabilities, by blended tiles."""
    factor = model.config.normalisation.rescale
    work = _rescale_plane(plane, factor) if factor != 1.0 else plane
    probs = predict_tiled(
        make_prob_fn(model, device), work, model.input_size, model.num_classes,
        overlap=overlap, batch_size=batch_size, progress=progress, should_stop=should_stop,
    )
    if work.shape[:2] != plane.shape[:2]:
        t = F.interpolate(torch.from_numpy(probs)[None], size=plane.shape[:2], mode="bilinear", align_corners=False)
        probs = t[0].numpy()
    return probs


def predict_image(
    model: ConvLoRASAM,
    image: np.ndarray,
    layout: ImageLayout | None = None,
    planes: Sequence[int] | None = None,
    device: str | torch.device = "auto",
    overlap: float = 0.25,
    batch_size: int = 4,
    return_probabilities: bool = False,
    instances: bool = False,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Prediction:
    """Segment an image as a napari layer holds it (2D, RGB, multichannel, stack or time series).

    Args:
        planes: for stacks, which planes to predict (others stay 0); None = all.
        progress: ``progress(done, total)`` in tiles over all planes.
        should_stop: polled between tile batches; raises ``PredictionCancelled`` when it returns True.
    """
    layout = layout or ImageLayout(percentiles=model.config.normalisation.percentiles)
    sam_planes = to_sam_planes(image, layout)  # N x Y x X x 3
    device = resolve_device(device)
    model = model.to(device).eval()
    n, y, x = sam_planes.shape[:3]
    chosen = list(range(n)) if planes is None else list(planes)
    k = model.num_classes
    values = class_values(model)
    labels = np.zeros((n, y, x), dtype=np.uint8 if max(values) < 256 else np.uint16)
    probabilities = np.zeros((k, n, y, x), dtype=np.float32) if return_probabilities else None

    def plane_progress(done: int, total: int) -> None:
        if progress is not None:
            progress(index * total + done, len(chosen) * total)

    for index, z in enumerate(chosen):
        probs = predict_plane_probabilities(model, sam_planes[z], device, overlap, batch_size, plane_progress, should_stop)
        labels[z] = probabilities_to_labels(probs, values)
        if probabilities is not None:
            probabilities[:, z] = probs
    spatial = spatial_shape(image, layout)  # planes are the leading axes flattened in C order
    labels = labels.reshape(spatial)
    if probabilities is not None:
        probabilities = probabilities.reshape((k, *spatial))
    inst = instances_from_labels(labels, background_value=values[0]) if instances else None
    return Prediction(labels, probabilities, inst)



def evaluate_image(
    model: ConvLoRASAM,
    image: np.ndarray,
    labels: np.ndarray,
    layout: ImageLayout | None = None,
    device: str | torch.device = "auto",
    prediction: Prediction | None = None,
) -> SegmentationMetrics:
    """Predict ``image`` (unless ``prediction`` is given) and score it against ``labels``, read with the
    label mode the model was trained with (sparse: unannotated pixels are not scored)."""
    head = model.config.head
    encoding = LabelEncoding(head.label_mode, class_values(model), head.background_value)
    layout = layout or ImageLayout(percentiles=model.config.normalisation.percentiles)
    validate_pair(image, labels, layout)
    prediction = prediction or predict_image(model, image, layout, device=device)
    matrix = ConfusionMatrix(model.num_classes)
    matrix.update(encoding.encode(prediction.labels), encoding.encode(labels))
    return matrix.compute()
