"""Prompt mIoU: how well the model segments each weak label's object, scored against evaluation labels.

For every weak object of a plane with evaluation labels, its target is the evaluation label id it covers most (in
its box, or at its positive points); objects on background only are not scored. Each object is prompted in the
``S x S`` window centred on it (points in coarse masks drawn with a fixed seed, so every evaluation prompts alike),
SAM's single-mask output is upsampled to the window and thresholded at logit 0, and its IoU with the target's
mask is taken inside the image. Reported: the mean over objects (``prompt_miou``), per weak label kind, and the
number of objects scored. WeSAM's evaluation pools the objects of an image before averaging over images; this
averages over objects, so that a plane with many objects weighs as much as it has objects.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..devices import autocast_context
from ..modeling import AdaptedSAM
from ..weak import WeakObject
from .crops import CropPrompt, crop_plane, object_centre, prompt_in_crop, window_around
from .decoding import decode_prompts

#: Seed of the points drawn in coarse masks for evaluation (the same prompts at every evaluation).
EVALUATION_SEED = 12345


def target_id(obj: WeakObject, truth: np.ndarray) -> int:
    """The evaluation label id the object covers most (0: background only, not scored)."""
    if obj.box is not None:
        x0, y0, x1, y1 = (int(round(float(v))) for v in obj.box)
        values = truth[max(y0, 0) : y1, max(x0, 0) : x1].ravel()
        if obj.mask is not None:
            values = truth[obj.full_mask(truth.shape)]
    else:
        cols = np.clip(obj.positive[:, 0].astype(int), 0, truth.shape[1] - 1)
        rows = np.clip(obj.positive[:, 1].astype(int), 0, truth.shape[0] - 1)
        values = truth[rows, cols]
    values = values[values != 0]
    if values.size == 0:
        return 0
    ids, counts = np.unique(values, return_counts=True)
    return int(ids[np.argmax(counts)])


@torch.no_grad()
def evaluate_prompts(model: AdaptedSAM, data: Any, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Prompt mIoU of ``model`` on the planes of ``data`` (a ``WeakData``) that have evaluation labels."""
    was_training = model.training
    model.eval()
    size = model.config.input_size
    recipe = data.recipe
    scores: dict[str, list[float]] = {}
    for plane, objects, truth in zip(data.planes, data.objects, data.truth):
        if truth is None:
            continue
        windows: dict[tuple[int, int], list[tuple[CropPrompt, int]]] = {}
        for k, obj in enumerate(objects):
            label = target_id(obj, truth)
            if label == 0:
                continue
            top, left = window_around(object_centre(obj), plane.shape[:2], size, None)
            rng = np.random.default_rng(EVALUATION_SEED + k)
            prompt = prompt_in_crop(obj, plane.shape[:2], top, left, size, rng, recipe.positive_points,
                                    recipe.negative_points)
            if prompt is not None:
                windows.setdefault((top, left), []).append((prompt, label))
        for (top, left), items in windows.items():
            image, valid = crop_plane(plane, top, left, size)
            tensor = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].to(device)
            with autocast_context(device, dtype):
                features = model.encode(tensor)
                low, _ = decode_prompts(model, features.embedding, features.early, [p for p, _ in items])
            masks = F.interpolate(low[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
            predicted = (masks[:, 0] > 0).cpu().numpy() & valid
            window = np.zeros((size, size), truth.dtype)
            part = truth[top : top + size, left : left + size]
            window[: part.shape[0], : part.shape[1]] = part
            for (prompt, label), pred in zip(items, predicted):
                target = window == label
                union = np.logical_or(pred, target).sum()
                scores.setdefault(prompt.kind, []).append(float(np.logical_and(pred, target).sum() / max(union, 1)))
    model.train(was_training)
    every = [s for values in scores.values() for s in values]
    return {"prompt_miou": float(np.mean(every)) if every else float("nan"), "objects": len(every),
            "per_kind": {kind: float(np.mean(values)) for kind, values in scores.items()}}
