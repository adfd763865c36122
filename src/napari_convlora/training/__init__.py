"""Supervised training: the loop (``loop.train``), the step both loops share (``step``), its events (``events``),
where a run starts (``run_start``), its notes and finite checks (``notes``), several processes
(``data_parallel``), recipes that follow the base (``recipes``) and the losses (``losses``). Public names are imported lazily (torch)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"train": "loop", "validate": "loop", "TrainingEvent": "events", "init_recipe": "run_start",
            "resume_recipe": "run_start", "recipe_for": "recipes"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
