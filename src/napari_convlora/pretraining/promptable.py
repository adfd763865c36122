"""SAM's promptable objective, to pretrain a SAM from scratch on generated scenes (``synthetic.py``).

As in the SAM paper (Kirillov et al. 2023, section 3 and appendix A), on SAM's own modules (``Sam.image_encoder``,
``prompt_encoder``, ``mask_decoder``), nothing rebuilt:

- each object of an image is prompted by a jittered box or by one to three points drawn in it;
- a single-point prompt is ambiguous: the decoder gives three masks and only the one with the lowest loss
  trains (the others get no mask gradient); boxes and several points give one mask;
- a second round adds, to the same prompt, the previous low-resolution logits as a mask prompt and a
  correction point in the larger error region (SAM's interactive training, one round here instead of up to 11);
- the mask loss is focal + dice at 20 : 1 (the focal weight ramps up from 0 at the start of training from
  random weights: ``focal_weight_at``), and the IoU head regresses the IoU of each predicted mask (MSE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.prompts import central_point, correction_point, mask_box, noisy_box, random_points
from ..training.mask_terms import mask_iou, sigmoid_focal_loss, soft_dice_loss

#: Objects prompted per image and step, drawn without replacement with probability proportional to the square
#: root of their area (OBJECT_WEIGHTING): crowded scenes are mostly objects of a few dozen pixels, which a
#: 64 x 64 mask grid barely resolves; drawn uniformly, they drowned the signal of the others in short runs.
OBJECTS_PER_IMAGE = 8
OBJECT_WEIGHTING = "sqrt(area)"
FOCAL_WEIGHT, DICE_WEIGHT, IOU_WEIGHT = 20.0, 1.0, 1.0
#: Objects of at least this many pixels (16 x 16) are also scored on their own: a 64 x 64 mask grid (4 px per
#: cell at 256 px) cannot draw the outline of a 40-pixel object, whatever the model knows.
LARGE_OBJECT_AREA = 256


@dataclass
class Prompted:
    """The prompts of K objects of one image. points: K x P x 2 (x, y) and labels K x P (1 in, 0 out, -1 pad),
    or None; boxes: K x 4 or None; masks: K x 1 x h x w low-resolution logits of a previous round, or None."""

    points: torch.Tensor | None
    labels: torch.Tensor | None
    boxes: torch.Tensor | None
    masks: torch.Tensor | None
    multimask: bool


def focal_weight_at(step: int, ramp_steps: int) -> float:
    """The focal term's weight at ``step``: from 0 up to SAM's 20 over ``ramp_steps``.

    From random weights (SAM started from an MAE-pretrained encoder), the full focal term at once drove every
    logit negative before the model could tell objects apart, and the dice term's gradient then vanished in
    the saturated sigmoid (held-out IoU 0.00 after 300 steps; dice alone learned)."""
    return FOCAL_WEIGHT * min(1.0, step / ramp_steps) if ramp_steps > 0 else FOCAL_WEIGHT


def decode(sam, embedding: torch.Tensor, prompted: Prompted) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's prompt encoder and mask decoder for the K objects of one image (prompts moved to its device).

    embedding: 1 x C x h x w. Returns low-resolution logits K x M x 4h x 4w and predicted IoUs K x M
    (M = 3 with ``multimask``, else 1)."""
    device = embedding.device

    def on(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device)

    points = None if prompted.points is None else (on(prompted.points), on(prompted.labels))
    sparse, dense = sam.prompt_encoder(points=points, boxes=on(prompted.boxes), masks=on(prompted.masks))
    return sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                            multimask_output=prompted.multimask)


def _mask_losses(low_res: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor, size: int,
                 focal_weight: float = FOCAL_WEIGHT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of the best of M masks per object, and that mask's logits. Returns (loss, chosen low-res logits
    K x 1 x h x w, IoU of the chosen masks K)."""
    logits = F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)
    truth = targets[:, None].expand_as(logits)
    mask_loss = (focal_weight * sigmoid_focal_loss(logits, truth)
                 + DICE_WEIGHT * soft_dice_loss(logits, truth, trailing=2))
    ious = mask_iou(logits, truth)
    best = mask_loss.detach().argmin(dim=1)
    rows = torch.arange(len(best), device=best.device)
    iou_loss = F.mse_loss(iou_pred, ious, reduction="none").mean(dim=1)
    loss = mask_loss[rows, best] + IOU_WEIGHT * iou_loss
    return loss.mean(), low_res[rows, best][:, None], ious[rows, best]


def _first_prompts(masks: np.ndarray, rng: np.random.Generator) -> tuple[Prompted, list[np.ndarray], bool]:
    """Round 1 for K masks: all boxes, or all point prompts (1-3 points; one point is ambiguous: 3 masks)."""
    if rng.random() < 0.5:
        boxes = np.stack([noisy_box(m, rng) for m in masks])
        return Prompted(None, None, torch.from_numpy(boxes), None, multimask=False), [], True
    count = int(rng.choice([1, 1, 2, 3]))
    points = [random_points(m, count, rng) for m in masks]
    coords = torch.from_numpy(np.stack(points))
    labels = torch.ones(coords.shape[:2], dtype=torch.int64)
    return Prompted(coords, labels, None, None, multimask=count == 1), points, False


def image_loss(sam, embedding: torch.Tensor, instances: np.ndarray, rng: np.random.Generator,
               focal_weight: float = FOCAL_WEIGHT) -> tuple[torch.Tensor, dict[str, float]]:
    """The promptable loss of one image: two rounds over up to ``OBJECTS_PER_IMAGE`` of its objects.

    embedding: 1 x C x h x w; instances: S x S int (0 background). ``focal_weight``: the focal term's weight
    (SAM's 20; the pretraining script ramps it up from 0, see ``focal_weight_at``). Returns the loss and the
    mean IoU of each round's chosen masks."""
    ids = np.unique(instances)
    ids = ids[ids > 0]
    if ids.size == 0:
        return embedding.sum() * 0.0, {}
    areas = np.bincount(instances.ravel())[ids].astype(np.float64)
    weights = np.sqrt(areas) / np.sqrt(areas).sum()  # larger objects a little more often (see OBJECT_WEIGHTING)
    chosen = rng.choice(ids, size=min(OBJECTS_PER_IMAGE, ids.size), replace=False, p=weights)
    masks = np.stack([instances == i for i in chosen])
    size = instances.shape[-1]
    targets = torch.from_numpy(masks.astype(np.float32)).to(embedding.device)
    first, points, boxed = _first_prompts(masks, rng)
    low_res, iou_pred = decode(sam, embedding, first)
    loss1, previous, iou1 = _mask_losses(low_res, iou_pred, targets, size, focal_weight)

    predicted = F.interpolate(previous.detach(), size=(size, size), mode="bilinear", align_corners=False)[:, 0] > 0
    fixes = [correction_point(p, m, rng) for p, m in zip(predicted.cpu().numpy(), masks)]
    fix_xy = np.stack([f[0] for f in fixes])[:, None]
    fix_label = np.array([f[1] for f in fixes])[:, None]
    if boxed:
        coords, labels = fix_xy, fix_label
    else:
        coords = np.concatenate([np.stack(points), fix_xy], axis=1)
        labels = np.concatenate([np.ones(coords.shape[:1] + (coords.shape[1] - 1,), np.int64), fix_label], axis=1)
    second = Prompted(torch.from_numpy(coords.astype(np.float32)), torch.from_numpy(labels.astype(np.int64)),
                      first.boxes, previous.detach(), multimask=False)
    low_res, iou_pred = decode(sam, embedding, second)
    loss2, _, iou2 = _mask_losses(low_res, iou_pred, targets, size, focal_weight)
    return loss1 + loss2, {"iou_round1": float(iou1.mean()), "iou_round2": float(iou2.mean())}


def preprocess(sam, images: np.ndarray) -> torch.Tensor:
    """B x S x S x 3 uint8 -> SAM's normalised B x 3 x S x S input (``Sam.preprocess``, at SAM's own size), on
    SAM's device."""
    batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().to(sam.device)
    return torch.stack([sam.preprocess(image) for image in batch])


@torch.no_grad()
def prompt_mious(sam, scenes: Sequence, max_objects: int = 16) -> dict[str, float]:
    """Held-out quality: mean IoU over objects with an exact box prompt (one mask), and with one central point
    (three masks; the one with the highest predicted IoU, as SAM's users get it); also over the objects of at
    least ``LARGE_OBJECT_AREA`` pixels (``*_large``)."""
    sam.eval()
    box_ious, point_ious, areas = [], [], []
    for scene in scenes:
        ids = np.unique(scene.instances)
        ids = ids[ids > 0][:max_objects]
        if ids.size == 0:
            continue
        embedding = sam.image_encoder(preprocess(sam, scene.image[None]))
        masks = np.stack([scene.instances == i for i in ids])
        areas += masks.sum(axis=(1, 2)).tolist()
        targets = torch.from_numpy(masks.astype(np.float32))[:, None].to(embedding.device)
        size = masks.shape[-1]
        boxes = torch.from_numpy(np.stack([mask_box(m) for m in masks]))
        low_res, _ = decode(sam, embedding, Prompted(None, None, boxes, None, multimask=False))
        logits = F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)
        box_ious += mask_iou(logits, targets)[:, 0].tolist()
        coords = torch.from_numpy(np.stack([central_point(m) for m in masks]))[:, None]
        low_res, iou_pred = decode(sam, embedding, Prompted(coords, torch.ones(len(ids), 1, dtype=torch.int64), None,
                                                             None, multimask=True))
        best = iou_pred.argmax(dim=1)
        chosen = low_res[torch.arange(len(ids), device=best.device), best][:, None]
        logits = F.interpolate(chosen, size=(size, size), mode="bilinear", align_corners=False)
        point_ious += mask_iou(logits, targets)[:, 0].tolist()
    large = np.asarray(areas) >= LARGE_OBJECT_AREA
    return {"box_miou": float(np.mean(box_ious)), "point_miou": float(np.mean(point_ious)),
            "objects": len(box_ious), "box_miou_large": float(np.mean(np.asarray(box_ious)[large])),
            "point_miou_large": float(np.mean(np.asarray(point_ious)[large])), "large_objects": int(large.sum())}
