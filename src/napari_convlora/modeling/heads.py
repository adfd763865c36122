"""Heads: what turns image features into masks. Each holds SAM's decoder parts by reference and owns only
what it adds, so SAM's own promptable decoder keeps working next to every head.

- :class:`PromptFreeHead`: Conv-LoRA's head. No prompts; the prompt encoder gives only its "no mask"
  embedding. Binary: one mask token. Multi-class: Q mask tokens (copies of SAM's token 0) sharing SAM's
  hypernetwork MLP 0, and a ``Linear(D, K+1)`` class head (last logit = no object); or, with SAMed's per-class
  head (``HeadConfig.multiclass="per_class"``), exactly K tokens, token k's mask being class k's logit, no class head.
- :class:`PromptableHead`: SAM's own prompt encoder and mask decoder, with its IoU head, on the adapted
  encoder (WeSAM adapts the encoder through it).

With HQ-SAM's parts (``hq.HQParts``, owned by the model and borrowed here like SAM's), both heads add HQ-SAM's
fusion: the promptable head is HQ-SAM's decoder (a fifth, HQ output token), and in the prompt-free head every mask
token also reads the fused HQ features through the HQ MLP ("SAM + HQ" adds that mask to SAM's, "HQ only" uses it
alone).

Borrowed parts are not registered as submodules: they belong to the model's ``sam`` and are saved once,
under ``sam.``. A head's own tensors are saved under ``head.``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import HeadConfig
from .features import ImageFeatures
from .hq import HQParts


def borrow(module: nn.Module, name: str, part: nn.Module) -> None:
    """Keep ``part`` as ``module.<name>`` without registering it (it is owned, moved and saved elsewhere)."""
    object.__setattr__(module, name, part)


def dense_positional_encoding(prompt_encoder: nn.Module) -> torch.Tensor:
    """SAM's positional encoding of the image-embedding grid, 1 x D x g x g, always computed in fp32."""
    weight = prompt_encoder.no_mask_embed.weight
    with torch.autocast(weight.device.type, enabled=False):
        return prompt_encoder.get_dense_pe()


class PromptFreeHead(nn.Module):
    """Class masks without prompts (METHODS.md 1.6), on SAM's two-way transformer and upscaling.

    Args:
        prompt_encoder, mask_decoder: SAM's own modules (borrowed).
        config: classes, tokens, label values and HQ mode.
        hq: HQ-SAM's parts (borrowed from the model) when ``config.hq`` is not "off".

    Trains (see :meth:`trainable_parameters`): its own tokens and class head, and SAM's IoU token,
    two-way transformer, output upscaling and hypernetwork MLP 0 (not for method "hq", where SAM stays
    frozen); never SAM's IoU prediction head, its own mask tokens or MLPs 1-3, which only its promptable path
    uses. With HQ each of its tokens plays the part of HQ-SAM's HQ token: the HQ MLP reads the fused features.
    """

    def __init__(
        self, prompt_encoder: nn.Module, mask_decoder: nn.Module, config: HeadConfig, hq: HQParts | None = None
    ) -> None:
        super().__init__()
        if config.uses_hq and hq is None:
            raise ValueError(f"the head's hq is {config.hq!r} but no HQ parts were given")
        borrow(self, "prompt_encoder", prompt_encoder)
        borrow(self, "decoder", mask_decoder)
        borrow(self, "hq", hq if config.uses_hq else None)
        self.config = config
        dim = mask_decoder.transformer_dim
        self.mask_tokens = nn.Embedding(config.num_mask_tokens, dim)
        with torch.no_grad():
            self.mask_tokens.weight.copy_(mask_decoder.mask_tokens.weight[0].expand(config.num_mask_tokens, -1))
        self.class_head = nn.Linear(dim, config.num_classes + 1) if config.has_class_head else None

    def trainable_parameters(self, sam_decoder: bool = True) -> list[nn.Parameter]:
        """Its own tokens and class head, and (``sam_decoder``) the SAM decoder parts it uses; HQ parts belong to
        the model, which adds them."""
        own = list(self.parameters())
        if not sam_decoder:
            return own
        decoder = self.decoder
        parts = (decoder.transformer, decoder.output_upscaling, decoder.output_hypernetworks_mlps[0])
        return [decoder.iou_token.weight] + [p for part in parts for p in part.parameters()] + own

    def forward(self, features: ImageFeatures) -> tuple[torch.Tensor, torch.Tensor | None]:
        """features (embedding B x D x g x g; with HQ also ``early`` B x g x g x C) ->
        (mask logits B x Q x 4g x 4g, class logits B x Q x (K+1); None for binary and per-class heads, whose
        Q = 1 or K masks are the logits themselves)."""
        embedding = features.embedding
        decoder, b = self.decoder, embedding.shape[0]
        tokens = torch.cat([decoder.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(b, -1, -1)
        src = embedding + self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        pos = dense_positional_encoding(self.prompt_encoder).expand(b, -1, -1, -1)
        hs, src = decoder.transformer(src, pos, tokens)
        mask_tokens_out = hs[:, 1 : 1 + self.config.num_mask_tokens]  # B x Q x D
        grid = embedding.shape[-2:]
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, -1, *grid))  # B x D/8 x 4g x 4g
        masks = None
        if self.config.hq != "hq":  # SAM's mask: one MLP (SAM's 0) shared by all tokens, on SAM's upscaled feature
            hyper = decoder.output_hypernetworks_mlps[0](mask_tokens_out)  # B x Q x D/8
            masks = (hyper @ upscaled.flatten(2)).view(b, -1, *upscaled.shape[-2:])
        if self.hq is not None:  # HQ-SAM's mask: the HQ MLP on the fused features
            hq = self.hq
            fused = hq.hq_mask_features(upscaled, hq.global_local_features(embedding, features.early))
            hq_masks = hq.hq_masks(mask_tokens_out, fused)
            masks = hq_masks if masks is None else masks + hq_masks
        class_logits = self.class_head(mask_tokens_out) if self.class_head is not None else None
        return masks, class_logits


@dataclass
class Prompts:
    """Prompts for one image, in pixel coordinates (x, y) of the S x S model input.

    points: N x P x 2 float, with point_labels N x P (1 positive, 0 negative); boxes: N x 4 (x0, y0, x1, y1);
    masks: N x 1 x 4g x 4g mask logits. N, the number of objects, must agree between the kinds given.
    """

    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    masks: torch.Tensor | None = None


class PromptableHead(nn.Module):
    """SAM's own promptable decoding (prompt encoder + mask decoder with its IoU head) on given features.

    Without HQ it adds nothing: the same weights and calls as ``segment_anything``'s ``Sam.forward``, minus the
    image encoder. It reproduces SAM as loaded while the adapters are off and before training has changed the
    decoder parts the prompt-free head shares with it (transformer, IoU token, upscaling, MLP 0).

    With HQ parts it is HQ-SAM's decoder (METHODS.md 2.1): tokens ``[iou, SAM's 4 mask tokens, hf_token,
    prompts]`` through SAM's transformer; SAM's mask (token 0, or the best of 1-3 by predicted IoU with
    multimask) plus (``hq_mode="sam+hq"``) or replaced by (``"hq"``) the HQ token's mask on the fused features.
    Like HQ-SAM it returns one mask per object even with multimask output.
    """

    def __init__(
        self, prompt_encoder: nn.Module, mask_decoder: nn.Module, hq: HQParts | None = None, hq_mode: str = "sam+hq"
    ) -> None:
        super().__init__()
        borrow(self, "prompt_encoder", prompt_encoder)
        borrow(self, "decoder", mask_decoder)
        borrow(self, "hq", hq)
        self.hq_mode = hq_mode
        #: Why SAM's own decoding cannot be trusted on this model (a version-1 bundle lost SAM's own mask
        #: tokens), or None.
        self.unavailable: str | None = None

    def forward(
        self,
        embedding: torch.Tensor,
        prompts: Prompts,
        multimask_output: bool = False,
        early: torch.Tensor | None = None,
        hq_token_only: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for the prompted objects of ONE image.

        Args:
            embedding: 1 x D x g x g, the image's embedding.
            multimask_output: SAM's three masks per object instead of one (with HQ: the best of them, plus HQ).
            early: 1 x g x g x C, the early encoder feature (``ImageFeatures.early``); needed with HQ parts.
            hq_token_only: HQ-SAM's switch; None follows ``hq_mode``.

        Returns:
            (mask logits N x M x 4g x 4g, predicted IoU N x M), M = 3 with multimask_output without HQ, else 1.
        """
        if self.unavailable:
            raise RuntimeError(self.unavailable)
        if embedding.dim() != 4 or embedding.shape[0] != 1:
            raise ValueError(f"expected the embedding of one image, 1 x D x g x g; got {tuple(embedding.shape)}")
        points = None if prompts.points is None else (prompts.points, prompts.point_labels)
        sparse, dense = self.prompt_encoder(points=points, boxes=prompts.boxes, masks=prompts.masks)
        if self.hq is not None:
            token_only = self.hq_mode == "hq" if hq_token_only is None else hq_token_only
            return self._hq_decode(embedding, early, sparse, dense, multimask_output, token_only)
        return self.decoder(
            image_embeddings=embedding,
            image_pe=dense_positional_encoding(self.prompt_encoder),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def _hq_decode(
        self, embedding: torch.Tensor, early: torch.Tensor | None, sparse: torch.Tensor, dense: torch.Tensor,
        multimask_output: bool, token_only: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HQ-SAM's decoding of N prompts on one image with SAM's decoder modules and the HQ parts -> N x 1 masks."""
        decoder, hq = self.decoder, self.hq
        global_local = hq.global_local_features(embedding, early)  # 1 x D/8 x 4g x 4g
        n, sam_tokens = sparse.shape[0], decoder.num_mask_tokens
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight, hq.hf_token.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        src = torch.repeat_interleave(embedding, n, dim=0) + dense
        pos = torch.repeat_interleave(dense_positional_encoding(self.prompt_encoder), n, dim=0)
        hs, src = decoder.transformer(src, pos, tokens)
        iou = decoder.iou_prediction_head(hs[:, 0])  # N x 4
        tokens_out = hs[:, 1 : 2 + sam_tokens]  # N x 5 x D: SAM's four, then the HQ token
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(n, -1, *embedding.shape[-2:]))
        hq_masks = hq.hq_masks(tokens_out[:, sam_tokens:], hq.hq_mask_features(upscaled, global_local))
        mlps = decoder.output_hypernetworks_mlps
        hyper = torch.stack([mlps[i](tokens_out[:, i]) for i in range(sam_tokens)], dim=1)  # N x 4 x D/8
        sam_masks = (hyper @ upscaled.flatten(2)).view(n, sam_tokens, *upscaled.shape[-2:])
        if multimask_output:  # the best of SAM's masks 1-3 by predicted IoU: still one mask
            iou, best = iou[:, 1:].max(dim=1, keepdim=True)
            sam_masks = sam_masks[torch.arange(n), 1 + best[:, 0]].unsqueeze(1)
        else:
            iou, sam_masks = iou[:, :1], sam_masks[:, :1]
        if token_only:
            return hq_masks, iou
        return sam_masks + hq_masks, iou
