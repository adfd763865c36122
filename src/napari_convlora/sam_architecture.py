"""SAM geometry: a small dataclass, presets, inference from a state dict, and the builder.

The builder composes ``segment_anything``'s own classes (no vendored copy), so any SAM whose
state dict keeps SAM's key names can be rebuilt: official vit_b/l/h, MedSAM, micro-sam exports,
and the tiny models the tests make.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import torch
from torch import nn

from .constants import SAM_PIXEL_MEAN, SAM_PIXEL_STD


class CheckpointError(ValueError):
    """A file that cannot be used as asked; the message names the file and what was expected."""


@dataclass(frozen=True)
class SamArchitecture:
    """Everything needed to rebuild a SAM with ``segment_anything``'s classes.

    Defaults are the official ViT-B at 1024 px. All fields are JSON-serialisable.
    """

    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_mlp_ratio: float = 4.0
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    qkv_bias: bool = True
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid (64 for a 1024 px SAM)."""
        return self.image_size // self.patch_size

    @property
    def model_type(self) -> str | None:
        """``"vit_b"``, ``"vit_l"`` or ``"vit_h"`` when the geometry is an official one, else None."""
        for name, preset in PRESETS.items():
            if preset == self:
                return name
        return None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SamArchitecture":
        known = {f.name for f in dataclasses.fields(cls)}
        missing = known - set(d)
        if missing:
            raise CheckpointError(f"SAM architecture record lacks {sorted(missing)}")
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["encoder_global_attn_indexes"] = tuple(kwargs["encoder_global_attn_indexes"])
        return cls(**kwargs)

    @classmethod
    def preset(cls, model_type: str) -> "SamArchitecture":
        """The official geometry for ``"vit_b"``, ``"vit_l"`` or ``"vit_h"``."""
        try:
            return PRESETS[model_type]
        except KeyError:
            raise ValueError(f"unknown SAM model type {model_type!r}; expected one of {sorted(PRESETS)}") from None


PRESETS: dict[str, SamArchitecture] = {
    "vit_b": SamArchitecture(),
    "vit_l": SamArchitecture(
        encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23)
    ),
    "vit_h": SamArchitecture(
        encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31)
    ),
}

#: A SAM small enough to train in milliseconds on a CPU; used by tests, the demo and benchmarks.
TINY = SamArchitecture(
    image_size=256,
    encoder_embed_dim=64,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    window_size=4,
    prompt_embed_dim=64,
    mask_in_chans=8,
    decoder_mlp_dim=128,
    iou_head_hidden_dim=32,
)


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


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
