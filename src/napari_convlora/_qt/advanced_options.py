"""The dock's Advanced tab: optimisation details, the binary models' loss, the multi-class head, the detail head, CPU
threads, the low-memory switch and where runs are saved, a plain form built with magicgui."""

from __future__ import annotations

from pathlib import Path

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, SpinBox

from ..config import RunOptions, TrainRecipe
from ..config.choices import (DETAIL_HEAD_LABELS, DETAIL_HEADS, MASK_LOSS_LABELS, MASK_LOSSES, MULTICLASS_HEAD_LABELS,
                              MULTICLASS_HEADS)
from ..config.suggestions import suggested_lr
from .fields import settings

#: Where training runs are saved unless the user chose a folder (remembered in the settings).
DEFAULT_RUN_FOLDER = Path.home() / "napari-convlora-runs"


class AdvancedOptions(Container):
    """Optimisation details, CPU threads and where runs are saved: a plain form, built with magicgui."""

    def __init__(self) -> None:
        defaults = TrainRecipe()
        self.lr = FloatSpinBox(value=defaults.lr, min=1e-6, max=1.0, step=1e-4, label="learning rate",
                               tooltip="AdamW learning rate (decays linearly to 0 over the run)")
        self.lr.native.setDecimals(6)
        self.suggested_lr = defaults.lr  # the rate proposed last: one the user has not changed follows the base
        self.batch_size = SpinBox(value=defaults.batch_size, min=1, max=64, label="batch size",
                                  tooltip="patches per forward pass")
        self.grad_accum = SpinBox(value=defaults.grad_accum, min=1, max=64, label="accumulate",
                                  tooltip="forward passes per optimizer step")
        self.mask_loss = ComboBox(value=defaults.mask_loss, label="loss (binary)",
                                  choices=[(MASK_LOSS_LABELS[name], name) for name in MASK_LOSSES],
                                  tooltip="binary models: PraNet's structure loss over every pixel, or HQ-SAM's "
                                          "BCE + dice on 12,544 points (75 % where the model is least sure); "
                                          "multi-class models use their own loss")
        self.multiclass_head = ComboBox(value=defaults.multiclass_head, label="multi-class head",
                                        choices=[(MULTICLASS_HEAD_LABELS[n], n) for n in MULTICLASS_HEADS],
                                        tooltip="3 classes or more: one token per class trained with "
                                                "cross-entropy + Dice (SAMed's; the default: it learns many alike "
                                                "regions where the other does not), or tokens matched to classes by "
                                                "a class head (Conv-LoRA's); binary models ignore it")
        self.detail_head = ComboBox(value=defaults.detail_head, label="full-resolution masks",
                                    choices=[(DETAIL_HEAD_LABELS[n], n) for n in DETAIL_HEADS],
                                    tooltip="a detail head corrects the masks at the input's full resolution "
                                            "instead of upsampling SAM's quarter-resolution masks: for "
                                            "structures a few pixels wide (membranes, small lesions); auto: on "
                                            "for inputs of 512 px or less, such as the built-in model's")
        self.threads = SpinBox(value=0, min=0, max=256, label="CPU threads (0 = automatic)",
                               tooltip="CPU threads for torch; 0: automatic (torch's default, fewer when other "
                                       "processes keep the CPUs busy, which would slow training down many times)")
        self.low_memory = CheckBox(value=False, label="less GPU memory",
                                   tooltip="activation checkpointing: the encoder's blocks are recomputed in the "
                                           "backward pass instead of kept, about a third of the memory for 1.6-2x "
                                           "the step time, same result (vit_h at 1024 px then fits a 12 GB card; "
                                           "BENCHMARKS.md). Supervised training; self-training ignores it")
        folder = str(settings().value("run_folder", "") or DEFAULT_RUN_FOLDER)
        self.run_folder = FileEdit(mode="d", value=folder, label="runs in",
                                   tooltip="folder where training runs are saved (remembered)")
        self.run_folder.changed.connect(lambda value: settings().setValue("run_folder", str(value)))
        self.run_folder.choose_btn.tooltip = "choose the folder where training runs are saved"
        super().__init__(widgets=[self.lr, self.batch_size, self.grad_accum, self.mask_loss, self.multiclass_head,
                                  self.detail_head, self.threads, self.low_memory, self.run_folder])
        self.margins = (0, 0, 0, 0)

    def suggest_lr(self, parameters: int) -> None:
        """Propose the learning rate of a base SAM of ``parameters`` parameters, unless the user chose one; the
        tooltip says why."""
        lr, why = suggested_lr(parameters)
        if self.lr.value == self.suggested_lr:
            self.lr.value = lr
        self.suggested_lr = lr
        self.lr.tooltip = f"AdamW learning rate (decays linearly to 0 over the run); proposed for this base: {why}"

    def run_options(self, device: str, precision: str) -> RunOptions:
        return RunOptions(device=device, precision=precision, num_threads=self.threads.value or None,
                          activation_checkpointing=bool(self.low_memory.value))
