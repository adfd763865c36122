"""Device, precision and run options: what the caller asks for, resolved or refused with a reason."""

from __future__ import annotations

import pytest
import torch

from napari_convlora.config import RunOptions
from napari_convlora.devices import apply_run_options, resolve_device, resolve_precision


def test_device_and_precision_choices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    import torch

    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="only offered on CUDA"):
        resolve_precision("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            resolve_device("cuda")


def test_run_options_are_checked_and_applied():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        RunOptions(device="gpu")
    with pytest.raises(ValueError, match="unknown precision"):
        RunOptions(precision="fp8")
    assert RunOptions(device="cuda:1").device == "cuda:1"
    before = torch.get_num_threads()
    try:
        device, dtype = apply_run_options(RunOptions(device="cpu", num_threads=1))
        assert (device.type, dtype, torch.get_num_threads()) == ("cpu", torch.float32, 1)
    finally:
        torch.set_num_threads(before)
