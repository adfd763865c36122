"""``AdaptedSAM``: a SAM with encoder adapters and heads, assembled from finished parts.

Like ``segment_anything``'s ``Sam(image_encoder=..., prompt_encoder=..., mask_decoder=...)``, it composes:

- ``sam``: SAM as loaded, frozen, and unchanged except for its input size (``resize.py``, the one edit);
- encoder adapters (LoRA or Conv-LoRA) that wrap the target Linear layers of SAM's image encoder and can be
  switched off or taken out again (``adapters/``); none for ``method="decoder"``;
- ``head``: the prompt-free head of the config (``heads.PromptFreeHead``), holding SAM's decoder parts by
  reference and owning its tokens and (matched multi-class heads) its class head;
- ``prompt_head``: SAM's own promptable decoding on the same adapted encoder (``heads.PromptableHead``);
- ``hq``: HQ-SAM's token, MLP and fusion convolutions (``hq.HQParts``) when the head uses HQ (``config.head.hq``),
  from an HQ-SAM checkpoint or new; both heads borrow them;
- ``instance_head``: foreground, centre and depth maps at full resolution for touching objects
  (``instance_head.InstanceHead``) when the config has ``instances``; trained with the adapters;
- ``detail_head``: the prompt-free head's masks corrected at full resolution (``detail_head.DetailHead``) when the
  head's config has ``detail``.

Images go in as RGB in 0..255; the pixel normalisation belongs to the model (its own buffers, from the
config). Activation checkpointing is a wrapper around the encoder blocks (``checkpointing.py``); an early
encoder feature, for a decoder-side fusion (HQ-SAM), is taken with a forward hook (``features.py``); the encoder's
attention can run through PyTorch's fused attention, a forward bound on SAM's ``Attention`` instances
(``fast_attention.py``).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.inject import adapter_layers, inject_adapters, set_adapters_enabled
from ..config import ModelConfig
from .base_sam import BaseSam
from .checkpointing import set_activation_checkpointing, unwrapped
from .fast_attention import set_fast_attention
from .features import BlockOutputCapture, ImageFeatures
from .heads import PromptableHead, PromptFreeHead
from .hq import HQParts
from .detail_head import DetailHead
from .instance_head import InstanceHead
from .outputs import SegmentationOutput
from .resize import resize_sam_input
from .sam_build import infer_architecture

#: The SAMs that are part of a model: a SAM serves one model (kept outside SAM's objects, weakly).
_SAMS_IN_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class AdaptedSAM(nn.Module):
    """SAM + encoder adapters (Conv-LoRA, LoRA or none) + a prompt-free head, and SAM's promptable path.

    Args:
        sam: ``segment_anything``'s ``Sam`` (``load_base(path).sam``); kept as ``.sam``. Its parameters are
            frozen, its input size is set to ``config.input_size`` and adapters wrap its encoder's target
            Linear layers; nothing else of it changes.
        config: geometry (must describe ``sam``), adapter, head, input size, input spec, base checkpoint.
        hq: HQ-SAM's parts for a head that uses HQ (those of an HQ-SAM checkpoint: ``load_base(path).hq``); None
            makes new ones (PyTorch's default initialisation, as HQ-SAM's training starts). Not used when the
            head's hq is off.
    """

    def __init__(self, sam: nn.Module, config: ModelConfig, hq: HQParts | None = None) -> None:
        super().__init__()
        if sam in _SAMS_IN_MODELS:
            raise ValueError("this SAM is already part of another model (they would train the same decoder); "
                             "load the base again for a second model")
        found = infer_architecture(sam.state_dict(), decoder_num_heads=config.base.decoder_num_heads)
        if found != config.base:
            differ = [k for k, v in vars(found).items() if getattr(config.base, k) != v]
            raise ValueError(f"the SAM given does not have the geometry of the config (differs in {differ})")
        self.config = config
        self.adapted_layers = inject_adapters(sam.image_encoder, config.adapter)  # raises before changing anything
        self.sam = sam
        _SAMS_IN_MODELS.add(sam)
        sam.requires_grad_(False)
        # SAM's mask decoder as loaded (CPU copies, outside the module tree: not in the state dict, so Model Zoo
        # packages and DDP see the model as before): the prompt-free head trains parts of the live one, after which
        # it no longer answers point and box prompts (promptable_decoder_as_loaded). Bundles carry it
        # (checkpoints.model_files); adapter files rebuild it from their base.
        self.decoder_as_loaded: dict[str, torch.Tensor] = {
            name: t.detach().to("cpu", copy=True) for name, t in sam.mask_decoder.state_dict().items()}
        resize_sam_input(sam, config.input_size)
        set_fast_attention(sam.image_encoder, "auto")  # a runtime choice (not saved): SDPA where it pays
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(-1, 1, 1), persistent=False)
        self.hq: HQParts | None = None
        if config.head.uses_hq:
            self.hq = hq if hq is not None else HQParts(config.base.prompt_embed_dim, config.base.encoder_embed_dim)
            if (self.hq.transformer_dim, self.hq.vit_dim) != (config.base.prompt_embed_dim, config.base.encoder_embed_dim):
                raise ValueError(f"HQ parts for decoder/encoder widths {self.hq.transformer_dim}/{self.hq.vit_dim} do "
                                 f"not fit this SAM ({config.base.prompt_embed_dim}/{config.base.encoder_embed_dim})")
            self.hq.requires_grad_(False)
        self.head = PromptFreeHead(sam.prompt_encoder, sam.mask_decoder, config.head, self.hq)
        self.prompt_head = PromptableHead(sam.prompt_encoder, sam.mask_decoder, self.hq,
                                          config.head.hq if config.head.uses_hq else "sam+hq")
        self.instance_head = (InstanceHead(config.base.prompt_embed_dim, config.base.encoder_embed_dim)
                              if config.instances is not None else None)
        self.detail_head = (DetailHead(config.base.prompt_embed_dim, config.base.encoder_embed_dim,
                                       config.head.num_mask_tokens, context=config.head.detail_context)
                            if config.head.detail else None)
        self._early_capture: BlockOutputCapture | None = None
        self.capture_early_feature(self._reads_early_feature)
        if config.promptable is not None:  # WeSAM trains the adapters only: the prompt-free head stays as built
            self.head.requires_grad_(False)
        for p in self.trainable_parameters():
            p.requires_grad_(True)

    @classmethod
    def from_base(cls, base: BaseSam, config: ModelConfig) -> AdaptedSAM:
        """The model of ``config`` on a loaded base (``checkpoints.sam_files.load_base``), with the base's HQ parts when it
        is an HQ-SAM checkpoint and the head uses HQ."""
        return cls(base.sam, config, hq=base.hq)

    # ---- what trains -------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapters' own weights (not the Linear layers they wrap), what the head trains (with SAM's decoder
        parts except for method "hq", where SAM stays frozen as HQ-SAM trains) and the HQ parts. A model adapted
        through SAM's promptable decoder (``config.promptable``, WeSAM) trains its adapters only."""
        adapters = [p for _, layer in adapter_layers(self.sam) for name, p in layer.named_parameters()
                    if not name.startswith("base_layer.")]
        if self.config.promptable is not None:
            return adapters
        head = self.head.trainable_parameters(sam_decoder=self.config.adapter.method != "hq")
        hq = list(self.hq.parameters()) if self.hq is not None else []
        instances = list(self.instance_head.parameters()) if self.instance_head is not None else []
        detail = list(self.detail_head.parameters()) if self.detail_head is not None else []
        return adapters + head + hq + instances + detail

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors fine-tuning changes, under their state-dict names (what an adapter file holds)."""
        trained = {id(p) for p in self.trainable_parameters()}
        return {name: t.detach() for name, t in self.state_dict(keep_vars=True).items() if id(t) in trained}

    # ---- switches ----------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.config.head.num_classes

    @property
    def input_size(self) -> int:
        return self.config.input_size

    def set_adapters_enabled(self, enabled: bool) -> None:
        """Switch the encoder adapters off (the encoder computes plain SAM) or back on."""
        set_adapters_enabled(self.sam, enabled)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute encoder blocks in the backward pass instead of storing their activations (less memory)."""
        set_activation_checkpointing(self.sam.image_encoder.blocks, enabled)

    def set_fast_attention(self, mode: str | bool) -> None:
        """Encoder attention through PyTorch's fused ``scaled_dot_product_attention`` (``"on"``), SAM's own forward
        (``"off"``) or by device type (``"auto"``, the default); the same result (``fast_attention.py``)."""
        set_fast_attention(self.sam.image_encoder, mode)

    def capture_early_feature(self, enabled: bool = True) -> None:
        """Make :meth:`encode` also return the output of the first global-attention block (HQ-SAM's early
        feature), taken with a forward hook on that block. On from the start when the head uses HQ."""
        if not enabled and self._reads_early_feature:
            raise ValueError("this model's HQ fusion, instance head or detail head reads the early feature: it cannot "
                             "be switched off")
        if enabled and self._early_capture is None:
            block = unwrapped(self.sam.image_encoder.blocks[self.config.base.first_global_block])
            self._early_capture = BlockOutputCapture(block)
        elif not enabled and self._early_capture is not None:
            self._early_capture.remove()
            self._early_capture = None

    @property
    def _reads_early_feature(self) -> bool:
        return self.hq is not None or self.instance_head is not None or self.detail_head is not None

    def balance_loss(self) -> torch.Tensor:
        """Conv-LoRA's load-balancing losses of the last forward, summed over layers (0 without Conv-LoRA)."""
        losses = [layer.balance_loss for _, layer in adapter_layers(self.sam) if layer.balance_loss is not None]
        return torch.stack(losses).sum() if losses else self.pixel_mean.new_zeros(())

    @contextlib.contextmanager
    def promptable_decoder_as_loaded(self) -> Iterator[None]:
        """While the block runs, SAM's mask decoder holds the weights it was loaded with, then the trained ones
        again: for SAM's promptable path on the adapted encoder (segment everything, SAM-refined objects). The
        prompt-free head trains SAM's decoder transformer, upscaling, first hypernetwork MLP and IoU token; the
        decoder trained so answered no point prompt of the nuclei benchmark (segment everything 0 objects found,
        SAM-refined F1 0.25), the one as loaded on the same adapted encoder did (0.41 and 0.78; BENCHMARKS.md)."""
        decoder = self.sam.mask_decoder
        trained = {name: t.detach().clone() for name, t in decoder.state_dict().items()}
        try:
            decoder.load_state_dict(self.decoder_as_loaded)
            yield
        finally:
            decoder.load_state_dict(trained)

    # ---- forward -----------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> ImageFeatures:
        """images: B x 3 x S x S float RGB in 0..255 -> features (embedding B x D x S/16 x S/16)."""
        s = self.config.input_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (s, s):
            raise ValueError(f"expected images B x 3 x {s} x {s}, got {tuple(images.shape)}")
        for _, layer in adapter_layers(self.sam):
            layer.balance_loss = None
        embedding = self.sam.image_encoder((images - self.pixel_mean) / self.pixel_std)
        early = self._early_capture.take() if self._early_capture is not None else None
        return ImageFeatures(embedding, early)

    def forward(self, images: torch.Tensor, instance_maps: bool = True) -> SegmentationOutput:
        """images: B x 3 x S x S float RGB in 0..255 -> raw outputs (mask logits B x Q x S/4 x S/4, or B x Q x S x S
        with a detail head; with an instance head and ``instance_maps`` also its maps' logits B x 3 x S x S:
        training and validation use them, class probabilities alone do not and skip the head)."""
        features = self.encode(images)
        masks, class_logits = self.head(features)
        normalised = (images - self.pixel_mean) / self.pixel_std
        if self.detail_head is not None:
            masks = self.detail_head(features, normalised, masks)
        instance_logits = None
        if self.instance_head is not None and instance_maps:
            instance_logits = self.instance_head(features, normalised)
        return SegmentationOutput(masks, class_logits, self.balance_loss(), instance_logits)

    def probabilities_from_output(self, out: SegmentationOutput, size: int | None = None) -> torch.Tensor:
        """Class probabilities B x K x size x size (sum 1 over K) from raw outputs.

        The mask logits are first upsampled bilinearly (align_corners=False) to size x size (a no-op for a detail
        head's full-resolution logits at the input's size).
        Binary: [1 - p, p] with p = sigmoid(mask). Per-class head (SAMed): softmax over the K mask logits.
        Matched multi-class head: sum_q softmax(class_q)[c] * sigmoid(mask_q) over the K real classes (no-object
        dropped), normalised over c. Per pixel the sigmoids are divided by the largest one before they are mixed
        (the normalisation cancels that factor), so that pixels where every mask logit is very negative still get
        probabilities that sum to 1 instead of underflowing.
        """
        size = size or self.config.input_size
        head = self.config.head
        masks = F.interpolate(out.mask_logits.float(), size=(size, size), mode="bilinear", align_corners=False)
        if head.binary:
            p = torch.sigmoid(masks[:, 0])
            return torch.stack([1 - p, p], dim=1)
        if head.per_class:
            return torch.softmax(masks, dim=1)
        cls = torch.softmax(out.class_logits.float(), dim=-1)[..., :-1]  # B x Q x K
        log_sigmoid = F.logsigmoid(masks)  # B x Q x S x S
        relative = torch.exp(log_sigmoid - log_sigmoid.amax(dim=1, keepdim=True))  # largest token = 1
        semantic = torch.einsum("bqk,bqhw->bkhw", cls, relative)
        return semantic / semantic.sum(dim=1, keepdim=True).clamp_min(torch.finfo(semantic.dtype).tiny)

    def probabilities_and_maps(self, images: torch.Tensor) -> torch.Tensor:
        """images: B x 3 x S x S float RGB 0..255 -> B x (K + 3) x S x S: the class probabilities, then the instance
        head's maps (foreground, centre, depth; sigmoid, each in 0..1). Only for a model with an instance head."""
        if self.instance_head is None:
            raise ValueError("this model has no instance head (train it with instance labels to get one)")
        out = self(images)
        return torch.cat([self.probabilities_from_output(out), torch.sigmoid(out.instance_logits.float())], dim=1)

    def class_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """images: B x 3 x S x S float RGB 0..255 -> B x K x S x S probabilities summing to 1 over K."""
        return self.probabilities_from_output(self(images, instance_maps=False))

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """images: B x 3 x S x S float RGB 0..255 -> B x S x S int64 class indices."""
        return self.class_probabilities(images).argmax(dim=1)
