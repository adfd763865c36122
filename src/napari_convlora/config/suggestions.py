"""Defaults that depend on the checkpoint and the machine (what the dock proposes before a user chooses). No torch."""

from __future__ import annotations

#: The largest input size proposed where SAM's encoder is slow: a step at 1024 px takes minutes on a CPU.
CPU_INPUT_SIZE = 256
MPS_INPUT_SIZE = 512


def suggested_input_size(image_size: int, device: str) -> tuple[int, str]:
    """The input size to propose for a SAM checkpoint of ``image_size`` px on ``device`` (cpu, cuda, mps),
    and why, in words for a tooltip."""
    if device == "cuda":
        return image_size, f"{image_size} px: the checkpoint's own input size, on a GPU"
    limit = MPS_INPUT_SIZE if device == "mps" else CPU_INPUT_SIZE
    size = min(image_size, limit)
    where = "Apple GPU (MPS)" if device == "mps" else "CPU"
    if size == image_size:
        return size, f"{size} px: the checkpoint's own input size"
    return size, (f"{size} px on the {where}: SAM's encoder costs about 16 times more per step at 1024 px, which "
                  f"takes minutes a step there; a smaller input trains in seconds a step (SAM sees {size} px tiles "
                  f"instead of {image_size} px ones)")
