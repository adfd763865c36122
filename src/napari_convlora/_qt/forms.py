"""The dock's two forms: which model (files, method, size, device, precision) and which data
(Image + Labels pairs, label mode, classes, validation fraction, how long to train).

Forms only hold choices and hand them out as plain values; the dock widget runs the jobs.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from .fields import LayerCombo, PathField, set_item_enabled

METHODS = {"Conv-LoRA": "conv_lora", "LoRA": "lora", "Decoder only": "decoder"}
DEVICES = {"auto": "auto", "CUDA": "cuda", "MPS": "mps", "CPU": "cpu"}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LABEL_MODES = {
    "dense (0 = background)": "dense",
    "sparse (0 = not annotated)": "sparse",
    "instances (objects vs background)": "instances",
}
SAM_FILTER = "SAM checkpoints (*.pth *.pt *.safetensors);;All files (*)"
MODEL_FILTER = "napari-convlora models (*.safetensors);;All files (*)"


def _spin(low: int, high: int, value: int, step: int = 1, tip: str = "") -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setValue(value)
    box.setToolTip(tip)
    return box


def _combo(items, tip: str = "") -> QComboBox:
    box = QComboBox()
    box.addItems(list(items))
    box.setToolTip(tip)
    return box


class ModelForm(QWidget):
    """Base SAM checkpoint, an optional fine-tuned file, the adapter method and where to run."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.sam = PathField("sam_checkpoint", "Choose a SAM checkpoint", SAM_FILTER, placeholder="SAM checkpoint (.pth)")
        self.finetuned = PathField("finetuned_model", "Choose a saved napari-convlora model", MODEL_FILTER,
                                   placeholder="optional: a saved fine-tuned model")
        self.info = QLabel("")
        self.info.setWordWrap(True)
        self.method = _combo(METHODS, "Conv-LoRA: LoRA with a mixture of multi-scale convolution experts; "
                                      "LoRA: low-rank adapters; Decoder only: the encoder stays frozen")
        self.rank = _spin(1, 64, 3, tip="rank of the low-rank adapters in the encoder")
        self.experts = _spin(1, 16, 8, tip="Conv-LoRA: number of scale experts")
        self.input_size = _spin(64, 2048, 1024, step=64, tip="SAM input (patch) size in pixels; 1024 is SAM's own, "
                                                             "512 or 256 train faster")
        self.device = _combo(DEVICES, "where to compute; unavailable devices are greyed out")
        self.precision = _combo(PRECISIONS, "mixed precision (bf16/fp16) is offered on CUDA only")
        self.method.currentTextChanged.connect(self._method_changed)
        self.device.currentIndexChanged.connect(self._device_changed)
        options = QHBoxLayout()
        for label, box in (("rank", self.rank), ("experts", self.experts)):
            options.addWidget(QLabel(label))
            options.addWidget(box)
        form = QFormLayout(self)
        form.addRow("SAM", self.sam)
        form.addRow("Fine-tuned", self.finetuned)
        form.addRow(self.info)
        form.addRow("Method", self.method)
        form.addRow("", options)
        form.addRow("Input size", self.input_size)
        form.addRow("Device", self.device)
        form.addRow("Precision", self.precision)
        self.set_devices({"cuda": False, "mps": False, "cpu": True}, checking=True)

    def _method_changed(self, text: str) -> None:
        method = METHODS[text]
        self.rank.setEnabled(method != "decoder")
        self.experts.setEnabled(method == "conv_lora")

    def set_devices(self, available: dict[str, bool], checking: bool = False) -> None:
        """Grey out devices this machine lacks."""
        self.cuda_available = bool(available.get("cuda"))
        for index, (label, name) in enumerate(DEVICES.items()):
            if name == "auto":
                continue
            ok = bool(available.get(name))
            suffix = " (checking…)" if checking and not ok else "" if ok else " (not available)"
            set_item_enabled(self.device, index, ok, label + suffix)
        self._device_changed()

    def _device_changed(self, *_: Any) -> None:
        cuda = self.cuda_available and self.device_name() in ("auto", "cuda")
        for index, name in enumerate(PRECISIONS):
            if name in ("bf16", "fp16"):
                set_item_enabled(self.precision, index, cuda, name if cuda else f"{name} (CUDA only)")
        if not cuda and self.precision.currentText() in ("bf16", "fp16"):
            self.precision.setCurrentIndex(0)

    def device_name(self) -> str:
        return list(DEVICES.values())[self.device.currentIndex()]

    def method_name(self) -> str:
        return METHODS[self.method.currentText()]

    def adapter_options(self) -> dict[str, Any]:
        method = self.method_name()
        options: dict[str, Any] = {} if method == "decoder" else {"rank": self.rank.value()}
        if method == "conv_lora":
            options["num_experts"] = self.experts.value()
        return options


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
        self.label_mode = _combo(LABEL_MODES, "how label values are read")
        self.class_names = QLineEdit()
        self.class_names.setPlaceholderText("optional: background, nucleus, …")
        self.class_names.setToolTip("one name per class, background first, separated by commas")
        self.val_fraction = QDoubleSpinBox()
        self.val_fraction.setRange(0.0, 0.5)
        self.val_fraction.setSingleStep(0.05)
        self.val_fraction.setValue(0.1)
        self.val_fraction.setToolTip("part of the labelled area held out to measure validation mIoU")
        self.length = _spin(1, 1_000_000, 200, tip="how long to train")
        self.unit = _combo(("steps", "epochs"), "an epoch covers every training image once")
        length = QHBoxLayout()
        length.addWidget(self.length, 1)
        length.addWidget(self.unit)
        form = QFormLayout(self)
        form.addRow(self.rows_box)
        form.addRow("", add)
        form.addRow("Labels", self.label_mode)
        form.addRow("Classes", self.class_names)
        form.addRow("Validation", self.val_fraction)
        form.addRow("Train for", length)
        self.advanced = QCollapsible("Advanced")
        grid = QWidget()
        layout = QGridLayout(grid)
        layout.setContentsMargins(0, 0, 0, 0)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(6)
        self.lr.setRange(1e-6, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(1e-4)
        self.batch_size = _spin(1, 64, 1, tip="patches per forward pass")
        self.grad_accum = _spin(1, 64, 4, tip="forward passes per optimizer step")
        self.threads = _spin(0, 256, 0, tip="CPU threads for torch (0: torch's default)")
        self.run_folder = PathField("run_folder", "Folder for training runs", directory=True,
                                    placeholder="default: ~/napari-convlora-runs")
        for row, (label, box) in enumerate((("learning rate", self.lr), ("batch size", self.batch_size),
                                            ("accumulate", self.grad_accum), ("CPU threads", self.threads),
                                            ("runs in", self.run_folder))):
            layout.addWidget(QLabel(label), row, 0)
            layout.addWidget(box, row, 1)
        self.advanced.addWidget(grid)
        form.addRow(self.advanced)
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
        return LABEL_MODES[self.label_mode.currentText()]

    def length_kwargs(self) -> dict[str, Any]:
        key = self.unit.currentText()
        return {"steps": self.length.value(), "epochs": None} if key == "steps" else \
            {"steps": None, "epochs": float(self.length.value())}
