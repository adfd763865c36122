"""``ConvLoRASAM``: SAM with encoder adapters and a prompt-free (multi-class) mask decoder.

Images go in, class probabilities come out; no points, boxes or masks. The prompt encoder only
contributes its frozen "no mask" embedding, computed once. Binary heads (2 classes) use one mask
token initialised from SAM's token 0; multi-class heads use Q tokens initialised from token 0 that
share SAM's hypernetwork MLP 0, plus a ``Linear(D, K+1)`` class head (last logit = no object).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adapters.inject import adapter_layers, inject_adapters, set_adapters_enabled
from .config import AdapterConfig, HeadConfig, ModelConfig, Normalisation
from .constants import PATCH_SIZE
from .outputs import SegmentationOutput
from .sam_architecture import infer_architecture


def resize_sam_input(sam: nn.Module, input_size: int) -> None:
    """Make ``sam`` take ``input_size`` square images: interpolate the absolute position embedding
    (bicubic) and update the prompt encoder's sizes. The relative-position tables of global blocks
    interpolate themselves inside ``segment_anything``."""
    if input_size % PATCH_SIZE:
        raise ValueError(f"input_size must be a multiple of {PATCH_SIZE}, got {input_size}")
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


class ConvLoRASAM(nn.Module):
    """SAM + LoRA / Conv-LoRA (or no encoder adapter) + a prompt-free segmentation head.

    Args:
        sam: ``segment_anything``'s ``Sam`` (as returned by :func:`load_sam`); it is modified in place
            and kept as ``.sam``.
        num_classes: classes with background as class 0 (binary = 2).
        adapter: ``"conv_lora"``, ``"lora"`` or ``"decoder"``.
        input_size: side S of the square input (multiple of 16; 1024 is SAM's native size).
        num_mask_tokens, class_names, class_values: see :class:`HeadConfig`.
        normalisation: how images are normalised (stored with the model).
        **adapter_options: fields of :class:`AdapterConfig` (rank, alpha, num_experts, scales, top_k, ...).
    """

    def __init__(
        self,
        sam: nn.Module,
        num_classes: int = 2,
        adapter: str = "conv_lora",
        input_size: int = 1024,
        num_mask_tokens: int | None = None,
        class_names: tuple[str, ...] | None = None,
        class_values: tuple[int, ...] | None = None,
        normalisation: Normalisation | None = None,
        label_mode: str = "dense",
        background_value: int = 0,
        **adapter_options: Any,
    ):
        super().__init__()
        base = getattr(sam, "architecture", None) or infer_architecture(sam.state_dict())
        self.config = ModelConfig(
            base=base,
            adapter=AdapterConfig(method=adapter, **adapter_options),
            head=HeadConfig(num_classes, num_mask_tokens, class_names, class_values, label_mode, background_value),
            input_size=input_size,
            normalisation=normalisation or Normalisation(),
        )
        self.sam = sam
        sam.requires_grad_(False)
        resize_sam_input(sam, input_size)
        sam.register_buffer("pixel_mean", torch.tensor(self.config.normalisation.pixel_mean).view(-1, 1, 1), False)
        sam.register_buffer("pixel_std", torch.tensor(self.config.normalisation.pixel_std).view(-1, 1, 1), False)
        self.adapted_layers = inject_adapters(sam.image_encoder, self.config.adapter)
        self._build_head()
        for name, p in self.named_parameters():
            p.requires_grad_(self._is_trainable(name))
        self.register_buffer("no_mask_embedding", torch.empty(0), persistent=False)
        self.register_buffer("image_pe", torch.empty(0), persistent=False)
        self.refresh_prompt_cache()
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_prompt_cache())

    @classmethod
    def from_config(cls, sam: nn.Module, config: ModelConfig) -> "ConvLoRASAM":
        adapter = {k: v for k, v in vars(config.adapter).items() if k != "method"}
        head = config.head
        return cls(
            sam, head.num_classes, config.adapter.method, config.input_size, head.num_mask_tokens,
            head.class_names, head.class_values, config.normalisation, head.label_mode, head.background_value,
            **adapter,
        )

    def _build_head(self) -> None:
        decoder, head = self.sam.mask_decoder, self.config.head
        dim = decoder.transformer_dim
        tokens = nn.Embedding(head.num_mask_tokens, dim)
        with torch.no_grad():
            tokens.weight.copy_(decoder.mask_tokens.weight[0].expand(head.num_mask_tokens, -1))
        decoder.mask_tokens = tokens
        decoder.num_mask_tokens = head.num_mask_tokens
        decoder.output_hypernetworks_mlps = nn.ModuleList([decoder.output_hypernetworks_mlps[0]])  # shared by all tokens
        self.class_head = None if head.binary else nn.Linear(dim, head.num_classes + 1)

    def _is_trainable(self, name: str) -> bool:
        if name.startswith("class_head."):
            return True
        if name.startswith("sam.mask_decoder."):
            return not name.startswith("sam.mask_decoder.iou_prediction_head.")
        if name.startswith("sam.image_encoder."):
            return any(name.startswith(f"sam.image_encoder.{a}.") and ".base_layer." not in name for a in self.adapted_layers)
        return False

    @torch.no_grad()
    def refresh_prompt_cache(self) -> None:
        """Recompute the frozen prompt-free embeddings (after loading weights)."""
        prompt = self.sam.prompt_encoder
        grid = prompt.image_embedding_size
        self.no_mask_embedding = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *grid).clone()
        self.image_pe = prompt.get_dense_pe().clone()

    # ----------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.config.head.num_classes

    @property
    def input_size(self) -> int:
        return self.config.input_size

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the tensors fine-tuning changes: adapters, decoder (IoU head excluded) and class head."""
        return {name: p.detach() for name, p in self.named_parameters() if self._is_trainable(name)}

    def balance_loss(self) -> torch.Tensor:
        """Conv-LoRA's load-balancing losses of the last forward, summed over blocks (0 without Conv-LoRA)."""
        losses = [layer.balance_loss for _, layer in adapter_layers(self.sam) if layer.balance_loss is not None]
        return torch.stack(losses).sum() if losses else self.image_pe.new_zeros(())

    def set_adapters_enabled(self, enabled: bool) -> None:
        set_adapters_enabled(self.sam, enabled)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute encoder blocks in the backward pass instead of storing their activations (less memory)."""
        for block in self.sam.image_encoder.blocks:
            if enabled:
                block.forward = partial(checkpoint, block.__class__.forward.__get__(block), use_reentrant=False)
            elif "forward" in vars(block):
                del block.forward

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images: B x 3 x S x S float RGB in 0..255 -> image embeddings B x D x S/16 x S/16."""
        s = self.config.input_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (s, s):
            raise ValueError(f"expected images B x 3 x {s} x {s}, got {tuple(images.shape)}")
        for _, layer in adapter_layers(self.sam):
            layer.balance_loss = None
        x = (images - self.sam.pixel_mean) / self.sam.pixel_std
        return self.sam.image_encoder(x)

    def decode(self, embeddings: torch.Tensor) -> SegmentationOutput:
        """Prompt-free mask decoding of B x D x g x g embeddings (no sparse prompt tokens)."""
        decoder = self.sam.mask_decoder
        b = embeddings.shape[0]
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(b, -1, -1)
        src = embeddings + self.no_mask_embedding.expand(b, -1, -1, -1)
        pos = self.image_pe.expand(b, -1, -1, -1)
        hs, src = decoder.transformer(src, pos, tokens)
        mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens]  # B x Q x D
        grid = embeddings.shape[-2:]
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, -1, *grid))  # B x D/8 x 4g x 4g
        hyper = decoder.output_hypernetworks_mlps[0](mask_tokens_out)  # B x Q x D/8
        masks = (hyper @ upscaled.flatten(2)).view(b, -1, *upscaled.shape[-2:])
        class_logits = self.class_head(mask_tokens_out) if self.class_head is not None else None
        return SegmentationOutput(masks, class_logits, self.balance_loss())

    def forward(self, images: torch.Tensor) -> SegmentationOutput:
        """images: B x 3 x S x S float RGB in 0..255 -> raw outputs (low-res logits B x Q x S/4 x S/4)."""
        return self.decode(self.encode(images))

    def probabilities_from_output(self, out: SegmentationOutput, size: int | None = None) -> torch.Tensor:
        """Class probabilities B x K x size x size (sum 1 over K) from raw outputs.

        Binary: [1 - p, p] with p = sigmoid(mask). Multi-class: sum_q softmax(class_q)[c] * sigmoid(mask_q)
        over the K real classes (no-object dropped), normalised over c.
        """
        size = size or self.config.input_size
        masks = F.interpolate(out.mask_logits.float(), size=(size, size), mode="bilinear", align_corners=False)
        if out.class_logits is None:
            p = torch.sigmoid(masks[:, 0])
            return torch.stack([1 - p, p], dim=1)
        cls = torch.softmax(out.class_logits.float(), dim=-1)[..., :-1]  # B x Q x K
        semantic = torch.einsum("bqk,bqhw->bkhw", cls, torch.sigmoid(masks))
        return semantic / semantic.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def class_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """images: B x 3 x S x S float RGB 0..255 -> B x K x S x S probabilities summing to 1 over K."""
        return self.probabilities_from_output(self(images))

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """images: B x 3 x S x S float RGB 0..255 -> B x S x S int64 class indices."""
        return self.class_probabilities(images).argmax(dim=1)
