"""A small table of per-class scores (IoU, Dice, boundary IoU, annotated pixels) of the last validation or
evaluation."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QLabel, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from ..metrics import class_labels

COLUMNS = ("class", "IoU", "Dice", "boundary IoU", "pixels")


def _score(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


class MetricsTable(QWidget):
    """One row per class; a caption above says what was measured (which step, which file is the best)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.caption = QLabel("No validation yet: scores per class appear here during training.")
        self.caption.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.setToolTip("IoU and Dice of each class on the validation pixels (annotated pixels held out "
                              "from training); boundary IoU: the IoU of the bands along the class's edges, as "
                              "HQ-SAM measures it (foreground classes only); pixels: how many validation pixels "
                              "the labels hold of each class")
        column = QVBoxLayout(self)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(self.caption)
        column.addWidget(self.table)
        self.table.setVisible(False)

    def show_metrics(self, metrics: Mapping[str, Any], class_names: Sequence[str] | None, caption: str) -> None:
        """Fill the table from a metrics record (``SegmentationMetrics.to_dict()``)."""
        ious = list(metrics.get("per_class_iou") or [])
        dices = list(metrics.get("per_class_dice") or [])
        pixels = list(metrics.get("per_class_pixels") or [])
        boundary = list(metrics.get("per_class_boundary_iou") or [])
        names = class_labels(class_names, len(ious))
        self.table.setRowCount(len(ious) + 1)
        missing = [None] * len(ious)
        rows = [(name, _score(iou), _score(dice), _score(b), f"{n:,}" if n is not None else "–")
                for name, iou, dice, b, n in zip(names, ious, dices, boundary + missing, pixels + missing)]
        rows.append(("mean", _score(metrics.get("mean_iou")), _score(metrics.get("mean_dice")),
                     _score(metrics.get("boundary_iou")), f"{metrics.get('num_pixels') or 0:,}"))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                item = QTableWidgetItem(text)
                if c:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(r, c, item)
        height = self.table.horizontalHeader().height() + sum(self.table.rowHeight(r) for r in range(len(rows)))
        self.table.setFixedHeight(height + 2 * self.table.frameWidth())
        self.table.setVisible(True)
        objects = metrics.get("instances")
        if objects:  # a model of instance labels: its objects, matched one to one at IoU 0.5
            caption += (f" Objects ({objects.get('method') or 'instances'}): F1@0.5 {_score(objects.get('f1_50'))} "
                        f"(precision {_score(objects.get('precision_50'))}, "
                        f"recall {_score(objects.get('recall_50'))}), "
                        f"mean F1@0.5:0.95 {_score(objects.get('mean_f1'))}, {objects.get('num_predicted')} found / "
                        f"{objects.get('num_true')} true.")
        self.caption.setText(caption)

    def rows(self) -> list[list[str]]:
        """The table's text, row by row (for tests and copying)."""
        return [[self.table.item(r, c).text() for c in range(len(COLUMNS))] for r in range(self.table.rowCount())]
