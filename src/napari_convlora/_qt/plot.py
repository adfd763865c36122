"""Live training curves (pyqtgraph): the loss per step above, validation mIoU below, on a shared step axis.

Points are appended as events arrive; the curves are redrawn at most a few times a second so that a
fast model does not keep the GUI thread busy with drawing.
"""

from __future__ import annotations

import pyqtgraph as pg
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QWidget

REDRAW_MS = 250


class TrainingPlot(pg.GraphicsLayoutWidget):
    """Loss and validation mIoU against the optimizer step."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setBackground(None)  # the dock's own (napari theme) background
        self.setMinimumHeight(220)
        self.loss_plot = self.addPlot(row=0, col=0)
        self.miou_plot = self.addPlot(row=1, col=0)
        self.loss_plot.setLabel("left", "loss")
        self.miou_plot.setLabel("left", "val mIoU")
        self.miou_plot.setLabel("bottom", "step")
        self.miou_plot.setYRange(0.0, 1.0)
        self.miou_plot.setXLink(self.loss_plot)
        for plot in (self.loss_plot, self.miou_plot):
            plot.showGrid(x=True, y=True, alpha=0.25)
            plot.setMouseEnabled(x=False, y=False)
            plot.hideButtons()
        self.loss_curve = self.loss_plot.plot(pen=pg.mkPen("#4fc3f7", width=1.5))
        self.miou_curve = self.miou_plot.plot(
            pen=pg.mkPen("#ffb74d", width=2), symbol="o", symbolSize=5, symbolBrush="#ffb74d"
        )
        self.loss_points: tuple[list[float], list[float]] = ([], [])
        self.miou_points: tuple[list[float], list[float]] = ([], [])
        self.redraws = 0
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self.redraw)

    def clear_curves(self) -> None:
        for xs, ys in (self.loss_points, self.miou_points):
            xs.clear()
            ys.clear()
        self.redraw()

    def add_loss(self, step: int, loss: float) -> None:
        self.loss_points[0].append(step)
        self.loss_points[1].append(loss)
        self._schedule()

    def add_miou(self, step: int, miou: float | None) -> None:
        if miou is None:
            return
        self.miou_points[0].append(step)
        self.miou_points[1].append(miou)
        self._schedule()

    def _schedule(self) -> None:
        if not self._timer.isActive():
            self._timer.start()

    def redraw(self) -> None:
        self.loss_curve.setData(*self.loss_points)
        self.miou_curve.setData(*self.miou_points)
        self.redraws += 1
