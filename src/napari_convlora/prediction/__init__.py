"""Prediction: planes of a stack (``planes``), tiles of a plane (``tiling``), many files (``batch``) and images
larger than memory (``blockwise``). Public names are imported lazily (torch)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"predict_image": "planes", "predict_tiled": "tiling", "instances_from_labels": "tiling"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
