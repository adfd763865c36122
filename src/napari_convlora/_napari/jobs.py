"""The jobs the dock runs on its compute thread: plain generators over the Qt-free core.

Each job gets copies of layer data (never a layer), yields progress, and returns its result; the widget
writes results to layers on the main thread. torch is imported inside the jobs only, so that the main
thread never imports it (an import of torch takes over a second).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Iterator, Sequence

import numpy as np

from ..config import RunOptions, TrainRecipe
from ..config.choices import ADAPTER_FORMAT, SAM_CHECKPOINT_FORMAT
from ..errors import CheckpointError
from .layers import LayerCopy
from .native_libs import isolate_triton

#: Step events reach the GUI thread in batches, at most this often (seconds).
STEP_BATCH_S = 0.25


@dataclass
class Message:
    """A line for the dock's log."""

    text: str


@dataclass
class LoadedFile:
    """What a model file is: ``info`` from ``files.describe``, and the model for fine-tuned files."""

    path: str
    info: dict[str, Any]
    model: Any = None
    resumable: bool = False


@dataclass
class TrainResult:
    model: Any
    path: str
    stopped: bool
    resumable: bool


@dataclass
class PredictResult:
    image_name: str
    labels: np.ndarray
    planes: list[int] | None
    class_values: tuple[int, ...]
    class_names: tuple[str, ...] | None
    background_value: int


@dataclass
class StepBatch:
    """Consecutive ``step`` training events, handed to the GUI thread together."""

    events: list[Any]
    kind: str = "steps"


def batch_steps(
    events: Iterator[Any], interval_s: float = STEP_BATCH_S, seen: set[str] | None = None
) -> Generator[Any, None, Any]:
    """Pass training ``events`` through, but gather ``step`` events into one :class:`StepBatch` per
    ``interval_s``: a fast model makes dozens of steps a second, and each event handed to the GUI
    thread costs it (and, on 2 CPUs, the training) time. Adds the event kinds to ``seen``; returns
    what ``events`` returns."""
    batch: list[Any] = []
    last = time.perf_counter()
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            if batch:
                yield StepBatch(batch)
            return done.value
        if seen is not None:
            seen.add(event.kind)
        if event.kind == "step":
            batch.append(event)
            if time.perf_counter() - last < interval_s:
                continue
            event = None
        if batch:
            yield StepBatch(batch)
            batch, last = [], time.perf_counter()
        if event is not None:
            yield event


@dataclass
class TileProgress:
    """Prediction progress in tiles, written by the compute thread and read by the dock when it redraws."""

    done: int = 0
    total: int = 0

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total


def probe_devices() -> Generator[Message, None, dict[str, bool]]:
    """Import torch (off the GUI thread) and say which devices this machine has."""
    yield Message("checking devices")
    isolate_triton()  # before torch: see native_libs
    from ..devices import available_devices

    return available_devices()


def load_file(path: str, base: str | None = None) -> Generator[Message, None, LoadedFile]:
    """Describe a SAM checkpoint, or load a fine-tuned file (an adapter needs its ``base`` SAM)."""
    yield Message(f"reading {path}")
    isolate_triton()  # before torch: see native_libs
    from ..files import describe, load_model
    from ..training_state import state_path

    info = describe(path)
    if info["format"] == SAM_CHECKPOINT_FORMAT:
        return LoadedFile(path, info)
    if info["format"] == ADAPTER_FORMAT and not base:
        raise CheckpointError(f"{Path(path).name} is an adapter: choose its SAM checkpoint first")
    yield Message("loading the fine-tuned model")
    model = load_model(path, base=base)
    return LoadedFile(path, info, model, resumable=state_path(path).is_file())


def train_job(
    base: str,
    pairs: Sequence[LayerCopy],
    recipe: TrainRecipe,
    run: RunOptions,
    out_path: str,
    resume_from: str | None = None,
    stop: threading.Event | None = None,
) -> Generator[Any, None, TrainResult | None]:
    """Resolve the recipe (a resumed run keeps its saved one), check and prepare the data with it, then drive
    ``train.train``; yields Messages and TrainingEvents."""
    isolate_triton()  # before torch: see native_libs
    from ..data import ImageLayout, TrainingPair, prepare_training_data
    from ..train import resume_recipe, train
    from ..training_state import state_path

    stop = stop or threading.Event()
    if resume_from:
        recipe, set_aside = resume_recipe(resume_from, requested=recipe)
        for line in set_aside:
            yield Message(f"resuming with the run's saved {line}")
    yield Message(f"checking {len(pairs)} annotated image(s)")
    training = [TrainingPair(p.image, p.labels, ImageLayout(rgb=p.rgb)) for p in pairs]
    data = prepare_training_data(training, recipe)
    yield Message(f"label values {list(data.encoding.class_values)}; {data.summary()}")
    if stop.is_set():
        return None
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    kinds: set[str] = set()
    events = train(base, data, out_path, recipe, run, resume_from=resume_from, stop=stop)
    model = yield from batch_steps(events, seen=kinds)
    return TrainResult(model, out_path, "stopped" in kinds, state_path(out_path).is_file())


def predict_job(
    model: Any,
    image: LayerCopy,
    planes: list[int] | None,
    device: str,
    progress: TileProgress,
    stop: threading.Event | None = None,
) -> Generator[Message, None, PredictResult | None]:
    """Segment a copied image (all planes, or ``planes``); None when stopped."""
    isolate_triton()  # before torch: see native_libs
    from ..data import ImageLayout
    from ..predict import predict_image
    from ..tiling import PredictionCancelled

    stop = stop or threading.Event()
    where = "the whole image" if planes is None else f"plane {planes[0]}"
    yield Message(f"predicting {where} of '{image.name}'")
    head = model.config.head
    try:
        prediction = predict_image(model, image.image, ImageLayout(rgb=image.rgb), planes=planes, device=device,
                                   progress=progress, should_stop=stop.is_set)
    except PredictionCancelled:
        return None
    return PredictResult(image.name, prediction.labels, planes, head.class_values, head.class_names,
                         head.background_value)


def save_job(model: Any, path: str, bundle: bool) -> Generator[Message, None, str]:
    """Write the adapter (it names its base SAM checkpoint) or a one-file bundle."""
    yield Message(f"saving {path}")
    isolate_triton()  # before torch: see native_libs
    from ..files import save_adapter, save_bundle

    (save_bundle if bundle else save_adapter)(model, path)
    return path
