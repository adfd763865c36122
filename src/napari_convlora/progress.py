"""A terminal progress bar for training events (tqdm), used by the CLI and the demo."""

from __future__ import annotations

import sys

from .train import TrainingEvent


def format_metrics(metrics: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    per_class = " ".join(pct(v) for v in metrics["per_class_iou"])
    return (f"mIoU {pct(metrics['mean_iou'])}, foreground mIoU {pct(metrics['mean_iou_foreground'])}, "
            f"pixel accuracy {pct(metrics['pixel_accuracy'])}; IoU per class: {per_class}")


class TerminalProgress:
    """Shows a bar with loss, learning rate, speed and ETA; prints validation results and saves."""

    def __init__(self, stream=None):
        self.stream, self.bar = stream or sys.stderr, None

    def show(self, event: TrainingEvent) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=event.total_steps, initial=event.step, unit="step", file=self.stream,
                            dynamic_ncols=True)
        if event.kind == "step":
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", img_s=f"{event.images_per_s:.2f}")
        elif event.kind == "validation":
            self.bar.write(f"validation at step {event.step}: {format_metrics(event.metrics)}"
                           + (f" ({event.message})" if event.message else ""), file=self.stream)
        elif event.message and event.kind != "saved":
            self.bar.write(event.message, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
