"""The raw outputs of the segmentation model, as the losses consume them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SegmentationOutput:
    """Raw model outputs for a batch of B images of side S.

    mask_logits: B x Q x S/4 x S/4 low-resolution mask logits (Q = 1 for binary models; Q = K for per-class heads,
        whose token k is class k); B x Q x S x S for a model with a detail head (``modeling/detail_head.py``).
    class_logits: B x Q x (K+1) class logits, the last being "no object"; None for binary and per-class models.
    balance_loss: scalar, Conv-LoRA's gate load-balancing loss summed over blocks (0 without Conv-LoRA).
    instance_logits: B x 3 x S x S logits of the instance head's maps (foreground, centre, depth), at the input's
        resolution; None without an instance head.
    """

    mask_logits: torch.Tensor
    class_logits: torch.Tensor | None
    balance_loss: torch.Tensor
    instance_logits: torch.Tensor | None = None
