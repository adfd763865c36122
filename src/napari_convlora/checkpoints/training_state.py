"""The resumable part of training, saved next to the model file: ``MODEL.training.pt``; and the run's
validations as a table beside it: ``MODEL.metrics.csv``.

One record of optimizer, scheduler, scaler, step, RNG states, history, the run's :class:`TrainRecipe` and the
model it started from (``started_from``: file name and sha256, or None), so that training resumes exactly as
if never interrupted (on the same kind of device: see BENCHMARKS.md for CUDA). Written atomically, read with
``weights_only=True``. Run options (device, precision, threads) are not saved: a resumed run takes the caller's.
"""

from __future__ import annotations

import csv
import math
import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..config import TrainRecipe, from_record, to_record
from ..config.choices import BEST_SUFFIX, MODEL_SUFFIX, TRAINING_STATE_SUFFIX
from ..errors import CheckpointError, ConfigError
from ..io.atomic import atomic_path
from ..io.safety import unreadable_reason
from ..metrics import selection_score
from .sam_files import refused_as_unsafe

#: Version of the training-state record; version 1 (napari-convlora 0.1.0) did not save the data settings.
STATE_VERSION = 2
_REQUIRED = ("step", "best", "history", "optimizer", "scheduler", "rng", "recipe")
#: Written next to a run's model file: ``run.metrics.csv``, one row per validation.
METRICS_SUFFIX = ".metrics.csv"
#: The instance head's scores in the metrics CSV (keys of a validation's ``"instances"``), each as ``instance_KEY``.
INSTANCE_COLUMNS = ("f1_50", "precision_50", "recall_50", "mean_f1", "foreground", "min_distance")


def trainable_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of ``model`` on the CPU, for the training state: with its own copy of the weights, a state
    is a whole record of its step, whatever happened to the model file after it (a save killed between the two)."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.trainable_state_dict().items()}


def state_path(model_path: str | os.PathLike) -> Path:
    """``run/model.safetensors`` -> ``run/model.training.pt``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(MODEL_SUFFIX) + TRAINING_STATE_SUFFIX)


def best_path(model_path: str | os.PathLike) -> Path:
    """``run/model.safetensors`` -> ``run/model.best.safetensors``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(MODEL_SUFFIX) + BEST_SUFFIX)


def metrics_path(model_path: str | os.PathLike) -> Path:
    """``run/model.safetensors`` -> ``run/model.metrics.csv``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(MODEL_SUFFIX) + METRICS_SUFFIX)


def metrics_table(
    history: Mapping[str, Any], class_names: Sequence[str] | None, class_values: Sequence[int],
    steps_per_epoch: int | None = None,
) -> tuple[list[str], list[list[Any]]]:
    """The header and rows of the metrics CSV, from a run's history (``{"loss": [(step, loss)], "validation":
    [(step, metrics)], "epochs": {step: epoch}}``; ``metrics`` as ``validate`` returns it). A history saved
    without epochs (an older run) takes them from ``steps_per_epoch``.

    Columns: ``step``, ``epoch``, ``train_loss`` (mean of the steps since the previous validation; empty at
    step 0), ``selection_mean_iou`` (mean IoU over the classes present in validation, the score the best model
    is chosen on), ``boundary_iou`` (HQ-SAM's boundary IoU, mean over the foreground classes), then per class
    ``iou_NAME``, ``dice_NAME``, ``boundary_iou_NAME`` (foreground classes only), ``pixels_NAME`` (NAME: the class
    name, else its label value; undefined scores, and boundary scores of runs validated before they existed,
    empty), and ``best``: 1 where that validation was the best so far (saved as the
    ``.best`` file; the last 1 is the model in it), else 0. Step 0 (before fine-tuning) is never the best.
    A run with an instance head adds, before ``best``, its objects' scores (``INSTANCE_COLUMNS``: F1, precision
    and recall at IoU 0.5, mean F1 over IoU 0.5-0.95, and the watershed's setting chosen at that validation).
    """
    names = list(class_names) if class_names and len(class_names) == len(class_values) else \
        [str(v) for v in class_values]
    kinds = [("iou", "dice", "pixels")] + [("iou", "dice", "boundary_iou", "pixels")] * (len(names) - 1)
    header = ["step", "epoch", "train_loss", "selection_mean_iou", "boundary_iou"]
    header += [f"{kind}_{name}" for name, each in zip(names, kinds) for kind in each]
    objects = any("instances" in metrics for _, metrics in history.get("validation", []))
    header += [f"instance_{key}" for key in INSTANCE_COLUMNS] * objects + ["best"]
    losses, epochs = history.get("loss", []), history.get("epochs", {})
    rows, previous, best = [], 0, -math.inf
    for step, metrics in history.get("validation", []):
        since = [loss for s, loss in losses if previous < s <= step]
        score = selection_score(metrics)
        is_best = step > 0 and score > best
        best = score if is_best else best
        epoch = epochs.get(step, step / steps_per_epoch if steps_per_epoch else None)
        boundary = list(metrics.get("per_class_boundary_iou") or []) + [None] * len(names)  # none in older runs
        per_class: list[Any] = []
        for i, scores in enumerate(zip(metrics["per_class_iou"], metrics["per_class_dice"],
                                       metrics["per_class_pixels"])):
            per_class += [*scores[:2], boundary[i], scores[2]] if i else list(scores)
        rows.append([step, _cell(epoch), sum(since) / len(since) if since else "", _cell(score),
                     _cell(metrics.get("boundary_iou")), *[_cell(v) for v in per_class],
                     *[_cell((metrics.get("instances") or {}).get(key)) for key in INSTANCE_COLUMNS * objects],
                     int(is_best)])
        previous = step
    return header, rows


def _cell(value: Any) -> Any:
    """A CSV cell: empty for an undefined value (None, NaN, -inf), else the value (full precision)."""
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def write_metrics_csv(path: str | os.PathLike, history: Mapping[str, Any], class_names: Sequence[str] | None,
                      class_values: Sequence[int], steps_per_epoch: int | None = None) -> Path:
    """Write :func:`metrics_table` as CSV, atomically (a reader never sees half a table)."""
    path = Path(path)
    header, rows = metrics_table(history, class_names, class_values, steps_per_epoch)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def rng_snapshot(rng: np.random.Generator) -> dict[str, Any]:
    """All random states the loop draws from: numpy sampler, torch CPU (and CUDA) generators."""
    snap = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def restore_rng(rng: np.random.Generator, snap: dict[str, Any]) -> None:
    rng.bit_generator.state = snap["numpy"]
    torch.set_rng_state(snap["torch"])
    if "cuda" in snap and torch.cuda.is_available():  # a run saved where more GPUs were visible restores those seen
        torch.cuda.set_rng_state_all(snap["cuda"][: torch.cuda.device_count()])


#: What each kind of run saves as its recipe, and how to resume it (for messages).
RECIPE_KINDS = {"TrainRecipe": "napari-convlora train --resume", "SelfTrainingRecipe": "napari-convlora adapt --resume"}


def save_training_state(path: str | os.PathLike, state: dict[str, Any], recipe: Any) -> Path:
    """Write ``state`` (step, best, history, rng, optimizer, scheduler, scaler) with the run's recipe (a
    :class:`TrainRecipe`, or a ``SelfTrainingRecipe`` for self-training; its kind is saved too)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({**state, "state_version": STATE_VERSION, "recipe": to_record(recipe),
                    "recipe_kind": type(recipe).__name__}, tmp)
    return path


def load_training_state(path: str | os.PathLike, recipe_type: type = TrainRecipe) -> tuple[dict[str, Any], Any]:
    """The saved state and the run's recipe (of ``recipe_type``).

    Raises:
        CheckpointError: no state, an unreadable one, one of another version, one that lacks a part, or the state
            of another kind of run (a self-training run given to supervised training, or the reverse).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path}: no training state to resume from (it is written next to the model file when training saves)"
        )
    reason = unreadable_reason(path)
    if reason:
        raise CheckpointError(f"{path}: {reason}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not refused_as_unsafe(e):
            raise CheckpointError(f"{path}: could not read the training state: the file is damaged") from None
        raise CheckpointError(f"{path}: refused to load: it holds Python objects beyond tensors and numbers, which "
                              "could run code when unpickled; this is not a training state napari-convlora wrote"
                              ) from None
    except Exception as e:  # noqa: BLE001 - any failure means the file is unusable; say which
        raise CheckpointError(f"{path}: could not read the training state ({' '.join(str(e).split())[:300]})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training state (found {type(state).__name__})")
    if state.get("state_version") is None and "train_config" in state:
        raise CheckpointError(
            f"{path}: written by napari-convlora 0.1, which did not save how the data were prepared, so the run "
            "cannot be resumed exactly. Its model file is complete: load it to predict, or start a new run"
        )
    if state.get("state_version") != STATE_VERSION:
        raise CheckpointError(f"{path}: training state version {state.get('state_version')!r} is not supported "
                              f"(this version reads {STATE_VERSION})")
    for key in _REQUIRED:
        if key not in state:
            raise CheckpointError(f"{path}: the training state lacks '{key}'")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: the training state is damaged: its step is {step!r}, not a count of steps")
    kind = state.get("recipe_kind", "TrainRecipe")  # states written before self-training existed are supervised
    if kind != recipe_type.__name__:
        how = RECIPE_KINDS.get(kind, "the tool that wrote it")
        raise CheckpointError(f"{path}: the state of another kind of run ({kind}); resume it with {how}")
    try:
        recipe = from_record(recipe_type, state["recipe"], path.name, "recipe")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return state, recipe
