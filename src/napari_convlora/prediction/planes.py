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
from ..config.choices import INSTANCE_LABEL_MODES, INSTANCE_METHODS
from ..constants import IGNORE_INDEX
from ..data import ImageLayout, LabelEncoding, SamPlanes, label_dtype, rescale_probabilities, validate_pair
from ..data.sampling import mirror_margin
from ..devices import autocast_context, resolve_device
from ..instances import instances_from_maps, separate_objects
from ..instances.metrics import InstanceScoreAccumulator, InstanceScores
from ..metrics import ConfusionMatrix, SegmentationMetrics
from ..modeling import AdaptedSAM
from .everything import segment_everything
from .sam_refined import refine_with_sam
from .tiling import instances_from_labels, predict_tiled, probabilities_to_labels
from .uncertainty import UNCERTAINTY_SCALE, uncertainty_map


@dataclass
class Prediction:
    """labels: the input's spatial shape (Y x X, or Z x Y x X), label values in the dtype of ``label_dtype``;
    planes not predicted hold 0.
    probabilities: K x (spatial shape) float32, when asked for.
    instances: objects with ids unique across classes and planes, when asked for (uint16, or uint32 from 65536
    objects on).
    instance_method: how the objects were found ("head", "sam_refined", "components" or "everything";
        ``INSTANCE_METHODS``), or
    None.
    uncertainty: the spatial shape, uint8, ``uncertainty.uncertainty_map`` times ``UNCERTAINTY_SCALE`` (0 sure, 255
        all classes equally likely; one byte a pixel, as the labels; planes not predicted hold 0), when asked
        for."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    instances: np.ndarray | None = None
    instance_method: str | None = None
    uncertainty: np.ndarray | None = None


def make_prob_fn(model: AdaptedSAM, device: torch.device, maps: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function B x 3 x S x S (0..255, any device) -> B x K x S x S probabilities, run on ``device``; with
    ``maps`` B x (K + 3) x S x S, the instance head's maps after the probabilities (``probabilities_and_maps``)."""
    forward = model.probabilities_and_maps if maps else model.class_probabilities

    def prob_fn(batch: torch.Tensor) -> torch.Tensor:
        with autocast_context(device):
            return forward(batch.to(device, non_blocking=True)).float()

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
    maps: bool = False,
) -> np.ndarray | None:
    """Plane ``index`` of ``planes`` -> K x Y x X float32 probabilities at the plane's own size (with ``maps``,
    K + 3: the instance head's maps after them, blended and resized alike), by blended tiles
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
        make_prob_fn(model, device, maps), view, model.input_size, model.num_classes + 3 * maps, overlap=overlap,
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
    instance_method: str = "auto",
    uncertainty: bool = False,
) -> Prediction:
    """Segment an image as a napari layer holds it (2D, RGB, multichannel, stack or time series).

    Args:
        layout: how to read the image's axes (RGB, channel axis); the rest comes from the model's input spec.
        planes: for stacks, which planes to predict (others stay 0); None = all.
        instances: also return objects, plane by plane (objects do not merge across slices or time points), by
            ``instance_method``: ``"head"``, the model's instance head (its maps split by the seeded watershed with
            the thresholds stored in the model: touching objects apart); ``"components"``, connected components
            of each class (in 3D with ``instances_3d``); ``"auto"`` (default): the head where the model has one and
            ``instances_3d`` is off, else components; ``"sam_refined"``, the head's objects as box + point prompts
            to SAM's promptable decoder on the adapted encoder (``sam_refined.py``); ``"everything"``, SAM's
            automatic mask generator on the adapted encoder (``everything.py``: no instance head or labels needed).
            ``Prediction.instance_method`` says which ran.
        progress: ``progress(done, total)`` in tiles over all planes.
        should_stop: polled between tile batches; raises ``PredictionCancelled`` when it returns True.
        uncertainty: also return each pixel's uncertainty (``Prediction.uncertainty``; computed band by band, so
            it costs one byte per pixel, not K floats).

    Raises:
        NonFiniteProbabilities: (a ValueError) the model's probabilities are NaN or infinite, say a model saved by a
            training run that diverged: one line naming the model's file (``checkpoints.model_files.model_file``).
        ValueError: ``instance_method`` unknown, or "head" / "sam_refined" for a model without an instance head,
            "head" / "sam_refined" / "everything" with ``instances_3d`` ("sam_refined" and "everything" also for a
            model that rescales images).
    """
    if model.config.promptable is not None:
        raise ValueError(PROMPTABLE_ONLY)
    method = instance_method_for(model, instance_method, instances_3d) if instances else None
    sam_planes = SamPlanes(image, layout or ImageLayout(), model.config.input)
    device = resolve_device(device)
    model = model.to(device).eval()
    chosen = list(range(len(sam_planes))) if planes is None else sam_planes.check_indices(planes)
    values = model.config.head.class_values
    k, (y, x) = model.num_classes, sam_planes.shape
    labels = np.zeros((len(sam_planes), y, x), dtype=label_dtype(values))
    probabilities = np.zeros((k, len(sam_planes), y, x), dtype=np.float32) if return_probabilities else None
    unsure = np.zeros((len(sam_planes), y, x), dtype=np.uint8) if uncertainty else None
    head = method in ("head", "sam_refined")
    found_by_id = head or method == "everything"  # objects as id images per plane (not components of the labels)
    maps = np.zeros((3, y, x), dtype=np.float32) if head else None
    objects = np.zeros((len(sam_planes), y, x), dtype=np.uint32) if found_by_id else None
    next_id = 0

    def plane_progress(done: int, total: int) -> None:
        if progress is not None:
            progress(index * total + done, len(chosen) * total)

    for index, z in enumerate(chosen):

        def write_rows(first: int, band: np.ndarray, z: int = z) -> None:  # labels (and probabilities) by bands
            rows = slice(first, first + band.shape[1])
            labels[z, rows] = probabilities_to_labels(band[:k], values)
            if probabilities is not None:
                probabilities[:, z, rows] = band[:k]
            if unsure is not None:
                unsure[z, rows] = np.rint(uncertainty_map(band[:k]) * UNCERTAINTY_SCALE)
            if maps is not None:
                maps[:, rows] = band[k:]

        predict_plane_probabilities(model, sam_planes, z, device, overlap, batch_size, plane_progress, should_stop,
                                    sink=write_rows, maps=head)
        if head:
            # the maps are back at the plane's size: a model pixel is 1 / rescale of the plane's pixels
            objects[z] = instances_from_maps(maps, model.config.instances, scale=1.0 / model.config.input.rescale)
    if method == "sam_refined":  # every plane's objects in one pass: one embedding cache, one label array
        for z, found in refine_with_sam(model, image, layout, {z: objects[z] for z in chosen}, device,
                                        should_stop).items():
            objects[z] = found
    if method == "everything":
        for z, found in segment_everything(model, image, layout, planes=chosen, device=device,
                                           should_stop=should_stop).items():
            objects[z] = found
    for z in chosen if found_by_id else ():  # ids unique across planes
        found = objects[z]
        objects[z] = np.where(found > 0, found + next_id, 0)
        next_id += int(found.max())
    spatial = sam_planes.leading + (y, x)  # planes are the leading axes flattened in C order
    labels = labels.reshape(spatial)
    if probabilities is not None:
        probabilities = probabilities.reshape((k, *spatial))
    inst = None
    if method == "components":
        inst = instances_from_labels(labels, background_value=values[0], per_plane=not instances_3d)
    elif found_by_id:
        inst = objects.reshape(spatial)
        inst = inst.astype(np.uint16) if next_id < 2**16 else inst
    return Prediction(labels, probabilities, inst, method,
                      None if unsure is None else unsure.reshape(spatial))


def instance_method_for(model: AdaptedSAM, asked: str, instances_3d: bool = False) -> str:
    """The instance method that runs for ``asked`` (see :func:`predict_image`), or ValueError in one line."""
    if asked not in INSTANCE_METHODS:
        raise ValueError(f"unknown instance method {asked!r}; expected one of {INSTANCE_METHODS}")
    has_head = model.instance_head is not None
    if asked in ("head", "sam_refined") and not has_head:
        raise ValueError("this model has no instance head (train it with --label-mode instances to get one): "
                         "choose the instance method 'components'")
    if asked == "sam_refined" and model.config.input.rescale != 1.0:
        raise ValueError("SAM refines objects at the image's own scale: this model rescales images "
                         f"({model.config.input.rescale}); choose the instance method 'head'")
    if asked == "everything" and model.config.input.rescale != 1.0:
        raise ValueError("segment everything works at the image's own scale: this model rescales images "
                         f"({model.config.input.rescale}); choose the instance method 'components'")
    if asked in ("head", "sam_refined", "everything") and instances_3d:
        raise ValueError(f"the instance method {asked!r} finds objects plane by plane: choose 3D instances or it, "
                         "not both")
    if asked == "auto":
        return "head" if has_head and not instances_3d else "components"
    return asked


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


def evaluate_objects(
    model: AdaptedSAM,
    labels: np.ndarray,
    prediction: Prediction,
) -> InstanceScores:
    """Score ``prediction.instances`` against instance ``labels`` (the model's instance label mode: sparse instances
    leave unannotated pixels out), plane by plane for stacks, pooled over the planes (issue 23, item 5)."""
    head = model.config.head
    if head.label_mode not in INSTANCE_LABEL_MODES:
        raise ValueError(f"objects are scored against instance labels; this model was trained on {head.label_mode!r} "
                         "labels")
    if prediction.instances is None:
        raise ValueError("the prediction holds no objects: predict with instances=True")
    encoding = LabelEncoding(head.label_mode, head.class_values, head.background_value)
    truth = encoding.encode_objects(labels)
    if truth.shape != prediction.instances.shape:
        raise ValueError(f"labels of shape {truth.shape} do not match the prediction's {prediction.instances.shape}")
    pooled = InstanceScoreAccumulator()
    planes = truth.reshape(-1, *truth.shape[-2:])
    for ids, found in zip(planes, prediction.instances.reshape(planes.shape)):
        pooled.update(found, separate_objects(ids), ignore=ids == IGNORE_INDEX)
    return pooled.compute()
