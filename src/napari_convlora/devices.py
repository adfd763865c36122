"""Device and precision choices: CUDA first, then Apple MPS, then CPU; mixed precision on CUDA only."""

from __future__ import annotations

import contextlib
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


def apply_run_options(run: RunOptions) -> tuple[torch.device, torch.dtype]:
    """Set torch's CPU threads as ``run`` asks and resolve its device and precision (the caller's choice)."""
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    device = resolve_device(run.device)
    return device, resolve_precision(run.precision, device)
