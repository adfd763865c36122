"""napari-convlora: fine-tune SAM with Conv-LoRA on napari annotations and predict multi-class labels.

The public core API is imported lazily, so that ``import napari_convlora`` (for example when napari
reads the plugin manifest) does not import torch; the configuration tree (``napari_convlora.config``)
never imports it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"

_EXPORTS = {
    "load_sam": "checkpoints.sam_files",
    "load_base": "checkpoints.sam_files",
    "BaseSam": "modeling",
    "tiny_sam_checkpoint": "checkpoints.sam_files",
    "tiny_hq_checkpoint": "checkpoints.sam_files",
    "random_sam": "checkpoints.sam_files",
    "random_base": "checkpoints.sam_files",
    "save_sam_checkpoint": "checkpoints.sam_files",
    "AdaptedSAM": "modeling",
    "SamArchitecture": "config",
    "ModelConfig": "config",
    "AdapterConfig": "config",
    "HeadConfig": "config",
    "InputSpec": "config",
    "TrainRecipe": "config",
    "RunOptions": "config",
    "recipe_for": "training.recipes",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "TrainingError": "errors",
    "save_adapter": "checkpoints.model_files",
    "save_bundle": "checkpoints.model_files",
    "load_model": "checkpoints.model_files",
    "describe": "checkpoints.model_files",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
