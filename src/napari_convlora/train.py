"""The training loop: one generator that yields progress events and stops cleanly when asked.

The napari widget, the CLI and the tests all drive :func:`train`. Read it top to bottom: build or
resume, optimizer and schedule, then steps with gradient accumulation, clipping, validation,
atomic saves (latest, best-on-validation, on stop) and exact resume.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator

import numpy as np
import torch

from .dataset import PreparedData
from .devices import autocast_context, resolve_device, resolve_precision
from .files import load_model, save_adapter
from .losses import segmentation_loss
from .metrics import ConfusionMatrix
from .model import ConvLoRASAM
from .sam_loading import load_sam
from .training_state import best_path, load_training_state, restore_rng, rng_snapshot, save_training_state, state_path


class TrainingError(RuntimeError):
    """Training cannot go on (for example a NaN loss); the last good file is kept."""


@dataclass
class TrainConfig:
    """How to train. Defaults follow the Conv-LoRA reference recipe (AdamW 1e-4, wd 1e-4, linear decay,
    clip 1.0, effective batch 4). ``steps`` counts optimizer steps; ``epochs`` is converted with
    ``PreparedData.steps_per_epoch``. Adapter options go to :class:`AdapterConfig`."""

    method: str = "conv_lora"
    input_size: int = 1024
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 1
    grad_accum: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    val_every: int | None = None  # None: ~10 validations per run
    device: str = "auto"
    precision: str = "auto"
    activation_checkpointing: bool = False
    seed: int = 0
    num_threads: int | None = None
    num_mask_tokens: int | None = None
    adapter_options: dict[str, Any] = field(default_factory=dict)

    def total_steps(self, data: PreparedData) -> int:
        if self.steps is not None:
            return int(self.steps)
        epochs = self.epochs if self.epochs is not None else 10
        return max(1, math.ceil(epochs * data.steps_per_epoch(self.batch_size * self.grad_accum)))


@dataclass
class TrainingEvent:
    """What the loop reports. kind: start, step, validation, saved, stopped, finished."""

    kind: str
    step: int
    total_steps: int
    epoch: float = 0.0
    loss: float | None = None
    parts: dict[str, float] = field(default_factory=dict)
    lr: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    metrics: dict[str, Any] | None = None
    path: str | None = None
    message: str = ""


def _build_model(base: Path, data: PreparedData, config: TrainConfig) -> ConvLoRASAM:
    encoding = data.encoding
    return ConvLoRASAM(
        load_sam(base),
        num_classes=encoding.num_classes,
        adapter=config.method,
        input_size=config.input_size,
        num_mask_tokens=config.num_mask_tokens,
        class_names=data.class_names,
        class_values=tuple(encoding.class_values),
        normalisation=data.normalisation,
        label_mode=encoding.mode,
        background_value=encoding.background_value,
        **config.adapter_options,
    )


def _optimizer(model: ConvLoRASAM, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, eps=1e-6)


@torch.no_grad()
def validate(model: ConvLoRASAM, data: PreparedData, device: torch.device, batch_size: int = 4) -> dict[str, Any] | None:
    """Per-class IoU/Dice, mIoU, pixel accuracy on the validation patches (labelled pixels only)."""
    if not data.validation:
        return None
    model.eval()
    matrix = ConfusionMatrix(model.num_classes)
    for i in range(0, len(data.validation), batch_size):
        chunk = data.validation[i : i + batch_size]
        images = torch.from_numpy(np.stack([c[0] for c in chunk])).to(device)
        with autocast_context(device):
            pred = model.segment(images).cpu().numpy()
        matrix.update(pred, np.stack([c[1] for c in chunk]))
    return matrix.compute().to_dict()


def _score(metrics: dict[str, Any] | None) -> float:
    if not metrics:
        return -math.inf
    value = metrics.get("mean_iou_foreground")
    return -math.inf if value is None else float(value)


def train(
    base_checkpoint: str | Path,
    data: PreparedData,
    out_path: str | Path,
    config: TrainConfig | None = None,
    resume_from: str | Path | None = None,
    stop: threading.Event | None = None,
) -> Generator[TrainingEvent, None, ConvLoRASAM]:
    """Fine-tune ``base_checkpoint`` on ``data``; yields :class:`TrainingEvent` and returns the model.

    Files: ``out_path`` (latest adapter, saved at every validation, at the end and on stop),
    ``*.best.safetensors`` (best foreground mIoU on validation) and ``*.training.pt`` (resume state).
    ``resume_from`` is an adapter file written by this loop; its training state must lie beside it,
    and its saved config is used so that the run continues exactly.
    Setting ``stop`` ends training at the next step (a half-accumulated step is discarded) and saves.
    """
    out_path, base_checkpoint = Path(out_path), Path(base_checkpoint)
    stop = stop or threading.Event()
    state = None
    if resume_from is not None:
        state = load_training_state(state_path(resume_from))
        config = TrainConfig(**state["train_config"])
    config = config or TrainConfig()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    model = load_model(resume_from, base=base_checkpoint) if state else _build_model(base_checkpoint, data, config)
    trained_values = tuple(model.config.head.class_values or range(model.num_classes))
    if trained_values != tuple(data.encoding.class_values):
        raise TrainingError(
            f"the model was trained on label values {list(trained_values)} but the labels now hold "
            f"{list(data.encoding.class_values)}; a new class needs a new training run"
        )
    model.to(device)
    model.set_activation_checkpointing(config.activation_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(model, config)
    total = config.total_steps(data)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    step, best, history = 0, -math.inf, {"loss": [], "validation": []}
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step, best, history = state["step"], state["best"], state["history"]
        restore_rng(rng, state["rng"])
    per_step = config.batch_size * config.grad_accum
    steps_per_epoch = max(1, data.steps_per_epoch(per_step))

    def save(kind: str, snapshot: dict[str, Any]) -> TrainingEvent:
        save_adapter(model, out_path, base_checkpoint)
        save_training_state(state_path(out_path), {
            "step": step, "best": best, "history": history, "rng": snapshot,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "train_config": dataclasses.asdict(config),
        })
        return TrainingEvent(kind, step, total, step / steps_per_epoch, path=str(out_path), message=f"saved {out_path}")

    yield TrainingEvent("start", step, total, step / steps_per_epoch,
                        message=f"training {config.method} on {device} ({str(dtype).removeprefix('torch.')}), "
                                f"{total} steps of {per_step} patches of {config.input_size} px")
    if step == 0:
        metrics = validate(model, data, device)
        if metrics:
            history["validation"].append((0, metrics))
            yield TrainingEvent("validation", 0, total, 0.0, metrics=metrics, message="before fine-tuning")
    val_every = config.val_every or max(1, total // 10)
    started, done_at_start = time.perf_counter(), step
    while step < total:
        snapshot = rng_snapshot(rng)
        if stop.is_set():
            break
        model.train()
        optimizer.zero_grad(set_to_none=True)
        parts: dict[str, float] = {}
        interrupted = False
        for micro in range(config.grad_accum):
            images, targets = data.sampler.sample(rng, config.batch_size)
            images = torch.from_numpy(images).to(device, non_blocking=True)
            targets = torch.from_numpy(targets).to(device, non_blocking=True)
            with autocast_context(device, dtype):
                losses = segmentation_loss(model(images), targets, model.num_classes)
            loss = losses["total"]
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {float(loss.detach())} at step {step + 1}; training stopped. The last good model "
                    f"is {out_path if out_path.exists() else 'not saved yet'}. Try a lower learning rate or fp32."
                )
            scaler.scale(loss / config.grad_accum).backward()
            for name, value in losses.items():
                parts[name] = parts.get(name, 0.0) + float(value.detach()) / config.grad_accum
            if stop.is_set() and micro < config.grad_accum - 1:
                interrupted = True
                break
        if interrupted:  # discard the half step; resume redraws the same batches
            restore_rng(rng, snapshot)
            break
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        history["loss"].append((step, parts["total"]))
        elapsed = time.perf_counter() - started
        rate = (step - done_at_start) / elapsed
        yield TrainingEvent(
            "step", step, total, step / steps_per_epoch, loss=parts["total"], parts=parts,
            lr=scheduler.get_last_lr()[0], images_per_s=rate * per_step, eta_s=(total - step) / rate,
        )
        if step % val_every == 0 or step == total:
            metrics = validate(model, data, device)
            if metrics:
                history["validation"].append((step, metrics))
                yield TrainingEvent("validation", step, total, step / steps_per_epoch, metrics=metrics)
                if _score(metrics) > best:
                    best = _score(metrics)
                    save_adapter(model, best_path(out_path), base_checkpoint)
            yield save("saved", rng_snapshot(rng))
    if step < total:
        yield save("stopped", rng_snapshot(rng))  # the RNG is back at the start of the unfinished step
    else:
        yield TrainingEvent("finished", step, total, step / steps_per_epoch, path=str(out_path),
                            message=f"finished {total} steps; model saved to {out_path}")
    return model.eval()
