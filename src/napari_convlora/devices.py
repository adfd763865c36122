"""Device and precision choices: CUDA first, then Apple MPS, then CPU; mixed precision on CUDA only."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import ContextManager

import torch

from .config import RunOptions
from .config.choices import DEVICES, MIXED_PRECISIONS, PRECISIONS


def available_devices() -> dict[str, bool]:
    """Which devices this machine can use (for menus that show unavailable ones greyed out)."""
    mps = getattr(torch.backends, "mps", None)
    return {
        "cuda": torch.cuda.is_available(),
        "mps": bool(mps and mps.is_available()),
        "cpu": True,
    }


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda, else mps, else cpu; an explicit but unavailable device raises ValueError."""
    if isinstance(device, torch.device):
        return device
    available = available_devices()
    if device == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    name = device.split(":")[0]
    if name not in available:
        raise ValueError(f"unknown device {device!r}; choose one of {DEVICES}")
    if not available[name]:
        raise ValueError(f"device {device!r} is not available on this machine (available: "
                         f"{[d for d, ok in available.items() if ok]})")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bf16 on CUDA where supported, else fp16 on CUDA, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision in MIXED_PRECISIONS and device.type != "cuda":
        raise ValueError(f"{precision} mixed precision is only offered on CUDA; use fp32 on {device.type}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_context(device: torch.device, dtype: torch.dtype | None = None) -> ContextManager:
    """Autocast on CUDA (bf16 by default where supported); a no-op elsewhere or for fp32."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = dtype or resolve_precision("auto", device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_threads(run: RunOptions, load: float | None = None, cpus: int | None = None) -> tuple[int, str]:
    """The CPU threads torch should use, and a line saying why.

    Asked for (``run.num_threads``): that. Otherwise torch's default, unless other processes keep CPUs busy
    (the 1-minute load average before this run starts): then only the CPUs left free, at least one. With two
    OpenMP threads on two cores that others keep busy, every parallel region waits for the thread the scheduler
    parked, and a step was 12 times slower (7.6 s against 0.6 s; BENCHMARKS.md, "busy CPUs").
    """
    default = torch.get_num_threads()
    if run.num_threads:
        return run.num_threads, f"{run.num_threads} CPU thread(s) as asked"
    cpus = cpus or available_cpus()
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = cpus - load
    if free >= default - 0.5:
        return default, f"{default} CPU thread(s)"
    threads = max(1, int(free + 0.5))
    return threads, (f"{threads} CPU thread(s): other processes keep {load:.1f} of the {cpus} CPUs busy "
                     f"(set the number of threads to override)")


@dataclass
class Resolved:
    """What a run actually uses: the device, the precision, and (on the CPU) how many threads and why."""

    device: torch.device
    dtype: torch.dtype
    threads_note: str = ""


def apply_run_options(run: RunOptions, load: float | None = None) -> Resolved:
    """Resolve ``run``'s device and precision and, for the CPU, set torch's threads (see :func:`cpu_threads`)."""
    device = resolve_device(run.device)
    dtype = resolve_precision(run.precision, device)
    note = ""
    if device.type == "cpu":
        threads, note = cpu_threads(run, load)
        torch.set_num_threads(threads)
    elif run.num_threads:
        torch.set_num_threads(run.num_threads)
    return Resolved(device, dtype, note)
