"""The instance head: foreground, centre and depth maps at full resolution, for touching objects
(``config/instances.py`` says what the maps are; ``instances/`` makes their targets and the objects).

Like micro-sam's instance decoder it reads the adapted encoder and predicts the three maps at the input's own
resolution; its parts are HQ-SAM's global-local fusion (the final embedding and the first global-attention block's
feature, each brought to 4x the token grid by two transposed convolutions: ``hq.upsample_x4``), two more
transposed convolutions to the full resolution, and a small convolution stem on the normalised image itself (a
UNETR-style skip at full resolution: the token grid of 16 px cannot place a seam between two touching nuclei by
itself). SAM's modules are read, not changed: the features come from the model's encoder and its hook.
"""

from __future__ import annotations

import torch
from torch import nn

from .features import ImageFeatures
from .hq import upsample_x4

#: Channels of the full-resolution features (the image stem's and the upsampled encoder's, each).
STEM_CHANNELS = 16


class InstanceHead(nn.Module):
    """Maps an image's features to three logit maps (foreground, centre, depth) at the input's resolution.

    Args:
        embed_dim: D, the channels of the neck's embedding (SAM's decoder width).
        vit_dim: C, the encoder's width (the early feature's channels).

    Parameters (D = 256, C = 768, ViT-B): about 1.1 M, most in the early feature's first transposed convolution.
    """

    def __init__(self, embed_dim: int, vit_dim: int) -> None:
        super().__init__()
        d8 = embed_dim // 8
        self.embedding_up = upsample_x4(embed_dim, embed_dim // 4, d8)
        self.early_up = upsample_x4(vit_dim, embed_dim // 4, d8)
        self.to_full = nn.Sequential(
            nn.ConvTranspose2d(d8, STEM_CHANNELS, kernel_size=2, stride=2), nn.GELU(),
            nn.ConvTranspose2d(STEM_CHANNELS, STEM_CHANNELS, kernel_size=2, stride=2), nn.GELU(),
        )
        self.stem = nn.Sequential(
            nn.Conv2d(3, STEM_CHANNELS, 3, padding=1), nn.GELU(),
            nn.Conv2d(STEM_CHANNELS, STEM_CHANNELS, 3, padding=1), nn.GELU(),
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * STEM_CHANNELS, 2 * STEM_CHANNELS, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * STEM_CHANNELS, 3, 1),
        )

    def forward(self, features: ImageFeatures, normalised: torch.Tensor) -> torch.Tensor:
        """features: embedding B x D x g x g and early B x g x g x C; normalised: B x 3 x 16g x 16g (the image
        as the encoder saw it) -> B x 3 x 16g x 16g logits (foreground, centre, depth)."""
        if features.early is None:
            raise ValueError("the instance head reads the encoder's early feature: encode with the model, which "
                             "captures it when the model has an instance head")
        coarse = self.embedding_up(features.embedding) + self.early_up(features.early.permute(0, 3, 1, 2))
        fine = self.to_full(coarse)
        return self.fuse(torch.cat([fine, self.stem(normalised)], dim=1))
