"""The resumable part of training, saved next to the model file: ``MODEL.training.pt``.

One record of optimizer, scheduler, scaler, step, RNG states, history and configs, so that
training resumes exactly as if never interrupted. Written atomically, read with weights_only=True.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path
from .sam_architecture import CheckpointError


def state_path(model_path: str | os.PathLike) -> Path:
    """``run/model.safetensors`` -> ``run/model.training.pt``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(".safetensors") + ".training.pt")


def best_path(model_path: str | os.PathLike) -> Path:
    """``run/model.safetensors`` -> ``run/model.best.safetensors``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(".safetensors") + ".best.safetensors")


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


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no training state to resume from (it is written next to the model file when training saves)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is unusable; say which
        raise CheckpointError(f"{path}: could not read the training state ({e})") from e
    for key in ("step", "optimizer", "scheduler", "rng", "train_config"):
        if key not in state:
            raise CheckpointError(f"{path}: the training state lacks '{key}'")
    return state
