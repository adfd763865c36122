"""The dock's two forms: which model (files, method, size, device, precision) and which data
(Image + Labels pairs, label mode, classes, validation fraction, how long to train, and an Advanced form).

Forms hold choices and hand them out as the core's configuration objects (``AdapterConfig``,
``TrainRecipe`` parts, ``RunOptions``); their menus list ``config.choices``. The dock widget runs the jobs.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton,
                            QSpinBox, QVBoxLayout, QWidget)

from ..checkpoints.builtin import OFFICIAL_CHECKPOINTS
from ..config import AdapterConfig, TrainRecipe
from ..config.choices import (DEVICE_LABELS, DEVICES, HQ_MODE_LABELS, HQ_MODES, LABEL_MODE_LABELS, LABEL_MODES,
                              LENGTH_UNITS, METHOD_LABELS, METHODS, MIXED_PRECISIONS, NO_ENCODER_ADAPTER, MODEL_SUFFIX,
                              PRECISIONS, SAM_SUFFIXES, UNPAINTED_PLANE_LABELS, UNPAINTED_PLANES)
from ..config.suggestions import suggested_input_size
from .advanced_options import AdvancedOptions
from .fields import LayerCombo, PathField, set_item_enabled

SAM_FILTER = f"SAM checkpoints ({' '.join('*' + s for s in SAM_SUFFIXES)});;All files (*)"
MODEL_FILTER = f"napari-convlora models (*{MODEL_SUFFIX});;All files (*)"


def _spin(low: int, high: int, value: int, step: int = 1, tip: str = "") -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setValue(value)
    box.setToolTip(tip)
    return box


def _combo(values, labels: dict[str, str] | None = None, tip: str = "") -> QComboBox:
    """A menu of ``values`` (shown through ``labels``); ``currentData()`` is the chosen value."""
    box = QComboBox()
    for value in values:
        box.addItem((labels or {}).get(value, value), value)
    box.setToolTip(tip)
    return box


#: Where training starts: the base SAM with new adapters, or the current fine-tuned model.
START_FROM = ("base", "model")
#: The fields a fine-tuned model decides; they follow it and are locked while training continues from it.
MODEL_FIELDS = ("method", "hq", "rank", "experts", "input_size")


class ModelForm(QWidget):
    """Base SAM checkpoint, an optional fine-tuned file, where training starts, the adapter method and where to run."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.sam = PathField("sam_checkpoint", "Choose a SAM checkpoint", SAM_FILTER,
                             placeholder="SAM checkpoint (.pth), or the built-in model")
        self.sam.setToolTip(f"a SAM checkpoint: official vit_b / vit_l / vit_h files come from {OFFICIAL_CHECKPOINTS} "
                            "(sam_vit_b_01ec64.pth is the smallest); HQ-SAM and fine-tuned SAM files work too")
        self.builtin = QPushButton("Built-in model")
        self.builtin.setToolTip("the built-in small SAM (3.8 M parameters, 256 px), shipped with the plugin: "
                                "pretrained in the napari-convlora repository on generated images only, it runs "
                                "the whole annotate-train-predict loop in minutes on a CPU; for real work choose "
                                f"an official checkpoint ({OFFICIAL_CHECKPOINTS})")
        self.finetuned = PathField("finetuned_model", "Choose a saved napari-convlora model", MODEL_FILTER,
                                   placeholder="optional: a saved fine-tuned model")
        self.info = QLabel("")
        self.info.setWordWrap(True)
        self.start_from = _combo(START_FROM, {"base": "the base SAM (new adapters)", "model": "the current model"},
                                 "where training starts: new adapters on the base SAM, or the model trained or "
                                 "loaded last (to correct its predictions and train again)")
        self.model_note = QLabel("")
        self.model_note.setWordWrap(True)
        self.method = _combo(METHODS, METHOD_LABELS, "Conv-LoRA: LoRA with a mixture of multi-scale convolution "
                                                     "experts; LoRA: low-rank adapters; Decoder only: the encoder "
                                                     "stays frozen; HQ-SAM: all of SAM stays frozen, only HQ-SAM's "
                                                     "token, MLP and fusion layers and the class head train")
        self.hq = _combo(HQ_MODES, HQ_MODE_LABELS, "HQ-SAM's output token and fusion of early and final encoder "
                                                   "features, for finer boundaries, with any method: SAM + HQ adds "
                                                   "the HQ mask to SAM's (HQ-SAM's default), HQ only uses it alone. "
                                                   "An HQ-SAM checkpoint's parts are used; a plain SAM gets new ones "
                                                   "that train with the run")
        adapter, recipe = AdapterConfig(), TrainRecipe()
        self.rank = _spin(1, 64, adapter.rank, tip="rank of the low-rank adapters in the encoder")
        self.experts = _spin(1, 16, adapter.num_experts, tip="Conv-LoRA: number of scale experts")
        self.input_size = _spin(64, 2048, recipe.input_size, step=64, tip="SAM input (patch) size in pixels; 1024 is SAM's own, "
                                                             "512 or 256 train faster")
        self.device = _combo(DEVICES, DEVICE_LABELS, "where to compute; unavailable devices are greyed out")
        self.precision = _combo(PRECISIONS, tip="mixed precision (bf16/fp16) is offered on CUDA only")
        self.method.currentIndexChanged.connect(self._method_changed)
        self.hq.currentIndexChanged.connect(self._method_changed)
        self.device.currentIndexChanged.connect(self._device_changed)
        self.start_from.currentIndexChanged.connect(self._start_changed)
        self.model_config: dict[str, Any] | None = None  # the config of the current fine-tuned model
        self.sam_image_size: int | None = None  # the loaded SAM checkpoint's own input size
        self.suggested_size: int | None = None  # the input size proposed last (a device change re-proposes it)
        self.cuda_available = self.mps_available = False
        self.tips = {name: getattr(self, name).toolTip() for name in MODEL_FIELDS}
        set_item_enabled(self.start_from, 1, False, "the current model (none yet)")
        options = QHBoxLayout()
        for label, box in (("rank", self.rank), ("experts", self.experts)):
            options.addWidget(QLabel(label))
            options.addWidget(box)
        sam_row = QHBoxLayout()
        sam_row.addWidget(self.sam, 1)
        sam_row.addWidget(self.builtin)
        form = QFormLayout(self)
        form.addRow("SAM", sam_row)
        form.addRow("Fine-tuned", self.finetuned)
        form.addRow(self.info)
        form.addRow("Start from", self.start_from)
        form.addRow(self.model_note)
        form.addRow("Method", self.method)
        form.addRow("HQ", self.hq)
        form.addRow("", options)
        form.addRow("Input size", self.input_size)
        form.addRow("Device", self.device)
        form.addRow("Precision", self.precision)
        self.set_devices({"cuda": False, "mps": False, "cpu": True}, checking=True)

    def _method_changed(self, *_: Any) -> None:
        locked = self.continues()
        method = self.method_name()
        self.method.setEnabled(not locked)
        self.hq.setEnabled(not locked)
        set_item_enabled(self.hq, HQ_MODES.index("off"), method != "hq",
                         HQ_MODE_LABELS["off"] + (" (not with the HQ-SAM method)" if method == "hq" else ""))
        if method == "hq" and self.hq_mode() == "off":
            self.hq.setCurrentIndex(HQ_MODES.index("sam+hq"))
        self.rank.setEnabled(method not in NO_ENCODER_ADAPTER and not locked)
        self.experts.setEnabled(method == "conv_lora" and not locked)
        self.input_size.setEnabled(not locked)

    # ---- the current fine-tuned model ---------------------------------------------------------
    def set_model(self, config: dict[str, Any] | None, name: str = "") -> None:
        """A fine-tuned model is current (trained or loaded): show the values it decides, and offer to
        continue from it (the default); None: no model."""
        self.model_config = config
        if config is None:
            set_item_enabled(self.start_from, 1, False, "the current model (none yet)")
            self.start_from.setCurrentIndex(0)
            return
        set_item_enabled(self.start_from, 1, True, f"the current model ({name})" if name else "the current model")
        self.start_from.setCurrentIndex(1)
        self._start_changed()

    def continues(self) -> bool:
        """Whether training starts from the current fine-tuned model."""
        return self.model_config is not None and self.start_from.currentData() == "model"

    def _start_changed(self, *_: Any) -> None:
        config = self.model_config if self.continues() else None
        if config is not None:
            adapter = config["adapter"]
            self.method.setCurrentIndex(METHODS.index(adapter["method"]))
            self.hq.setCurrentIndex(HQ_MODES.index(config["head"].get("hq", "off")))
            if adapter.get("rank"):
                self.rank.setValue(int(adapter["rank"]))
            if adapter.get("num_experts"):
                self.experts.setValue(int(adapter["num_experts"]))
            self.input_size.setValue(int(config["input_size"]))
            self.model_note.setText("Method, HQ, rank, experts and input size come from the current model while "
                                    "training continues from it.")
        else:
            self.model_note.setText("")
        for name in MODEL_FIELDS:
            tip = self.tips[name] + (" (set by the current model)" if config is not None else "")
            getattr(self, name).setToolTip(tip)
        self._method_changed()

    def suggest_input_size(self, image_size: int) -> None:
        """Propose an input size for a checkpoint of ``image_size`` px on the chosen device (unless the current
        model decides it); the tooltip says why."""
        if self.continues():
            return
        size, why = suggested_input_size(image_size, self.resolved_device())
        self.input_size.setValue(size)
        self.suggested_size = size
        self.input_size.setToolTip(f"SAM input (patch) size in pixels; proposed: {why}")
        self.tips["input_size"] = self.input_size.toolTip()
        self.sam_image_size = image_size

    def resolved_device(self) -> str:
        """The device "automatic" means on this machine (as far as the probe has told)."""
        name = self.device_name()
        if name != "auto":
            return name
        return "cuda" if self.cuda_available else "mps" if self.mps_available else "cpu"

    def set_devices(self, available: dict[str, bool], checking: bool = False) -> None:
        """Grey out devices this machine lacks."""
        self.cuda_available = bool(available.get("cuda"))
        self.mps_available = bool(available.get("mps"))
        for index, name in enumerate(DEVICES):
            if name == "auto":
                continue
            ok = bool(available.get(name))
            suffix = " (checking…)" if checking and not ok else "" if ok else " (not available)"
            set_item_enabled(self.device, index, ok, DEVICE_LABELS[name] + suffix)
        self._device_changed()

    def _device_changed(self, *_: Any) -> None:
        if self.sam_image_size and self.input_size.value() == self.suggested_size:  # not chosen by hand
            self.suggest_input_size(self.sam_image_size)
        cuda = self.cuda_available and self.device_name() in ("auto", "cuda")
        for index, name in enumerate(PRECISIONS):
            if name in MIXED_PRECISIONS:
                set_item_enabled(self.precision, index, cuda, name if cuda else f"{name} (CUDA only)")
        if not cuda and self.precision.currentData() in MIXED_PRECISIONS:
            self.precision.setCurrentIndex(0)

    def device_name(self) -> str:
        return self.device.currentData()

    def method_name(self) -> str:
        return self.method.currentData()

    def precision_name(self) -> str:
        return self.precision.currentData()

    def hq_mode(self) -> str:
        return self.hq.currentData()

    def base_has_hq(self, has_hq: bool) -> None:
        """A SAM checkpoint was chosen: with HQ-SAM's parts, HQ is proposed ("SAM + HQ"); without, it goes back to
        off (unless the current model decides it)."""
        if not self.continues():
            self.hq.setCurrentIndex(HQ_MODES.index("sam+hq" if has_hq or self.method_name() == "hq" else "off"))

    def adapter_config(self) -> AdapterConfig:
        """The encoder adapter chosen here (rank and experts only where the method has them)."""
        method = self.method_name()
        options: dict[str, Any] = {} if method in NO_ENCODER_ADAPTER else {"rank": self.rank.value()}
        if method == "conv_lora":
            options["num_experts"] = self.experts.value()
        return AdapterConfig(method=method, **options)


class PairRow(QWidget):
    """One annotated image: an Image layer and the Labels layer painted on it."""

    removed = Signal(object)

    def __init__(self, images, labels, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.image = LayerCombo(images, "(no Image layer)")
        self.labels = LayerCombo(labels, "(no Labels layer)")
        self.image.setToolTip("Image layer to train on")
        self.labels.setToolTip("Labels layer with the annotations of that image")
        remove = QPushButton("✕")
        remove.setFixedWidth(26)
        remove.setToolTip("remove this pair")
        remove.clicked.connect(lambda: self.removed.emit(self))
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.image, 1)
        row.addWidget(self.labels, 1)
        row.addWidget(remove)

    def names(self) -> tuple[str | None, str | None]:
        return self.image.current(), self.labels.current()


class DataForm(QWidget):
    """The annotated images and how to train on them."""

    def __init__(self, image_names, labels_names, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._image_names, self._labels_names = image_names, labels_names
        self.rows: list[PairRow] = []
        self.rows_box = QVBoxLayout()
        self.rows_box.setContentsMargins(0, 0, 0, 0)
        add = QPushButton("+ pair")
        add.setToolTip("train on one more Image + Labels pair")
        add.clicked.connect(lambda: self.add_pair())
        self.label_mode = _combo(LABEL_MODES, LABEL_MODE_LABELS, "how label values are read")
        self.unpainted = _combo(UNPAINTED_PLANES, UNPAINTED_PLANE_LABELS,
                                "in a stack or time series: a plane where nothing is painted is not annotated "
                                "(skipped), or a real negative (all background); sparse modes always skip it")
        self.class_names = QLineEdit()
        self.class_names.setPlaceholderText("optional: background, nucleus, …")
        self.class_names.setToolTip("one name per class, background first, separated by commas")
        self.val_fraction = QDoubleSpinBox()
        self.val_fraction.setRange(0.0, 0.5)
        self.val_fraction.setSingleStep(0.05)
        self.val_fraction.setValue(TrainRecipe().val_fraction)
        self.val_fraction.setToolTip("part of the labelled area held out to measure validation mIoU")
        self.length = _spin(1, 1_000_000, 200, tip="how long to train")
        self.unit = _combo(LENGTH_UNITS, tip="an epoch covers every training image once")
        length = QHBoxLayout()
        length.addWidget(self.length, 1)
        length.addWidget(self.unit)
        form = QFormLayout(self)
        form.addRow(self.rows_box)
        form.addRow("", add)
        form.addRow("Labels", self.label_mode)
        form.addRow("Unpainted planes", self.unpainted)
        form.addRow("Classes", self.class_names)
        form.addRow("Validation", self.val_fraction)
        form.addRow("Train for", length)
        self.options = AdvancedOptions()  # shown in a tab of its own by the dock
        self.add_pair()

    def add_pair(self, image: str | None = None, labels: str | None = None) -> PairRow:
        row = PairRow(self._image_names, self._labels_names)
        row.removed.connect(self.remove_pair)
        self.rows.append(row)
        self.rows_box.addWidget(row)
        row.image.refresh(image)
        row.labels.refresh(labels)
        return row

    def remove_pair(self, row: PairRow) -> None:
        if len(self.rows) > 1:
            self.rows.remove(row)
            row.setParent(None)
            row.deleteLater()

    def refresh(self) -> None:
        for row in self.rows:
            row.image.refresh()
            row.labels.refresh()

    def pairs(self) -> list[tuple[str, str]]:
        """(image name, labels name) of every complete row."""
        return [(i, l) for i, l in (row.names() for row in self.rows) if i and l]

    def names(self) -> tuple[str, ...] | None:
        names = tuple(n.strip() for n in self.class_names.text().split(",") if n.strip())
        return names or None

    def mode(self) -> str:
        return self.label_mode.currentData()

    def recipe_fields(self) -> dict[str, Any]:
        """The :class:`TrainRecipe` fields chosen in this form."""
        length = {"steps": self.length.value()} if self.unit.currentData() == "steps" else \
            {"epochs": float(self.length.value())}
        options = self.options
        return dict(label_mode=self.mode(), unpainted_planes=self.unpainted.currentData(), class_names=self.names(),
                    val_fraction=self.val_fraction.value(),
                    lr=options.lr.value, batch_size=options.batch_size.value, grad_accum=options.grad_accum.value,
                    mask_loss=options.mask_loss.value, multiclass_head=options.multiclass_head.value,
                    detail_head=options.detail_head.value, **length)
