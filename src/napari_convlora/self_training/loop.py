"""WeSAM's self-training loop (METHODS.md 3): adapt SAM's encoder through its own promptable decoder from weak labels.

One network, three forwards per step (``self_train``):
- **teacher**: the adapted model on the weak view (flips), with gradients;
- **student**: the same model on the strong view (the weak view plus photometric changes, ``views.py``);
- **anchor**: the same model with its adapters switched off, under ``no_grad``, on the weak view: exactly the SAM
  that was loaded (no second copy in memory).

Every prompted object of the crop is decoded by SAM's own prompt encoder and mask decoder (``model.prompt_head``,
single-mask output, decoder frozen); low-resolution logits are upsampled to the crop (``S x S``), and
``self_training.losses.wesam_loss`` gives the five terms. Only the adapter weights train (``ModelConfig.promptable``).

Yields the same :class:`~..train.TrainingEvent` as supervised training (start, step with the loss terms in
``parts``, validation with prompt mIoU when evaluation labels exist, saved, stopped, finished); Stop saves at the
next step; a NaN loss stops without saving it; saves are atomic (``save_adapter``) and write the training state
beside the adapter, so that ``resume_from`` continues a stopped or finished run exactly.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from pathlib import Path
from typing import Any, Generator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoints.model_files import load_model, save_adapter
from ..checkpoints.sam_files import load_base
from ..checkpoints.training_state import (load_training_state, restore_rng, rng_snapshot, save_training_state,
                                          state_path, trainable_copy)
from ..config import HeadConfig, ModelConfig, RunOptions
from ..config.model import PromptableAdaptation
from ..config.self_training import SelfTrainingRecipe
from ..devices import apply_run_options, autocast_context
from ..errors import ConfigError, TrainingError
from ..io.safety import check_outputs_are_not_inputs, check_writable, run_lock
from ..modeling import AdaptedSAM, BaseSam
from ..training.events import TrainingEvent
from ..training.notes import not_finite_message
from ..training.run_start import restore_trainable
from ..training.step import TrainingStep, restore_optimizer
from .crops import CropPrompt, CropSampler, PromptedCrop
from .data import WeakData
from .decoding import decode_prompts
from .evaluation import evaluate_prompts
from .losses import BranchOutputs, wesam_loss
from .views import Flips, random_flips, strong_view


def _flip_prompts(prompts: Sequence[CropPrompt], flips: Flips, size: int) -> list[CropPrompt]:
    return [CropPrompt(p.kind, None if p.box is None else flips.boxes(p.box, size)[0],
                       flips.points(p.positive, size), flips.points(p.negative, size)) for p in prompts]


def _to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """S x S x 3 float32 -> 1 x 3 x S x S on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(device)


def _branch(model: AdaptedSAM, image: torch.Tensor, prompts: Sequence[CropPrompt], size: int) -> BranchOutputs:
    features = model.encode(image)
    low, iou = decode_prompts(model, features.embedding, features.early, prompts)
    logits = F.interpolate(low[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return BranchOutputs(mask_logits=logits, iou_pred=iou.float(), low_res_logits=low.float(),
                         embedding=features.embedding[0].float())


def step_loss(model: AdaptedSAM, crop: PromptedCrop, recipe: SelfTrainingRecipe, rng: np.random.Generator,
              device: torch.device) -> dict[str, torch.Tensor]:
    """WeSAM's loss on one crop: the weak and strong views, the three forwards, the five terms and the total."""
    size = recipe.input_size
    flips = random_flips(rng)
    weak_image, valid = flips.image(crop.image), flips.image(crop.valid)
    prompts = _flip_prompts(crop.prompts, flips, size)
    strong_image = strong_view(weak_image, rng, valid)
    weak, strong = _to_tensor(weak_image, device), _to_tensor(strong_image, device)
    with torch.no_grad():
        model.set_adapters_enabled(False)
        try:
            anchor = _branch(model, weak, prompts, size)
        finally:
            model.set_adapters_enabled(True)
    teacher = _branch(model, weak, prompts, size)
    student = _branch(model, strong, prompts, size)
    return wesam_loss(student, teacher, anchor, reference_quirks=recipe.reference_quirks)


@torch.no_grad()
def check_finite_prompt_outputs(model: AdaptedSAM, crop: PromptedCrop, device: torch.device,
                                dtype: torch.dtype | None, step: int, out_path: Path) -> None:
    """Stop before a save when the model's prompt outputs on ``crop`` (the step's last, as it is: no view drawn, no
    random number used) are not finite, although its weights are."""
    was_training = model.training
    model.eval()
    try:
        with autocast_context(device, dtype):
            features = model.encode(_to_tensor(crop.image, device))
            low, iou = decode_prompts(model, features.embedding, features.early, crop.prompts)
        if not bool(torch.isfinite(low).all() & torch.isfinite(iou).all()):
            raise TrainingError(not_finite_message("the model's outputs became NaN or infinite", step, out_path))
    finally:
        model.train(was_training)


def model_config_for(base: BaseSam, recipe: SelfTrainingRecipe, data: WeakData) -> ModelConfig:
    """The model a WeSAM run adapts: ``base`` with the recipe's adapter, SAM's own decoder, no trained head."""
    return ModelConfig(base=base.architecture, adapter=recipe.adapter, head=HeadConfig(num_classes=2),
                       input_size=recipe.input_size, input=dataclasses.replace(recipe.input),
                       base_checkpoint=base.checkpoint,
                       promptable=PromptableAdaptation(weak_labels=data.kinds()))


def resume_self_training_recipe(resume_from: str | Path) -> SelfTrainingRecipe:
    """The recipe of the self-training run saved at ``resume_from`` (prepare the data with it to resume)."""
    return load_training_state(state_path(resume_from), SelfTrainingRecipe)[1]


def self_train(
    base_checkpoint: str | Path | BaseSam,
    data: WeakData,
    out_path: str | Path,
    recipe: SelfTrainingRecipe | None = None,
    run: RunOptions | None = None,
    stop: threading.Event | None = None,
    resume_from: str | Path | None = None,
) -> Generator[TrainingEvent, None, AdaptedSAM]:
    """Adapt ``base_checkpoint`` (a SAM checkpoint file, or a ``BaseSam`` already loaded) to ``data``'s images from
    their weak labels; yields events, returns the model.

    Args:
        data: planes and weak labels (``prepare_weak_data``), with evaluation labels or not.
        out_path: the adapter file to write (saved at every validation, at the end and on stop), with its training
            state beside it (``*.training.pt``) for an exact resume.
        recipe: default ``data.recipe``; it must be the one the data were prepared with.
        resume_from: an adapter written by this loop: the run continues exactly from its last save (its recipe,
            but for ``steps``, must be this one: take it with :func:`resume_self_training_recipe`).

    Raises:
        ConfigError: an output that is an input, or data prepared for another recipe.
        TrainingError: a resume with another recipe.
    """
    out_path = Path(out_path)
    base_checkpoint = base_checkpoint if isinstance(base_checkpoint, BaseSam) else Path(base_checkpoint)
    base_file = None if isinstance(base_checkpoint, BaseSam) else base_checkpoint
    recipe = recipe or data.recipe
    if (recipe.input_size, recipe.input) != (data.recipe.input_size, data.recipe.input):
        raise ConfigError("the data were prepared for another input size or input spec than the recipe's")
    run = run or RunOptions()
    check_outputs_are_not_inputs({"the output": out_path, "its training state": state_path(out_path)},
                                 {"the base checkpoint": base_file})
    check_writable(out_path, "the output")
    if resume_from is None and recipe.effective_warmup_steps < recipe.warmup_steps:
        shortened = (f"warm-up {recipe.warmup_steps} -> {recipe.effective_warmup_steps} steps for a "
                     f"{recipe.steps}-step run (at most half of it)")
        recipe = recipe.for_new_run()
    else:
        shortened = ""
    with run_lock(out_path) as note:
        note = "; ".join(filter(None, [shortened, note]))
        return (yield from _self_train(base_checkpoint, data, out_path, recipe, run, stop or threading.Event(), note,
                                       Path(resume_from) if resume_from is not None else None))


def _start_model(base_checkpoint: Path | BaseSam, recipe: SelfTrainingRecipe, data: WeakData, resume_from: Path | None
                 ) -> tuple[AdaptedSAM, dict[str, Any] | None]:
    """A new model on the base, or the saved run's model and state (checked against the recipe)."""
    base = base_checkpoint if isinstance(base_checkpoint, BaseSam) else load_base(base_checkpoint)
    if resume_from is None:
        return AdaptedSAM.from_base(base, model_config_for(base, recipe, data)), None
    state, saved = load_training_state(state_path(resume_from), SelfTrainingRecipe)
    if dataclasses.replace(recipe, steps=saved.steps) != saved:
        differ = [f.name for f in dataclasses.fields(saved) if f.name != "steps"
                  and getattr(saved, f.name) != getattr(recipe, f.name)]
        raise TrainingError(f"{resume_from}: this run was started with another recipe (differs in {differ}); resume "
                            "it with its saved recipe (resume_self_training_recipe)")
    if recipe.steps < state["step"]:
        raise TrainingError(f"{resume_from}: the run has already made {state['step']} steps; give more to continue it")
    model = load_model(resume_from, base=base)
    if model.config.promptable is None:
        raise TrainingError(f"{resume_from}: not a self-training run's model")
    if state.get("trainable") is not None:  # the state's own copy: exact even if the model file is of a later save
        restore_trainable(model, state["trainable"], resume_from)
    return model, state


def _self_train(base_checkpoint: Path | BaseSam, data: WeakData, out_path: Path, recipe: SelfTrainingRecipe,
                run: RunOptions,
                stop: threading.Event, note: str, resume_from: Path | None) -> Generator[TrainingEvent, None, AdaptedSAM]:
    resolved = apply_run_options(run)
    device, dtype = resolved.device, resolved.dtype
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    model, state = _start_model(base_checkpoint, recipe, data, resume_from)
    model.to(device)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)  # coupled L2, as WeSAM
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_factor)
    stepper = TrainingStep(model, optimizer, scheduler, device=device, dtype=dtype, grad_clip=recipe.grad_clip,
                           out_path=out_path)
    sampler = CropSampler(data.planes, data.objects, recipe.input_size, recipe.max_objects, recipe.positive_points,
                          recipe.negative_points)
    total, val_every = recipe.steps, recipe.val_every or max(1, recipe.steps // 5)
    adaptation = model.config.promptable
    step, history = 0, []
    if state is not None:
        restore_optimizer(optimizer, scheduler, state, resume_from)
        stepper.restore_scaler(state.get("scaler"))
        step, history = state["step"], state["history"]
        restore_rng(rng, state["rng"])

    def validate(step: int) -> TrainingEvent | None:
        if not data.has_evaluation:
            return None
        metrics = evaluate_prompts(model, data, device, dtype)
        if adaptation.before is None:
            adaptation.before = metrics
        adaptation.after = metrics
        history.append((step, metrics))
        return TrainingEvent("validation", step, total, metrics=metrics,
                             message=f"step {step}: {describe_metrics(metrics)} on {metrics['objects']} objects")

    def save(kind: str, step: int, snapshot: dict[str, Any]) -> TrainingEvent:
        if last_crop is not None:  # finite weights can still give NaN outputs: never saved as the last good model
            check_finite_prompt_outputs(model, last_crop, device, dtype, step, out_path)
        adaptation.steps = step
        save_adapter(model, out_path)
        best = adaptation.after["prompt_miou"] if adaptation.after else math.nan
        save_training_state(state_path(out_path), {
            "step": step, "best": best, "history": history, "rng": snapshot, "trainable": trainable_copy(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": stepper.scaler.state_dict()}, recipe)
        return TrainingEvent(kind, step, total, path=str(out_path), message=f"saved {out_path}")

    yield TrainingEvent("start", step, total, message=(
        f"self-training (WeSAM) {recipe.adapter.method} on {device}: {total} steps of {recipe.input_size} px crops "
        f"from {data.describe()}" + (f", resuming {resume_from} at step {step}" if state is not None else "")
        + "".join(f"; {line}" for line in [note, resolved.threads_note] if line)))
    if state is None:
        event = validate(0)
        if event:
            yield event
    started, first, last_crop = time.perf_counter(), step, None
    while step < total:
        if stop.is_set():
            yield save("stopped", step, rng_snapshot(rng))
            return model.eval()
        crop = sampler.sample(rng)
        while not crop.prompts:  # every object was cut off at the crop's edge
            crop = sampler.sample(rng)
        last_crop = crop
        stepper.start()
        stepper.micro_batch(lambda: step_loss(model, crop, recipe, rng, device), step + 1)
        parts = stepper.finish(step + 1)
        step += 1
        elapsed = time.perf_counter() - started
        yield TrainingEvent("step", step, total, loss=parts["total"], lr=scheduler.get_last_lr()[0],
                            parts={k: v for k, v in parts.items() if k != "total"},
                            images_per_s=(step - first) / max(elapsed, 1e-9),
                            eta_s=elapsed / (step - first) * (total - step))
        if step % val_every == 0 or step == total:
            snapshot = rng_snapshot(rng)  # before validation, which draws nothing from these, so a resume matches
            event = validate(step)
            if event:
                yield event
            yield save("saved", step, snapshot)
    model.eval()
    summary = _summary(adaptation)
    yield TrainingEvent("finished", step, total, path=str(out_path), message=f"finished {step} steps{summary}")
    return model


def _summary(adaptation: PromptableAdaptation) -> str:
    if not adaptation.before or not adaptation.after:
        return " (no evaluation labels: no prompt mIoU)"
    before, after = adaptation.before["prompt_miou"], adaptation.after["prompt_miou"]
    return f"; prompt mIoU {100 * before:.1f}% before, {100 * after:.1f}% after"


def describe_metrics(metrics: dict[str, Any] | None) -> str:
    """One line for a log: prompt mIoU overall and per weak label kind."""
    if not metrics:
        return "no evaluation labels"
    kinds = ", ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.get("per_kind", {}).items() if not math.isnan(v))
    return f"prompt mIoU {100 * metrics['prompt_miou']:.1f}%" + (f" ({kinds})" if kinds else "")
