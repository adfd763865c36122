"""Shared fixtures: tiny SAM checkpoints written in the official format, so the real loading code runs."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["dock_fixtures"]  # the dock's fixtures, shared by the GUI test modules


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny SAM (segment_anything classes, random weights) saved as an official-format .pth, 256 px."""
    from napari_convlora import tiny_sam_checkpoint

    return tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny_sam.pth", image_size=256, seed=0)


@pytest.fixture(scope="session")
def tiny_hq_checkpoint(tmp_path_factory) -> Path:
    """A tiny HQ-SAM in the official format (SAM's keys + the 25 HQ keys, random weights), 256 px."""
    from napari_convlora import tiny_hq_checkpoint

    return tiny_hq_checkpoint(tmp_path_factory.mktemp("hq") / "tiny_sam_hq.pth", seed=0)


@pytest.fixture(scope="session")
def other_tiny_checkpoint(tmp_path_factory) -> Path:
    """Same geometry, other weights (a different base)."""
    from napari_convlora import tiny_sam_checkpoint

    return tiny_sam_checkpoint(tmp_path_factory.mktemp("sam2") / "other_sam.pth", image_size=256, seed=1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (ask with ``pytest.mark.usefixtures``): two OpenMP threads on two shared cores
    are many times slower (BENCHMARKS.md, busy CPUs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
