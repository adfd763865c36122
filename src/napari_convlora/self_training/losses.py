"""WeSAM's self-training losses (METHODS.md 3.4), for ONE image with N prompted instances (torch only).

Three forwards feed them: the **student** (the adapted SAM on the strong view), the **teacher** (the same adapted
SAM on the weak view, *with* gradients: there is no EMA copy) and the frozen **anchor** (SAM before adaptation,
weak view). The total is ``20 * focal + dice + iou_mse + anchor + contrastive``:

- focal, dice, iou_mse: the student against the teacher's hard pseudo-labels ``1[teacher logit > 0]``;
- anchor: ``0.5 * Dice(student, A) + 0.5 * Dice(teacher, A)`` with ``A = 1[anchor logit > 0]``, smoothing 1, so
  gradients reach the adapter through both the strong and the weak view;
- contrastive: the teacher's and the anchor's instance features pulled together, one log-ratio over the
  whole N x N similarity matrix (0 when N = 1).
Pseudo-labels are hard thresholds and never carry a gradient; the anchor's outputs are detached here too.

**Resolution.** The reference computes focal, dice, IoU-MSE and the anchor term on SAM's 256 x 256 low-resolution
logits upsampled bilinearly (``align_corners=False``) to the padded 1024 x 1024 input frame. The functions accept
mask logits of any H x W (the three networks' at the same size): to reproduce the reference, the trainer should
pass the low-res logits upsampled to the model's input frame (``input_size x input_size``). Passing the low-res
logits themselves is 16 x cheaper but not the same loss: the IoU target is thresholded on a coarser grid and the
dice smoothing weighs 16 x more against the pixel sums. The contrastive term takes the *low-res* logits (256 x
256) and resizes them to the embedding grid itself (64 x 64), as the reference does.

**The call-signature quirk and ``reference_quirks``.** The released code calls ``focal(pred, target, num_masks)``
and ``dice(pred, target, num_masks)``, whose third parameters are the focal ``alpha`` and the dice smoothing:
the effective focal weight is ``alpha = num_masks`` and the effective smoothing ``num_masks`` (a habit inherited
from lightning-sam, where that argument was meant as a normaliser). ``reference_quirks=True`` reproduces this.
With ``reference_quirks=False`` (default) we use what the reference code itself declares: its loss classes'
defaults, ``alpha = 0.8`` (its ``ALPHA`` constant) and smoothing 1 (the value its own anchor term uses), and no
division of focal or dice by ``num_masks``. We do not read the third argument as a normaliser, because both
terms are already means over all pixels of all instances of the image pooled together: dividing again would
shrink them by the crowd size while the anchor and contrastive terms (never divided) keep their weight. The one
place where the reference normalises by ``num_masks`` on purpose, the IoU-MSE sum, keeps it in both modes.

``num_masks`` defaults to N. The reference sums these per-image terms over a batch with ``num_masks`` = the
instances of the whole batch; pass that total to reproduce a batch of several images (its runs use batch 1).

Numerics follow the reference: focal's BCE is taken on ``sigmoid(logits)`` with PyTorch's clamp of each log at
-100 (computed in fp32 with autocast off); the IoU-MSE threshold is 0.5 on *logits*, as in its ``calc_iou``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..training.mask_terms import soft_dice_loss

#: The reference's loss weights and constants (``training/losses.py``, ``adaptation.py``).
FOCAL_WEIGHT = 20.0
FOCAL_ALPHA = 0.8
FOCAL_GAMMA = 2.0
DICE_SMOOTH = 1.0
CONTRAST_TEMPERATURE = 0.3
IOU_LOGIT_THRESHOLD = 0.5
_IOU_EPS = 1e-7


# --------------------------------------------------------------------------------------------------
# Pseudo-labels and the single terms


def pseudo_labels(logits: torch.Tensor) -> torch.Tensor:
    """Hard pseudo-labels: ``1[logits > 0]`` as float, no gradient. Any shape in, the same shape out (0./1.)."""
    return (logits.detach() > 0).float()


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA
) -> torch.Tensor:
    """Focal loss on ``sigmoid(logits)``, averaged over every element (all instances' pixels jointly). WeSAM's
    formula, not SAM's ``training.mask_terms.sigmoid_focal_loss``: alpha weighs every pixel alike.

    logits: N x H x W (any shape). target: same shape, values in [0, 1].
    Returns a scalar: ``mean(alpha * (1 - exp(-bce))**gamma * bce)``, ``bce`` the per-pixel binary cross-entropy
    of the probabilities (each log clamped at -100, as ``F.binary_cross_entropy`` does).
    """
    with torch.autocast(logits.device.type, enabled=False):
        prob = torch.sigmoid(logits.float())
        bce = F.binary_cross_entropy(prob, target.float(), reduction="none")
        return (alpha * (1.0 - torch.exp(-bce)) ** gamma * bce).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice loss over every element jointly (not per instance): WeSAM's reduction of
    ``training.mask_terms.soft_dice_loss``, which the other objectives take per mask.

    logits: N x H x W (any shape). target: same shape, values in [0, 1].
    Returns a scalar: ``1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)``, ``p = sigmoid(logits)``.
    """
    return soft_dice_loss(logits, target, smooth, trailing=None)


def hard_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each instance's mask ``1[logits >= 0.5]`` (a threshold on logits) with its target; no gradient.
    WeSAM's ``calc_iou``, not SAM's ``training.mask_terms.mask_iou`` (logit 0, an empty union scoring 1).

    logits: N x H x W. target: N x H x W in {0, 1}. Returns N values in [0, 1] (``inter / (union + 1e-7)``).
    """
    mask = (logits.detach() >= IOU_LOGIT_THRESHOLD).float()
    target = target.detach().float()
    inter = (mask * target).sum(dim=(-2, -1))
    union = mask.sum(dim=(-2, -1)) + target.sum(dim=(-2, -1)) - inter
    return inter / (union + _IOU_EPS)


def iou_mse_loss(
    logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor, num_masks: float
) -> torch.Tensor:
    """The IoU head's regression to the IoU the student's masks really reach against the pseudo-labels.

    logits: N x H x W student mask logits. target: N x H x W pseudo-labels in {0, 1}.
    iou_pred: N (or N x 1) predicted IoUs. Returns a scalar: ``sum_n (iou_pred_n - hard_iou_n)**2 / num_masks``.
    Only ``iou_pred`` carries a gradient (the IoU target is thresholded).
    """
    iou = hard_iou(logits, target)
    return (iou_pred.float().reshape(-1) - iou).square().sum() / num_masks


def anchor_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, anchor_mask: torch.Tensor
) -> torch.Tensor:
    """Anchor regularisation: ``0.5 Dice(student, A) + 0.5 Dice(teacher, A)``, smoothing 1.

    student_logits, teacher_logits: N x H x W. anchor_mask: N x H x W in {0, 1} (``pseudo_labels`` of the
    anchor's logits). Returns a scalar; gradients reach both the student's and the teacher's logits.
    """
    return 0.5 * dice_loss(student_logits, anchor_mask) + 0.5 * dice_loss(teacher_logits, anchor_mask)


def instance_features(embedding: torch.Tensor, low_res_logits: torch.Tensor) -> torch.Tensor:
    """Each instance's mean L2-normalised embedding over its own mask on the embedding grid.

    embedding: C x h x w (SAM's 256 x 64 x 64). low_res_logits: N x h' x w' (SAM's 256 x 256 logits).
    Masks: ``sigmoid(bilinear resize of the logits to h x w) > 0.5``, detached. Each pixel's C-vector is
    L2-normalised first; an empty mask divides by 1 (its feature is the zero vector). Returns N x C.
    """
    normed = F.normalize(embedding.float(), p=2, dim=0)  # C x h x w
    resized = F.interpolate(low_res_logits.detach().float()[:, None], size=embedding.shape[-2:],
                            mode="bilinear", align_corners=False)[:, 0]
    masks = (torch.sigmoid(resized) > 0.5).float()  # N x h x w
    counts = masks.sum(dim=(-2, -1))
    counts = torch.where(counts == 0, torch.ones_like(counts), counts)
    return (masks.flatten(1) @ normed.flatten(1).t()) / counts[:, None]


def contrastive_loss(
    teacher_embedding: torch.Tensor,
    anchor_embedding: torch.Tensor,
    teacher_low_res_logits: torch.Tensor,
    anchor_low_res_logits: torch.Tensor,
    temperature: float = CONTRAST_TEMPERATURE,
) -> torch.Tensor:
    """WeSAM's instance contrast between the teacher's and the anchor's embeddings.

    teacher_embedding, anchor_embedding: C x h x w. teacher_low_res_logits, anchor_low_res_logits: N x h' x w',
    each network's own masks (see :func:`instance_features`). With ``S`` the N x N cosine similarities of teacher
    (rows) and anchor (columns) instance features divided by ``temperature``, returns the scalar
    ``-log(sum_i exp(S_ii) / sum_ij exp(S_ij))``: one ratio over the whole matrix, not a mean of row-wise
    InfoNCE terms. It is exactly 0 for N = 1.
    """
    teacher = instance_features(teacher_embedding, teacher_low_res_logits)
    anchor = instance_features(anchor_embedding, anchor_low_res_logits)
    sim = F.cosine_similarity(teacher[:, None, :], anchor[None, :, :], dim=-1) / temperature  # N x N
    return torch.logsumexp(sim.flatten(), dim=0) - torch.logsumexp(sim.diagonal(), dim=0)


# --------------------------------------------------------------------------------------------------
# The total


@dataclass
class BranchOutputs:
    """One network's outputs on one view of one image with N prompted instances.

    mask_logits: N x H x W mask logits at the loss resolution (the reference: upsampled to the input frame).
    iou_pred: N (or N x 1) predicted IoUs; needed for the student.
    low_res_logits: N x h' x w' SAM low-res logits (256 x 256); needed for the teacher and the anchor.
    embedding: C x h x w image embedding (256 x 64 x 64); needed for the teacher and the anchor.
    """

    mask_logits: torch.Tensor
    iou_pred: torch.Tensor | None = None
    low_res_logits: torch.Tensor | None = None
    embedding: torch.Tensor | None = None


def wesam_loss(
    student: BranchOutputs,
    teacher: BranchOutputs,
    anchor: BranchOutputs,
    *,
    num_masks: float | None = None,
    reference_quirks: bool = False,
) -> dict[str, torch.Tensor]:
    """WeSAM's loss for one image: the terms and ``total = 20 focal + dice + iou_mse + anchor + contrastive``.

    Args:
        student: strong view through the adapted SAM (``mask_logits``, ``iou_pred``).
        teacher: weak view through the same adapted SAM, with gradients (``mask_logits``, ``low_res_logits``,
            ``embedding``).
        anchor: weak view through the frozen original SAM (``mask_logits``, ``low_res_logits``, ``embedding``);
            detached here.
        num_masks: the IoU-MSE normaliser (and, with quirks, the focal alpha and dice smoothing); default N.
        reference_quirks: True reproduces the released code's call-signature quirk (focal ``alpha = num_masks``,
            self-training dice smoothing ``num_masks``); False (default) uses alpha 0.8 and smoothing 1 (see the
            module docstring). Nothing else changes.

    Returns:
        Scalars under ``"focal"``, ``"dice"``, ``"iou_mse"``, ``"anchor"``, ``"contrastive"`` and ``"total"``.
        An image without instances (N = 0) gives zeros, still attached to the student's graph.
    """
    for name, branch, needed in (("student", student, ("iou_pred",)),
                                 ("teacher", teacher, ("low_res_logits", "embedding")),
                                 ("anchor", anchor, ("low_res_logits", "embedding"))):
        missing = [field for field in needed if getattr(branch, field) is None]
        if missing:
            raise ValueError(f"the {name}'s outputs lack {missing}")
        if branch.mask_logits.shape != student.mask_logits.shape or branch.mask_logits.dim() != 3:
            raise ValueError(f"expected N x H x W mask logits of one shape, got {tuple(branch.mask_logits.shape)} "
                             f"for the {name} and {tuple(student.mask_logits.shape)} for the student")
    n = student.mask_logits.shape[0]
    if n == 0:
        zero = student.mask_logits.sum().float() * 0.0
        return dict.fromkeys(("focal", "dice", "iou_mse", "anchor", "contrastive", "total"), zero)
    num_masks = float(n if num_masks is None else num_masks)
    alpha, smooth = (num_masks, num_masks) if reference_quirks else (FOCAL_ALPHA, DICE_SMOOTH)

    target = pseudo_labels(teacher.mask_logits)
    anchor_mask = pseudo_labels(anchor.mask_logits)
    terms = {
        "focal": focal_loss(student.mask_logits, target, alpha=alpha),
        "dice": dice_loss(student.mask_logits, target, smooth=smooth),
        "iou_mse": iou_mse_loss(student.mask_logits, target, student.iou_pred, num_masks),
        "anchor": anchor_loss(student.mask_logits, teacher.mask_logits, anchor_mask),
        "contrastive": contrastive_loss(teacher.embedding, anchor.embedding.detach(),
                                        teacher.low_res_logits, anchor.low_res_logits),
    }
    terms["total"] = (FOCAL_WEIGHT * terms["focal"] + terms["dice"] + terms["iou_mse"] + terms["anchor"]
                      + terms["contrastive"])
    return terms
