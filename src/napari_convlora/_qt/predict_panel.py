"""The dock's Predict section: which image, what to write, copying into the training labels, evaluating,
saving, and a legend of what the last prediction holds. Widgets only; the dock widget runs the jobs."""

from __future__ import annotations

import html
from typing import Mapping, Sequence

from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QGridLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
                            QPushButton, QVBoxLayout, QWidget)

from ..config.choices import INSTANCE_METHOD_LABELS, INSTANCE_METHODS
from .._napari.layers import LARGE_BYTES
from .._napari.layers import COPY_MODES
from .fields import LayerCombo, settings

COPY_MODE_LABELS = {"unpainted": "fill unpainted pixels only", "all": "replace painted pixels too"}


def _button(text: str, tip: str) -> QPushButton:
    button = QPushButton(text)
    button.setToolTip(tip)
    return button


def legend_html(counts: Mapping[int, int], names: Sequence[str], colours: Mapping[int, str], background: int) -> str:
    """A coloured square, the class name and its pixel count for each class; absent classes say so."""
    total = max(sum(counts.values()), 1)
    rows = []
    for (value, count), name in zip(counts.items(), names):
        colour = "transparent" if value == background else colours.get(value, "#888888")
        square = f'<span style="color:{colour}">■</span>' if value != background else "□"
        share = f"{100 * count / total:.1f}%"
        absent = ' <b style="color:#ff8a65">absent</b>' if count == 0 else ""
        rows.append(f"{square} {html.escape(name)}: {count:,} px ({share}){absent}")
    return "<br>".join(rows)


STORE_TIP = (
    "where Predict writes an image held lazily (dask or Zarr data, a multiscale layer: its level 0, the full "
    f"resolution; or an image over {LARGE_BYTES / 2**30:.0f} GiB): block by block, never loading it whole, into a "
    "new Zarr store <name>.zarr (instances into <name>-instances.zarr) that a Labels layer then reads lazily; "
    "painting on that layer writes into the store. A store that exists is never overwritten; the store appears "
    "only when complete, so Stop or an error leaves nothing under its name. Empty: a temporary store under the "
    "system's temporary folder, deleted when napari closes (the log says where; copy it to keep it; where the "
    "temporary folder lives in memory, choose a store on disk). Images held in memory ignore this field."
)


class StoreField(QWidget):
    """The Zarr store for predictions of large images: a text box and a save dialog; empty means temporary."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.edit = QLineEdit()
        self.edit.setPlaceholderText("(a temporary Zarr store)")
        self.edit.setToolTip(STORE_TIP)
        self.button = _button("…", "choose the Zarr store (a new <name>.zarr) for predictions of large images")
        self.button.setFixedWidth(30)
        self.button.clicked.connect(self.browse)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        label = QLabel("large images to")
        label.setToolTip(STORE_TIP)
        row.addWidget(label)
        row.addWidget(self.edit, 1)
        row.addWidget(self.button)

    def path(self) -> str:
        return self.edit.text().strip()

    def browse(self) -> None:
        start = self.path() or str(settings().value("last_folder", ""))
        path, _ = QFileDialog.getSaveFileName(self, "Zarr store for the prediction", start, "Zarr stores (*.zarr)")
        if path:
            self.edit.setText(path if path.rstrip("/").lower().endswith(".zarr") else path + ".zarr")


class PredictPanel(QGroupBox):
    """Predict, Predict files…, Suggest where to label, Copy to training labels (with how), Evaluate, Save, Export
    and Model Zoo export."""

    def __init__(self, images, labels, parent: QWidget | None = None) -> None:
        super().__init__("Predict", parent)
        self.image = LayerCombo(images, "(no Image layer)")
        self.image.setToolTip("the Image layer to segment with the current model")
        self.whole_stack = QCheckBox("whole stack")
        self.whole_stack.setToolTip("predict every plane of a stack (else only the plane shown)")
        self.instances = QCheckBox("instances")
        self.instances.setToolTip("also write a Labels layer of objects, numbered plane by plane in stacks, found "
                                  "as the menu beside says")
        self.instance_method = QComboBox()
        for name in INSTANCE_METHODS:
            self.instance_method.addItem(INSTANCE_METHOD_LABELS[name], name)
        self.instance_method.setToolTip("how objects are found: the model's instance head (trained from instance "
                                        "labels: touching objects apart), the head's objects refined by SAM's "
                                        "prompts, connected components of each class, segment everything (SAM's "
                                        "grid of point prompts: no instance labels needed), or auto (the head when "
                                        "the model has one)")
        self.instance_method.setEnabled(False)
        self.instances.toggled.connect(self.instance_method.setEnabled)
        self.predict = _button("Predict", "segment the chosen image with the current model; writes '<image> "
                                          "prediction' (and '<image> instances'); an image held lazily (dask, "
                                          "Zarr, multiscale) block by block into a Zarr store (see 'large "
                                          "images to')")
        self.store = StoreField()
        self.suggest = _button("Suggest where to label", "mark the few regions of the plane shown where the last "
                                                         "prediction of the chosen image is least sure (its "
                                                         "'<image> uncertainty' layer) and nothing is labelled yet: "
                                                         "a Points layer '<image> suggestions'; label there, train "
                                                         "again")
        self.predict_files = _button("Predict files…", "segment image files (TIFF, PNG, …) without opening them: "
                                                       "choose the files, then a folder for the label images")
        self.copy = _button("Copy to training labels", "copy the prediction into the Labels layer paired with "
                                                       "this image under Training data, to correct it; Ctrl+Z in "
                                                       "that layer undoes the copy")
        self.copy_mode = QCheckBox(COPY_MODE_LABELS["all"])
        self.copy_mode.setToolTip("off: only pixels nobody painted are filled (what you painted stays); on: the "
                                  "predicted planes become the prediction (you are asked first). In dense and "
                                  "instances label modes 0 is painted background: whenever a painted pixel would "
                                  "change, you are asked first (with the count), on or off")
        self.evaluate_labels = LayerCombo(labels, "(no Labels layer)")
        self.evaluate_labels.setToolTip("Labels layer with the true classes of the chosen image")
        self.evaluate = _button("Evaluate", "predict the chosen image and score it (IoU, Dice per class) against "
                                            "the chosen Labels layer")
        self.save = _button("Save adapter…", "only the trained tensors (small); loading it needs the same SAM "
                                             "checkpoint")
        self.export = _button("Export bundle…", "one self-contained file: the SAM checkpoint, adapters and head "
                                                "side by side, to share or to load without the checkpoint")
        self.model_zoo = _button("Export for Model Zoo…", "a BioImage Model Zoo package (.zip): the model as "
                                                          "PyTorch weights with its architecture, a test image cut "
                                                          "from the chosen image, a cover and a README; tools built "
                                                          "on bioimageio.core run it in an environment with "
                                                          "napari-convlora (as its environment file says); needs "
                                                          "the 'bioimageio' extra")
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        self.legend.setToolTip("pixels of each class in the last prediction")

        top = QHBoxLayout()
        top.addWidget(self.image, 1)
        top.addWidget(self.whole_stack)
        top.addWidget(self.instances)
        top.addWidget(self.instance_method)
        grid = QGridLayout()
        grid.addWidget(self.predict, 0, 0)
        grid.addWidget(self.predict_files, 0, 1)
        grid.addWidget(self.suggest, 1, 0, 1, 2)
        grid.addWidget(self.copy, 2, 0)
        grid.addWidget(self.copy_mode, 2, 1)
        grid.addWidget(self.evaluate_labels, 3, 0)
        grid.addWidget(self.evaluate, 3, 1)
        grid.addWidget(self.save, 4, 0)
        grid.addWidget(self.export, 4, 1)
        grid.addWidget(self.model_zoo, 5, 0, 1, 2)
        column = QVBoxLayout(self)
        column.addLayout(top)
        column.addWidget(self.store)
        column.addLayout(grid)
        column.addWidget(self.legend)

    def copy_mode_name(self) -> str:
        return COPY_MODES[1] if self.copy_mode.isChecked() else COPY_MODES[0]

    def refresh(self) -> None:
        self.image.refresh()
        self.evaluate_labels.refresh()

    def show_counts(self, layer_name: str, counts: Mapping[int, int], names: Sequence[str], colours: Mapping[int, str],
                    background: int) -> None:
        self.legend.setText(f"<b>{html.escape(layer_name)}</b><br>"
                            + legend_html(counts, names, colours, background))
