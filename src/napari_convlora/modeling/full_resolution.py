"""Maps at the input's own resolution from the adapted encoder: what the instance head and the detail head share.

SAM's masks come out at a quarter of the input's side (64 x 64 for a 256 px input): a 2 px membrane or a lesion a
few pixels wide has no room there. These heads read the adapted encoder as HQ-SAM's global-local fusion does (the
final embedding and the first global-attention block's feature, each brought to 4x the token grid by
``hq.upsample_x4``), bring that to the full resolution with two more transposed convolutions, and fuse it with a
small convolution stem on the normalised image itself (a UNETR-style skip at full resolution). With ``context``,
a small pyramid on the stem (:class:`LocalContext`) adds what a pixel's surroundings of about 40 px look like at the
image's own resolution. SAM's modules are read, not changed: the features come from the model's encoder and its
hook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .features import ImageFeatures
from .hq import upsample_x4

#: Channels of the full-resolution features (the image stem's and the upsampled encoder's, each).
STEM_CHANNELS = 16


class FullResolutionMaps(nn.Module):
    """Maps an image's features (and, optionally, ``extra_channels`` maps already at full resolution) to
    ``out_channels`` logit maps at the input's resolution.

    Args:
        embed_dim: D, the channels of the neck's embedding (SAM's decoder width).
        vit_dim: C, the encoder's width (the early feature's channels).
        out_channels: the maps it predicts.
        extra_channels: channels of a full-resolution input fused with the stem (0: none).

    Parameters (D = 256, C = 768, ViT-B): about 1.1 M, most in the early feature's first transposed convolution.
    """

    def __init__(self, embed_dim: int, vit_dim: int, out_channels: int, extra_channels: int = 0,
                 context: bool = False) -> None:
        super().__init__()
        d8 = embed_dim // 8
        self.extra_channels = extra_channels
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
        self.context = LocalContext(STEM_CHANNELS) if context else None
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * STEM_CHANNELS + extra_channels, 2 * STEM_CHANNELS, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * STEM_CHANNELS, out_channels, 1),
        )

    def forward(self, features: ImageFeatures, normalised: torch.Tensor,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        """features: embedding B x D x g x g and early B x g x g x C; normalised: B x 3 x 16g x 16g (the image
        as the encoder saw it); extra: B x extra_channels x 16g x 16g or None -> B x out_channels x 16g x 16g."""
        if features.early is None:
            raise ValueError("a full-resolution head reads the encoder's early feature: encode with the model, which "
                             "captures it when the model has such a head")
        if (extra is None) != (self.extra_channels == 0):
            raise ValueError(f"this head fuses {self.extra_channels} extra full-resolution channels; "
                             f"got {'none' if extra is None else extra.shape[1]}")
        coarse = self.embedding_up(features.embedding) + self.early_up(features.early.permute(0, 3, 1, 2))
        local = self.stem(normalised)
        if self.context is not None:
            local = local + self.context(local)
        parts = [self.to_full(coarse), local] + ([] if extra is None else [extra])
        return self.fuse(torch.cat(parts, dim=1))


class LocalContext(nn.Module):
    """A small pyramid on the stem's features (half and quarter resolution, back to full): what a pixel's
    surroundings of about 40 px look like at the image's own resolution, such as a lesion's rim against the organ's
    texture, which the encoder's 16 px patches blur and the stem's two 3 x 3 convolutions cannot see."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        wide = 2 * channels
        self.down2 = nn.Sequential(nn.Conv2d(channels, wide, 3, stride=2, padding=1), nn.GELU(),
                                  nn.Conv2d(wide, wide, 3, padding=1), nn.GELU())
        self.down4 = nn.Sequential(nn.Conv2d(wide, wide, 3, stride=2, padding=1), nn.GELU(),
                                     nn.Conv2d(wide, wide, 3, padding=2, dilation=2), nn.GELU())
        self.merge = nn.Sequential(nn.Conv2d(wide, wide, 3, padding=1), nn.GELU())
        self.out = nn.Conv2d(wide, channels, 1)

    def forward(self, stem: torch.Tensor) -> torch.Tensor:
        """stem: B x c x H x W (H, W divisible by 4) -> B x c x H x W."""
        half = self.down2(stem)
        quarter = self.down4(half)
        half = self.merge(half + F.interpolate(quarter, size=half.shape[-2:], mode="bilinear", align_corners=False))
        return self.out(F.interpolate(half, size=stem.shape[-2:], mode="bilinear", align_corners=False))
