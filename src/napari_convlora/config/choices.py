"""Every choice list and file-format name of the plugin, defined once (no torch, no Qt).

The core validates against these tuples, the command line offers them as ``choices``, and the dock shows
them through the ``*_LABELS`` dictionaries (value -> text in the menu).
"""

from __future__ import annotations

#: What trains: LoRA with a mixture of convolution experts in the encoder, plain LoRA, no encoder adapter (the
#: decoder trains), or HQ-SAM's regime (SAM frozen; only the HQ parts and the head's own tokens and class head).
METHODS = ("conv_lora", "lora", "decoder", "hq")
METHOD_LABELS = {"conv_lora": "Conv-LoRA", "lora": "LoRA", "decoder": "Decoder only", "hq": "HQ-SAM (SAM frozen)"}
#: Methods without an encoder adapter.
NO_ENCODER_ADAPTER = ("decoder", "hq")
#: The slices of a fused qkv projection's output, in SAM's order (LoRA may adapt some of them: WeSAM's q and v).
QKV_SLICES = ("q", "k", "v")

#: HQ-SAM's output token and global-local fusion on the head: off, added to SAM's mask (the paper's default
#: "error correction", ``hq_token_only=False``) or the HQ mask alone (``hq_token_only=True``).
HQ_MODES = ("off", "sam+hq", "hq")
HQ_MODE_LABELS = {"off": "off", "sam+hq": "SAM + HQ", "hq": "HQ only"}

#: How a multi-class head (3 classes or more) ties mask tokens to classes: "matched", Conv-LoRA's Mask2Former-style
#: mask classification (2K tokens, a class head, Hungarian matching in the loss; METHODS.md 1.6), or "per_class",
#: SAMed's fixed tokens (K tokens, token k always class k, no class head: softmax over the K mask logits, trained with
#: cross-entropy + Dice). Binary heads have one token either way.
MULTICLASS_HEADS = ("matched", "per_class")
MULTICLASS_HEAD_LABELS = {"matched": "matched tokens (Conv-LoRA)", "per_class": "one token per class (SAMed)"}

#: The supervised loss of a binary model: PraNet's structure loss (weighted BCE + weighted IoU over every pixel;
#: Conv-LoRA's) or HQ-SAM's point-sampled BCE + dice (12,544 points, 75 % chosen by uncertainty). Multi-class
#: models always use their head's own loss (``MULTICLASS_HEADS``) and refuse "hq_points".
MASK_LOSSES = ("structure", "hq_points")
MASK_LOSS_LABELS = {"structure": "structure (PraNet)", "hq_points": "HQ-SAM points"}

#: Where to compute; "auto" takes CUDA, then Apple MPS, then the CPU.
DEVICES = ("auto", "cuda", "mps", "cpu")
DEVICE_LABELS = {"auto": "auto", "cuda": "CUDA", "mps": "MPS", "cpu": "CPU"}

#: Arithmetic of training and prediction; mixed precision (bf16, fp16) on CUDA only.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MIXED_PRECISIONS = ("bf16", "fp16")

#: Kinds of weak labels for self-training (WeSAM): boxes (rectangles, or the boxes of polygons and ellipses),
#: points, coarse masks.
WEAK_LABEL_KINDS = ("box", "points", "coarse")

#: How label values are read (see ``data/labels.py``).
LABEL_MODES = ("dense", "sparse", "instances", "sparse_instances")
LABEL_MODE_LABELS = {
    "dense": "dense (0 = background)",
    "sparse": "sparse (0 = not annotated)",
    "instances": "instances (objects vs background 0)",
    "sparse_instances": "sparse instances (0 = not annotated)",
}
#: Whether a run trains an instance head (``modeling/instance_head.py``: foreground, centre and depth maps, split into
#: objects by a seeded watershed): "auto" trains one for the instance label modes and not otherwise; "on" / "off".
INSTANCE_HEADS = ("auto", "on", "off")
#: Whether a run trains a detail head (``modeling/detail_head.py``: the masks corrected at full resolution).
DETAIL_HEADS = ("auto", "on", "off")
DETAIL_HEAD_LABELS = {"auto": "auto (on up to 512 px)", "on": "on", "off": "off (SAM's quarter resolution)"}
#: How prediction finds objects: the instance head where the model has one, else connected components ("auto");
#: the head's maps split by its seeded watershed ("head"); the head's objects as box + point prompts to SAM's
#: promptable decoder ("sam_refined"); connected components of each class ("components").
INSTANCE_METHODS = ("auto", "head", "sam_refined", "components", "everything")
INSTANCE_METHOD_LABELS = {"auto": "auto (instance head if trained)", "head": "instance head",
                          "sam_refined": "instance head, refined by SAM", "components": "connected components",
                          "everything": "segment everything (SAM's grid of points)"}
#: The label modes where objects have ids of their own (what an instance head learns from).
INSTANCE_LABEL_MODES = ("instances", "sparse_instances")

#: In a stack or time series, a plane where nothing was painted is "not annotated" (skipped) or "background"
#: (a real negative: every pixel of it trains as background). Sparse modes always skip: 0 means not annotated.
UNPAINTED_PLANES = ("skip", "background")
UNPAINTED_PLANE_LABELS = {"skip": "not annotated (skipped)", "background": "background (negatives)"}

#: How long to train: a number of optimizer steps, or of passes over the labelled planes.
LENGTH_UNITS = ("steps", "epochs")

# ---- files --------------------------------------------------------------------------------------
#: Only the trained tensors, on top of a base SAM checkpoint named by its sha256.
ADAPTER_FORMAT = "napari-convlora-adapter"
#: Base SAM, adapters and head bundled in one file (weights side by side, not merged into each other).
BUNDLE_FORMAT = "napari-convlora-bundle"
#: The name format version 1 gave the bundle.
BUNDLE_FORMAT_V1 = "napari-convlora-model"
#: What ``describe`` reports for a SAM checkpoint (official, MedSAM, micro-sam export, ...).
SAM_CHECKPOINT_FORMAT = "sam-checkpoint"
#: The version of the adapter and bundle files written now; version 1 files are still read.
FORMAT_VERSION = 2

MODEL_SUFFIX = ".safetensors"
SAM_SUFFIXES = (".pth", ".pt", ".safetensors")
#: Written next to a run's model file: ``run.best.safetensors`` and ``run.training.pt`` (see training_state.py).
BEST_SUFFIX = ".best" + MODEL_SUFFIX
TRAINING_STATE_SUFFIX = ".training.pt"
