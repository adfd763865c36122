"""HQ-SAM's point-sampled mask loss for a binary model's foreground logits (torch only).

HQ-SAM (Ke et al., "Segment Anything in High Quality", NeurIPS 2023) trains its HQ mask with a PointRend-style
loss (SysCV/sam-hq, ``train/utils/loss_mask.py``: ``loss_masks``): per mask, 112 x 112 = 12,544 points are drawn
in continuous normalised coordinates; 3 x 12,544 uniform candidates are read from the logits, the 75 % most
uncertain (largest -|logit|) are kept and the other 25 % are drawn uniformly anew. Logits and targets are both
read at those points by bilinear ``grid_sample`` (align_corners=False, zero padding, so a point within half a
pixel of the border also reads the zero outside). The loss is the BCE mean over points plus the dice loss
1 - (2 sum(p t) + 1) / (sum p + sum t + 1), each summed over masks and divided by the number of masks.

:func:`hq_mask_loss` reproduces it exactly (the same random draws, in the same order, from the same generator)
when every pixel is labelled. Our targets may leave pixels unannotated (IGNORE_INDEX); the rule for them:

- a point counts when the target pixel that contains it, (floor(y H), floor(x W)), is labelled;
- candidates that would not count get uncertainty -inf, so the uncertain 75 % go to labelled pixels first
  (if fewer candidates are labelled, the rest are taken among the others and do not count);
- a counted point's target is the bilinear interpolation over labelled pixels only, renormalised by their
  share of the bilinear weight (the zero padding counts as labelled background, as in HQ-SAM), so an
  unannotated neighbour never reads as background; with every pixel labelled this is HQ-SAM's target;
- BCE is the mean over counted points and dice sums over counted points only; both are summed over the
  images with at least one counted point and divided by their number. An image without one (no labelled
  pixel, or none hit) contributes nothing; when no image has one, both terms are 0, still attached to the
  graph (no NaN).

Logits are read bilinearly, so a counted point within one logit pixel of an unannotated region still reads
that region's logits (as the structure loss does, which upsamples the logits before masking).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX

#: HQ-SAM's sampling (``loss_masks``): points per mask, candidates per point, share chosen by uncertainty.
HQ_NUM_POINTS = 112 * 112
HQ_OVERSAMPLE_RATIO = 3.0
HQ_IMPORTANCE_RATIO = 0.75


def _uniform_points(count: int, num: int, generator: torch.Generator | None,
                    device: torch.device) -> torch.Tensor:
    """count x num x 2 points uniform in [0, 1)^2 (x, y), drawn from ``generator`` (on its own device), or
    from torch's global generator of ``device`` as HQ-SAM does."""
    draw_device = generator.device if generator is not None else device
    return torch.rand(count, num, 2, generator=generator, device=draw_device).to(device)


def read_at_points(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinearly read N maps at points in [0, 1]^2 (align_corners=False, zero padding), as HQ-SAM's
    ``point_sample``.

    maps: N x C x h x w float. points: N x P x 2 float, (x, y) with (0, 0) the top-left image corner and
    (1, 1) the bottom-right one. Returns N x C x P.
    """
    grid = (2.0 * points - 1.0)[:, :, None].to(maps.dtype)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[..., 0]


def labelled_at(labelled: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Whether the pixel containing each point is labelled.

    labelled: N x H x W bool. points: N x P x 2 in [0, 1)^2 (x, y). Returns N x P bool.
    """
    height, width = labelled.shape[-2:]
    cols = (points[..., 0] * width).floor().long().clamp(0, width - 1)
    rows = (points[..., 1] * height).floor().long().clamp(0, height - 1)
    return torch.gather(labelled.flatten(1), 1, rows * width + cols)


def uncertain_points(logits: torch.Tensor, labelled: torch.Tensor, num_points: int, oversample_ratio: float,
                     importance_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """HQ-SAM's (PointRend's) point choice, preferring labelled pixels among the uncertain candidates.

    logits: N x 1 x h x w (read without gradient). labelled: N x H x W bool, the target's labelled pixels.
    Draws N x (num_points * oversample_ratio) uniform candidates, keeps the int(importance_ratio * num_points)
    with the largest -|logit| (labelled candidates first), then draws the rest uniformly.
    Returns N x num_points x 2 points in [0, 1)^2 (x, y).
    """
    if oversample_ratio < 1 or not 0 <= importance_ratio <= 1:
        raise ValueError(f"need oversample_ratio >= 1 and importance_ratio in [0, 1], got {oversample_ratio}, "
                         f"{importance_ratio}")
    count, device = logits.shape[0], logits.device
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_ratio * num_points)
    candidates = _uniform_points(count, num_candidates, generator, device)
    with torch.no_grad():
        uncertainty = -read_at_points(logits.detach(), candidates)[:, 0].abs()
        uncertainty = torch.where(labelled_at(labelled, candidates), uncertainty, -torch.inf)
        top = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
    if num_points > num_uncertain:
        chosen = torch.cat([chosen, _uniform_points(count, num_points - num_uncertain, generator, device)], dim=1)
    return chosen


@torch.no_grad()
def point_targets(targets: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The foreground target at each point, and whether the point counts (module docstring).

    targets: B x H x W int64 (1 = foreground, IGNORE_INDEX = unannotated). points: B x P x 2 in [0, 1)^2 (x, y).
    Returns (truth, counted): B x P float in [0, 1] (0 where not counted) and B x P bool.
    """
    labelled = targets != IGNORE_INDEX
    counted = labelled_at(labelled, points)
    maps = torch.stack([(targets == 1).float(), (~labelled).float()], dim=1)  # B x 2 x H x W
    foreground, unlabelled = read_at_points(maps, points.float()).unbind(1)  # B x P each
    share = 1.0 - unlabelled  # >= 1/4 at a counted point: its own pixel has at least that bilinear weight
    return torch.where(counted, foreground / share.clamp_min(1e-6), 0.0), counted


def hq_mask_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_points: int = HQ_NUM_POINTS,
    oversample_ratio: float = HQ_OVERSAMPLE_RATIO,
    importance_ratio: float = HQ_IMPORTANCE_RATIO,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """HQ-SAM's point-sampled BCE + dice mask loss of a binary model's foreground logits.

    logits: B x 1 x h x w foreground logits (SAM's low-resolution masks; any float dtype, computed in fp32).
    targets: B x H x W int64, 1 = foreground, 0 = background, IGNORE_INDEX = unannotated ((h, w) may differ
    from (H, W): both are read at the same normalised points).
    generator: where the random points come from; None: torch's global generator of the logits' device, in
    HQ-SAM's order (candidates, then the uniform rest), which makes the result equal ``loss_masks(logits,
    targets[:, None].float(), B)`` when every pixel is labelled. The rule for unannotated pixels is in the
    module's docstring.
    Returns scalars {"mask": point BCE, "dice": point dice loss}, to be summed with weights 1:1 as in HQ-SAM.
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"expected foreground logits of shape B x 1 x h x w, got {tuple(logits.shape)}")
    if targets.dim() != 3 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"expected targets B x H x W for {logits.shape[0]} images, got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer label map, got dtype {targets.dtype}")
    logits = logits.float()
    targets = targets.to(logits.device)
    labelled = targets != IGNORE_INDEX
    points = uncertain_points(logits, labelled, num_points, oversample_ratio, importance_ratio, generator)

    truth, counted = point_targets(targets, points)
    weight = counted.float()
    point_logits = read_at_points(logits, points)[:, 0]  # B x P

    bce = F.binary_cross_entropy_with_logits(point_logits, truth, reduction="none")
    num_counted = weight.sum(dim=1)
    per_image_bce = (weight * bce).sum(dim=1) / num_counted.clamp_min(1.0)
    prob = point_logits.sigmoid()  # training.mask_terms.soft_dice_loss, weighted by which points are labelled
    numerator = 2.0 * (weight * prob * truth).sum(dim=1) + 1.0
    denominator = (weight * prob).sum(dim=1) + (weight * truth).sum(dim=1) + 1.0
    per_image_dice = 1.0 - numerator / denominator

    counts = num_counted > 0
    num_masks = counts.sum().clamp_min(1)
    return {
        "mask": torch.where(counts, per_image_bce, 0.0).sum() / num_masks,
        "dice": torch.where(counts, per_image_dice, 0.0).sum() / num_masks,
    }
