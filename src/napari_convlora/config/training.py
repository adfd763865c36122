"""How to fine-tune (:class:`TrainRecipe`, saved with the run and reused on resume) and where to run it
(:class:`RunOptions`, always the caller's, never saved). No torch.

The dock and the command line build these objects directly. Resolve first, then prepare the data: when a
run is resumed its saved recipe is read before any data are cut (``training.loop.resume_recipe``), and when a run
starts from a trained model the model's settings are (``training.loop.init_recipe``), because the recipe decides the
patch size, the normalisation, the label encoding and the validation split.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import ConfigError
from .choices import (DETAIL_HEADS, DEVICES, HQ_MODES, INSTANCE_HEADS, INSTANCE_LABEL_MODES, LABEL_MODES, MASK_LOSSES,
                      MULTICLASS_HEADS, PRECISIONS, UNPAINTED_PLANES)
from .model import AdapterConfig, InputSpec, check_input_size
from .records import ADDED_LATER, added_later

#: The largest input side at which ``detail_head="auto"`` trains a detail head.
DETAIL_AUTO_MAX_SIZE = 512
#: Passes over the labelled planes when neither steps nor epochs are given.
DEFAULT_EPOCHS = 10.0
#: The recipe fields that decide how the data are prepared; data cut for other values cannot train.
DATA_FIELDS = ("input_size", "input", "label_mode", "background_value", "unpainted_planes", "class_names",
               "instance_head", "val_fraction", "augment", "seed")


@dataclass
class TrainRecipe:
    """Everything that decides what a fine-tuning run computes. Defaults follow the Conv-LoRA reference
    (AdamW 1e-4, weight decay 1e-4, linear decay, clipping at 1.0, 4 patches per optimizer step).

    adapter: the encoder adapter (method and hyper-parameters).
    input_size: SAM's input side S in pixels, the side of the training patches (1024 is SAM's own).
    input: how images are normalised, which channels are used and how they are rescaled.
    label_mode, background_value, class_names: how the Labels are read (``data/labels.py``); None for the
        background value takes the mode's default (0 dense and instances, 1 sparse modes).
    unpainted_planes: in stacks, a plane where nothing is painted is skipped (``"skip"``: not annotated) or
        trains as background (``"background"``: a real negative); dense and instances modes only.
    num_mask_tokens: matched multi-class heads: tokens that compete for the classes (default 2 x classes).
    multiclass_head: how a multi-class head ties tokens to classes (``HeadConfig.multiclass``): ``"matched"``
        (Conv-LoRA's: class head and Hungarian matching) or ``"per_class"`` (SAMed's: token k is class k, trained
        with cross-entropy + Dice; the default since issue 22: on 6 alike organs mIoU 0.37 against 0.06, on the
        3-class sample level, with steadier validation; BENCHMARKS.md). Binary models ignore it. Runs saved before
        the field existed were matched, and resume as such.
    hq: HQ-SAM's fusion on the head (``HeadConfig.hq``): ``"off"``, ``"sam+hq"`` or ``"hq"``; method ``"hq"``
        with ``"off"`` means ``"sam+hq"`` (the paper's default output).
    mask_loss: the loss of a binary model: ``"structure"`` (PraNet's structure loss, Conv-LoRA's) or
        ``"hq_points"`` (HQ-SAM's point-sampled BCE + dice, ``training/hq_mask_loss.py``). Multi-class models
        always use their head's loss (``multiclass_head``) and refuse ``"hq_points"`` (here when ``class_names``
        names more than two classes, else when training starts: :meth:`check_mask_loss`).
    instance_head: ``"auto"`` (the default) trains an instance head (foreground, centre and depth maps, split into
        objects by a seeded watershed; ``config/instances.py``) with the instance label modes and not otherwise;
        ``"on"`` asks for one (an instance label mode is then required) and ``"off"`` for none. Runs saved before
        the field existed had none.
    detail_head: ``"on"`` corrects the masks at the input's full resolution (``HeadConfig.detail``,
        ``modeling/detail_head.py``; for structures a few pixels wide), ``"off"`` upsamples SAM's quarter-resolution
        masks; ``"auto"`` (the default): on for inputs of 512 px or less (the built-in model's 256 px, SAM at 256 or
        512 px on a CPU), where a quarter of the input is too coarse, off otherwise (SAM at its own 1024 px). Runs saved before the field existed had none.
    val_fraction: share of the labelled area held out for validation (ignored with explicit validation images).
    steps or epochs: how long to train (an epoch tiles every training plane once); neither: 10 epochs.
    batch_size x grad_accum: patches per optimizer step.
    val_every: optimizer steps between validations (None: about 10 in a run).
    """

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    input_size: int = 1024
    input: InputSpec = field(default_factory=InputSpec)
    label_mode: str = "dense"
    background_value: int | None = None
    unpainted_planes: str = "skip"
    class_names: tuple[str, ...] | None = None
    num_mask_tokens: int | None = None
    hq: str = field(default="off", metadata=ADDED_LATER)
    mask_loss: str = field(default="structure", metadata=ADDED_LATER)
    multiclass_head: str = field(default="per_class", metadata=added_later("matched"))
    instance_head: str = field(default="auto", metadata=added_later("off"))
    detail_head: str = field(default="auto", metadata=added_later("off"))
    val_fraction: float = 0.1
    augment: bool = True
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 1
    grad_accum: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    val_every: int | None = None
    seed: int = 0

    @property
    def trains_instance_head(self) -> bool:
        """Whether this run trains an instance head (see ``instance_head``)."""
        return self.instance_head == "on" or (self.instance_head == "auto" and self.label_mode in INSTANCE_LABEL_MODES)

    @property
    def trains_detail_head(self) -> bool:
        """Whether this run's model corrects its masks at full resolution (see ``detail_head``)."""
        return self.detail_head == "on" or (self.detail_head == "auto" and self.input_size <= DETAIL_AUTO_MAX_SIZE)

    def __post_init__(self) -> None:
        check_input_size(self.input_size)
        if self.detail_head not in DETAIL_HEADS:
            raise ConfigError(f"unknown detail head setting {self.detail_head!r}; expected one of {DETAIL_HEADS}")
        if self.hq not in HQ_MODES:
            raise ConfigError(f"unknown HQ mode {self.hq!r}; expected one of {HQ_MODES}")
        if self.adapter.method == "hq" and self.hq == "off":
            self.hq = "sam+hq"
        if self.mask_loss not in MASK_LOSSES:
            raise ConfigError(f"unknown mask loss {self.mask_loss!r}; expected one of {MASK_LOSSES}")
        if self.multiclass_head not in MULTICLASS_HEADS:
            raise ConfigError(f"unknown multi-class head {self.multiclass_head!r}; expected one of {MULTICLASS_HEADS}")
        if self.label_mode not in LABEL_MODES:
            raise ConfigError(f"unknown label mode {self.label_mode!r}; expected one of {LABEL_MODES}")
        if self.instance_head not in INSTANCE_HEADS:
            raise ConfigError(f"unknown instance head setting {self.instance_head!r}; expected one of {INSTANCE_HEADS}")
        if self.instance_head == "on" and self.label_mode not in INSTANCE_LABEL_MODES:
            raise ConfigError(f"an instance head (--instance-head on) learns from instance labels: choose the label "
                              f"mode 'instances' or 'sparse_instances', not {self.label_mode!r}")
        if self.unpainted_planes not in UNPAINTED_PLANES:
            raise ConfigError(f"unpainted_planes must be one of {UNPAINTED_PLANES}, got {self.unpainted_planes!r}")
        if self.class_names is not None:
            self.class_names = tuple(str(n) for n in self.class_names)
        if self.class_names is not None and len(self.class_names) > 2:
            self.check_mask_loss(len(self.class_names))
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"the validation fraction must be in [0, 1), got {self.val_fraction}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give the length of training in steps or in epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.val_every is not None and self.val_every < 1:
            raise ConfigError(f"val_every must be >= 1, got {self.val_every}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"the learning rate must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or not self.grad_clip > 0:
            raise ConfigError(f"weight_decay must be >= 0 and grad_clip > 0, got {self.weight_decay}, {self.grad_clip}")

    def check_mask_loss(self, num_classes: int) -> None:
        """Refuse a binary-only mask loss for labels with ``num_classes`` classes (background included)."""
        if self.mask_loss == "hq_points" and num_classes != 2:
            raise ConfigError(f"mask loss 'hq_points' (--mask-loss) is for binary models, but the labels hold "
                              f"{num_classes} classes; multi-class models use their own head's loss: choose "
                              f"mask loss 'structure'")

    @property
    def patches_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run, given how many make one epoch."""
        if self.steps is not None:
            return int(self.steps)
        epochs = self.epochs if self.epochs is not None else DEFAULT_EPOCHS
        return max(1, math.ceil(epochs * steps_per_epoch))

    def differences(
        self, other: "TrainRecipe", mine: str, theirs: str, fields: tuple[str, ...] | None = None
    ) -> list[str]:
        """``["input_size: 512 asked, 256 saved", ...]`` (``mine="asked"``, ``theirs="saved"``) for the fields
        (default all) where this recipe and ``other`` differ."""
        names = fields or tuple(f.name for f in dataclasses.fields(self))
        return [f"{name}: {getattr(self, name)!r} {mine}, {getattr(other, name)!r} {theirs}"
                for name in names if getattr(self, name) != getattr(other, name)]


@dataclass
class RunOptions:
    """Where and how fast to compute; the caller's choice every time, never saved with a run.

    device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"cpu"``.
    precision: ``"auto"`` (bf16 on CUDA where supported, else fp16 on CUDA, fp32 elsewhere), ``"fp32"``,
        ``"bf16"``, ``"fp16"``.
    num_threads: CPU threads for torch (None: leave torch's setting).
    activation_checkpointing: recompute encoder blocks in the backward pass (less GPU memory, slower; the
        result is the same).
    """

    device: str = "auto"
    precision: str = "auto"
    num_threads: int | None = None
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.device.split(":")[0] not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose one of {DEVICES}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1 (or None), got {self.num_threads}")
