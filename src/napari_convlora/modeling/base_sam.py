"""The SAM that a model adapts, as loaded: ``segment_anything``'s ``Sam``, its geometry, where it came from, and the
HQ-SAM parts when the checkpoint had them (``checkpoints.sam_files`` reads it from a file)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import BaseCheckpoint, SamArchitecture
from .hq import HQParts


@dataclass
class BaseSam:
    """A SAM to adapt: ``segment_anything``'s ``Sam``, its geometry, (when it came from a file) the
    file's name and sha256, which adapter files record so that they are only ever loaded on this base, and the
    HQ parts of an HQ-SAM checkpoint (None for a plain SAM)."""

    sam: torch.nn.Module
    architecture: SamArchitecture
    checkpoint: BaseCheckpoint | None = None
    hq: HQParts | None = None
