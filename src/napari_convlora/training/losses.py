"""Training losses (torch only): PraNet's structure loss and a Mask2Former-style mask-classification loss, and the
dispatch of every model's loss (the per-class head's cross-entropy + Dice lives in ``per_class_loss.py``).

Targets are int64 label maps, B x H x W, holding class indices 0..K-1 (0 = background) or IGNORE_INDEX for
pixels nobody annotated. Ignored pixels never enter any loss term: the structure loss gives them weight 0,
the mask-classification loss only samples points at labelled pixels. An image without a labelled pixel
contributes nothing (and no NaN).

Point sampling works in normalised coordinates: a pixel (row, col) of an H x W target sits at
x = (col + 0.5) * 2 / W - 1 (same for y), and low-resolution logits are read there with
``F.grid_sample(align_corners=False, padding_mode="border")``. This gives exactly the value that
``F.interpolate(..., mode="bilinear", align_corners=False)`` to H x W would give at that pixel, so logits and
targets may have different resolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ..config.choices import MASK_LOSSES
from ..constants import IGNORE_INDEX
from ..errors import ConfigError
from ..modeling.outputs import SegmentationOutput
from .hq_mask_loss import hq_mask_loss
from .instance_loss import instance_loss
from .mask_terms import soft_dice_loss
from .per_class_loss import per_class_loss

#: Hungarian matcher cost weights (Mask2Former defaults): class, mask BCE, dice.
MATCH_CLASS_WEIGHT = 1.0
MATCH_MASK_WEIGHT = 5.0
MATCH_DICE_WEIGHT = 5.0

_POOL_KERNEL = 31  # PraNet's boundary window: 31 x 31 average, stride 1, padding 15


# --------------------------------------------------------------------------------------------------
# Binary: structure loss


def structure_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """PraNet's structure loss (weighted BCE + weighted IoU), as PraNet intended it.

    logits: B x 1 x H x W foreground logits. target: B x 1 x H x W, values in [0, 1] (any dtype).
    valid: optional B x 1 x H x W bool, True where the pixel is labelled.
    Returns a scalar: the mean over images that have at least one valid pixel of (wBCE + wIoU); 0 (still
    attached to the graph) when no image has one.

    Weight map w = 1 + 5 |avgpool31(G) - G| (stride 1, padding 15, zero padding counted in the average).
    wBCE = sum(w bce) / sum(w) per image. The reference (PraNet and Conv-LoRA) calls
    ``binary_cross_entropy_with_logits(..., reduce="none")``, which silently makes that term the plain mean
    BCE over the batch; we deliberately implement the intended per-image weighting instead.
    wIoU = 1 - (sum(w p G) + 1) / (sum(w (p + G)) - sum(w p G) + 1) with p = sigmoid(logits).

    With ``valid``, ignored pixels get w = 0 in every sum, and they count as background (G = 0) inside the
    average pool, so an unlabelled region never looks like a boundary of foreground.
    """
    if logits.dim() != 4 or logits.shape[1] != 1 or logits.shape != target.shape:
        raise ValueError(f"expected logits and target of shape B x 1 x H x W, got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    logits = logits.float()
    if valid is None:
        valid = torch.ones_like(logits, dtype=torch.bool)
    elif valid.shape != logits.shape:
        raise ValueError(f"valid has shape {tuple(valid.shape)}, expected {tuple(logits.shape)}")
    valid = valid.bool()
    truth = torch.where(valid, target.float(), 0.0)
    # The 31 x 31 box average (zero padding counted) done as two separable passes: same values, ~10x cheaper.
    half = _POOL_KERNEL // 2
    pooled = F.avg_pool2d(truth, kernel_size=(_POOL_KERNEL, 1), stride=1, padding=(half, 0))
    pooled = F.avg_pool2d(pooled, kernel_size=(1, _POOL_KERNEL), stride=1, padding=(0, half))
    weight = torch.where(valid, 1.0 + 5.0 * (pooled - truth).abs(), 0.0)

    bce = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
    weighted_bce = torch.where(valid, weight * bce, 0.0).sum(dim=(1, 2, 3))
    weight_sum = weight.sum(dim=(1, 2, 3))
    wbce = weighted_bce / weight_sum.clamp_min(1e-12)  # 0 / eps = 0 for an image without valid pixels

    prob = torch.where(valid, torch.sigmoid(logits), 0.0)
    inter = (weight * prob * truth).sum(dim=(1, 2, 3))
    union = (weight * (prob + truth)).sum(dim=(1, 2, 3))
    wiou = 1.0 - (inter + 1.0) / (union - inter + 1.0)  # exactly 0 without valid pixels

    has_label = valid.flatten(1).any(dim=1)
    per_image = torch.where(has_label, wbce + wiou, 0.0)
    return per_image.sum() / has_label.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------------
# Multi-class: point sampling helpers


def _randint(high: int, size: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    """Uniform integers in [0, high) drawn from ``generator`` (on its own device), moved to ``device``."""
    draw_device = generator.device if generator is not None else device
    return torch.randint(high, size, generator=generator, device=draw_device).to(device)


def pixel_coords(flat_index: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised (x, y) centres, in [-1, 1], of pixels given by flat indices into an H x W grid.

    flat_index: any shape ``S`` of int64. Returns float32 of shape ``S x 2`` (x first, as grid_sample wants).
    """
    rows = torch.div(flat_index, width, rounding_mode="floor")
    cols = flat_index - rows * width
    x = (cols.float() + 0.5) * (2.0 / width) - 1.0
    y = (rows.float() + 0.5) * (2.0 / height) - 1.0
    return torch.stack([x, y], dim=-1)


def sample_logits(logits: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly read N maps of logits at normalised points (align_corners=False, border padding).

    logits: N x h x w. coords: P x 2 (the same points for every map) or N x P x 2. Returns N x P.
    """
    if coords.dim() == 2:
        out = F.grid_sample(logits[None], coords[None, None].to(logits.dtype), mode="bilinear",
                            padding_mode="border", align_corners=False)
        return out[0, :, 0]
    out = F.grid_sample(logits[:, None], coords[:, None].to(logits.dtype), mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out[:, 0, 0]


def _uniform_valid_points(valid_index: torch.Tensor, size: tuple[int, ...],
                          generator: torch.Generator | None) -> torch.Tensor:
    """Flat pixel indices drawn uniformly (with replacement) among ``valid_index``; shape ``size``."""
    draw = _randint(valid_index.numel(), size, generator, valid_index.device)
    return valid_index[draw]


def _importance_points(logits: torch.Tensor, valid_index: torch.Tensor, height: int, width: int,
                       num_points: int, oversample_ratio: float, importance_ratio: float,
                       generator: torch.Generator | None) -> torch.Tensor:
    """PointRend-style points per map, among valid pixels only.

    logits: N x h x w. Draws num_points * oversample_ratio uniform valid candidates per map, keeps the
    importance_ratio * num_points most uncertain (-|logit|), and adds the rest uniformly.
    Returns N x num_points flat indices into the H x W target.
    """
    count = logits.shape[0]
    num_candidates = max(int(num_points * oversample_ratio), 1)
    num_uncertain = min(int(importance_ratio * num_points), num_candidates)
    candidates = _uniform_valid_points(valid_index, (count, num_candidates), generator)
    with torch.no_grad():
        uncertainty = -sample_logits(logits.detach(), pixel_coords(candidates, height, width)).abs()
        top = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = torch.gather(candidates, 1, top)
    extra = _uniform_valid_points(valid_index, (count, num_points - num_uncertain), generator)
    return torch.cat([chosen, extra], dim=1)


# --------------------------------------------------------------------------------------------------
# Multi-class: Hungarian matching


def matching_cost(point_logits: torch.Tensor, class_logits: torch.Tensor, point_targets: torch.Tensor,
                  classes: torch.Tensor) -> torch.Tensor:
    """Cost of assigning each of Q tokens to each of n GT class masks.

    point_logits: Q x P mask logits at P shared points. class_logits: Q x (K+1).
    point_targets: n x P float {0, 1}, the GT mask of each class at the same points. classes: n int64.
    Returns Q x n: 1 * (-softmax prob of the class) + 5 * mean BCE + 5 * dice.
    """
    num_points = point_logits.shape[1]
    class_cost = -class_logits.softmax(dim=-1)[:, classes]
    positive = F.softplus(-point_logits)  # BCE where the target is 1
    negative = F.softplus(point_logits)   # BCE where the target is 0
    bce_cost = (positive @ point_targets.T + negative @ (1.0 - point_targets).T) / num_points
    prob = point_logits.sigmoid()
    numerator = 2.0 * prob @ point_targets.T + 1.0
    denominator = prob.sum(-1)[:, None] + point_targets.sum(-1)[None, :] + 1.0
    dice_cost = 1.0 - numerator / denominator
    return (MATCH_CLASS_WEIGHT * class_cost + MATCH_MASK_WEIGHT * bce_cost
            + MATCH_DICE_WEIGHT * dice_cost)


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment of the n columns (classes) to the Q rows (tokens).

    cost: Q x n with Q >= n. Returns (token_index, column_index), each n int64, sorted by token.
    """
    num_tokens, num_targets = cost.shape
    if num_tokens < num_targets:
        raise ValueError(f"{num_targets} classes are present in an image but the model has only "
                         f"{num_tokens} mask tokens; use at least as many mask tokens as classes")
    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return (torch.as_tensor(rows, dtype=torch.long, device=cost.device),
            torch.as_tensor(cols, dtype=torch.long, device=cost.device))


def match_tokens(mask_logits: torch.Tensor, class_logits: torch.Tensor, labels: torch.Tensor,
                 num_points: int = 12544, generator: torch.Generator | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Match one image's mask tokens to the classes present among its labelled pixels.

    mask_logits: Q x h x w. class_logits: Q x (K+1). labels: H x W int64 (IGNORE_INDEX = unlabelled).
    Costs are evaluated on ``num_points`` points drawn uniformly among labelled pixels.
    Returns (token_index, matched_class), each n int64 (n = number of classes present; 0 if none).
    """
    flat = labels.flatten()
    valid_index = torch.nonzero(flat != IGNORE_INDEX).squeeze(1)
    empty = torch.zeros(0, dtype=torch.long, device=labels.device)
    if valid_index.numel() == 0:
        return empty, empty
    classes = torch.unique(flat[valid_index])
    if mask_logits.shape[0] < classes.numel():
        raise ValueError(f"{classes.numel()} classes are present in an image but the model has only "
                         f"{mask_logits.shape[0]} mask tokens; use at least as many mask tokens as classes")
    with torch.no_grad():
        points = _uniform_valid_points(valid_index, (num_points,), generator)
        point_logits = sample_logits(mask_logits.detach().float(), pixel_coords(points, *labels.shape))
        point_targets = (flat[points][None, :] == classes[:, None]).float()
        cost = matching_cost(point_logits, class_logits.detach().float(), point_targets, classes)
    tokens, columns = hungarian_match(cost)
    return tokens, classes[columns]


# --------------------------------------------------------------------------------------------------
# Multi-class: the loss


def _check_targets(targets: torch.Tensor, num_classes: int) -> None:
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer label map, got dtype {targets.dtype}")
    if targets.numel() and (targets.min() < IGNORE_INDEX or targets.max() >= num_classes):
        raise ValueError(f"target values must be in 0..{num_classes - 1} or {IGNORE_INDEX} (ignored), "
                         f"got range {int(targets.min())}..{int(targets.max())}")


def mask_classification_loss(
    mask_logits: torch.Tensor,
    class_logits: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    no_object_weight: float = 0.1,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Mask2Former-style set loss: Hungarian matching, class cross-entropy, point-sampled BCE and dice.

    mask_logits: B x Q x h x w. class_logits: B x Q x (K+1), last = "no object". targets: B x H x W int64
    in 0..K-1 or IGNORE_INDEX; (h, w) may differ from (H, W).
    Per image, the GT consists of one binary mask per class present among the labelled pixels (background
    included). Returns scalars {"class", "mask", "dice"}, to be summed with weights 1:1:1:
      class: cross-entropy over all Q tokens of images with labels; matched tokens -> their class, the
        others -> no object; weighted mean with class weights 1 and ``no_object_weight`` for no object.
      mask / dice: per matched pair on ``num_points`` PointRend points among labelled pixels, mean BCE over
        points and the dice loss, summed over pairs and divided by the number of pairs in the batch.
    Raises ValueError when an image holds more classes than there are tokens.
    """
    if mask_logits.dim() != 4 or class_logits.dim() != 3 or targets.dim() != 3:
        raise ValueError("expected mask_logits B x Q x h x w, class_logits B x Q x (K+1), targets B x H x W")
    batch, num_tokens = mask_logits.shape[:2]
    if class_logits.shape != (batch, num_tokens, num_classes + 1):
        raise ValueError(f"class_logits must be B x Q x (K+1) = {(batch, num_tokens, num_classes + 1)}, "
                         f"got {tuple(class_logits.shape)}")
    if targets.shape[0] != batch:
        raise ValueError(f"targets hold {targets.shape[0]} images, logits {batch}")
    _check_targets(targets, num_classes)
    mask_logits, class_logits = mask_logits.float(), class_logits.float()
    height, width = targets.shape[-2:]

    class_rows, class_targets, bce_terms, dice_terms = [], [], [], []
    num_masks = 0
    for b in range(batch):
        flat = targets[b].flatten()
        valid_index = torch.nonzero(flat != IGNORE_INDEX).squeeze(1)
        if valid_index.numel() == 0:
            continue  # nothing labelled: this image contributes nothing
        tokens, classes = match_tokens(mask_logits[b], class_logits[b], targets[b], num_points, generator)
        token_classes = torch.full((num_tokens,), num_classes, dtype=torch.long, device=flat.device)
        token_classes[tokens] = classes
        class_rows.append(class_logits[b])
        class_targets.append(token_classes.to(class_logits.device))

        matched_logits = mask_logits[b, tokens]  # n x h x w
        points = _importance_points(matched_logits, valid_index, height, width, num_points,
                                    oversample_ratio, importance_ratio, generator)
        point_logits = sample_logits(matched_logits, pixel_coords(points, height, width))
        point_targets = (flat[points] == classes[:, None]).float()
        bce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none")
        bce_terms.append(bce.mean(dim=1).sum())
        dice_terms.append(soft_dice_loss(point_logits, point_targets).sum())
        num_masks += int(tokens.numel())

    if num_masks == 0:
        zero = (mask_logits.sum() + class_logits.sum()) * 0.0  # keeps backward() working
        return {"class": zero, "mask": zero, "dice": zero}
    class_weight = torch.ones(num_classes + 1, device=class_logits.device)
    class_weight[num_classes] = no_object_weight
    class_loss = F.cross_entropy(torch.cat(class_rows), torch.cat(class_targets), weight=class_weight)
    return {
        "class": class_loss,
        "mask": torch.stack(bce_terms).sum() / num_masks,
        "dice": torch.stack(dice_terms).sum() / num_masks,
    }


# --------------------------------------------------------------------------------------------------
# Dispatch


def segmentation_loss(output: SegmentationOutput, targets: torch.Tensor, num_classes: int,
                      generator: torch.Generator | None = None,
                      mask_loss: str = "structure",
                      instance_targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """All training loss terms for one batch, plus their sum under "total".

    output: the model's raw outputs (low-resolution mask logits B x Q x h x w).
    targets: B x H x W int64 in 0..K-1 or IGNORE_INDEX, at full input resolution.
    mask_loss: the binary model's loss (``TrainRecipe.mask_loss``, one of ``MASK_LOSSES``).
    Binary models (class_logits None, K = 2, Q = 1), mask_loss "structure": {"structure"}: the structure loss
    of the foreground logits mask_logits[:, :1], bilinearly upsampled (align_corners=False) to H x W, against
    targets == 1 on pixels != IGNORE_INDEX; mask_loss "hq_points": {"mask", "dice"}: HQ-SAM's point-sampled
    loss of mask_logits[:, :1] (:func:`~.hq_mask_loss.hq_mask_loss`, drawing from ``generator``).
    Multi-class models (num_classes > 2) refuse "hq_points" (ConfigError). Matched heads (with class logits):
    {"class", "mask", "dice"} (mask_classification_loss with its defaults). Per-class heads (no class logits,
    Q = K, token k = class k): {"ce", "dice"}, SAMed's cross-entropy + soft Dice at H x W, weighted 1 : 1
    (:func:`~.per_class_loss.per_class_loss`). A model with an instance head (``output.instance_logits``) adds
    {"instance_bce", "instance_dice"} (:func:`~.instance_loss.instance_loss`) against ``instance_targets``: (maps
    B x 3 x S x S floats in 0..1, valid B x S x S bool), from ``instances.object_maps``. All add "balance"
    (output.balance_loss, added unscaled: its 0.01 coefficient belongs to the model) and "total" (the sum of all
    terms).
    """
    if mask_loss not in MASK_LOSSES:
        raise ConfigError(f"unknown mask loss {mask_loss!r}; expected one of {MASK_LOSSES}")
    if num_classes > 2 and mask_loss == "hq_points":
        raise ConfigError(f"mask loss 'hq_points' (--mask-loss) is for binary models; this model has "
                          f"{num_classes} classes: choose mask loss 'structure'")
    if output.class_logits is not None:
        terms = mask_classification_loss(output.mask_logits, output.class_logits, targets, num_classes,
                                         generator=generator)
    elif num_classes > 2:
        if output.mask_logits.shape[1] != num_classes:
            raise ValueError(f"a multi-class model without class logits has one mask per class ({num_classes}), "
                             f"got {output.mask_logits.shape[1]}")
        _check_targets(targets, num_classes)
        terms = per_class_loss(output.mask_logits, targets)
    else:
        if num_classes != 2:
            raise ValueError(f"a model has at least 2 classes (background included), got {num_classes}")
        _check_targets(targets, num_classes)
        if mask_loss == "hq_points":
            terms = hq_mask_loss(output.mask_logits[:, :1], targets, generator=generator)
        else:
            logits = F.interpolate(output.mask_logits[:, :1].float(), size=targets.shape[-2:],
                                   mode="bilinear", align_corners=False)
            labels = targets[:, None]
            terms = {"structure": structure_loss(logits, labels == 1, labels != IGNORE_INDEX)}
    if output.instance_logits is not None:
        if instance_targets is None:
            raise ValueError("a model with an instance head trains from instance targets (maps, valid); none given")
        terms.update(instance_loss(output.instance_logits, *instance_targets))
    reference = next(iter(terms.values()))
    terms["balance"] = torch.as_tensor(output.balance_loss, dtype=reference.dtype,
                                       device=reference.device).reshape(())
    terms["total"] = torch.stack(list(terms.values())).sum()
    return terms
