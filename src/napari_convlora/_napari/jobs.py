"""The jobs the dock runs on its compute thread: plain generators over the Qt-free core.

Each job gets copies of layer data (never a layer), yields progress, and returns its result; the widget
writes results to layers on the main thread. torch is imported inside the jobs only, so that the main
thread never imports it (an import of torch takes over a second).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Iterator, Sequence

import numpy as np

from ..config import RunOptions, TrainRecipe
from ..config.choices import ADAPTER_FORMAT, SAM_CHECKPOINT_FORMAT
from ..errors import CheckpointError
from ..io.safety import check_outputs_are_not_inputs
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
    """What a model file is: ``info`` from ``checkpoints.model_files.describe``, and the model for fine-tuned files."""

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
    config: dict[str, Any] | None = None  # the model's configuration record (what ``checkpoints.model_files.describe`` shows)
    #: The model Predict uses: the best on validation where the run kept one (else ``model``), and what it is.
    predict_model: Any = None
    predict_note: str = ""


@dataclass
class PredictResult:
    image_name: str
    labels: np.ndarray
    planes: list[int] | None
    class_values: tuple[int, ...]
    class_names: tuple[str, ...] | None
    background_value: int
    instances: np.ndarray | None = None
    #: How the objects were found ("head", "sam_refined" or "components"), when asked for.
    instance_method: str | None = None
    #: Each pixel's uncertainty (uint8, 0 sure to 255 all classes alike, the labels' shape; ``Prediction``).
    uncertainty: np.ndarray | None = None


@dataclass
class EvaluateResult:
    image_name: str
    labels_name: str
    metrics: dict[str, Any]
    class_names: tuple[str, ...] | None


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
    """Prediction progress, written by the compute thread and read by the dock when it redraws: ``done`` of
    ``total`` (tiles; blocks or chunks in block-wise prediction) and ``text``, the progress bar's format (``%v``
    done, ``%m`` total), where the job says what it counts."""

    done: int = 0
    total: int = 0
    text: str = ""

    def __call__(self, done: int, total: int, text: str | None = None) -> None:
        if text is not None:
            self.text = text
        self.done, self.total = done, total


def probe_devices() -> Generator[Message, None, dict[str, bool]]:
    """Import torch (off the GUI thread) and say which devices this machine has."""
    yield Message("checking devices")
    isolate_triton()  # before torch: see native_libs
    from ..devices import available_devices

    return available_devices()


def builtin_checkpoint() -> Generator[Message, None, str]:
    """The built-in small SAM shipped with the package (pretrained here on generated scenes; nothing is downloaded)."""
    from ..checkpoints.builtin import builtin_checkpoint as path, describe_builtin

    yield Message(f"using {describe_builtin()}")
    return str(path())


def load_file(path: str, base: str | None = None) -> Generator[Message, None, LoadedFile]:
    """Describe a SAM checkpoint, or load a fine-tuned file (an adapter needs its ``base`` SAM)."""
    yield Message(f"reading {path}")
    isolate_triton()  # before torch: see native_libs
    from ..checkpoints.model_files import describe, load_model
    from ..checkpoints.training_state import state_path

    info = describe(path)
    if info["format"] == SAM_CHECKPOINT_FORMAT:
        return LoadedFile(path, info)
    if info["format"] == ADAPTER_FORMAT and not base:
        raise CheckpointError(f"{Path(path).name} is an adapter: choose its SAM checkpoint first")
    yield Message("loading the fine-tuned model")
    model = load_model(path, base=base)
    return LoadedFile(path, info, model, resumable=state_path(path).is_file())


def name_layers(message: str, pairs: Sequence[LayerCopy]) -> str:
    """A data-preparation message about ``image N`` said with the names of that pair's layers."""
    for index, pair in enumerate(pairs, start=1):
        prefix = f"image {index}: "
        if message.startswith(prefix):
            return f"'{pair.name}' with '{pair.labels_name}': {message[len(prefix):]}"
    return message


def names_from_layers(pairs: Sequence[LayerCopy], recipe: TrainRecipe) -> tuple[str, ...] | None:
    """Class names for the recipe from the Labels layers' features, when the recipe has none and the layers
    name every class value their labels hold (value modes only: instance ids are not classes)."""
    if recipe.class_names is not None or recipe.label_mode not in ("dense", "sparse"):
        return None
    names: dict[int, str] = {}
    for pair in pairs:
        names.update(pair.class_names or {})
    if not names:
        return None
    from ..data import make_label_encoding

    try:
        encoding = make_label_encoding([p.labels for p in pairs], recipe.label_mode, recipe.background_value)
    except ValueError:  # data preparation reports it, naming the image
        return None
    found = [names.get(int(v)) for v in encoding.class_values]
    if any(n is None for n in found[1:]):
        return None
    return (found[0] or "background", *found[1:])


def train_job(
    base: str,
    pairs: Sequence[LayerCopy],
    recipe: TrainRecipe,
    run: RunOptions,
    out_path: str,
    resume_from: str | None = None,
    init_from: str | None = None,
    stop: threading.Event | None = None,
) -> Generator[Any, None, TrainResult | None]:
    """Resolve the recipe (a resumed run keeps its saved one; a run that continues a model takes what the model
    decides), check and prepare the data with it, then drive ``training.loop.train``; yields Messages and TrainingEvents."""
    isolate_triton()  # before torch: see native_libs
    from ..config import to_record
    from ..data import ImageLayout, TrainingPair, prepare_training_data
    from ..training.loop import init_recipe, resume_recipe, train
    from ..checkpoints.training_state import state_path

    stop = stop or threading.Event()
    if resume_from:
        recipe, set_aside = resume_recipe(resume_from, requested=recipe)
        for line in set_aside:
            yield Message(f"resuming with the run's saved {line}")
    elif init_from:
        recipe, set_aside = init_recipe(init_from, requested=recipe)
        for line in set_aside:
            yield Message(f"continuing {Path(init_from).name} with its {line}")
    yield Message(f"checking {len(pairs)} annotated image(s)")
    named = names_from_layers(pairs, recipe)
    if named is not None:
        recipe = dataclasses.replace(recipe, class_names=named)
        yield Message(f"class names from the Labels layers' features: {', '.join(named)}")
    training = [TrainingPair(p.image, p.labels, ImageLayout(rgb=p.rgb)) for p in pairs]
    try:
        data = prepare_training_data(training, recipe)
    except ValueError as e:  # "image 2: ..." -> the layers the user knows
        raise ValueError(name_layers(str(e), pairs)) from None
    yield Message(f"label values {list(data.encoding.class_values)}; {data.summary()}")
    for line in data.warnings:
        yield Message("warning: " + name_layers(line, pairs))
    if stop.is_set():
        return None
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    kinds: set[str] = set()
    events = train(base, data, out_path, recipe, run, resume_from=resume_from, init_from=init_from, stop=stop)
    model = yield from batch_steps(events, seen=kinds)
    chosen, note = _model_to_predict_with(model, base, out_path)
    return TrainResult(model, out_path, "stopped" in kinds, state_path(out_path).is_file(), to_record(model.config),
                       chosen, note)


def _model_to_predict_with(model: Any, base: str, out_path: str) -> tuple[Any, str]:
    """The best model on validation where the run kept one and it is not the last, else the last; and a line
    saying which one Predict uses."""
    from ..checkpoints.model_files import load_model
    from ..checkpoints.training_state import best_path, load_training_state, state_path

    best = best_path(out_path)
    try:
        state, _ = load_training_state(state_path(out_path))
    except CheckpointError:
        return model, f"Predict uses the last model, {Path(out_path).name}"
    best_step, step = state.get("best_step"), state["step"]
    if best_step is None or best_step == step or not best.is_file():
        return model, f"Predict uses the last model, {Path(out_path).name} (step {step})"
    chosen = load_model(best, base=base)
    return chosen, (f"Predict uses the best model on validation, {best.name} (step {best_step}, mean IoU "
                    f"{100 * state['best']:.1f}%); the last one, {Path(out_path).name} (step {step}), is what "
                    "training continues from")


def predict_job(
    model: Any,
    image: LayerCopy,
    planes: list[int] | None,
    device: str,
    progress: TileProgress,
    stop: threading.Event | None = None,
    instances: bool = False,
    instance_method: str = "auto",
) -> Generator[Message, None, PredictResult | None]:
    """Segment a copied image (all planes, or ``planes``; with ``instances`` also objects, plane by plane, by
    ``instance_method``: ``prediction.planes.predict_image``); None when stopped."""
    isolate_triton()  # before torch: see native_libs
    from ..data import ImageLayout
    from ..prediction.planes import predict_image
    from ..prediction.tiling import PredictionCancelled

    stop = stop or threading.Event()
    where = "the whole image" if planes is None else f"plane {planes[0]}"
    yield Message(f"predicting {where} of '{image.name}'")
    head = model.config.head
    try:
        prediction = predict_image(model, image.image, ImageLayout(rgb=image.rgb), planes=planes, device=device,
                                   progress=progress, should_stop=stop.is_set, instances=instances,
                                   instance_method=instance_method, uncertainty=True)
    except PredictionCancelled:
        return None
    return PredictResult(image.name, prediction.labels, planes, head.class_values, head.class_names,
                         head.background_value, prediction.instances, prediction.instance_method,
                         prediction.uncertainty)


def predict_files_job(
    model: Any,
    paths: Sequence[str],
    out_dir: str,
    device: str,
    progress: TileProgress,
    instances: bool = False,
    stop: threading.Event | None = None,
    instance_method: str = "auto",
) -> Generator[Message, None, str]:
    """Predict image files into ``out_dir``, one log line per file (a file that fails is skipped, the others go
    on); returns the summary line. Stopping ends it between tile batches; finished files are kept."""
    isolate_triton()  # before torch: see native_libs
    from ..prediction.batch import expand_inputs, predict_files, summary

    stop = stop or threading.Event()
    images = expand_inputs(paths)
    yield Message(f"predicting {len(images)} file(s) into {out_dir}")
    started, results = time.perf_counter(), []
    for result in predict_files(model, images, out_dir, device=device, instances=instances, progress=progress,
                                should_stop=stop.is_set, instance_method=instance_method):
        results.append(result)
        yield Message(result.line(model.config.head.class_names))
    line = summary(results, out_dir, time.perf_counter() - started)
    return line + (" (stopped)" if stop.is_set() and len(results) < len(images) else "")


def evaluate_job(model: Any, pair: LayerCopy, labels_name: str, device: str) -> Generator[Message, None, EvaluateResult]:
    """Predict a copied image and score it against its copied Labels (read with the model's label mode); a model of
    instance labels also has its objects scored (``metrics["instances"]``, with the watershed's setting)."""
    isolate_triton()  # before torch: see native_libs
    from ..config.choices import INSTANCE_LABEL_MODES
    from ..data import ImageLayout
    from ..prediction.planes import evaluate_image, evaluate_objects, predict_image

    yield Message(f"evaluating the model on '{pair.name}' against '{labels_name}'")
    layout = ImageLayout(rgb=pair.rgb)
    objects = model.config.head.label_mode in INSTANCE_LABEL_MODES
    prediction = predict_image(model, pair.image, layout, device=device, instances=True) if objects else None
    metrics = evaluate_image(model, pair.image, pair.labels, layout, device=device, prediction=prediction).to_dict()
    if objects:
        setting = model.config.instances
        metrics["instances"] = {**evaluate_objects(model, pair.labels, prediction).as_dict(),
                                "method": prediction.instance_method,
                                "foreground": setting.foreground if setting else None,
                                "min_distance": setting.min_distance if setting else None}
    return EvaluateResult(pair.name, labels_name, metrics, model.config.head.class_names)


def save_job(model: Any, path: str, bundle: bool, base: str | None = None) -> Generator[Message, None, str]:
    """Write the adapter (it names its base SAM checkpoint) or a one-file bundle.

    base: the SAM checkpoint chosen in the dock (may differ from the model's base once another one is chosen).

    Raises:
        ConfigError: before anything is written, when ``path`` is ``base`` or the SAM checkpoint the model was
            built on (see ``checkpoints.model_files.check_not_base_checkpoint``); one line naming the file.
    """
    check_outputs_are_not_inputs({"the file chosen": path}, {"the SAM checkpoint": base})
    yield Message(f"saving {path}")
    isolate_triton()  # before torch: see native_libs
    from ..checkpoints.model_files import save_adapter, save_bundle

    (save_bundle if bundle else save_adapter)(model, path)
    return path


def model_zoo_job(model: Any, path: str, image: LayerCopy | None, plane: int | None) -> Generator[Message, None, str]:
    """Write the model as a BioImage Model Zoo package, its test image cut from ``image`` (else the built-in
    sample); bioimageio.spec checks the package before it is moved into place."""
    yield Message(f"exporting a BioImage Model Zoo package to {path}")
    isolate_triton()  # before torch: see native_libs
    from ..bioimageio.export import export_bioimageio  # refuses a bad path before any work
    from ..data import ImageLayout

    sample = None if image is None else image.image
    layout = None if image is None else ImageLayout(rgb=image.rgb)
    return str(export_bioimageio(model, path, sample, layout, plane=plane))

