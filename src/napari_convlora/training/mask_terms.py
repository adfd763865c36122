"""Binary mask loss terms that several objectives share (torch only): soft Dice, SAM's focal loss, the IoU of
thresholded masks.

Who uses what, and where a sibling differs on purpose (each difference is stated once, beside the sibling):
- soft Dice: the supervised mask-classification loss (per mask, over sampled points), HQ-SAM's point-sampled
  loss, SAM's promptable pretraining (per mask, over pixels) and WeSAM (``self_training.losses.dice_loss``: every
  instance's pixels pooled into ONE Dice, as WeSAM's code reduces it): one implementation, the reduction chosen by
  ``trailing``.
- focal: SAM's (RetinaNet's: alpha balances positives against negatives) here, used by the pretraining;
  WeSAM's ``self_training.losses.focal_loss`` is another formula on purpose (alpha a plain weight, the BCE of
  clamped probabilities, as its code computes it).
- IoU of thresholded masks: SAM's here (logit > 0, an empty union scores 1); WeSAM's ``hard_iou`` thresholds logits
  at 0.5 and divides by ``union + 1e-7`` (its ``calc_iou``), on purpose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
                   trailing: int | None = 1) -> torch.Tensor:
    """``1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)``, ``p = sigmoid(logits)`` (in float32).

    logits, target: the same shape, target in [0, 1]. The sums run over the last ``trailing`` dimensions
    (1: N x P point samples -> N; 2: ... x H x W masks -> ...), or over every element jointly with
    ``trailing=None`` (one scalar for all instances together).
    """
    prob = torch.sigmoid(logits.float())
    target = target.float()
    if trailing is None:
        prob, target = prob.flatten(), target.flatten()
    elif trailing > 1:
        prob, target = prob.flatten(-trailing), target.flatten(-trailing)
    return 1.0 - (2.0 * (prob * target).sum(-1) + smooth) / (prob.sum(-1) + target.sum(-1) + smooth)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
                       ) -> torch.Tensor:
    """SAM's focal loss per mask, averaged over pixels. logits, targets: ... x H x W -> ... (targets in [0, 1])."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(dim=(-2, -1))


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded masks (logit > 0) with the targets (> 0.5). ... x H x W -> ... (no gradient; an
    empty prediction of an empty target scores 1)."""
    pred = logits.detach() > 0
    truth = targets > 0.5
    inter = (pred & truth).flatten(-2).sum(-1).float()
    union = (pred | truth).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
