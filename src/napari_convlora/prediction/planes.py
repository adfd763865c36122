"""Predict label images of any size with a fine-tuned model: planes of a stack, tiles of a plane.

Images are prepared exactly as for training: the model's :class:`~.config.InputSpec` (channels, percentiles,
rescale) through ``data.SamPlanes``, one plane at a time, so predicting one plane of a large stack makes no
float copy of the others; and a plane continues past its border as its mirror image, ``mirror_margin`` pixels
wide, as training patches do (``data.sampling``), so that no pixel is predicted from a tile's edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..checkpoints.model_files import model_file
from ..data import ImageLayout, LabelEncoding, SamPlanes, label_dtype, rescale_probabilities, validate_pair
from ..data.sampling import mirror_margin
from ..devices import autocast_context, resolve_device
from ..metrics import ConfusionMatrix, SegmentationMetrics
from ..modeling import AdaptedSAM
from .tiling import instances_from_labels, predict_tiled, probabilities_to_labels


@dataclass
class Prediction:
    """labels: the input's spatial shape (Y x X, or Z x Y x X), label values in the dtype of ``label_dtype``;
    planes not predicted hold 0.
    probabilities: K x (spatial shape) float32, when asked for.
    instances: connected components per class with ids unique across classes, when asked for."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    instances: np.ndarray | None = None


def make_prob_fn(model: AdaptedSAM, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function B x 3 x S x S (0..255, any device) -> B x K x S x S probabilities, run on ``device``."""

    def prob_fn(batch: torch.Tensor) -> torch.Tensor:
        with autocast_context(device):
            return model.class_probabilities(batch.to(device, non_blocking=True)).float()

    return prob_fn


def predict_plane_probabilities(
    model: AdaptedSAM,
    planes: SamPlanes,
    index: int,
    device: torch.device,
    overlap: float = 0.25,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    sink: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray | None:
    """Plane ``index`` of ``planes`` -> K x Y x X float32 probabilities at the plane's own size, by blended tiles
    over the plane as the model sees it (rescaled by the input spec, extended by ``mirror_margin(input size)``
    pixels of its mirror image on every side), resized back.

    With ``sink`` (and no rescaling) the plane is prepared tile by tile and the probabilities are handed over
    in bands of rows, ``sink(first_row, K x n x X)``, and never held whole: memory beyond the output is then a
    band of tile rows, whatever the plane's size. With rescaling the bands come from the whole resized plane.

    Raises:
        NonFiniteProbabilities: the model's probabilities are NaN or infinite (one line naming its file), before
            any band with them reaches ``sink``."""
    view = planes.input_view(index)
    streaming = sink is not None and not isinstance(view, np.ndarray)
    probs = predict_tiled(
        make_prob_fn(model, device), view, model.input_size, model.num_classes, overlap=overlap,
        batch_size=batch_size, progress=progress, should_stop=should_stop, sink=sink if streaming else None,
        source=model_file(model), border=mirror_margin(model.input_size),
    )
    if streaming:
        return None
    probs = rescale_probabilities(probs, planes.shape)
    if sink is None:
        return probs
    sink(0, probs)
    return None


#: Why a model adapted through SAM's promptable decoder (WeSAM) cannot segment without prompts.
PROMPTABLE_ONLY = ("this model was adapted to segment prompts (WeSAM self-training from weak labels); its prompt-free "
                   "head was never trained: segment boxes, points or coarse labels with it (Segment prompts in the "
                   "dock, napari-convlora segment-prompts), or train the prompt-free head from the base SAM")


def predict_image(
    model: AdaptedSAM,
    image: np.ndarray,
    layout: ImageLayout | None = None,
    planes: Sequence[int] | None = None,
    device: str | torch.device = "auto",
    overlap: float = 0.25,
    batch_size: int = 4,
    return_probabilities: bool = False,
    instances: bool = False,
    instances_3d: bool = False,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Prediction:
    """Segment an image as a napari layer holds it (2D, RGB, multichannel, stack or time series).

    Args:
        layout: how to read the image's axes (RGB, channel axis); the rest comes from the model's input spec.
        planes: for stacks, which planes to predict (others stay 0); None = all.
        instances: also return connected components per class, labelled plane by plane (objects do not merge
            across slices or time points), or in 3D with ``instances_3d``.
        progress: ``progress(done, total)`` in tiles over all planes.
        should_stop: polled between tile batches; raises ``PredictionCancelled`` when it returns True.

    Raises:
        NonFiniteProbabilities: (a ValueError) the model's probabilities are NaN or infinite, say a model saved by a
            training run that diverged: one line naming the model's file (``checkpoints.model_files.model_file``).
    """
    if model.config.promptable is not None:
        raise ValueError(PROMPTABLE_ONLY)
    sam_planes = SamPlanes(image, layout or ImageLayout(), model.config.input)
    device = resolve_device(device)
    model = model.to(device).eval()
    chosen = list(range(len(sam_planes))) if planes is None else sam_planes.check_indices(planes)
    values = model.config.head.class_values
    k, (y, x) = model.num_classes, sam_planes.shape
    labels = np.zeros((len(sam_planes), y, x), dtype=label_dtype(values))
    probabilities = np.zeros((k, len(sam_planes), y, x), dtype=np.float32) if return_probabilities else None

    def plane_progress(done: int, total: int) -> None:
        if progress is not None:
            progress(index * total + done, len(chosen) * total)

    for index, z in enumerate(chosen):

        def write_rows(first: int, band: np.ndarray, z: int = z) -> None:  # labels (and probabilities) by bands
            labels[z, first : first + band.shape[1]] = probabilities_to_labels(band, values)
            if probabilities is not None:
                probabilities[:, z, first : first + band.shape[1]] = band

        predict_plane_probabilities(model, sam_planes, z, device, overlap, batch_size, plane_progress, should_stop,
                                    sink=write_rows)
    spatial = sam_planes.leading + (y, x)  # planes are the leading axes flattened in C order
    labels = labels.reshape(spatial)
    if probabilities is not None:
        probabilities = probabilities.reshape((k, *spatial))
    inst = instances_from_labels(labels, background_value=values[0], per_plane=not instances_3d) if instances else None
    return Prediction(labels, probabilities, inst)


def evaluate_image(
    model: AdaptedSAM,
    image: np.ndarray,
    labels: np.ndarray,
    layout: ImageLayout | None = None,
    device: str | torch.device = "auto",
    prediction: Prediction | None = None,
) -> SegmentationMetrics:
    """Predict ``image`` (unless ``prediction`` is given) and score it against ``labels``, read with the
    label mode the model was trained with (sparse: unannotated pixels are not scored)."""
    head = model.config.head
    encoding = LabelEncoding(head.label_mode, head.class_values, head.background_value)
    layout = layout or ImageLayout()
    validate_pair(image, labels, layout, spec=model.config.input)
    prediction = prediction or predict_image(model, image, layout, device=device)
    matrix = ConfusionMatrix(model.num_classes)
    matrix.update(encoding.encode(prediction.labels), encoding.encode(labels))
    return matrix.compute()
