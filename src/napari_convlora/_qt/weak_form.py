"""The dock's Weak labels tab: which image and which weak-label layers, how to adapt SAM to them (WeSAM
self-training), and the buttons that segment the prompts, prompt interactively and hand instances to Training data.
Widgets only; the dock runs the jobs (``weak_actions.py``, ``prompt_actions.py``)."""

from __future__ import annotations

from typing import Callable

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..config import AdapterConfig, wesam_adapter
from ..config.self_training import SelfTrainingRecipe
from .fields import LayerCombo
from .forms import _combo, _spin

#: What adapts: WeSAM's LoRA (rank 4 on q and v), or the plugin's LoRA or Conv-LoRA.
ADAPT_METHODS = ("wesam", "lora", "conv_lora")
ADAPT_METHOD_LABELS = {"wesam": "WeSAM (LoRA q, v, rank 4)", "lora": "LoRA", "conv_lora": "Conv-LoRA"}


def _adapter(method: str) -> AdapterConfig:
    return wesam_adapter() if method == "wesam" else AdapterConfig(method=method)


def _button(text: str, tip: str, checkable: bool = False) -> QPushButton:
    button = QPushButton(text)
    button.setToolTip(tip)
    button.setCheckable(checkable)
    return button


class WeakForm(QWidget):
    """Image, weak-label layers, evaluation labels and the adaptation's method and length; then the actions."""

    def __init__(self, images: Callable[[], list[str]], weak_layers: Callable[[], list[tuple[str, str]]],
                 labels: Callable[[], list[str]], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._weak_layers = weak_layers
        self.image = LayerCombo(images, "(no Image layer)")
        self.image.setToolTip("the Image layer the weak labels are drawn on")
        self.layers = QListWidget()
        self.layers.setMaximumHeight(96)
        self.layers.setToolTip("tick the weak-label layers: Shapes (rectangles, polygons, ellipses: a box each), "
                               "Points (feature 'label' True/False for positive/negative, 'instance' to group "
                               "points into one object; else one object per positive point) and Labels (coarse "
                               "masks: one object per id). A 'class' feature names each object's class")
        none = "(no evaluation labels)"
        self.evaluation = LayerCombo(lambda: [none, *labels()], none)  # optional: none unless chosen
        self.evaluation.setToolTip("optional: dense instance labels of the image, to score prompt mIoU before and "
                                   "during adaptation (never used by the loss)")
        self.coarse_masks = QCheckBox("coarse masks from polygons")
        self.coarse_masks.setToolTip("prompt polygons and ellipses like coarse labels (their box and points drawn "
                                     "inside them afresh at every step) instead of by their box alone")
        defaults = SelfTrainingRecipe()
        self.method = _combo(ADAPT_METHODS, ADAPT_METHOD_LABELS,
                             "the encoder adapter trained: WeSAM's LoRA of rank 4 on the q and v projections (the "
                             "paper's), or the plugin's LoRA or Conv-LoRA; SAM's decoder stays as loaded")
        self.steps = _spin(1, 1_000_000, defaults.steps, tip="optimizer steps of self-training; the learning rate "
                           f"warms up over the first half (at most {defaults.warmup_steps} steps, as WeSAM). The "
                           "input size, device and runs folder are those of the Model and Advanced tabs")
        self.adapt = _button("Adapt", "adapt SAM's encoder to this image from the weak labels (WeSAM self-training, "
                                      "in the background); the run is saved in the runs folder (Advanced)")
        self.stop = _button("Stop", "stop at the next step: what was trained so far is saved and used")
        self.resume = _button("Resume", "continue the stopped (or finished) self-training run exactly, in its own "
                                        "file and with its own settings; more Steps than it made continue it longer")
        self.read = QLabel("")
        self.read.setWordWrap(True)
        self.read.setToolTip("what was read from the weak-label layers (the log lists what was skipped and why)")
        self.model_info = QLabel("adapted model: none yet")
        self.model_info.setWordWrap(True)
        self.model_info.setToolTip("the promptable model Segment prompts and interactive prompting use: the last "
                                   "adapted, or an adapted file loaded under Model")
        self.whole_stack = QCheckBox("whole stack")
        self.whole_stack.setToolTip("segment the prompts of every plane (the instances layer is replaced); else "
                                    "only those of the plane shown")
        self.through_stack = QCheckBox("through stack")
        self.through_stack.setToolTip("carry each prompted object to the neighbouring planes (its mask's box and "
                                      "innermost point as the next plane's prompt) until it ends: one id per object "
                                      "through the stack; other planes it reaches keep their objects")
        self.compare = QCheckBox("compare with unadapted")
        self.compare.setToolTip("also segment the prompts with the SAM that was loaded (adapters off) into "
                                "'<image> instances (unadapted)'")
        self.segment = _button("Segment prompts", "every box, point group and coarse object of the ticked layers "
                                                  "becomes one object of '<image> instances' (one id each)")
        self.interactive = _button("Interactive prompting", "adds the layers 'prompt points' and 'prompt boxes': "
                                   "click a point or draw a rectangle and the object appears in '<image> instances' "
                                   "(a new id); the image embedding of each plane is computed once", checkable=True)
        self.negative = QCheckBox("negative points")
        self.negative.setToolTip("points added now are negative (red): each one removes its area from the last "
                                 "object made by a point on that plane, which is segmented again")
        self.to_training = _button("Instances to training labels", "write '<image> classes' from '<image> "
                                   "instances': each object gets its class (from a 'class' feature of the weak "
                                   "layers, else one class 'object'), and pair it with the image under Training "
                                   "data, so that Train teaches the prompt-free head and unprompted planes get "
                                   "segmented too")
        self._layout()

    def _layout(self) -> None:
        form = QFormLayout()
        form.addRow("Image", self.image)
        form.addRow("Weak labels", self.layers)
        form.addRow("Evaluation", self.evaluation)
        form.addRow("", self.coarse_masks)
        form.addRow("Method", self.method)
        form.addRow("Steps", self.steps)
        buttons = QHBoxLayout()
        buttons.addWidget(self.adapt)
        buttons.addWidget(self.stop)
        buttons.addWidget(self.resume)
        prompts = QGroupBox("Prompts")
        grid = QGridLayout(prompts)
        grid.addWidget(self.model_info, 0, 0, 1, 2)
        grid.addWidget(self.whole_stack, 1, 0)
        grid.addWidget(self.through_stack, 1, 1)
        grid.addWidget(self.compare, 2, 0, 1, 2)
        grid.addWidget(self.segment, 3, 0, 1, 2)
        grid.addWidget(self.interactive, 4, 0)
        grid.addWidget(self.negative, 4, 1)
        grid.addWidget(self.to_training, 5, 0, 1, 2)
        column = QVBoxLayout(self)
        column.addLayout(form)
        column.addLayout(buttons)
        column.addWidget(self.read)
        column.addWidget(prompts)

    # ---- the weak-label layers ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """Follow the viewer's layers; ticks stay with the names."""
        self.image.refresh()
        self.evaluation.refresh()
        ticked = set(self.checked_layers())
        self.layers.clear()
        for name, kind in self._weak_layers():
            item = QListWidgetItem(f"{name} ({kind})")
            item.setData(Qt.ItemDataRole.UserRole, name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if name in ticked else Qt.CheckState.Unchecked)
            self.layers.addItem(item)

    def _items(self) -> list[QListWidgetItem]:
        return [self.layers.item(i) for i in range(self.layers.count())]

    def checked_layers(self) -> list[str]:
        return [item.data(Qt.ItemDataRole.UserRole) for item in self._items()
                if item.checkState() == Qt.CheckState.Checked]

    def set_checked(self, names: list[str]) -> None:
        for item in self._items():
            on = item.data(Qt.ItemDataRole.UserRole) in names
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)

    # ---- the recipe and the buttons' state ---------------------------------------------------------------
    def recipe(self, input_size: int) -> SelfTrainingRecipe:
        """The self-training recipe chosen here, at the Model tab's ``input_size`` (ConfigError when not allowed)."""
        return SelfTrainingRecipe(adapter=_adapter(self.method.currentData()), input_size=input_size,
                                  steps=self.steps.value())  # a short run's warm-up is scaled by the run itself

    def set_busy(self, what: str | None, has_model: bool, resumable: bool = False) -> None:
        idle = what is None
        self.resume.setEnabled(idle and resumable)
        for widget in (self.image, self.layers, self.evaluation, self.coarse_masks, self.method, self.steps,
                       self.adapt):
            widget.setEnabled(idle)
        self.stop.setEnabled(what == "adapt")
        self.segment.setEnabled(idle and has_model)
        self.to_training.setEnabled(idle)
        self.interactive.setEnabled(has_model or self.interactive.isChecked())
