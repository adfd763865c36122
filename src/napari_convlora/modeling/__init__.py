"""The adapted model and its parts (torch): ``AdaptedSAM`` composes SAM, encoder adapters and heads."""

from .adapted_sam import AdaptedSAM
from .base_sam import BaseSam
from .fast_attention import set_fast_attention
from .features import BlockOutputCapture, ImageFeatures
from .heads import PromptableHead, PromptFreeHead, Prompts
from .outputs import SegmentationOutput
from .resize import resize_sam_input

__all__ = [
    "AdaptedSAM",
    "BaseSam",
    "BlockOutputCapture",
    "ImageFeatures",
    "PromptFreeHead",
    "PromptableHead",
    "Prompts",
    "SegmentationOutput",
    "resize_sam_input",
    "set_fast_attention",
]
