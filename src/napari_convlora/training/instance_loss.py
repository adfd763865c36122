"""The loss of an instance head (torch only): each of its three maps (foreground, centre, depth; targets in 0..1
from ``instances.object_maps``) by binary cross-entropy with the soft targets plus a soft Dice, over the annotated
pixels of the batch.

micro-sam trains its instance decoder's foreground and distance maps with a Dice loss per map
(``DiceBasedDistanceLoss``); the cross-entropy added here gives every pixel a gradient from the first step (a Dice
term alone barely moves a map that starts near 0 on small objects) and is what the foreground's soft Dice is
usually paired with. Terms are weighted 1 : 1 and averaged over the three maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1.0


def instance_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss terms of an instance head.

    logits: B x 3 x S x S map logits. targets: B x 3 x S x S floats in 0..1. valid: B x S x S bool, the annotated
    pixels. Returns {"instance_bce": mean BCE over the valid pixels and the 3 maps, "instance_dice": mean over the
    3 maps of ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` over the valid pixels of the batch}; both 0 (still
    attached to the graph) without valid pixels.
    """
    if logits.dim() != 4 or logits.shape[1] != 3 or logits.shape != targets.shape:
        raise ValueError(f"expected instance logits and targets B x 3 x S x S, got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if valid.shape != (logits.shape[0], *logits.shape[-2:]):
        raise ValueError(f"valid has shape {tuple(valid.shape)}, expected {(logits.shape[0], *logits.shape[-2:])}")
    logits = logits.float()
    weight = valid[:, None].expand_as(logits).to(logits.dtype)
    count = weight.sum()
    bce = (F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none") * weight).sum()
    bce = bce / count.clamp_min(1)
    prob = torch.sigmoid(logits) * weight
    truth = targets.float() * weight
    inter = (prob * truth).sum(dim=(0, 2, 3))
    dice = 1.0 - (2.0 * inter + DICE_SMOOTH) / (prob.sum(dim=(0, 2, 3)) + truth.sum(dim=(0, 2, 3)) + DICE_SMOOTH)
    dice = torch.where(count > 0, dice.mean(), 0.0 * dice.mean())
    return {"instance_bce": bce, "instance_dice": dice}
