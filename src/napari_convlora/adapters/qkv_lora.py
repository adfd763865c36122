"""LoRA on named slices of a fused qkv Linear (SAMed's and WeSAM's adapter, METHODS.md 3.1).

SAM's attention computes q, k and v with one ``Linear(d, 3 d)`` whose output is ``[q | k | v]`` along the last
axis. This layer adds a separate rank-r branch to each named slice (WeSAM: q and v) and leaves the others (k)
exactly as the base layer computes them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config.choices import QKV_SLICES as QKV
from .layers import LoRALinear


def is_fused_qkv(layer: nn.Linear) -> bool:
    """Whether ``layer`` can be a fused qkv projection: ``out_features == 3 * in_features``."""
    return layer.out_features == 3 * layer.in_features


class QkvSliceLoRALinear(LoRALinear):
    """``[q | k | v] = base(x)``, then ``s += (alpha / r) * B_s(A_s(dropout(x)))`` for each slice s in ``slices``.

    A_s: d -> r (Kaiming-uniform, a = sqrt 5), B_s: r -> d (zeros), no bias; so it starts as the identity. The
    branches are ``lora_A[s]`` and ``lora_B[s]`` (state-dict names ``lora_A.q.weight``, ...). Switching off,
    merging and removing work as for :class:`LoRALinear`. With rank 4, alpha 4 and slices ("q", "v") this holds
    ``4 d r`` parameters per layer: 147,456 over ViT-B's 12 blocks.
    """

    def __init__(
        self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
        slices: tuple[str, ...] = ("q", "v"),
    ):
        super().__init__(base_layer, rank, alpha, dropout)
        if not is_fused_qkv(base_layer):
            raise ValueError(f"qkv slices need a fused qkv Linear (out = 3 x in), got {base_layer.in_features} -> "
                             f"{base_layer.out_features}")
        if not slices or set(slices) - set(QKV) or len(set(slices)) != len(slices):
            raise ValueError(f"slices must be distinct names among {QKV}, got {slices}")
        self.slices = tuple(s for s in QKV if s in slices)
        d = base_layer.in_features
        # One low-rank pair per slice takes the place of LoRALinear's whole-output pair.
        self.lora_A = nn.ModuleDict({s: nn.Linear(d, rank, bias=False) for s in self.slices})
        self.lora_B = nn.ModuleDict({s: nn.Linear(rank, d, bias=False) for s in self.slices})
        for s in self.slices:
            nn.init.kaiming_uniform_(self.lora_A[s].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[s].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ... x d -> ... x 3d (same leading shape); the slices not named come straight from the base layer."""
        y = self.base_layer(x)
        if not self.enabled:
            return y
        h = self.lora_dropout(x)
        parts = list(y.split(self.base_layer.in_features, dim=-1))
        for s in self.slices:
            i = QKV.index(s)
            parts[i] = parts[i] + self.lora_B[s](self.bottleneck(self.lora_A[s](h))) * self.scaling
        return torch.cat(parts, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        """The dense update (3d x d): ``scaling * B_s @ A_s`` in each named slice's rows, zeros elsewhere."""
        d = self.base_layer.in_features
        ref = self.lora_A[self.slices[0]].weight
        delta = torch.zeros(3 * d, d, device=ref.device, dtype=ref.dtype)
        for s in self.slices:
            i = QKV.index(s)
            delta[i * d:(i + 1) * d] = (self.lora_B[s].weight @ self.lora_A[s].weight) * self.scaling
        return delta
