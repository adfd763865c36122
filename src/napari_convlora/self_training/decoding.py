"""SAM's own promptable decoding of a crop's prompts on the (adapted) encoder's features: what self-training's three
forwards, its evaluation and the dock's prompt segmentation share."""

from __future__ import annotations

from typing import Sequence

import torch

from ..modeling import AdaptedSAM, Prompts
from .crops import CropPrompt, prompt_groups


def decode_prompts(model: AdaptedSAM, embedding: torch.Tensor, early: torch.Tensor | None,
                   prompts: Sequence[CropPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's single-mask decoding of every prompt of one crop, in prompt order.

    Returns (low-resolution logits N x 4g x 4g, predicted IoU N)."""
    device = embedding.device
    low, iou = [None] * len(prompts), [None] * len(prompts)
    for indices, arrays in prompt_groups(prompts):
        def on(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
            value = arrays[name]
            return None if value is None else torch.from_numpy(value).to(device=device, dtype=dtype)

        masks, ious = model.prompt_head(embedding, Prompts(points=on("points"), point_labels=on("labels", torch.int64),
                                                           boxes=on("boxes")), multimask_output=False, early=early)
        for row, i in enumerate(indices):
            low[i], iou[i] = masks[row, 0], ious[row, 0]
    return torch.stack(low), torch.stack(iou)
