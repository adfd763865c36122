"""HQ-SAM's additions to SAM's mask decoder (METHODS.md 2.1), built from ``segment_anything``'s own blocks.

:class:`HQParts` owns the five modules HQ-SAM adds, under the names its checkpoints use (prefixed there by
``mask_decoder.``): the HQ output token ``hf_token``, its MLP ``hf_mlp``, and the global-local fusion
``compress_vit_feat`` (early encoder feature), ``embedding_encoder`` (final image embedding) and
``embedding_maskfeature`` (SAM's upscaled mask feature). SAM's decoder itself is not copied or forked: the heads
run SAM's transformer, upscaling, MLPs and IoU head and add these parts where HQ-SAM does.

Trainable parameters (D = 256, C = encoder width): ``1024 * C + 284,672``: 1,071,104 / 1,333,248 / 1,595,392 for
ViT-B / L / H (:func:`hq_parameter_count`).
"""

from __future__ import annotations

import torch
from torch import nn

#: The keys an official ``sam_hq_vit_*.pth`` holds beyond SAM's own (all under ``mask_decoder.``), in its names.
HQ_CHECKPOINT_PREFIX = "mask_decoder."
HQ_MODULES = ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")


def upsample_x4(in_dim: int, mid_dim: int, out_dim: int) -> nn.Sequential:
    """ConvT 2x2/2 -> LayerNorm2d -> GELU -> ConvT 2x2/2: a feature map 4x larger (the indices 0, 1, 3 of HQ-SAM's
    keys)."""
    from segment_anything.modeling.common import LayerNorm2d

    return nn.Sequential(
        nn.ConvTranspose2d(in_dim, mid_dim, kernel_size=2, stride=2), LayerNorm2d(mid_dim), nn.GELU(),
        nn.ConvTranspose2d(mid_dim, out_dim, kernel_size=2, stride=2),
    )


class HQParts(nn.Module):
    """HQ-SAM's HQ token, HQ MLP and fusion convolutions for a decoder of width ``transformer_dim`` on an encoder
    of width ``vit_dim``. New parts use PyTorch's default initialisation (``hf_token`` ~ N(0, 1)), as HQ-SAM does.

    Args:
        transformer_dim: D, SAM's decoder width (256 in official SAMs); masks are read from D/8 channels.
        vit_dim: C, the image encoder's width (768 / 1024 / 1280 for ViT-B / L / H).
    """

    def __init__(self, transformer_dim: int, vit_dim: int) -> None:
        super().__init__()
        from segment_anything.modeling.common import LayerNorm2d
        from segment_anything.modeling.mask_decoder import MLP

        d = transformer_dim
        self.transformer_dim, self.vit_dim = d, vit_dim
        self.hf_token = nn.Embedding(1, d)
        self.hf_mlp = MLP(d, d, d // 8, 3)
        self.compress_vit_feat = upsample_x4(vit_dim, d, d // 8)
        self.embedding_encoder = upsample_x4(d, d // 4, d // 8)
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(d // 8, d // 4, 3, 1, 1), LayerNorm2d(d // 4), nn.GELU(), nn.Conv2d(d // 4, d // 8, 3, 1, 1),
        )

    def global_local_features(self, embedding: torch.Tensor, early: torch.Tensor) -> torch.Tensor:
        """HQ-SAM's image-side fusion, before the decoder runs.

        Args:
            embedding: B x D x g x g, the neck's output (the final image embedding, no prompt added).
            early: B x g x g x C, the raw output of the first global-attention block (channels last).

        Returns:
            B x D/8 x 4g x 4g: ``embedding_encoder(embedding) + compress_vit_feat(early)``.
        """
        if early is None:
            raise ValueError("HQ-SAM's fusion needs the encoder's early feature (encode with the model, which "
                             "captures it when the head uses HQ)")
        return self.embedding_encoder(embedding) + self.compress_vit_feat(early.permute(0, 3, 1, 2))

    def hq_mask_features(self, upscaled: torch.Tensor, global_local: torch.Tensor) -> torch.Tensor:
        """``embedding_maskfeature(U_sam) + global_local``: upscaled (N x D/8 x 4g x 4g, SAM's upscaled mask feature
        of each of N decodings) and global_local (1 or N x D/8 x 4g x 4g) -> N x D/8 x 4g x 4g."""
        return self.embedding_maskfeature(upscaled) + global_local

    def hq_masks(self, tokens_out: torch.Tensor, hq_features: torch.Tensor) -> torch.Tensor:
        """tokens_out: N x T x D (decoded tokens), hq_features: N x D/8 x h x w -> N x T x h x w mask logits."""
        n, c, h, w = hq_features.shape
        return (self.hf_mlp(tokens_out) @ hq_features.view(n, c, h * w)).view(n, -1, h, w)

    def to_checkpoint_state(self) -> dict[str, torch.Tensor]:
        """This module's tensors under the names of an official HQ-SAM checkpoint (``mask_decoder.hf_token.weight``, ...)."""
        return {HQ_CHECKPOINT_PREFIX + k: v for k, v in self.state_dict().items()}


def hq_parameter_count(transformer_dim: int, vit_dim: int) -> int:
    """Trainable parameters of :class:`HQParts`, from the shapes: ``1024 * C + 284,672`` for D = 256."""
    d = transformer_dim
    token, mlp = d, 2 * (d * d + d) + d * (d // 8) + d // 8
    compress = vit_dim * d * 4 + d + 2 * d + d * (d // 8) * 4 + d // 8
    encoder = d * (d // 4) * 4 + d // 4 + 2 * (d // 4) + (d // 4) * (d // 8) * 4 + d // 8
    maskfeature = (d // 8) * (d // 4) * 9 + d // 4 + 2 * (d // 4) + (d // 4) * (d // 8) * 9 + d // 8
    return token + mlp + compress + encoder + maskfeature


def split_hq_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's tensors -> (SAM's own, the HQ parts' under :class:`HQParts` names); the second is empty for a
    plain SAM."""
    prefixes = tuple(HQ_CHECKPOINT_PREFIX + m + "." for m in HQ_MODULES)
    hq = {k[len(HQ_CHECKPOINT_PREFIX):]: v for k, v in state.items() if k.startswith(prefixes)}
    sam = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    return sam, hq
