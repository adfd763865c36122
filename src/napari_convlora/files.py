"""Adapter files (only the trained tensors) and merged one-file models, both ``.safetensors``.

Each file carries a JSON record under the metadata key ``napari_convlora``: format name and version,
package version, the full :class:`ModelConfig` (base geometry, adapter, head with class names,
input size, normalisation) and, for adapters, the base checkpoint's file name and sha256.
Writes are atomic; reads never unpickle (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path, sha256_file
from .config import ModelConfig
from .model import ConvLoRASAM
from .sam_architecture import CheckpointError, build_sam, infer_architecture
from .sam_loading import extract_sam_state, load_sam, read_tensors

METADATA_KEY = "napari_convlora"
ADAPTER_FORMAT = "napari-convlora-adapter"
MERGED_FORMAT = "napari-convlora-model"
FORMAT_VERSION = 1

_hash_cache: dict[tuple[str, int, int], str] = {}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("napari-convlora")
    except PackageNotFoundError:
        return "unknown"


def base_checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 of a base checkpoint, cached by (path, size, mtime) so repeated saves stay cheap."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = sha256_file(path)
    return _hash_cache[key]


def _write(tensors: dict[str, torch.Tensor], record: dict[str, Any], path: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(record)})
    return Path(path)


def _record(model: ConvLoRASAM, file_format: str) -> dict[str, Any]:
    return {
        "format": file_format,
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "config": model.config.to_dict(),
    }


def save_adapter(model: ConvLoRASAM, path: str | os.PathLike, base_checkpoint: str | os.PathLike) -> Path:
    """Write only the trained tensors (adapters, decoder without IoU head, class head) and the config.

    ``base_checkpoint`` is the SAM file the model was built from; its sha256 is recorded so that
    :func:`load_model` can refuse a different base. A vit_b Conv-LoRA binary adapter holds
    119,232 encoder + 3,505,536 decoder parameters (about 14 MB in fp32).
    """
    record = _record(model, ADAPTER_FORMAT)
    record["base_checkpoint"] = {
        "file_name": Path(base_checkpoint).name,
        "sha256": base_checkpoint_hash(base_checkpoint),
        "model_type": model.config.base.model_type,
    }
    return _write(model.trainable_state_dict(), record, path)


def save_merged(model: ConvLoRASAM, path: str | os.PathLike) -> Path:
    """Write one self-contained file (base SAM + adapters + head + config) to share with others."""
    return _write(dict(model.state_dict()), _record(model, MERGED_FORMAT), path)


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON record of a file this project wrote, or None for any other safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if METADATA_KEY not in metadata:
        return None
    try:
        record = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its napari-convlora record is not valid JSON ({e})") from e
    if record.get("format") not in (ADAPTER_FORMAT, MERGED_FORMAT):
        raise CheckpointError(f"{path}: unknown file format {record.get('format')!r}")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by a newer napari-convlora (format version {record['format_version']}); please upgrade"
        )
    return record


def _require_record(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: expected a napari-convlora .safetensors file (adapter or merged model); "
            "for a SAM checkpoint use load_sam"
        )
    record = read_record(path)
    if record is None:
        raise CheckpointError(f"{path}: a safetensors file, but not one written by napari-convlora (no metadata record)")
    return record


def _check_tensor_keys(model: ConvLoRASAM, tensors: dict[str, torch.Tensor], path: Any, adapter: bool) -> None:
    """Adapter files hold exactly the trained tensors; merged files any subset of the state dict."""
    expected = model.state_dict()
    trainable = set(model.trainable_state_dict())
    unexpected = sorted(set(tensors) - (trainable if adapter else set(expected)))
    missing_trained = sorted(trainable - set(tensors))
    if unexpected or missing_trained:
        raise CheckpointError(
            f"{path}: tensors do not match the model its config describes: "
            f"unexpected {unexpected[:5]}, missing trained tensors {missing_trained[:5]}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{path}: '{name}' has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")


def load_model(
    path: str | os.PathLike,
    base: str | os.PathLike | None = None,
    check_base_hash: bool = True,
) -> ConvLoRASAM:
    """Load an adapter file (with its base SAM checkpoint) or a merged file, on the CPU in eval mode.

    Args:
        path: a ``.safetensors`` file written by :func:`save_adapter` or :func:`save_merged`.
        base: the base SAM checkpoint, required for adapter files.
        check_base_hash: refuse a base whose sha256 differs from the recorded one. Set False only when
            you know the base is equivalent (for example the same weights re-saved).

    Raises:
        CheckpointError: wrong kind of file, missing or mismatching base, tensors that do not fit.
    """
    from safetensors.torch import load_file

    record = _require_record(path)
    config = ModelConfig.from_dict(record["config"])
    tensors = load_file(str(path), device="cpu")
    if record["format"] == MERGED_FORMAT:
        sam = build_sam(config.base)
        sam.architecture = config.base
        model = ConvLoRASAM.from_config(sam, config)
        _check_tensor_keys(model, tensors, path, adapter=False)
        missing = sorted(set(model.state_dict()) - set(tensors))
        if missing:
            raise CheckpointError(f"{path}: merged model file lacks tensors {missing[:5]}")
        model.load_state_dict(tensors, strict=True)
        return model.eval()

    expected = record.get("base_checkpoint", {})
    if base is None:
        raise CheckpointError(
            f"{path}: an adapter file needs its base SAM checkpoint "
            f"('{expected.get('file_name')}', sha256 {str(expected.get('sha256'))[:12]}...)"
        )
    if check_base_hash and base_checkpoint_hash(base) != expected.get("sha256"):
        raise CheckpointError(
            f"{path}: was trained on '{expected.get('file_name')}' (sha256 {str(expected.get('sha256'))[:12]}...) "
            f"but {base} has a different sha256. Use the same base checkpoint, or pass check_base_hash=False "
            "if you are sure the weights are the same."
        )
    sam = load_sam(base)
    if sam.architecture != config.base:
        raise CheckpointError(f"{path}: the base {base} has a different SAM architecture than the adapter was trained on")
    model = ConvLoRASAM.from_config(sam, config)
    _check_tensor_keys(model, tensors, path, adapter=True)
    model.load_state_dict(tensors, strict=False)
    return model.eval()


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """The config of a file this project wrote, or the geometry of a SAM checkpoint (any supported format)."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        record = read_record(path)
        if record is not None:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                record["tensors"] = len(f.keys())
                record["parameters"] = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
            record["file_size"] = path.stat().st_size
            return record
    state = extract_sam_state(read_tensors(path), path)
    try:
        arch = infer_architecture(state)
    except KeyError as e:
        raise CheckpointError(f"{path}: SAM tensor {e} is missing") from None
    return {
        "format": "sam-checkpoint",
        "model_type": arch.model_type,
        "architecture": arch.to_dict(),
        "parameters": sum(t.numel() for t in state.values()),
        "file_size": path.stat().st_size,
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

