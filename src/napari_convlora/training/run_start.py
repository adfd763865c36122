"""Where a training run starts, and the checks that what it starts from agrees with what it is given.

A run starts from the base SAM (fresh adapters and head), continues a stopped or finished run exactly
(``resume_from``: its saved recipe, optimizer and step), or starts anew from a trained model (``init_from``:
step 0, a new optimizer and schedule, the model's adapter and head weights). Resolve, then prepare: callers
read the recipe first (:func:`resume_recipe`, :func:`init_recipe`), prepare the data with it, then train.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.model_files import load_model, model_config, read_record
from ..checkpoints.training_state import load_training_state, state_path
from ..config import DATA_FIELDS, ModelConfig, TrainRecipe
from ..config.choices import MODEL_SUFFIX
from ..config.instances import InstanceConfig
from ..data import LabelEncoding, PreparedData
from ..errors import CheckpointError, TrainingError
from ..io.atomic import sha256_file
from ..modeling import AdaptedSAM, BaseSam

#: What may change when a run is resumed: how long it trains (a finished run can be continued for longer; the
#: learning rate then decays over the new length).
LENGTH_FIELDS = ("steps", "epochs")

#: The recipe fields a trained model decides: a run started from it (``init_from``) takes them from the model.
MODEL_FIELDS = ("adapter", "input_size", "input", "label_mode", "background_value", "class_names",
                "num_mask_tokens", "hq", "multiclass_head", "instance_head", "detail_head")


def resume_recipe(resume_from: str | Path, requested: TrainRecipe | None = None) -> tuple[TrainRecipe, list[str]]:
    """The recipe of the run saved at ``resume_from``, and what differs from the ``requested`` one.

    A resumed run continues exactly as it started, so its saved recipe wins; the returned lines say which of
    the caller's settings were set aside (``"input_size: 512 asked, 256 saved"``), for the caller to show.
    """
    _, saved = load_training_state(state_path(resume_from))
    return saved, [] if requested is None else requested.differences(saved, "asked", "saved")


def saved_model_config(path: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` recorded in an adapter or bundle file, read without loading its tensors.

    Raises:
        CheckpointError: no such file, or not a ``.safetensors`` file written by napari-convlora.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    record = read_record(path) if path.suffix == MODEL_SUFFIX else None
    if record is None:
        raise CheckpointError(f"{path}: not a model written by napari-convlora (an adapter or bundle "
                              f"{MODEL_SUFFIX} file); to start from a SAM checkpoint, give it as the base")
    return model_config(record, path)


def init_recipe(init_from: str | Path, requested: TrainRecipe | None = None) -> tuple[TrainRecipe, list[str]]:
    """The recipe of a new run that starts from the trained model ``init_from``, and what was set aside.

    The model decides the fields of :data:`MODEL_FIELDS` (adapter method and hyper-parameters, input size,
    input spec, label mode, background value, class names, mask tokens, HQ mode, multi-class head, instance head,
    detail head):
    they are taken from it, because its weights only fit them. Everything else (length, learning rate, batch, validation split, augmentation, seed)
    is the caller's, from ``requested`` (default: :class:`TrainRecipe` defaults). The returned lines say which
    requested values were set aside (``"input_size: 512 asked, 256 in the model"``); a field left at None
    (background value, class names, mask tokens: "the default") is no request and is not reported.

    Raises:
        CheckpointError: ``init_from`` is not a model file written by napari-convlora.
    """
    config = saved_model_config(init_from)
    if config.promptable is not None:
        raise CheckpointError(f"{init_from}: adapted to segment prompts (WeSAM self-training): its prompt-free head "
                              "was never trained, so supervised training cannot continue it; start from the base SAM")
    head = config.head
    resolved = dataclasses.replace(
        requested or TrainRecipe(), adapter=config.adapter, input_size=config.input_size, input=config.input,
        label_mode=head.label_mode, background_value=head.background_value, class_names=head.class_names,
        num_mask_tokens=head.num_mask_tokens, hq=head.hq, multiclass_head=head.multiclass,
        instance_head="on" if config.instances is not None else "off", detail_head="on" if head.detail else "off")
    if requested is None:
        return resolved, []
    asked = [f for f in MODEL_FIELDS if getattr(requested, f) is not None
             and not (f in ("instance_head", "detail_head") and getattr(requested, f) == "auto")]  # "auto" asks for nothing
    return resolved, requested.differences(resolved, "asked", "in the model", tuple(asked))


def check_recipe(data: PreparedData, recipe: TrainRecipe, resume_from: Path | None, saved: TrainRecipe | None,
                 init_from: Path | None) -> None:
    """Before any work: a resumed run keeps its saved recipe (but its length), a run started from a model
    takes the model's fields, and the data were prepared for the recipe that trains."""
    if saved is not None and dataclasses.replace(recipe, **{f: getattr(saved, f) for f in LENGTH_FIELDS}) != saved:
        differences = "; ".join(recipe.differences(saved, "asked", "saved"))
        raise TrainingError(
            f"{resume_from}: this run was started with another recipe ({differences}); resume it with its saved "
            "recipe (train.resume_recipe) and data prepared with that recipe"
        )
    if init_from is not None:
        _check_class_values(saved_model_config(init_from).head.class_values, data.encoding)
        resolved, conflicts = init_recipe(init_from, recipe)
        if resolved != recipe:  # the conflicts, else the fields left at None that the model sets
            differences = "; ".join(conflicts or recipe.differences(resolved, "asked", "in the model", MODEL_FIELDS))
            raise TrainingError(
                f"{init_from}: the recipe does not fit the model to start from ({differences}); take the model's "
                "settings (train.init_recipe) and prepare the data with that recipe"
            )
    mismatch = recipe.differences(data.recipe, "to train", "in the data", DATA_FIELDS)
    if mismatch:
        raise TrainingError(
            f"the data were prepared for another recipe ({'; '.join(mismatch)}): prepare them with the recipe "
            "that trains (prepare_training_data(pairs, recipe))"
        )


def _check_class_values(trained: tuple[int, ...], encoding: LabelEncoding) -> None:
    """The labels must hold the label values the model was trained on (its head has one output per class)."""
    if tuple(trained) != tuple(encoding.class_values):
        why = ("a new class needs a new training run" if set(encoding.class_values) - set(trained) else
               "paint every class of the model somewhere (the classes are the label values painted)")
        raise TrainingError(f"the model was trained on label values {list(trained)} but the labels now hold "
                            f"{list(encoding.class_values)}; {why}")


def _differing_fields(found: ModelConfig, expected: ModelConfig) -> list[str]:
    """The fields in which two model configs differ, but for the base checkpoint, the instance head's
    post-processing (chosen on validation as a run goes; only whether there is an instance head counts) and
    whether a detail head has its context pyramid (``HeadConfig.detail_context``: a model saved before the
    pyramid keeps its own detail head when a run resumes it or starts from it; its weights decide)."""
    found, expected = (dataclasses.replace(c, base_checkpoint=None,
                                           instances=None if c.instances is None else InstanceConfig(),
                                           head=dataclasses.replace(c.head, detail_context=False))
                       for c in (found, expected))
    return [f.name for f in dataclasses.fields(found) if getattr(found, f.name) != getattr(expected, f.name)]


def load_resumed_model(resume_from: Path, state: dict[str, Any], base: BaseSam, expected: ModelConfig,
                       encoding: LabelEncoding) -> AdaptedSAM:
    """The model of the run being resumed, checked against its training state, the base and the labels.

    The weights are the training state's own copy when it holds one (since 0.3), so that a run killed between
    writing its model file and its state resumes exactly from the state's step; otherwise the model file's, which
    must then come from the same save."""
    own = state.get("trainable")
    if own is None:
        _check_pair(resume_from, state)
    model = load_model(resume_from, base=base)
    if own is not None:
        restore_trainable(model, own, resume_from)
    _check_class_values(model.config.head.class_values, encoding)
    differ = _differing_fields(model.config, expected)
    if differ:
        raise TrainingError(
            f"{resume_from}: the model file and its training state ({state_path(resume_from).name}) describe "
            f"different models (they differ in {differ}); was one of them replaced?"
        )
    return model


def load_initial_model(init_from: Path, base: BaseSam, expected: ModelConfig, encoding: LabelEncoding
                       ) -> AdaptedSAM:
    """The trained model a new run starts from (adapter file on ``base``, or bundle), checked against the base
    and the labels. A bundle must have been trained on ``base`` too: the new run saves an adapter on it."""
    model = load_model(init_from, base=base)  # an adapter file: refuses another base (sha256)
    trained_on = model.config.base_checkpoint
    if trained_on is None or trained_on.sha256 != base.checkpoint.sha256:
        was = f"'{trained_on.file_name}' (sha256 {trained_on.sha256[:12]}...)" if trained_on else \
            "a SAM built in memory (no checkpoint file)"
        raise CheckpointError(
            f"{init_from}: was trained on {was} but the base is '{base.checkpoint.file_name}' (sha256 "
            f"{base.checkpoint.sha256[:12]}...); give the base checkpoint the model was trained on"
        )
    model.config = dataclasses.replace(model.config, base_checkpoint=base.checkpoint)
    _check_class_values(model.config.head.class_values, encoding)
    differ = _differing_fields(model.config, expected)
    if differ:
        raise TrainingError(f"{init_from}: the model differs from the one this recipe trains (in {differ}); take "
                            "its settings with train.init_recipe")
    return model


def restore_trainable(model: AdaptedSAM, saved: dict[str, Any], resume_from: Path) -> None:
    """Load the training state's copy of the trained tensors into ``model`` (built from the run's model file)."""
    mine = model.trainable_state_dict()
    if not isinstance(saved, dict) or set(saved) != set(mine) or any(
            not isinstance(saved[k], torch.Tensor) or saved[k].shape != v.shape for k, v in mine.items()):
        raise CheckpointError(f"{state_path(resume_from)}: its copy of the trained weights does not fit the model of "
                              f"{resume_from.name} (was one of them replaced?); the model file itself is complete: "
                              "predict with it, or train anew")
    model.load_state_dict(saved, strict=False)


def _check_pair(resume_from: Path, state: dict[str, Any]) -> None:
    """The model file and the training state must come from the same save (they are two writes: a crash or a
    full disk between them leaves a pair one step apart, and resuming it would silently not be exact)."""
    if state.get("model_sha256") != sha256_file(resume_from):
        raise CheckpointError(
            f"{resume_from}: the model file and its training state ({state_path(resume_from).name}, step "
            f"{state.get('step')}) are not from the same save (was a save interrupted, or a file replaced?), so the "
            f"run cannot be resumed exactly. The model file itself is complete: predict with it, or train anew"
        )


def started_from(init_from: Path | None) -> dict[str, str] | None:
    """What the training state records of the model a run started from: its file name and sha256."""
    return None if init_from is None else {"file_name": init_from.name, "sha256": sha256_file(init_from)}
