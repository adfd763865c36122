"""Data-parallel training over several processes with ``torch.distributed`` (``torchrun``): NCCL on CUDA, gloo on
the CPU.

The scheme, chosen so that N processes compute what one process computes:

- A step is ``grad_accum`` micro-batches of ``batch_size`` patches, whatever the number of processes (the recipe
  does not change with N, so a run resumes with another N). Every process draws every micro-batch from the same
  seeded generator (drawing patches is cheap next to a step) and computes only its own: micro-batch ``m`` belongs
  to process ``m % N``. So ``grad_accum`` must be a multiple of N.
- Each micro-batch seeds torch from (seed, step, micro-batch) before its forward pass (the noisy gate, dropout),
  so its randomness does not depend on which process computes it.
- Once per step the gradients of the trainable parameters are summed over the processes in one ``all_reduce``
  (each local loss is already divided by ``grad_accum``): the same sum a single process accumulates, up to the
  order of float additions. A parameter no process used in the step (a Conv-LoRA expert no row was routed to)
  keeps no gradient, as in one process, so AdamW skips it there too. This is what ``DistributedDataParallel``
  does, without its wrapper: its per-bucket overlap buys nothing for the few million adapter parameters, and its
  unused-parameter search would give such an expert a zero gradient that AdamW does not skip.
- Process 0 validates, logs and writes every file; the others wait at the next step's collective. Stop and
  non-finite losses are agreed by all processes at every step, so every process ends at the same step.
- A process that dies or stops answering makes the others' next collective fail (gloo: at once when the peer's
  connection closes; otherwise after ``Processes.timeout_s``); :class:`ParallelError` says so and where the last
  save is. Under torchrun the agent also ends the other processes once one has failed; with NCCL a collective
  that times out is aborted by NCCL's watchdog, which ends the process rather than raising.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, TrainingError

#: How long a process waits for the others at a collective before the run fails (process 0 validates and saves
#: while the others wait, so this must outlast the longest validation).
DEFAULT_TIMEOUT_S = 1800.0


class ParallelError(TrainingError):
    """Another process of a multi-process run ended or stopped answering."""


def micro_seed(seed: int, step: int, micro: int) -> int:
    """The torch seed of micro-batch ``micro`` of step ``step`` (0-based): the same in every process."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Processes:
    """This process's place in a run: ``rank`` of ``world_size`` (1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def main(self) -> bool:
        """Process 0: the one that validates, logs and writes."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def check_recipe(self, grad_accum: int, batch_size: int) -> None:
        """A step's micro-batches must share out evenly over the processes."""
        if grad_accum % self.world_size:
            raise ConfigError(
                f"{self.world_size} processes share each step's {grad_accum} micro-batches of {batch_size} patches: "
                f"--grad-accum must be a multiple of {self.world_size} (a step is batch size x grad accum patches "
                "whatever the number of processes)")

    def mine(self, grad_accum: int) -> range:
        """The micro-batches of a step this process computes."""
        return range(self.rank, grad_accum, self.world_size)

    def device(self, device: torch.device) -> torch.device:
        """The device of this process: ``cuda:<local rank>`` when the run is on CUDA (made the current device,
        before anything asks CUDA a question, so that no process makes a context on GPU 0)."""
        if self.parallel and device.type == "cuda":
            if torch.cuda.device_count() <= self.local_rank:
                raise ConfigError(f"process {self.rank} needs GPU {self.local_rank}, but this machine shows "
                                  f"{torch.cuda.device_count()}: start at most that many processes per node")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    # -- collectives (no-ops in a single process) ---------------------------------------------------------------
    def any(self, flag: bool, device: torch.device) -> bool:
        """True when ``flag`` is true in any process."""
        if not self.parallel:
            return flag
        value = torch.tensor([float(flag)], dtype=torch.float64, device=device)
        return self._all_reduce(value, torch.distributed.ReduceOp.MAX, read=True)[0] > 0

    def reduce_step(self, params: Sequence[torch.nn.Parameter], parts: dict[str, float], failed: bool,
                    device: torch.device) -> tuple[dict[str, float], bool]:
        """Sum the step's gradients and loss parts over the processes; learn whether any process failed.

        params: the trainable parameters (their ``.grad`` hold this process's share of the step); on return they
            hold the sum, and ``None`` where no process made a gradient. parts: this process's share of the loss
            parts (the same names in every process that did not fail). failed: this process could not finish its
            micro-batches (a non-finite loss).
        Returns (the summed parts, whether any process failed).
        """
        if not self.parallel:
            return parts, failed
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1).float() if g is not None else p.new_zeros(p.numel(), dtype=torch.float32)
                          for g, p in zip(grads, params)]) if params else torch.zeros(0, device=device)
        names = sorted(parts)
        meta = torch.tensor([float(g is not None) for g in grads] + [float(failed)], dtype=torch.float64,
                            device=device)
        self._all_reduce(flat, torch.distributed.ReduceOp.SUM)
        used = self._all_reduce(meta, torch.distributed.ReduceOp.SUM, read=True)
        if used[-1] > 0:
            return parts, True
        offset = 0
        for p, g, u in zip(params, grads, used):
            n = p.numel()
            if u > 0:
                summed = flat[offset: offset + n].view_as(p).to(p.dtype)
                if g is None:
                    p.grad = summed.clone()
                else:
                    g.copy_(summed)
            else:
                p.grad = None
            offset += n
        values = torch.tensor([parts[n] for n in names], dtype=torch.float64, device=device)
        return dict(zip(names, self._all_reduce(values, torch.distributed.ReduceOp.SUM, read=True))), False

    def barrier(self, device: torch.device) -> None:
        """Wait until every process gets here (the end of the run: process 0 has written its files)."""
        if self.parallel:  # read back, so that the host waits too (NCCL returns before the GPU has done it)
            self._all_reduce(torch.zeros(1, device=device), torch.distributed.ReduceOp.SUM, read=True)

    def _all_reduce(self, tensor: torch.Tensor, op: torch.distributed.ReduceOp,
                    read: bool = False) -> list[float] | None:
        """All-reduce ``tensor`` in place; with ``read``, its values on the host (the wait, and where NCCL's
        errors surface, inside the same guard)."""
        try:
            torch.distributed.all_reduce(tensor, op=op)
            return tensor.tolist() if read else None
        except RuntimeError as e:  # DistError is one: a peer died, timed out or broke the connection
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ParallelError(f"process {self.rank} of {self.world_size}: another process of this run ended or "
                                f"stopped answering ({first[:200]})") from e


def from_environment(timeout_s: float = DEFAULT_TIMEOUT_S) -> Processes:
    """This process's place as ``torchrun`` describes it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); a single
    process when they are not set. ``timeout_s``: how long to wait for the others at a collective."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ConfigError(f"torchrun's RANK / WORLD_SIZE / LOCAL_RANK are not integers: {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"torchrun's RANK {rank} / WORLD_SIZE {world} make no sense")
    if timeout_s <= 0:
        raise ConfigError(f"the timeout for the other processes must be > 0 s, got {timeout_s}")
    return Processes(rank, world, local, float(timeout_s))


#: Whether this process is in a group :func:`start` made, and whether it ever was (see :func:`end_process`).
_joined = _ever_joined = False


def start(processes: Processes, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on the CPU) when the run has several processes."""
    if not processes.parallel or torch.distributed.is_initialized():  # one process, or the caller's own group
        return
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"training in several processes runs on CUDA or the CPU, not on {device.type}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=processes.timeout_s))
    global _joined, _ever_joined
    _joined = _ever_joined = True


def end_process(code: int) -> int:
    """Return ``code``, or, in a process that trained in a group, end it now with ``code``, without the
    interpreter's finalisation: there gloo's worker threads, left behind by ``destroy_process_group``, sometimes
    abort the process ("terminate called without an active exception", seen here in about 1 run in 5 on a busy
    CPU; pytorch/pytorch#179291) after every file was written, and torchrun then reports a finished run as
    failed. Everything is written and closed by then; the standard streams are flushed here."""
    if not _ever_joined:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def stop() -> None:
    """Leave the process group that :func:`start` made (none made, nothing done: a group the caller made stays)."""
    global _joined
    if _joined and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _joined = False

