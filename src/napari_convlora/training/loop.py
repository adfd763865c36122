"""The training loop: one generator that yields progress events and stops cleanly when asked.

The napari dock, the CLI and the tests all drive :func:`train`. Read it top to bottom: build (or load the run
being resumed), optimizer and schedule, then steps with gradient accumulation, clipping, validation, atomic
saves (latest, best-on-validation, on stop) and exact resume.

Resolve, then prepare: a resumed run continues with the recipe it was started with, and a run started from a
trained model takes that model's adapter, input and label settings, so callers read the recipe first
(:func:`resume_recipe`, :func:`init_recipe`, both in ``training/run_start.py``) and prepare the data with it; ``train``
refuses data prepared for another recipe. Run options (device, precision, threads) are always the caller's.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from pathlib import Path
from typing import Any, Generator

import numpy as np
import torch

from ..checkpoints.model_files import save_adapter
from ..checkpoints.sam_files import load_base
from ..checkpoints.training_state import (best_path, load_training_state, metrics_path, restore_rng, rng_snapshot,
                                          save_training_state, state_path, trainable_copy, write_metrics_csv)
from ..config import HeadConfig, ModelConfig, RunOptions, TrainRecipe
from ..data import LabelEncoding, PreparedData
from ..devices import apply_run_options, autocast_context, resolve_device
from ..errors import ConfigError, TrainingError
from ..instances import object_classes, object_maps
from ..io.atomic import copy_file, sha256_file, temporary_files
from ..io.safety import check_outputs_are_not_inputs, check_writable, run_lock
from ..metrics import ConfusionMatrix, selection_score
from ..modeling import AdaptedSAM, BaseSam
from .data_parallel import Processes, micro_seed
from .data_parallel import start as join_processes
from .data_parallel import stop as leave_processes
from .events import TrainingEvent
from .instance_validation import ValidationObjects, instance_config_for, setting_after
from .losses import segmentation_loss
from .notes import (check_finite, check_finite_forward, check_finite_output, check_finite_validation, data_notes,
                    hq_note, hq_words, outputs_finite, selection_blind, stall_note, which_file)
from .run_start import (LENGTH_FIELDS, MODEL_FIELDS, check_recipe, init_recipe, load_initial_model, load_resumed_model,
                        resume_recipe, started_from)
from .step import LossFn, TrainingStep, restore_optimizer

__all__ = ["LENGTH_FIELDS", "MODEL_FIELDS", "TrainingEvent", "TrainingError", "init_recipe", "resume_recipe",
           "train", "validate"]


def model_config_for(base: BaseSam, recipe: TrainRecipe, encoding: LabelEncoding,
                     object_radius: float | None = None) -> ModelConfig:
    """The model a new run trains: ``base`` adapted as ``recipe`` says, with a head for ``encoding``'s classes; an
    instance head's seeds lie at least half the objects' median radius (``object_radius``, px) apart."""
    head = HeadConfig(
        num_classes=encoding.num_classes,
        num_mask_tokens=recipe.num_mask_tokens,
        class_names=recipe.class_names,
        class_values=encoding.class_values,
        label_mode=encoding.mode,
        background_value=encoding.background_value,
        hq=recipe.hq, multiclass=recipe.multiclass_head, detail=recipe.trains_detail_head,
        detail_context=recipe.trains_detail_head,
    )
    return ModelConfig(base=base.architecture, adapter=recipe.adapter, head=head, input_size=recipe.input_size,
                       input=dataclasses.replace(recipe.input), base_checkpoint=base.checkpoint,
                       instances=instance_config_for(object_radius) if recipe.trains_instance_head else None)


def _optimizer(model: AdaptedSAM, recipe: TrainRecipe) -> torch.optim.Optimizer:
    params = model.trainable_parameters()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, eps=1e-6)


@torch.no_grad()
def validate(
    model: AdaptedSAM, data: PreparedData, device: torch.device, dtype: torch.dtype | None = None, batch_size: int = 4,
    step: int = 0, out_path: Path | None = None,
) -> dict[str, Any] | None:
    """Per-class IoU/Dice, mIoU, pixel accuracy and HQ-SAM's boundary IoU (each patch an image) on the validation
    patches (labelled pixels only). With an instance head trained from object ids, also its objects' scores
    (``metrics["instances"]``) at the foreground threshold that scored best
    (``instance_validation.ValidationObjects.choose``); the run then keeps that threshold in the model
    (``instance_validation.setting_after``), so that the files saved after this validation carry it. The model is
    not changed here.

    Raises:
        TrainingError: an output (logit) on the validation patches was NaN or infinite; the message names ``step``
            and the run's ``out_path`` (the argmax of NaN still scores, so such a model must not count as validated).
    """
    if not data.validation:
        return None
    model.eval()
    matrix = ConfusionMatrix(model.num_classes)
    finite = torch.ones((), dtype=torch.bool, device=device)
    objects = ValidationObjects() if data.object_ids and model.instance_head is not None else None
    for i in range(0, len(data.validation), batch_size):
        chunk = data.validation[i : i + batch_size]
        images = torch.from_numpy(np.stack([c[0] for c in chunk])).to(device)
        targets = np.stack([c[1] for c in chunk])
        with autocast_context(device, dtype):
            out = model(images)
            finite &= outputs_finite(out)
            pred = model.probabilities_from_output(out).argmax(dim=1).cpu().numpy()  # model.segment(images)
        if objects is not None:
            objects.add(torch.sigmoid(out.instance_logits.float()).cpu().numpy(), targets)
        matrix.update(pred, object_classes(targets) if data.object_ids else targets)
    check_finite_validation(finite, step, out_path)
    metrics = matrix.compute().to_dict()
    if objects is not None:
        metrics["instances"] = objects.choose(model.config.instances)[1]
    return metrics


def _batch_loss(model: AdaptedSAM, images: np.ndarray, targets: np.ndarray, device: torch.device, step: int,
                out_path: Path, mask_loss: str, object_ids: bool = False) -> LossFn:
    """The forward of one micro-batch (B x 3 x S x S float32 images, B x S x S int64 targets) for the step.
    With ``object_ids`` the targets are instance ids (``PreparedData.object_ids``): the class targets are their
    foreground, and the instance head's targets are made from them (``instances.object_maps``)."""
    instance_targets = None
    if object_ids:
        made = [object_maps(t) for t in targets]
        instance_targets = (torch.from_numpy(np.stack([m for m, _ in made])).to(device, non_blocking=True),
                            torch.from_numpy(np.stack([v for _, v in made])).to(device, non_blocking=True))
        targets = object_classes(targets)

    def loss() -> dict[str, torch.Tensor]:
        out = model(torch.from_numpy(images).to(device, non_blocking=True))
        check_finite_output(out, step, out_path)
        return segmentation_loss(out, torch.from_numpy(targets).to(device, non_blocking=True), model.num_classes,
                                 mask_loss=mask_loss, instance_targets=instance_targets)

    return loss


def train(
    base_checkpoint: str | Path | BaseSam,
    data: PreparedData,
    out_path: str | Path,
    recipe: TrainRecipe | None = None,
    run: RunOptions | None = None,
    resume_from: str | Path | None = None,
    stop: threading.Event | None = None,
    init_from: str | Path | None = None,
    processes: Processes | None = None,
) -> Generator[TrainingEvent, None, AdaptedSAM]:
    """Fine-tune ``base_checkpoint`` on ``data``; yields :class:`TrainingEvent` and returns the model.

    ``base_checkpoint`` is a SAM checkpoint file, or a :class:`~napari_convlora.modeling.BaseSam` the caller has
    loaded already (``load_base``), which is then not read again (a SAM serves one model: load one per run); the run
    never changes its weights. The adapters' random start follows ``recipe.seed`` either way, but not identically:
    building SAM from a file draws from the same generator first.

    Args:
        recipe: how to train; default ``data.recipe``. Its data settings (input size, input spec, labels,
            validation split, augmentation, seed) must be those the data were prepared with.
        run: device, precision, threads (default: automatic).
        resume_from: an adapter written by this loop, whose training state lies beside it. The run continues
            exactly, with its saved recipe (``recipe`` must equal it), into ``out_path`` (which may be another file).
        stop: set it to end training at the next step (a half-accumulated step is discarded); the loop saves.
        init_from: a model file written by this project (adapter on ``base_checkpoint``, or a bundle trained on
            it) to start a new run from ("train again" after annotating more): step 0, a new optimizer and
            schedule, the model's adapter and head weights. The recipe must carry the model's settings (take them
            with :func:`init_recipe`) and the labels its label values. Not with ``resume_from``; ``out_path``
            must be another file (the model is only read).
        processes: this process's place in a multi-process run (``training.data_parallel.from_environment()`` under
            ``torchrun``; default: one process). Every process calls ``train`` with the same arguments; they share
            each step's micro-batches, sum their gradients, and process 0 alone validates and writes the files
            (see ``training/data_parallel.py``). The process group is joined here and left at the end.

    Files: ``out_path`` (latest adapter, saved at every validation, at the end and on stop),
    ``*.best.safetensors`` (best mean IoU over the classes present in validation), ``*.training.pt``
    (resume state) and ``*.metrics.csv`` (one row per validation, rewritten at each; see
    :func:`~.checkpoints.training_state.metrics_table`).

    Raises:
        ConfigError: before any work, ``resume_from`` with ``init_from``, or an output that is an input.
    """
    out_path = Path(out_path)
    base_checkpoint = base_checkpoint if isinstance(base_checkpoint, BaseSam) else Path(base_checkpoint)
    base_file = None if isinstance(base_checkpoint, BaseSam) else base_checkpoint
    resume_from = Path(resume_from) if resume_from is not None else None
    init_from = Path(init_from) if init_from is not None else None
    if resume_from is not None and init_from is not None:
        raise ConfigError(f"resume {resume_from} or start a new run from {init_from}, not both")
    recipe = recipe or data.recipe
    run = run or RunOptions()
    outputs = {"the output": out_path, "its best file": best_path(out_path), "its training state": state_path(out_path),
               "its metrics table": metrics_path(out_path)}
    check_outputs_are_not_inputs(outputs, {"the base checkpoint": base_file, "the model to start from": init_from})
    processes = processes or Processes()
    processes.check_recipe(recipe.grad_accum, recipe.batch_size)
    stop = stop or threading.Event()
    if not processes.main:  # process 0 holds the lock and writes; the others only compute
        try:
            return (yield from _train(base_checkpoint, data, out_path, recipe, run, resume_from, init_from, stop,
                                      "", processes))
        finally:
            leave_processes()
    check_writable(out_path, "the output")
    with run_lock(out_path) as note:
        leftovers = [tmp for path in outputs.values() for tmp in temporary_files(path)]
        for tmp in leftovers:  # this run holds the lock: they belong to a save that was killed
            tmp.unlink(missing_ok=True)
        if leftovers:
            note = "; ".join(filter(None, [note, f"removed {len(leftovers)} temporary file(s) of an interrupted save"]))
        try:
            return (yield from _train(base_checkpoint, data, out_path, recipe, run, resume_from, init_from, stop,
                                      note, processes))
        finally:
            leave_processes()


def _train(
    base_checkpoint: Path | BaseSam,
    data: PreparedData,
    out_path: Path,
    recipe: TrainRecipe,
    run: RunOptions,
    resume_from: Path | None,
    init_from: Path | None,
    stop: threading.Event,
    note: str,
    processes: Processes,
) -> Generator[TrainingEvent, None, AdaptedSAM]:
    state, saved = load_training_state(state_path(resume_from)) if resume_from else (None, None)
    check_recipe(data, recipe, resume_from, saved, init_from)
    recipe.check_mask_loss(data.encoding.num_classes)
    device = processes.device(resolve_device(run.device))  # cuda:<local rank> before precision asks CUDA
    resolved = apply_run_options(run)
    dtype = resolved.dtype
    join_processes(processes, device)
    main = processes.main
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)

    base = base_checkpoint if isinstance(base_checkpoint, BaseSam) else load_base(base_checkpoint)
    config = model_config_for(base, recipe, data.encoding, data.object_radius)
    if state:
        model = load_resumed_model(resume_from, state, base, config, data.encoding)
    elif init_from:
        model = load_initial_model(init_from, base, config, data.encoding)
    else:
        model = AdaptedSAM.from_base(base, config)
    model.to(device)
    model.set_activation_checkpointing(run.activation_checkpointing)
    optimizer = _optimizer(model, recipe)
    steps_per_epoch = data.steps_per_epoch()
    total = recipe.total_steps(steps_per_epoch)
    if state and total < state["step"]:
        raise TrainingError(f"{resume_from}: the run has already made {state['step']} steps; to continue it, give "
                            f"more than that (asked for {total})")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))
    stepper = TrainingStep(model, optimizer, scheduler, device=device, dtype=dtype, micro_batches=recipe.grad_accum,
                           grad_clip=recipe.grad_clip, out_path=out_path, processes=processes)
    step, best, best_step, history = 0, -math.inf, None, {"loss": [], "validation": [], "epochs": {}}
    origin = started_from(init_from)
    if state:
        restore_optimizer(optimizer, scheduler, state, resume_from)
        stepper.restore_scaler(state.get("scaler"))
        step, best, history = state["step"], state["best"], state["history"]
        best_step, origin = state.get("best_step"), state.get("started_from")
        history.setdefault("epochs", {})
        restore_rng(rng, state["rng"])
        if main and resume_from != out_path and best_path(resume_from).is_file():
            copy_file(best_path(resume_from), best_path(out_path))  # the run's best so far goes with it

    def log(metrics: dict[str, Any] | None) -> None:
        """Add a validation to the history and rewrite the metrics table from it."""
        if metrics:
            history["validation"].append((step, metrics))
            history["epochs"][step] = step / steps_per_epoch
        write_metrics_csv(metrics_path(out_path), history, recipe.class_names, data.encoding.class_values,
                          steps_per_epoch)

    def save(kind: str, snapshot: dict[str, Any]) -> TrainingEvent:
        check_finite(model, step, out_path)
        if validated != step and probe is not None:  # weights that no validation has run: their outputs on a batch
            check_finite_forward(model, probe, device, dtype, step, out_path)
        save_adapter(model, out_path)
        save_training_state(state_path(out_path), {
            "step": step, "best": best, "best_step": best_step, "history": history, "rng": snapshot,
            "model_sha256": sha256_file(out_path), "started_from": origin, "trainable": trainable_copy(model),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": stepper.scaler.state_dict(),
        }, recipe)
        log(None)
        return TrainingEvent(kind, step, total, step / steps_per_epoch, path=str(out_path), message=f"saved {out_path}")

    blind = selection_blind(data)  # validation too thin to choose a best model on
    yield TrainingEvent("start", step, total, step / steps_per_epoch,
                        message=f"training {recipe.adapter.method}{hq_words(recipe.hq)} on {device} "
                                f"({str(dtype).removeprefix('torch.')}"
                                + (f", {resolved.threads_note}" if resolved.threads_note else "") + ")"
                                + (f" in {processes.world_size} processes" if processes.parallel else "") + ", "
                                f"{total} steps of {recipe.patches_per_step} patches of {recipe.input_size} px"
                                + (f", starting from {init_from}" if init_from else "")
                                + "".join(f"; {line}" for line in [note, hq_note(base, recipe), *data_notes(data),
                                                                    blind]
                                          if line))
    validated, probe = None, None  # the step whose weights validation checked; the last micro-batch's images
    if step == 0 and main:
        metrics = validate(model, data, device, dtype, step=0, out_path=out_path)
        model.config.instances = setting_after(model.config.instances, metrics)
        if metrics:
            validated = 0
            log(metrics)
            yield TrainingEvent("validation", 0, total, 0.0, metrics=metrics, message="before fine-tuning")
    val_every = recipe.val_every or max(1, total // 10)
    started, done_at_start = time.perf_counter(), step
    mine = set(processes.mine(recipe.grad_accum))
    while step < total:
        snapshot = rng_snapshot(rng)
        if processes.any(stop.is_set(), device):  # every process stops at the same step
            break
        stepper.start()
        interrupted = False
        for micro in range(recipe.grad_accum):
            images, targets = data.sampler.sample(rng, recipe.batch_size)  # every process draws every micro-batch
            probe = images
            if micro not in mine:
                continue
            torch.manual_seed(micro_seed(recipe.seed, step, micro))  # the same noise whichever process computes it
            stepper.micro_batch(_batch_loss(model, images, targets, device, step + 1, out_path, recipe.mask_loss,
                                            data.object_ids), step + 1)
            if not processes.parallel and stop.is_set() and micro < recipe.grad_accum - 1:
                interrupted = True
                break
        if interrupted:  # discard the half step; resume redraws the same batches
            restore_rng(rng, snapshot)
            break
        parts = stepper.finish(step + 1)
        step += 1
        history["loss"].append((step, parts["total"]))
        elapsed = time.perf_counter() - started
        rate = (step - done_at_start) / elapsed
        yield TrainingEvent(
            "step", step, total, step / steps_per_epoch, loss=parts["total"], parts=parts,
            lr=scheduler.get_last_lr()[0], images_per_s=rate * recipe.patches_per_step, eta_s=(total - step) / rate,
        )
        if main and (step % val_every == 0 or step == total):
            metrics = validate(model, data, device, dtype, step=step, out_path=out_path)
            model.config.instances = setting_after(model.config.instances, metrics)  # kept by the saves after it
            if metrics:
                validated = step
                log(metrics)
                better = not blind and selection_score(metrics) > best
                if better:
                    best, best_step = selection_score(metrics), step
                    save_adapter(model, best_path(out_path))  # weights and validation outputs checked above
                yield TrainingEvent("validation", step, total, step / steps_per_epoch, metrics=metrics,
                                    message=f"best so far: saved to {best_path(out_path).name}" if better else "")
                stalled = stall_note(history, step, total, recipe.lr)
                if stalled:
                    yield TrainingEvent("note", step, total, step / steps_per_epoch, message=stalled)
            yield save("saved", rng_snapshot(rng))
    model.set_activation_checkpointing(False)
    if step < total:
        if main:
            yield save("stopped", rng_snapshot(rng))  # the RNG is back at the start of the unfinished step
        else:
            yield TrainingEvent("stopped", step, total, step / steps_per_epoch, message="stopped with process 0")
        processes.barrier(device)
    else:
        if main and step == done_at_start:  # a finished run resumed (into a new file, say): nothing trained
            yield save("saved", rng_snapshot(rng))
        processes.barrier(device)  # the others end once process 0 has written
        yield TrainingEvent("finished", step, total, step / steps_per_epoch, path=str(out_path),
                            message=f"finished {total} steps; model saved to {out_path}"
                            + which_file(best, best_step, out_path, blind)
                            + f"; validation metrics in {metrics_path(out_path).name}")
    return model.eval()
