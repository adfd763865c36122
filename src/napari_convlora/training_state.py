"""The resumable part of training, saved next to the model file: ``MODEL.training.pt``.

One record of optimizer, scheduler, scaler, step, RNG states, history and the run's :class:`TrainRecipe`,
so that training resumes exactly as if never interrupted (on the same kind of device: see BENCHMARKS.md for
CUDA). Written atomically, read with ``weights_only=True``. Run options (device, precision, threads) are not
saved: a resumed run takes the caller's.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path
from .config import TrainRecipe, from_record, to_record
from .config.choices import BEST_SUFFIX, MODEL_SUFFIX, TRAINING_STATE_SUFFIX
from .errors import CheckpointError, ConfigError
from .safety import unreadable_reason

#: Version of the training-state record; version 1 (napari-convlora 0.1.0) did not save the data settings.
STATE_VERSION = 2
_REQUIRED = ("step", "best", "history", "optimizer", "scheduler", "rng", "recipe")


def state_path(model_path: str | os.PathLike) -> Path:
    """``run/model.safetensors`` -> ``run/model.training.pt``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(MODEL_SUFFIX) + TRAINING_STATE_SUFFIX)


def best_path(model_path: str | os.PathLike) -> Path:
    """``run/model.safetensors`` -> ``run/model.best.safetensors``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(MODEL_SUFFIX) + BEST_SUFFIX)


def rng_snapshot(rng: np.random.Generator) -> dict[str, Any]:
    """All random states the loop draws from: numpy sampler, torch CPU (and CUDA) generators."""
    snap = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def restore_rng(rng: np.random.Generator, snap: dict[str, Any]) -> None:
    rng.bit_generator.state = snap["numpy"]
    torch.set_rng_state(snap["torch"])
    if "cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snap["cuda"])


def save_training_state(path: str | os.PathLike, state: dict[str, Any], recipe: TrainRecipe) -> Path:
    """Write ``state`` (step, best, history, rng, optimizer, scheduler, scaler) with the run's recipe."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({**state, "state_version": STATE_VERSION, "recipe": to_record(recipe)}, tmp)
    return path


def load_training_state(path: str | os.PathLike) -> tuple[dict[str, Any], TrainRecipe]:
    """The saved state and the run's recipe.

    Raises:
        CheckpointError: no state, an unreadable one, one of another version, or one that lacks a part.
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
    except pickle.UnpicklingError:
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
    try:
        recipe = from_record(TrainRecipe, state["recipe"], path.name, "recipe")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return state, recipe
