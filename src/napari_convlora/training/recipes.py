"""Recipes that follow the base model: the input size and learning rate a run gets when the caller does not set
them, the same for the command line, the dock and the API (``napari_convlora.recipe_for``).

The rules live in ``config.suggestions`` (no torch); this module reads the facts they need from the checkpoint
(its own input size and its parameter count) and resolves the device.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import TrainRecipe
from ..config.suggestions import suggested_input_size, suggested_lr
from ..errors import CheckpointError

#: The recipe fields that follow the base when not given.
BASE_FIELDS = ("input_size", "lr")


def base_facts(checkpoint: str | os.PathLike | None) -> tuple[int, int]:
    """(its own input size in px, its parameter count) of a SAM checkpoint, a path or ``"builtin"``.

    Raises:
        CheckpointError: the file is not a SAM checkpoint this package reads.
    """
    from ..checkpoints.builtin import resolve_base
    from ..checkpoints.model_files import describe

    path = resolve_base(checkpoint)
    info = describe(path)
    if "architecture" not in info or "image_size" not in (info["architecture"] or {}):
        raise CheckpointError(f"{path}: not a SAM checkpoint (a base for training is a SAM .pth file, or 'builtin')")
    return int(info["architecture"]["image_size"]), int(info["parameters"])


def base_defaults(checkpoint: str | os.PathLike | None, device: str = "auto",
                  self_training: bool = False) -> dict[str, tuple[Any, str]]:
    """``{"input_size": (256, why), "lr": (1e-3, why)}``: what a run on ``checkpoint`` gets on ``device`` (``"auto"``
    resolves as training would) when the caller leaves those fields out (``self_training``: for WeSAM's)."""
    from ..devices import resolve_device

    image_size, parameters = base_facts(checkpoint)
    kind = resolve_device(device).type
    return {"input_size": suggested_input_size(image_size, kind), "lr": suggested_lr(parameters, self_training)}


def recipe_for(checkpoint: str | os.PathLike | None = "builtin", device: str = "auto",
               **fields: Any) -> TrainRecipe:
    """A :class:`TrainRecipe` for fine-tuning ``checkpoint`` (a SAM file, or ``"builtin"``) on ``device``: its input
    size and learning rate follow the base (:func:`base_defaults`) unless given in ``fields``, which win; every other
    field is the recipe's default or the one given.

    Example: ``recipe_for("builtin", steps=300, class_names=("background", "nucleus"))``.
    """
    return recipe_with(base_defaults(checkpoint, device), **fields)


def recipe_with(defaults: dict[str, tuple[Any, str]], **fields: Any) -> TrainRecipe:
    """:func:`recipe_for` from the base's :func:`base_defaults`, read once by a caller that also reports them."""
    return TrainRecipe(**{name: value for name, (value, _) in defaults.items() if name not in fields}, **fields)


def defaults_notes(defaults: dict[str, tuple[Any, str]], given: dict[str, Any], options: dict[str, str]) -> list[str]:
    """One line per base-dependent field of ``defaults`` (:func:`base_defaults`): the value the run uses and why, or
    that the user's value wins over the base's (``given``: field -> value set by the user, or None; ``options``:
    field -> how the user sets it)."""
    notes = []
    for name, (value, why) in defaults.items():
        label = name.replace("_", " ") if name != "lr" else "learning rate"
        if given.get(name) is None:
            notes.append(f"{label} {why} (set {options[name]} to change it)")
        elif given[name] != value:
            notes.append(f"{label} {given[name]:g} ({options[name]}; the base's default would be {value:g})")
    return notes
