"""What the image encoder hands to the heads, and how an early feature is taken without forking the encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ImageFeatures:
    """The image encoder's outputs for a batch of B images of side S (grid g = S / 16).

    embedding: B x D x g x g, the neck's output (D = 256 for official SAMs): what SAM's decoder reads.
    early: B x g x g x C, the raw output of the first global-attention block (C = the encoder width), when a
        head asked for it (HQ-SAM's fusion does); else None.
    """

    embedding: torch.Tensor
    early: torch.Tensor | None = None


class BlockOutputCapture:
    """Keeps the output of one encoder block while the encoder runs: a forward hook on that block, so the
    encoder's own forward is used unchanged. ``take()`` hands the tensor over and forgets it."""

    def __init__(self, block: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = block.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.value = output

    def take(self) -> torch.Tensor | None:
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self.handle.remove()
        self.value = None
