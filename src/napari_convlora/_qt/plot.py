"""Live training curves (pyqtgraph): the loss per step above, validation mIoU below (a star on the best) with
HQ-SAM's boundary IoU beside it when the validation has it (named in a legend), on a shared step axis.

Points are appended as events arrive and drawn when the progress view's paced timer calls :meth:`redraw`
(every 0.5-3 s, see pacing.py), together with the progress bar: one repaint of the window instead of many.
"""

from __future__ import annotations

import pyqtgraph as pg
from qtpy.QtWidgets import QWidget


class TrainingPlot(pg.GraphicsLayoutWidget):
    """Loss, validation mIoU and validation boundary IoU against the optimizer step."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setBackground(None)  # the dock's own (napari theme) background
        self.setMinimumHeight(220)
        self.loss_plot = self.addPlot(row=0, col=0)
        self.miou_plot = self.addPlot(row=1, col=0)
        self.loss_plot.setLabel("left", "loss")
        self.miou_plot.setLabel("left", "validation")
        self.miou_plot.setLabel("bottom", "step")
        self.miou_plot.setYRange(0.0, 1.0)
        self.miou_plot.setXLink(self.loss_plot)
        for plot in (self.loss_plot, self.miou_plot):
            for side in ("bottom", "left"):  # an empty plot's axis read "step (x0.001)"
                plot.getAxis(side).enableAutoSIPrefix(False)
            plot.showGrid(x=True, y=True, alpha=0.25)
            plot.setMouseEnabled(x=False, y=False)
            plot.hideButtons()
        self.loss_curve = self.loss_plot.plot(pen=pg.mkPen("#4fc3f7", width=1))
        self.loss_curve.setDownsampling(auto=True, method="peak")  # long runs: ~1 point per pixel drawn
        self.loss_curve.setClipToView(True)
        self.legend = self.miou_plot.addLegend(offset=(-5, -5))  # bottom right, below rising curves
        self.miou_curve = self.miou_plot.plot(
            pen=pg.mkPen("#ffb74d", width=2), symbol="o", symbolSize=5, symbolBrush="#ffb74d", name="mIoU"
        )
        self.boundary_curve = self.miou_plot.plot(  # in the legend from its first point (older runs have none)
            pen=pg.mkPen("#ba68c8", width=2), symbol="t", symbolSize=6, symbolBrush="#ba68c8"
        )
        self.best_marker = pg.ScatterPlotItem(symbol="star", size=14, brush="#fff176", pen=pg.mkPen("#f57f17"))
        self.best_marker.setToolTip("the best validation so far: its model is the run's .best file")
        self.miou_plot.addItem(self.best_marker)
        self.loss_plot.setXRange(0, 1, padding=0.02)
        self.loss_points: tuple[list[float], list[float]] = ([], [])
        self.miou_points: tuple[list[float], list[float]] = ([], [])
        self.boundary_points: tuple[list[float], list[float]] = ([], [])
        self.changed = False

    def set_total_steps(self, total: int) -> None:
        """Fix the step axis to the whole run: the curves grow across it, and a redraw does not
        re-layout the axes (which made each redraw twice as expensive)."""
        self.loss_plot.enableAutoRange(x=False, y=True)
        self.loss_plot.setXRange(0, max(1, total), padding=0.02)

    def clear_curves(self) -> None:
        for xs, ys in (self.loss_points, self.miou_points, self.boundary_points):
            xs.clear()
            ys.clear()
        self.legend.removeItem(self.boundary_curve)
        self.best_marker.setData([], [])
        self.changed = True
        self.redraw()

    def add_loss(self, step: int, loss: float) -> None:
        self.loss_points[0].append(step)
        self.loss_points[1].append(loss)
        self.changed = True

    def add_miou(self, step: int, miou: float | None) -> None:
        if miou is not None:
            self.miou_points[0].append(step)
            self.miou_points[1].append(miou)
            self.changed = True

    def add_boundary_iou(self, step: int, value: float | None) -> None:
        """A validation's boundary IoU (its mean over the foreground classes); None (undefined) adds nothing."""
        if value is None:
            return
        if not self.boundary_points[0]:
            self.legend.addItem(self.boundary_curve, "boundary IoU")
        self.boundary_points[0].append(step)
        self.boundary_points[1].append(value)
        self.changed = True

    def mark_best(self, step: int, miou: float | None) -> None:
        """Put the star on the best validation so far."""
        if miou is not None:
            self.best_marker.setData([step], [miou])
            self.changed = True

    def best_step(self) -> int | None:
        xs, _ = self.best_marker.getData()
        return int(xs[0]) if len(xs) else None

    def redraw(self) -> None:
        """Draw the points added since the last redraw (nothing to do if none)."""
        if not self.changed:
            return
        self.loss_curve.setData(*self.loss_points)
        self.miou_curve.setData(*self.miou_points)
        self.boundary_curve.setData(*self.boundary_points)
        self.changed = False
