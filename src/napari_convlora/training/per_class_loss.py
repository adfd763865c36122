"""The loss of a per-class multi-class head (``HeadConfig.multiclass="per_class"``): SAMed's recipe (torch only).

SAMed (Zhang and Liu, "Customized Segment Anything Model for Medical Image Segmentation", arXiv:2304.13785;
``github.com/hitachinsk/SAMed``, ``trainer.py: calc_loss`` and ``utils.py: DiceLoss``) gives SAM's decoder one mask
token per class and trains the K mask logits as semantic logits with
``loss = (1 - dice_weight) * CE + dice_weight * Dice``, ``dice_weight = 0.8`` (``train.py --dice_param``), CE being
``nn.CrossEntropyLoss()`` over the K classes and Dice the mean over classes of ``1 - Dice(softmax_k, onehot_k)``.

Kept from SAMed: cross-entropy over the K logits, a soft Dice of the softmax probabilities pooled over the batch (one
sum over every image and pixel, not one Dice per image), smoothing 1e-5.
Changed on purpose, and why:
- weights 1 : 1, not SAMed's 0.2 : 0.8 (``SAMED_WEIGHTS``), because they measured better here
  (``benchmarks/multiclass_heads.py``, built-in SAM, 300 steps): on the 6-class ``anatomy`` family, mIoU 0.372 ± 0.017
  [0.341, 0.390] over 5 seeds against 0.341 ± 0.077 [0.192, 0.399] (one 0.2 : 0.8 run stalled at 0.19); on the
  3-class cells sample 0.884 both;
- computed at full input resolution, the logits upsampled bilinearly (align_corners=False) as prediction does, like
  the binary structure loss (SAMed scores the S/4 logits against labels downsampled to S/4);
- pixels labelled ``IGNORE_INDEX`` (not annotated) enter no term, and an image with none labelled adds nothing;
- Dice averages over the classes present among the batch's labelled pixels (SAMed: over all K, so an absent class
  adds a term near 1 whose only way down is predicting nothing; cross-entropy already does that), and its
  denominator is ``sum(p) + sum(g)`` (the Dice of ``mask_terms.soft_dice_loss``; SAMed's is ``sum(p^2) + sum(g^2)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX

#: The weights used: CE + Dice, 1 : 1 (see the module docstring).
CE_WEIGHT = 1.0
DICE_WEIGHT = 1.0
#: SAMed's (ce_weight, dice_weight): (1 - dice_param) * CE + dice_param * Dice with dice_param = 0.8.
SAMED_WEIGHTS = (0.2, 0.8)
DICE_SMOOTH = 1e-5


def per_class_loss(mask_logits: torch.Tensor, targets: torch.Tensor, ce_weight: float = CE_WEIGHT,
                   dice_weight: float = DICE_WEIGHT) -> dict[str, torch.Tensor]:
    """Cross-entropy + soft Dice of per-class logits against a label map.

    mask_logits: B x K x h x w, token k's mask being class k's logit. targets: B x H x W int64 in 0..K-1 or
    IGNORE_INDEX; the logits are upsampled bilinearly (align_corners=False) to H x W first.
    Returns scalars {"ce": ce_weight * CE, "dice": dice_weight * Dice}, already weighted (their sum is the loss):
      CE: mean cross-entropy over the labelled pixels of the batch;
      Dice: mean over the classes present among them of ``1 - (2 sum(p_k g_k) + s) / (sum(p_k) + sum(g_k) + s)``,
        p = softmax over the K logits, g = one-hot labels, sums over every labelled pixel of the batch, s = 1e-5.
    Both are 0 (still attached to the graph) when no pixel is labelled.
    """
    if mask_logits.dim() != 4 or targets.dim() != 3 or targets.shape[0] != mask_logits.shape[0]:
        raise ValueError(f"expected mask_logits B x K x h x w and targets B x H x W, got {tuple(mask_logits.shape)} "
                         f"and {tuple(targets.shape)}")
    num_classes = mask_logits.shape[1]
    logits = F.interpolate(mask_logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
    valid = targets != IGNORE_INDEX
    count = valid.sum()
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / count.clamp_min(1)

    prob = torch.softmax(logits, dim=1).movedim(1, -1)[valid]  # N x K, labelled pixels only
    truth = F.one_hot(targets[valid], num_classes).to(prob.dtype)  # N x K
    inter, prob_sum, truth_sum = (prob * truth).sum(0), prob.sum(0), truth.sum(0)
    per_class = 1.0 - (2.0 * inter + DICE_SMOOTH) / (prob_sum + truth_sum + DICE_SMOOTH)
    present = truth_sum > 0
    dice = torch.where(present, per_class, 0.0).sum() / present.sum().clamp_min(1)
    return {"ce": ce_weight * ce, "dice": dice_weight * dice}
