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
        resolved = apply_run_options(RunOptions(device="cpu", num_threads=1))
        assert (resolved.device.type, resolved.dtype, torch.get_num_threads()) == ("cpu", torch.float32, 1)
    finally:
        torch.set_num_threads(before)


def test_cpu_threads_give_way_to_other_processes(monkeypatch):
    """Two OpenMP threads on two cores that other processes keep busy made training 10-20 times slower."""
    from napari_convlora.devices import cpu_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert cpu_threads(RunOptions(), load=0.2, cpus=2) == (2, "2 CPU thread(s)")
    threads, note = cpu_threads(RunOptions(), load=1.1, cpus=2)
    assert threads == 1 and "other processes keep 1.1 of the 2 CPUs busy" in note
    assert cpu_threads(RunOptions(), load=9.7, cpus=2)[0] == 1
    assert cpu_threads(RunOptions(), load=3.0, cpus=16)[0] == 2  # plenty left: torch's default
    assert cpu_threads(RunOptions(num_threads=2), load=9.7, cpus=2) == (2, "2 CPU thread(s) as asked")
