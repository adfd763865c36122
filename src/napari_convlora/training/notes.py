"""What the training loop tells the user (notes on the data and the HQ parts, which file is which) and its
checks that stop a run going NaN before anything non-finite is saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints.training_state import best_path
from ..config import TrainRecipe
from ..constants import IGNORE_INDEX
from ..data import PreparedData
from ..devices import autocast_context
from ..errors import TrainingError
from ..metrics import class_labels, selection_score
from ..modeling import AdaptedSAM, BaseSam, SegmentationOutput


#: Fewer labelled validation pixels of a class than this make its IoU too noisy to choose a model on.
MIN_VALIDATION_PIXELS = 1000


#: Fewer validation pixels than this in a class that trains, and validation cannot choose a "best" model: one
#: blob more or less right swings that class's IoU, and so the mean, by more than real progress does.
MIN_SELECTION_PIXELS = 32


#: In a binary task, a background class below this share of the labelled pixels is probably the thin structure.
MINORITY_BACKGROUND = 0.25


def hq_words(hq: str) -> str:
    return {"off": "", "sam+hq": " with HQ-SAM's fusion (SAM + HQ)", "hq": " with HQ-SAM's fusion (HQ only)"}[hq]


def hq_note(base: BaseSam, recipe: TrainRecipe) -> str:
    """What happens to HQ-SAM's parts: an HQ-SAM base's are used or left out, a plain SAM gets new ones."""
    if base.hq is not None and recipe.hq == "off":
        return ("the base is an HQ-SAM checkpoint, but its HQ parts are not used (HQ is off; choose 'SAM + HQ' or "
                "'HQ only' to use them)")
    if base.hq is None and recipe.hq != "off":
        return "the base is a plain SAM: HQ-SAM's parts start new (untrained) and train with the run"
    return ""


def data_notes(data: PreparedData) -> list[str]:
    """What the user should know about the data before trusting the run: a binary task whose background is the
    thin class, and classes too thin in validation to choose the "best" model on."""
    names = class_labels(data.recipe.class_names, data.encoding.num_classes)
    notes = []
    if data.encoding.num_classes == 2:
        counts = np.zeros(2, dtype=np.int64)
        for _, targets in data.train_planes:
            counts += np.bincount(targets[targets != IGNORE_INDEX], minlength=2)
        share = counts[0] / max(1, counts.sum())
        if share < MINORITY_BACKGROUND:
            notes.append(
                f"the background class {names[0]} (label {data.encoding.class_values[0]}) is only {100 * share:.0f} % "
                "of the labelled pixels: if it is the thin structure you want (membranes, boundaries), make it the "
                "foreground: a binary head learns to find its foreground class"
            )
    if not data.validation:
        return notes + ["no validation pixels: the best model cannot be chosen; the last one is saved"]
    for index, (name, value, count) in enumerate(zip(names, data.encoding.class_values, data.validation_pixels())):
        if index in data.unvalidated_classes:  # the data's own warning says why
            continue
        if count == 0:
            notes.append(f"{name} (label {value}) has no validation pixels: the best model is chosen without it")
        elif count < MIN_VALIDATION_PIXELS:
            notes.append(f"{name} (label {value}) has only {count} validation pixels: its IoU is noisy; raise "
                         "the validation fraction or add validation images")
    return notes


#: The share of the run after which a run that has not learned says so (at the first validation past it).
STALL_CHECK_AT = 0.2
#: ... and not before this many steps (a few patches' losses are too noisy to call flat).
STALL_MIN_STEPS = 10
#: The loss has "not moved" while its recent mean is above this share of its first steps' mean ...
STALL_LOSS_RATIO = 0.9
#: ... and validation has not risen by more than this above its score before fine-tuning.
STALL_SCORE_GAIN = 0.02


#: Where the user sets the learning rate, in the stall note.
LR_OPTION = "--lr on the command line, 'learning rate' in the dock's Advanced tab"


def stall_note(history: dict[str, Any], step: int, total: int, lr: float, option: str = LR_OPTION) -> str:
    """A note for a run that has not learned by its first validation past :data:`STALL_CHECK_AT` of the run (and
    :data:`STALL_MIN_STEPS`): the mean loss of its second half of steps so far is above :data:`STALL_LOSS_RATIO` of the
    first half's, and validation has not risen by :data:`STALL_SCORE_GAIN` over its score before fine-tuning
    (``history``: the loop's, with ``"loss"`` as (step, value) and ``"validation"`` as (step, metrics)); ``""``
    otherwise, and at every other step. ``option``: where the user sets
    the learning rate."""
    validations, check_at = history["validation"], max(STALL_CHECK_AT * total, STALL_MIN_STEPS)
    if step < check_at or len(validations) < 2 or validations[-2][0] >= check_at:
        return ""
    if validations[0][0] != 0:  # no score before fine-tuning to compare with (a resumed run)
        return ""
    losses = [value for _, value in history["loss"]]
    half = max(1, len(losses) // 2)  # halves, not single steps: one patch's loss is noisy
    first, last = float(np.mean(losses[:half])), float(np.mean(losses[-half:]))
    before, now = selection_score(validations[0][1]), selection_score(validations[-1][1])
    if last <= STALL_LOSS_RATIO * first or now > before + STALL_SCORE_GAIN:
        return ""
    return (f"after {step} of {total} steps the loss has not moved ({first:.3f} -> {last:.3f}) and validation has "
            f"not risen ({100 * before:.1f}% -> {100 * now:.1f}%): try a higher learning rate (now {lr:g}; {option}), "
            "check that the labels mark what you want segmented, or paint more examples")


def selection_blind(data: PreparedData) -> str:
    """Why validation cannot choose the best model (a class that trains has fewer than
    :data:`MIN_SELECTION_PIXELS` validation pixels), or ``""`` when it can; also ``""`` without validation."""
    if not data.validation:
        return ""
    names = class_labels(data.recipe.class_names, data.encoding.num_classes)
    trained = np.zeros(data.encoding.num_classes, dtype=np.int64)
    for _, targets in data.train_planes:
        trained += np.bincount(targets[targets != IGNORE_INDEX], minlength=data.encoding.num_classes)
    thin = [f"{name}: {count} pixels" for name, count, train in zip(names, data.validation_pixels(), trained)
            if train and count < MIN_SELECTION_PIXELS]
    if not thin:
        return ""
    return (f"no best model is chosen: validation is too thin to tell ({'; '.join(thin)}; at least "
            f"{MIN_SELECTION_PIXELS} each), so the last model is the result; paint more or give validation images")


def which_file(best: float, best_step: int | None, out_path: Path, blind: str = "") -> str:
    if best_step is None:
        return " (validation too thin to choose on: no best file)" if blind else " (no validation: no best file)"
    return (f"; the best on validation, {best_path(out_path).name}, is from step {best_step} (mean IoU over the classes "
            f"in validation {100 * best:.1f}%)")


def not_finite_message(what: str, step: int, out_path: Path) -> str:
    kept = f"the last good model is {out_path}" if out_path.exists() else "nothing was saved yet"
    return (f"{what} at step {step}; training stopped and nothing non-finite was saved ({kept}). "
            "Try a lower learning rate, or fp32 instead of fp16.")


def check_finite(model: AdaptedSAM, step: int, out_path: Path) -> None:
    """Stop (before the next forward, validation or save) when a trained weight is not finite: one check of all
    of them (a single wait for the GPU), and their names only when something is wrong."""
    params = model.trainable_parameters()
    if bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        return
    bad = [name for name, t in model.trainable_state_dict().items() if not bool(torch.isfinite(t).all())]
    raise TrainingError(not_finite_message(f"the weights became NaN or infinite ({bad[0]} and "
                                            f"{len(bad) - 1} more)", step, out_path))


def outputs_finite(out: SegmentationOutput) -> torch.Tensor:
    """Whether every logit of ``out`` is finite: a 0-d bool tensor on the outputs' device (no wait for the GPU until
    it is read)."""
    return torch.stack([torch.isfinite(logits).all()
                        for logits in (out.mask_logits, out.class_logits, out.instance_logits)
                        if logits is not None]).all()


def check_finite_output(out: SegmentationOutput, step: int, out_path: Path) -> None:
    """Non-finite outputs stop training before the loss (the matching of the multi-class loss fails on them)."""
    if not bool(outputs_finite(out)):
        raise TrainingError(not_finite_message("the model's outputs became NaN or infinite", step, out_path))


def check_finite_validation(finite: torch.Tensor, step: int, out_path: Path | None) -> None:
    """Stop before anything is logged or saved when validation saw a non-finite output (``finite``: the
    :func:`outputs_finite` of all its batches, combined): finite weights can output NaN (a learning rate far too
    high), and the argmax of NaN still scores. ``out_path`` None: a validation outside a run."""
    if bool(finite):
        return
    if out_path is None:
        raise TrainingError("the model's outputs on the validation data are NaN or infinite")
    raise TrainingError(not_finite_message("the model's outputs on the validation data became NaN or infinite", step,
                                           out_path))


@torch.no_grad()
def check_finite_forward(model: AdaptedSAM, images: np.ndarray, device: torch.device, dtype: torch.dtype | None,
                         step: int, out_path: Path) -> None:
    """Before a save that no validation of these weights preceded: their outputs on ``images`` (B x 3 x S x S
    float32 0..255, the step's last micro-batch) must be finite. The step's own forward ran before its update, so
    it does not vouch for the weights being saved. One forward in eval mode; it draws no random numbers and
    records no routing (no gradients), so the run goes on exactly as without it."""
    model.eval()
    with autocast_context(device, dtype):
        out = model(torch.from_numpy(images).to(device))
    check_finite_output(out, step, out_path)
