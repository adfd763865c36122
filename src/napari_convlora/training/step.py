"""One optimisation step, as both loops take it (supervised training and WeSAM's self-training) and as the
training-speed benchmark times it.

A step is: zero the gradients; for each micro-batch, the forward under autocast (bf16/fp16 on CUDA), a finite
check of the loss, the backward of ``loss / micro_batches`` through the fp16 loss scaler; then the gradients summed
across processes (``data_parallel``), the loss scale undone, clipping when the recipe asks for it, the optimizer and
the schedule stepped, and a finite check of the trained weights, so that nothing non-finite is ever validated or
saved. The loops keep what differs: what a micro-batch is, and which process computes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..adapters.routing import drop_unrouted_expert_grads
from ..devices import autocast_context
from ..errors import TrainingError
from ..modeling import AdaptedSAM
from .data_parallel import Processes
from .notes import check_finite, not_finite_message

#: A micro-batch's forward: the loss terms, the one to minimise under "total" (computed under autocast).
LossFn = Callable[[], dict[str, torch.Tensor]]


def loss_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """The fp16 loss scaler: on for fp16 on CUDA (fp16 gradients underflow without it), off otherwise (a no-op
    that still saves and restores its state)."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16 and device.type == "cuda")


def restore_optimizer(optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any], run: Path) -> None:
    """The optimizer's and the schedule's state of the run saved at ``run``; one of another model (another method,
    rank or set of trained tensors) is refused in one line naming the file, not in torch's words."""
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise TrainingError(f"{run}: its training state holds the optimizer of another model (its state does not fit "
                            "the trained tensors of this one): resume with the model file saved with that state, or "
                            "start a new run") from e


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any] | None) -> None:
    """The fp16 loss scale of the run being resumed, when it had one; a run started without fp16 (CPU, fp32,
    bf16) and resumed in fp16 starts from a fresh scale."""
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)


class TrainingStep:
    """Takes the optimisation steps of one run. Call :meth:`start`, :meth:`micro_batch` once per micro-batch this
    process computes, then :meth:`finish`; ``scaler`` is saved with the training state and restored on resume.

    Args:
        model: the model; its ``trainable_parameters()`` are what the step updates.
        optimizer, scheduler: stepped once per step.
        device, dtype: where the forward runs, and its autocast dtype (None or fp32: no autocast).
        micro_batches: micro-batches a step holds (each loss is divided by it, so gradients are their mean).
        grad_clip: the largest gradient norm (None: no clipping).
        out_path: the run's model file, named in the messages of a run that stops going non-finite.
        processes: this process's place in a multi-process run (default: one process).
    """

    def __init__(self, model: AdaptedSAM, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                 device: torch.device, dtype: torch.dtype | None, micro_batches: int = 1,
                 grad_clip: float | None = None, out_path: Path, processes: Processes | None = None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.dtype, self.micro_batches = device, dtype, micro_batches
        self.grad_clip, self.out_path = grad_clip, out_path
        self.processes = processes or Processes()
        self.params = model.trainable_parameters()
        self.scaler = loss_scaler(device, dtype)
        self.parts: dict[str, float] = {}
        self.failure: TrainingError | None = None

    def restore_scaler(self, saved: dict[str, Any] | None) -> None:
        """The fp16 loss scale of the run being resumed (:func:`restore_scaler`)."""
        restore_scaler(self.scaler, saved)

    def start(self) -> None:
        """Begin a step: training mode, no gradients, no loss parts yet."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.parts, self.failure = {}, None

    def micro_batch(self, loss_fn: LossFn, step: int) -> None:
        """Forward (under autocast) and backward of one micro-batch of step ``step`` (1-based, for messages).

        Raises:
            TrainingError: the loss (or, where ``loss_fn`` checks them, the outputs) became non-finite. In a
                multi-process run the error is kept and raised by :meth:`finish`, after the other processes have
                learnt of it, so that none waits for this one.
        """
        if self.failure is not None:
            return
        try:
            with autocast_context(self.device, self.dtype):
                losses = loss_fn()
            loss = losses["total"]
            if not bool(torch.isfinite(loss)):
                raise TrainingError(not_finite_message(f"the loss became {float(loss.detach())}", step,
                                                        self.out_path))
        except TrainingError as e:
            if not self.processes.parallel:
                raise
            self.failure = e
            return
        self.scaler.scale(loss / self.micro_batches).backward()
        for name, value in losses.items():
            self.parts[name] = self.parts.get(name, 0.0) + float(value.detach()) / self.micro_batches

    def finish(self, step: int) -> dict[str, float]:
        """End step ``step`` (1-based): gradients summed over the processes, unscaled, clipped, applied; the
        schedule stepped; the weights checked. Returns the step's loss parts (summed over processes).

        Raises:
            TrainingError: this or another process went non-finite, or the updated weights did.
        """
        drop_unrouted_expert_grads(self.model)  # masked expert dispatch: unused experts keep no gradient
        parts, failed = self.processes.reduce_step(self.params, self.parts, self.failure is not None, self.device)
        if self.failure is not None:
            raise self.failure
        if failed:
            raise TrainingError(not_finite_message("another process's loss or outputs became NaN or infinite",
                                                    step, self.out_path))
        self.scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        check_finite(self.model, step, self.out_path)
        return parts
