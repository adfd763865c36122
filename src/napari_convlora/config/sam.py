"""SAM's geometry as data: the dataclass every SAM is rebuilt from, the official presets and a tiny SAM.

No torch here: ``modeling/sam_build.py`` turns a :class:`SamArchitecture` into ``segment_anything``'s modules and
reads one off a checkpoint's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_global_attn_indexes", tuple(int(i) for i in self.encoder_global_attn_indexes))
        object.__setattr__(self, "encoder_mlp_ratio", float(self.encoder_mlp_ratio))

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid (64 for a 1024 px SAM)."""
        return self.image_size // self.patch_size

    @property
    def first_global_block(self) -> int:
        """Index of the first global-attention block, whose output HQ-SAM fuses (2 / 5 / 7 for ViT-B / L / H)."""
        if not self.encoder_global_attn_indexes:
            raise ConfigError("this SAM has no global-attention block")
        return min(self.encoder_global_attn_indexes)

    @property
    def model_type(self) -> str | None:
        """``"vit_b"``, ``"vit_l"`` or ``"vit_h"`` when the geometry is an official one, ``"small"`` for the built-in
        model's, else None."""
        if self == SMALL:
            return "small"
        return next((name for name, preset in PRESETS.items() if preset == self), None)

    @classmethod
    def preset(cls, model_type: str) -> "SamArchitecture":
        """The official geometry for ``"vit_b"``, ``"vit_l"`` or ``"vit_h"``; ``"tiny"`` for :data:`TINY`, ``"small"``
        for :data:`SMALL` (the built-in model)."""
        if model_type == "tiny":
            return TINY
        if model_type == "small":
            return SMALL
        try:
            return PRESETS[model_type]
        except KeyError:
            raise ConfigError(f"unknown SAM model type {model_type!r}; expected one of {sorted(PRESETS)}") from None


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

#: The built-in small SAM (about 3.8 M parameters, 256 px): the geometry of the model pretrained in this repository
#: (``scripts/pretrain_small_sam.py``) and shipped with the package as the embedded default.
SMALL = SamArchitecture(
    image_size=256,
    encoder_embed_dim=192,
    encoder_depth=6,
    encoder_num_heads=3,
    encoder_global_attn_indexes=(2, 5),
    window_size=8,
    prompt_embed_dim=128,
    mask_in_chans=16,
    decoder_mlp_dim=512,
    iou_head_hidden_dim=128,
)

