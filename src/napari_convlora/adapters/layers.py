"""LoRA and Conv-LoRA layers that wrap an ``nn.Linear`` (kept as ``base_layer``).

Both keep the wrapped layer's forward signature and return type, and start as the exact identity
(``lora_B`` is zero). Conv-LoRA's auxiliary balance loss is left on ``self.balance_loss`` after
each forward, to be collected by the model, never returned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import indexed_mix, masked_mix, resolve_dispatch
from .gate import NoisyTopKGate


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) * B(A(dropout(x)))``, A: d_in -> r (Kaiming-uniform), B: r -> d_out (zeros)."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRA wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.rank, self.scaling = rank, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.enabled = True
        self.balance_loss: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # some callers read .weight/.bias of the Linear they wrapped
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        """What happens inside the rank-r bottleneck (identity for plain LoRA). z: ... x r."""
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ... x d_in -> ... x d_out (same leading shape, same dtype as the base layer's output)."""
        y = self.base_layer(x)
        if not self.enabled:
            return y
        z = self.lora_A(self.lora_dropout(x))
        return y + self.lora_B(self.bottleneck(z)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * B @ A`` (d_out x d_in) that merging adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` equal to this layer (only possible for plain LoRA)."""
        merged = nn.Linear(self.base_layer.in_features, self.base_layer.out_features, bias=self.base_layer.bias is not None)
        merged = merged.to(self.base_layer.weight.device, self.base_layer.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(self.base_layer.weight + self.delta_weight().to(self.base_layer.weight.dtype))
            if self.base_layer.bias is not None:
                merged.bias.copy_(self.base_layer.bias)
        merged.weight.requires_grad_(self.base_layer.weight.requires_grad)
        return merged


class ScaleExpert(nn.Module):
    """One Conv-LoRA expert: bicubic up by ``scale``, 3x3 conv (r -> r, zero bias), GELU, bicubic back down.

    A scale of 1 skips both resizes. Input and output: N x r x h x w, in the conv weight's dtype.
    """

    def __init__(self, rank: int, scale: float):
        super().__init__()
        self.scale = float(scale)
        self.conv = nn.Conv2d(rank, rank, kernel_size=3, padding=1, bias=True)
        nn.init.zeros_(self.conv.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return F.gelu(self.conv(z))
        size = z.shape[-2:]
        up = F.interpolate(z, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return F.interpolate(F.gelu(self.conv(up)), size=size, mode="bicubic", align_corners=False)


class ConvLoRALinear(LoRALinear):
    """Conv-LoRA: a mixture of scale experts inside LoRA's bottleneck, chosen per row by a noisy top-k gate.

    ``y = base(x) + s * B(z + sum_{e in topk} [g_e] E_e(z))``, ``z = A(dropout(x))`` viewed as an r-channel
    image. A row is one image (global-attention blocks, input N x H x W x d) or one window (windowed blocks,
    input (B*windows) x 14 x 14 x d): each window is routed and convolved on its own, with zero padding at
    its borders. Gate weighting ``[g_e]`` only when ``weight_by_gate`` (the reference leaves it out).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int = 3,
        alpha: float = 32.0,
        dropout: float = 0.0,
        scales: tuple[float, ...] = (1, 2, 3, 4, 5, 6, 7, 8),
        top_k: int = 1,
        weight_by_gate: bool = False,
        noisy_gating: bool = True,
        balance_coef: float = 0.01,
    ):
        super().__init__(base_layer, rank, alpha, dropout)
        self.experts = nn.ModuleList(ScaleExpert(rank, s) for s in scales)
        self.gate = NoisyTopKGate(rank, len(scales), top_k=top_k, noisy=noisy_gating, balance_coef=balance_coef)
        self.weight_by_gate = weight_by_gate
        #: How rows reach their experts (``"auto"``, ``"indexed"``, ``"masked"``; see ``adapters/dispatch.py``):
        #: a runtime choice, not saved. ``"auto"`` decides by device type (``dispatch.AUTO_DISPATCH``).
        self.dispatch = "auto"
        #: M booleans on the device, masked dispatch only: experts routed rows since gradients were cleared.
        self.routed_experts: torch.Tensor | None = None

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        """z: N x h x w x r (channels last, as SAM feeds its Linear layers) -> same shape."""
        if z.dim() == 3:  # N x L x r with a square token grid
            side = math.isqrt(z.shape[1])
            if side * side != z.shape[1]:
                raise ValueError(f"Conv-LoRA needs a square token grid, got {z.shape[1]} tokens")
            return self.bottleneck(z.reshape(z.shape[0], side, side, -1)).reshape(z.shape)
        if z.dim() != 4:
            raise ValueError(f"Conv-LoRA expects N x H x W x C input, got shape {tuple(z.shape)}")
        zc = z.permute(0, 3, 1, 2)  # N x r x h x w
        gates, self.balance_loss = self.gate(zc)
        if resolve_dispatch(self.dispatch, zc.device.type) == "masked":
            self._note_routed(gates)
            mixed = masked_mix(self.experts, zc, gates, self.weight_by_gate)
        else:
            mixed = indexed_mix(self.experts, zc, gates, self.weight_by_gate)
        return (zc + mixed).permute(0, 2, 3, 1)

    def _note_routed(self, gates: torch.Tensor) -> None:
        """Mark (on the device, no host copy) the experts that rows were routed to, for their gradients.

        gates: N x M. The record covers every forward with gradients since this layer's expert gradients were
        last set to ``None`` (``zero_grad(set_to_none=True)``), so all micro-batches of an accumulated step.
        """
        if not torch.is_grad_enabled():
            return
        routed = (gates.detach() != 0).any(dim=0)  # M
        fresh = self.routed_experts is None or all(p.grad is None for p in self.experts.parameters())
        self.routed_experts = routed if fresh else self.routed_experts | routed

    def merged(self) -> nn.Linear:
        raise NotImplementedError(
            "Conv-LoRA cannot be merged into the base weight: its expert convolutions and GELU act on the "
            "bottleneck non-linearly. Disable the adapters or remove them instead."
        )
