"""A terminal progress bar for training events (tqdm), used by the CLI and the demo."""

from __future__ import annotations

import sys
from typing import Sequence

from ..metrics import format_line
from ..training.events import TrainingEvent


class TerminalProgress:
    """Shows a bar with loss, learning rate, speed and ETA; prints validation results and saves."""

    def __init__(self, stream=None, class_names: Sequence[str] | None = None):
        self.stream, self.bar, self.class_names = stream or sys.stderr, None, class_names

    def show(self, event: TrainingEvent) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=event.total_steps, initial=event.step, unit="step", file=self.stream,
                            dynamic_ncols=True)
        if event.kind == "step":
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", img_s=f"{event.images_per_s:.2f}")
        elif event.kind == "validation" and "prompt_miou" in (event.metrics or {}):  # self-training (WeSAM)
            self.bar.write(f"validation: {event.message}", file=self.stream)
        elif event.kind == "validation":
            self.bar.write(f"validation at step {event.step}: {format_line(event.metrics, self.class_names)}"
                           + (f" ({event.message})" if event.message else ""), file=self.stream)
        elif event.message and event.kind != "saved":
            self.bar.write(event.message, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TileProgress:
    """A bar of tiles on stderr for one prediction in memory: ``progress(done, total)`` as ``predict_image`` calls
    it. Use it as a context manager, so that the bar is closed before the result lines are printed."""

    def __init__(self, what: str, stream=None) -> None:
        self.what, self.stream, self.bar = what, stream or sys.stderr, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit="tile", desc=self.what, file=self.stream, dynamic_ncols=True)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> TileProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
