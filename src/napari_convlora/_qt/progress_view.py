"""What the dock shows while a job runs: a progress bar with ETA, the live loss / mIoU / boundary IoU plot and a log.

Events from the compute thread are recorded as they arrive and drawn together by a paced timer (see
``pacing.py``): each repaint recomposes the whole napari window, which software OpenGL pays for with
CPU taken from training. When no job runs, log lines appear at once.
"""

from __future__ import annotations

from typing import Any, Sequence

from qtpy.QtCore import QTimer, Signal
from qtpy.QtGui import QTextCursor
from qtpy.QtWidgets import QPlainTextEdit, QProgressBar, QVBoxLayout, QWidget

from .._napari import jobs
from ..metrics import format_line
from ..metrics import selection_score
from .metrics_table import MetricsTable
from .pacing import RefreshPacer
from .plot import TrainingPlot


def eta_text(seconds: float | None) -> str:
    """Time left in words: ``"about 40 s left"``, ``"about 12 min left"``, ``"about 3 h 05 min left"``."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"about {max(seconds, 1)} s left"
    minutes = int(round(seconds / 60))
    if minutes < 60:
        return f"about {minutes} min left"
    return f"about {minutes // 60} h {minutes % 60:02d} min left"


def rate_text(steps_per_s: float | None) -> str:
    """Training speed: ``"2.4 steps/s"`` or, for slow steps, ``"38 s/step"``."""
    if not steps_per_s:
        return ""
    return f"{steps_per_s:.1f} steps/s" if steps_per_s >= 0.95 else f"{1 / steps_per_s:.0f} s/step"


#: A run expected to take longer than this (seconds) after its first steps gets a warning with what to change.
LONG_RUN_S = 2 * 3600


class ProgressView(QWidget):
    """Progress bar, training plot, per-class scores of the last validation, and log of the dock.

    ``slow_run(eta_s)`` is emitted once per run when, after its first steps, the run looks like it will take
    longer than ``LONG_RUN_S``."""

    slow_run = Signal(float)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.plot = TrainingPlot()
        self.scores = MetricsTable()
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(300)
        self.log.setMinimumHeight(80)
        self.follow_log = True  # scroll to new log lines (until the user scrolls up to read)
        self.log.verticalScrollBar().actionTriggered.connect(self._log_scrolled)
        column = QVBoxLayout(self)
        column.setContentsMargins(0, 0, 0, 0)
        for part in (self.plot, self.scores, self.log):  # the progress bar is placed by the dock, by its buttons
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
        self.activity: Any = None  # napari's progress in its activity dock, while a job runs
        self.activity_text = "napari-convlora"
        self.warned_slow = False
        self.best: tuple[int, float] | None = None  # (step, selection score) of the best validation of the run
        self.best_file = ""

    # ---- jobs --------------------------------------------------------------------------------
    def start_training(self) -> None:
        self.activity_text = "napari-convlora: training"
        self.progress.setFormat("%v / %m")
        self.tile_progress = jobs.TileProgress()
        self.warned_slow = False
        self.best = None

    def start_prediction(self, text: str = "predicting · %p%") -> jobs.TileProgress:
        """Returns the progress record for the prediction job to fill in; ``text``: the bar's format."""
        self.tile_progress = jobs.TileProgress(text=text)
        first = text.split(" · ")[0]
        self.activity_text = "napari-convlora: " + (first if "%" not in first else "predicting")
        self.progress.setFormat(text)
        return self.tile_progress

    def set_running(self, running: bool) -> None:
        """Draw periodically while a job that reports progress runs; draw once more when it ends."""
        if running and not self.running:
            self.pacer.reset()
            self.timer.start(self.pacer.interval_ms)
            self._open_activity()
        elif not running:
            self.timer.stop()
            self.draw()
            if self.running and self.progress.maximum() > 0:  # no time left to tell once it has ended
                ended = "done" if self.progress.value() >= self.progress.maximum() else "ended"
                training = self.progress.format().startswith(("step", "%v"))
                self.progress.setFormat(f"{ended} · step %v / %m" if training else f"{ended} · %p%")
            self.close_activity()
        self.running = running

    def _open_activity(self) -> None:
        """The same progress in napari's activity dock (``napari.utils.progress``), updated when drawing."""
        from napari.utils import progress

        self.close_activity()
        self.activity = progress(total=0, desc=self.activity_text)

    def close_activity(self, *_: Any) -> None:
        """End the activity dock's entry of the job, if one is open."""
        if self.activity is not None:
            self.activity.close()
            self.activity = None

    def _update_activity(self, done: int, total: int) -> None:
        if self.activity is not None and total > 0:
            if self.activity.total != total:
                self.activity.total = total
            if done != self.activity.n:
                self.activity.update(done - self.activity.n)

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
            self._check_pace(self.last_step)
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
            self.plot.add_boundary_iou(event.step, event.metrics.get("boundary_iou"))
            line = f"step {event.step}: validation {format_line(event.metrics, class_names)}"
            self.say(line + (f" ({event.message})" if event.message else ""))
            if event.message.startswith("best so far"):  # "best so far: saved to <file>"
                self.best = (event.step, selection_score(event.metrics))
                self.best_file = event.message.rsplit(" ", 1)[-1]
                self.plot.mark_best(event.step, event.metrics.get("mean_iou"))
            where = "before fine-tuning" if event.step == 0 else f"at step {event.step}"
            best = f" Best so far: step {self.best[0]}, saved as {self.best_file}." if self.best else ""
            self.scores.show_metrics(event.metrics, class_names, f"Validation {where}.{best}")
        elif event.kind == "note":
            self.say(event.message)
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
            self._update_activity(event.step, self.progress.maximum())
            parts = ["step %v / %m", rate_text(self.steps_per_s(event)), f"loss {event.loss:.4f}", eta_text(event.eta_s)]
            self.progress.setFormat(" · ".join(p for p in parts if p))
        elif self.tile_progress.total:  # prediction
            if self.tile_progress.text and self.progress.format() != self.tile_progress.text:
                self.progress.setFormat(self.tile_progress.text)
            self.progress.setRange(0, self.tile_progress.total)
            self.progress.setValue(self.tile_progress.done)
            self._update_activity(self.tile_progress.done, self.tile_progress.total)
        self.progress.setUpdatesEnabled(True)  # schedules the repaint

    @staticmethod
    def steps_per_s(event: Any) -> float | None:
        """Optimizer steps per second of a step event (its ETA and the steps left give the rate)."""
        left = event.total_steps - event.step
        if event.eta_s and left > 0:
            return left / event.eta_s
        return None

    def _check_pace(self, event: Any) -> None:
        """After a few steps, warn once when the run would take hours."""
        if not self.warned_slow and event.step >= 2 and (event.eta_s or 0) > LONG_RUN_S:
            self.warned_slow = True
            self.slow_run.emit(float(event.eta_s))

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
