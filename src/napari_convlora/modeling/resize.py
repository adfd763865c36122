"""The one edit made to SAM's own modules: the input size.

SAM keeps its input side in three places that no constructor argument reaches after loading: the image
encoder's absolute position embedding (a 64 x 64 grid for 1024 px), ``img_size``, and the prompt encoder's
image and embedding sizes. Serving another input size means changing them; everything else about SAM stays
as loaded. The relative-position tables of SAM's global-attention blocks interpolate themselves.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..config import check_input_size
from ..constants import PATCH_SIZE


def resize_sam_input(sam: nn.Module, input_size: int) -> None:
    """Make ``sam`` take ``input_size`` square images: interpolate the absolute position embedding (bicubic,
    a new frozen parameter) and update the prompt encoder's sizes. Nothing changes at SAM's own size."""
    check_input_size(input_size)
    grid = input_size // PATCH_SIZE
    encoder, prompt = sam.image_encoder, sam.prompt_encoder
    if encoder.pos_embed is not None and encoder.pos_embed.shape[1] != grid:
        pos = encoder.pos_embed.data.permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
        encoder.pos_embed = nn.Parameter(pos.permute(0, 2, 3, 1).contiguous(), requires_grad=False)
    encoder.img_size = input_size
    prompt.image_embedding_size = (grid, grid)
    prompt.input_image_size = (input_size, input_size)
    prompt.mask_input_size = (4 * grid, 4 * grid)


#: What :func:`resize_sam_input` may change: (module path inside ``Sam``, attribute).
RESIZED_ATTRIBUTES = (
    ("image_encoder", "pos_embed"),
    ("image_encoder", "img_size"),
    ("prompt_encoder", "image_embedding_size"),
    ("prompt_encoder", "input_image_size"),
    ("prompt_encoder", "mask_input_size"),
)
