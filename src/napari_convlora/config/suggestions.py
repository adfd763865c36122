"""Defaults that depend on the base model and the machine: what the dock proposes and what the command line and
:func:`napari_convlora.recipe_for` use when the user sets nothing. No torch.

The learning rate follows the size of the base: SAM's own checkpoints (91 M parameters and more) take Conv-LoRA's
1e-4; a small SAM such as the built-in one (3.8 M) learns nothing useful at 1e-4 in a short run and is trained at
:data:`SMALL_BASE_LR`, the rate measured best over the benchmark families (BENCHMARKS.md, "Learning rate of the
built-in model").
"""

from __future__ import annotations

#: The largest input size proposed where SAM's encoder is slow: a step at 1024 px takes minutes on a CPU.
CPU_INPUT_SIZE = 256
MPS_INPUT_SIZE = 512
#: Bases with fewer parameters than this are small models (the built-in SAM: 3.8 M; SAM vit_b: 91 M).
SMALL_BASE_PARAMETERS = 30_000_000
#: Conv-LoRA's learning rate, for SAM's own checkpoints.
SAM_LR = 1e-4
#: The learning rate of small bases (measured: BENCHMARKS.md, "What the defaults learn").
SMALL_BASE_LR = 1e-3
#: Self-training (WeSAM) of a small base: the rate of its measured runs (BENCHMARKS.md, "Learning rate and longer
#: runs"; 1e-4 and WeSAM's warm-up moved nothing in a short run).
SMALL_BASE_SELF_TRAINING_LR = 1e-3


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


def suggested_lr(parameters: int, self_training: bool = False) -> tuple[float, str]:
    """The learning rate to propose for a base SAM of ``parameters`` parameters (for WeSAM's self-training with
    ``self_training``), and why, in words."""
    if parameters < SMALL_BASE_PARAMETERS:
        lr = SMALL_BASE_SELF_TRAINING_LR if self_training else SMALL_BASE_LR
        return lr, (f"{lr:g}: a small base ({parameters / 1e6:.1f} M parameters) learns at a "
                               "higher rate than SAM's own checkpoints (measured, BENCHMARKS.md)")
    return SAM_LR, f"{SAM_LR:g}: Conv-LoRA's rate for SAM's checkpoints ({parameters / 1e6:.0f} M parameters)"


#: Segment everything (``prediction/everything.py``): SAM's thresholds of its automatic mask generator (predicted
#: IoU, stability) for SAM's own checkpoints, and those of small bases, whose IoU head is less confident (the
#: built-in SAM: median predicted IoU 0.53 for masks that match an object, 0.22 for the others; measured on the
#: plugin's sample, seeds 0 and 2, BENCHMARKS.md "Segment everything").
SAM_EVERYTHING_THRESHOLDS = (0.88, 0.95)
SMALL_BASE_EVERYTHING_THRESHOLDS = (0.4, 0.8)


def everything_thresholds(parameters: int) -> tuple[float, float]:
    """(predicted IoU, stability) thresholds of segment everything for a base SAM of ``parameters`` parameters."""
    return SMALL_BASE_EVERYTHING_THRESHOLDS if parameters < SMALL_BASE_PARAMETERS else SAM_EVERYTHING_THRESHOLDS
