"""What a training loop reports: the events that supervised training (``training.loop``) and self-training
(``self_training.loop``) yield alike, and that the dock, the CLI's progress bar and the tests read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainingEvent:
    """What the loop reports. kind: start, step, validation, note (advice in ``message``, e.g. a run that has not
    learned), saved, stopped, finished."""

    kind: str
    step: int
    total_steps: int
    epoch: float = 0.0
    loss: float | None = None
    parts: dict[str, float] = field(default_factory=dict)
    lr: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    metrics: dict[str, Any] | None = None
    path: str | None = None
    message: str = ""
