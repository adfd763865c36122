"""Build ``segment_anything``'s ``Sam`` for a :class:`~.config.SamArchitecture`, and read the geometry off
a checkpoint's tensors.

The builder composes ``segment_anything``'s own classes (no vendored copy), so any SAM whose state dict keeps
SAM's key names can be rebuilt: official vit_b/l/h, MedSAM, micro-sam exports, and the tiny models the tests
make.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Mapping

import torch
from torch import nn

from ..config.sam import SamArchitecture
from ..constants import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from ..errors import CheckpointError


def build_sam(arch: SamArchitecture) -> "Sam":  # noqa: F821 (segment_anything imported lazily)
    """A randomly initialised ``segment_anything.modeling.Sam`` of the given geometry, in eval mode."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = arch.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=arch.image_size,
            patch_size=arch.patch_size,
            embed_dim=arch.encoder_embed_dim,
            depth=arch.encoder_depth,
            num_heads=arch.encoder_num_heads,
            mlp_ratio=arch.encoder_mlp_ratio,
            out_chans=arch.prompt_embed_dim,
            qkv_bias=arch.qkv_bias,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=arch.window_size,
            global_attn_indexes=arch.encoder_global_attn_indexes,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=arch.prompt_embed_dim,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
                attention_downsample_rate=arch.attention_downsample_rate,
            ),
            num_multimask_outputs=arch.num_multimask_outputs,
            iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    return sam.eval()


def _count_indexed(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indexes = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indexes) + 1 if indexes else 0


def infer_architecture(state: Mapping[str, torch.Tensor], decoder_num_heads: int = 8) -> SamArchitecture:
    """Read SAM's geometry off the tensors of a state dict with SAM's key names.

    Embedding dim and patch size come from the patch embedding; image size from the absolute
    position embedding; heads from the relative-position tables (their width is the head dim);
    the window size and the global-attention blocks from the tables' lengths (2 * size - 1).
    The decoder's head count is not stored in any tensor: SAM uses 8 everywhere, and
    ``decoder_num_heads`` overrides it for unusual checkpoints.

    Raises:
        KeyError: a tensor needed to infer the geometry is absent.
        CheckpointError: the tensors contradict each other.
    """
    patch_w = state["image_encoder.patch_embed.proj.weight"]  # C x 3 x p x p
    embed_dim, patch = patch_w.shape[0], patch_w.shape[-1]
    pos = state["image_encoder.pos_embed"]  # 1 x g x g x C
    grid = pos.shape[1]
    depth = _count_indexed(state, "image_encoder.blocks.")
    if depth == 0:
        raise KeyError("image_encoder.blocks.0.attn.qkv.weight")
    head_dim = state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    global_blocks, window_sizes = [], set()
    for i in range(depth):
        size = (state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] + 1) // 2
        if size == grid:
            global_blocks.append(i)
        else:
            window_sizes.add(size)
    if len(window_sizes) > 1:
        raise CheckpointError(f"encoder blocks use different window sizes {sorted(window_sizes)}")
    mlp_dim = state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]
    prompt_dim = state["prompt_encoder.no_mask_embed.weight"].shape[1]
    cross_q = state["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"]
    return SamArchitecture(
        image_size=grid * patch,
        patch_size=patch,
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=embed_dim // head_dim,
        encoder_mlp_ratio=mlp_dim / embed_dim,
        encoder_global_attn_indexes=tuple(global_blocks),
        window_size=window_sizes.pop() if window_sizes else 0,
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state,
        prompt_embed_dim=prompt_dim,
        mask_in_chans=state["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        decoder_depth=_count_indexed(state, "mask_decoder.transformer.layers."),
        decoder_mlp_dim=state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        decoder_num_heads=decoder_num_heads,
        attention_downsample_rate=prompt_dim // cross_q.shape[0],
        num_multimask_outputs=state["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        iou_head_depth=_count_indexed(state, "mask_decoder.iou_prediction_head.layers."),
        iou_head_hidden_dim=state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
    )

