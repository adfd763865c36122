"""What the dock shows while a job runs: a progress bar with ETA, the live loss / mIoU plot and a log.

Events from the compute thread are recorded as they arrive and drawn together by a paced timer (see
``pacing.py``): each repaint recomposes the whole napari window, which software OpenGL pays for with
CPU taken from training. When no job runs, log lines appear at once.
"""

from __future__ import annotations

from typing import Any, Sequence

from qtpy.QtCore import QTimer
from qtpy.QtGui import QTextCursor
from qtpy.QtWidgets import QPlainTextEdit, QProgressBar, QVBoxLayout, QWidget

from .._napari import jobs
from ..metrics import format_line
from .pacing import RefreshPacer
from .plot import TrainingPlot


def eta_text(seconds: float | None) -> str:
    """``m:ss`` or ``h:mm:ss``; empty when unknown."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class ProgressView(QWidget):
    """Progress bar, training plot and log of the dock."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.plot = TrainingPlot()
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(300)
        self.log.setMinimumHeight(80)
        self.follow_log = True  # scroll to new log lines (until the user scrolls up to read)
        self.log.verticalScrollBar().actionTriggered.connect(self._log_scrolled)
        column = QVBoxLayout(self)
        column.setContentsMargins(0, 0, 0, 0)
        for part in (self.progress, self.plot, self.log):
            column.addWidget(part)
        self.events_seen: list[str] = []  # training event kinds, in order
        self.tile_progress = jobs.TileProgress()  # written by a prediction job, read when drawing
        self.last_step: Any = None  # the latest step event not drawn yet
        self.log_lines: list[str] = []  # log lines not shown yet
        self.pacer = RefreshPacer()
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.timeout.connect(self._tick)
        self.running = False

    # ---- jobs --------------------------------------------------------------------------------
    def start_training(self) -> None:
        self.progress.setFormat("%v / %m")
        self.tile_progress = jobs.TileProgress()

    def start_prediction(self) -> jobs.TileProgress:
        """Returns the progress record for the prediction job to fill in."""
        self.tile_progress = jobs.TileProgress()
        self.progress.setFormat("predicting · %p%")
        return self.tile_progress

    def set_running(self, running: bool) -> None:
        """Draw periodically while a job that reports progress runs; draw once more when it ends."""
        if running and not self.running:
            self.pacer.reset()
            self.timer.start(self.pacer.interval_ms)
        elif not running:
            self.timer.stop()
            self.draw()
        self.running = running

    # ---- recording ---------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """Add a line to the log: at once when idle, with the next redraw while a job runs."""
        self.log_lines.append(text)
        if not self.running:
            self._show_log()

    def show_event(self, event: Any, class_names: Sequence[str] | None = None) -> None:
        """Record a ``TrainingEvent`` or a batch of step events (``jobs.StepBatch``)."""
        if event.kind == "steps":
            for step in event.events:
                self.plot.add_loss(step.step, step.loss)
            self.events_seen.extend(["step"] * len(event.events))
            self.last_step = event.events[-1]
            return
        self.events_seen.append(event.kind)
        if event.kind == "start":
            self.progress.setRange(0, event.total_steps)
            self.progress.setValue(event.step)
            if event.step == 0:
                self.plot.clear_curves()
            self.plot.set_total_steps(event.total_steps)
            self.say(event.message)
        elif event.kind == "validation":
            self.plot.add_miou(event.step, event.metrics.get("mean_iou"))
            line = f"step {event.step}: validation {format_line(event.metrics, class_names)}"
            self.say(line + (f" ({event.message})" if event.message else ""))
        elif event.kind in ("stopped", "finished"):
            self.say(event.message + (" — Resume continues from here" if event.kind == "stopped" else ""))

    # ---- drawing -----------------------------------------------------------------------------
    def _tick(self) -> None:
        self.draw()
        if self.running:
            self.timer.start(self.pacer.tick())

    def draw(self) -> None:
        """Draw the latest progress, curves and log lines in one repaint of the window."""
        self.plot.redraw()
        self._show_log()
        # QProgressBar.setValue repaints at once (a second whole-window composition): let it only
        # schedule its repaint, which joins the plot's
        self.progress.setUpdatesEnabled(False)
        if self.last_step is not None:  # training
            event, self.last_step = self.last_step, None
            self.progress.setValue(event.step)
            self.progress.setFormat(f"step %v / %m · loss {event.loss:.4f} · ETA {eta_text(event.eta_s)}")
        elif self.tile_progress.total:  # prediction
            self.progress.setRange(0, self.tile_progress.total)
            self.progress.setValue(self.tile_progress.done)
        self.progress.setUpdatesEnabled(True)  # schedules the repaint

    def _show_log(self) -> None:
        if not self.log_lines:
            return
        self.log.appendPlainText("\n".join(self.log_lines))
        self.log_lines.clear()
        if self.follow_log:
            self.log.moveCursor(QTextCursor.MoveOperation.End)
            self.log.ensureCursorVisible()

    def _log_scrolled(self, _action: int) -> None:
        """The user moved the log's scroll bar: follow new lines again once back at the end."""
        bar = self.log.verticalScrollBar()
        self.follow_log = bar.sliderPosition() >= bar.maximum()
