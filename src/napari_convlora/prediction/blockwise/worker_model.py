"""Where dask workers get the model from: file paths, loaded once per worker thread, never a pickled model.

A :class:`ModelSource` is a few strings; a block task carries it to a worker, which loads the model on the first
task and keeps it for the next ones (a worker has one thread; each thread of a process keeps its own copy, so
that no two threads share a module's forward hooks). The client reads only the file's configuration.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import ModelConfig

_MODELS = threading.local()


@dataclass(frozen=True)
class ModelSource:
    """A model file as workers load it (``checkpoints.model_files.load_model``): adapter or bundle ``path``, its ``base``
    checkpoint, the device, and torch's CPU threads in the worker (None: leave torch's setting). ``stamp``
    (sizes and modification times) makes a worker reload a file that changed since it cached the model."""

    path: str
    base: str | None = None
    check_base_hash: bool = True
    device: str = "cpu"
    threads: int | None = None
    stamp: tuple[int, ...] = ()

    @classmethod
    def of(cls, path: str | os.PathLike, base: str | os.PathLike | None = None, check_base_hash: bool = True,
           device: str = "cpu", threads: int | None = None) -> "ModelSource":
        files = [Path(path)] + ([Path(base)] if base else [])
        stamp = tuple(n for f in files if f.is_file() for n in (f.stat().st_size, f.stat().st_mtime_ns))
        return cls(str(path), None if base is None else str(base), check_base_hash, device, threads, stamp)

    def config(self) -> ModelConfig:
        """The model's configuration, read from the file's record without loading any weights; an adapter's base
        is checked as ``checkpoints.model_files.load_model`` checks it (present; the same sha256 unless ``check_base_hash`` is off),
        so that a wrong base is refused here, not on every worker."""
        from ...errors import CheckpointError
        from ...config.choices import ADAPTER_FORMAT
        from ...checkpoints.model_files import _require_record, model_config
        from ...checkpoints.sam_files import checkpoint_identity

        record = _require_record(Path(self.path))
        config = model_config(record, self.path)
        expected = config.base_checkpoint
        if record["format"] != ADAPTER_FORMAT or expected is None:
            return config
        if self.base is None:
            raise CheckpointError(f"{self.path}: an adapter file needs its base SAM checkpoint "
                                  f"('{expected.file_name}', sha256 {expected.sha256[:12]}...)")
        if not Path(self.base).is_file():
            raise CheckpointError(f"{self.base}: no such file")
        found = checkpoint_identity(self.base) if self.check_base_hash else None
        if found is not None and found.sha256 != expected.sha256:
            raise CheckpointError(f"{self.path}: was trained on '{expected.file_name}' (sha256 {expected.sha256[:12]}"
                                  f"...) but {found.file_name} has sha256 {found.sha256[:12]}...; use the same base "
                                  "checkpoint, or --ignore-base-hash if you are sure the weights are the same")
        return config

    def load(self) -> Any:
        """The model in eval mode on its device, loaded once per thread (a worker has one thread)."""
        cache = _MODELS.__dict__.setdefault("models", {})
        if self not in cache:
            import torch

            from ...checkpoints.model_files import load_model

            if self.threads:
                torch.set_num_threads(self.threads)
            cache.clear()  # one model per thread
            cache[self] = load_model(self.path, self.base, self.check_base_hash).to(self.device).eval()
        return cache[self]


def forget_models() -> None:
    """Drop the models this thread loaded."""
    _MODELS.__dict__.pop("models", None)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model already in this process (the dock's current model) where ``blockwise`` expects a
    :class:`ModelSource`: for blockwise prediction without a client only (it is not sent to workers).
    ``path`` names it in messages."""

    model: Any
    device: str = "cpu"
    path: str = "the current model"

    def config(self) -> ModelConfig:
        return self.model.config

    def load(self) -> Any:
        """The model in eval mode on its device (as ``predict_image`` prepares it; a no-op once it is there)."""
        from ...devices import resolve_device

        return self.model.to(resolve_device(self.device)).eval()
