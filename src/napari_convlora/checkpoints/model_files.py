"""Model files, both ``.safetensors``: adapters (only the trained tensors) and bundles (everything in one file).

- An **adapter** holds what fine-tuning changed (adapters, the decoder parts the head trains, the head's own
  tokens and class head) and names its base SAM checkpoint by file name and sha256: it is loaded on top of
  that checkpoint (``load_model(path, base=...)``). About 14 MB for vit_b.
- A **bundle** holds the base SAM, the adapters and the head side by side in one self-contained file. It
  does not merge weights: Conv-LoRA cannot be merged into SAM's weights (its experts act non-linearly inside
  the bottleneck); plain LoRA could be (``adapters.inject.remove_adapters(..., merge=True)``), which a bundle
  does not do, so that every bundle loads back as the model that was trained.

Each file carries a JSON record under the metadata key ``napari_convlora``: format name and version, package
version and the full :class:`~.config.ModelConfig`. Version 1 files are read through ``checkpoints/format_v1.py``.
Writes are atomic; reads never unpickle (safetensors, or ``torch.load(weights_only=True)`` for SAM).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, from_record, to_record
from ..config.choices import ADAPTER_FORMAT, BUNDLE_FORMAT, FORMAT_VERSION, MODEL_SUFFIX, SAM_CHECKPOINT_FORMAT
from ..errors import CheckpointError, ConfigError
from ..io.atomic import atomic_path
from ..io.safety import unreadable_reason
from ..modeling import AdaptedSAM, BaseSam
from ..modeling.hq import split_hq_state
from ..modeling.sam_build import build_sam, infer_architecture
from . import format_v1 as files_v1
from .sam_files import checkpoint_identity, extract_sam_state, load_base, read_tensors

METADATA_KEY = "napari_convlora"


#: The prefix of SAM's decoder as loaded (``AdaptedSAM.decoder_as_loaded``) in a bundle's tensors; bundles saved
#: before it existed lack them.
DECODER_AS_LOADED = "sam_decoder_as_loaded."

def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("napari-convlora")
    except PackageNotFoundError:
        return "unknown"


#: The attribute of a model that names its file (:func:`model_file`).
_FILE_ATTRIBUTE = "source_file"


def model_file(model: AdaptedSAM) -> Path | None:
    """The file ``model`` was last loaded from (:func:`load_model`) or written to (:func:`save_adapter`,
    :func:`save_bundle`), for messages about the model; None for a model built in memory and never saved."""
    return getattr(model, _FILE_ATTRIBUTE, None)


def _write(tensors: dict[str, torch.Tensor], model: AdaptedSAM, file_format: str, path: str | os.PathLike) -> Path:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    record = {"format": file_format, "format_version": FORMAT_VERSION, "package_version": package_version(),
              "config": to_record(model.config)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    check_not_base_checkpoint(model, path)  # every writer: the dock, the command line, the loops, a script
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(record)})
        except SafetensorError as e:  # a full disk, among others: reported as a failed write of ``path``
            raise OSError(str(e)) from e
    setattr(model, _FILE_ATTRIBUTE, Path(path))
    return Path(path)


def check_not_base_checkpoint(model: AdaptedSAM, path: str | os.PathLike) -> None:
    """Refuse ``path`` when it holds the SAM checkpoint ``model`` was built on: the model records its base by file
    name and sha256 (not by path), so an existing file there is hashed (once per session: the hash is cached)
    unless it is a file this package wrote (an adapter or bundle, never a base).

    Raises:
        ConfigError: one line naming the file and the base.
    """
    base = model.config.base_checkpoint
    if base is None or not Path(path).is_file():
        return
    try:
        if read_record(path) is not None:
            return
    except CheckpointError:  # not safetensors (a .pth): hash it
        pass
    if checkpoint_identity(path).sha256 == base.sha256:
        raise ConfigError(
            f"the file chosen {path} is the SAM checkpoint this model was built on ('{base.file_name}', sha256 "
            f"{base.sha256[:12]}...): writing it would destroy the base; choose another file"
        )


def save_adapter(model: AdaptedSAM, path: str | os.PathLike) -> Path:
    """Write only the trained tensors and the config, which names the base checkpoint by sha256.

    A vit_b Conv-LoRA binary adapter holds 119,232 encoder + 3,505,536 decoder parameters (about 14 MB).

    Raises:
        CheckpointError: the model's SAM did not come from a checkpoint file (save a bundle instead).
    """
    if model.config.base_checkpoint is None:
        raise CheckpointError(
            f"{path}: an adapter names the SAM checkpoint it was trained on, but this model's SAM was built in "
            "memory, not loaded from a file; save a bundle (save_bundle) instead"
        )
    return _write(model.trainable_state_dict(), model, ADAPTER_FORMAT, path)


def save_bundle(model: AdaptedSAM, path: str | os.PathLike) -> Path:
    """Write one self-contained file: base SAM, adapters and head (not merged), and the config."""
    as_loaded = {DECODER_AS_LOADED + name: t for name, t in model.decoder_as_loaded.items()}
    return _write(dict(model.state_dict()) | as_loaded, model, BUNDLE_FORMAT, path)


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON record of a file this project wrote (version 1 records converted to the current shape; their
    ``format_version`` still says 1), or None for any other safetensors file."""
    from safetensors import SafetensorError, safe_open

    reason = unreadable_reason(path)  # safetensors says "No such file" for a file it may not read
    if reason:
        raise CheckpointError(f"{path}: {reason}")
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
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: its napari-convlora record is not a JSON object")
    version = record.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CheckpointError(f"{path}: its napari-convlora record is damaged: format version {version!r} is not a "
                              "version number")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer napari-convlora (format version {version!r}); please upgrade")
    if version == 1:
        record = files_v1.convert_record(record, path)
    if record.get("format") not in (ADAPTER_FORMAT, BUNDLE_FORMAT):
        raise CheckpointError(f"{path}: unknown file format {record.get('format')!r}")
    return record


def _require_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix != MODEL_SUFFIX:
        raise CheckpointError(
            f"{path}: expected a napari-convlora {MODEL_SUFFIX} file (adapter or bundle); "
            "for a SAM checkpoint use load_sam"
        )
    record = read_record(path)
    if record is None:
        raise CheckpointError(f"{path}: a safetensors file, but not one written by napari-convlora (no metadata record)")
    return record


def model_config(record: dict[str, Any], path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of a record (from :func:`read_record`)."""
    try:
        return from_record(ModelConfig, record.get("config"), Path(path).name, "config")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _check_bundle_geometry(tensors: dict[str, torch.Tensor], config: ModelConfig, path: Path) -> None:
    """The SAM in a bundle's tensors must be the one its record describes."""
    # SAM's own names: without the "sam." prefix and the adapters' "base_layer." level
    sam_tensors = {k[len("sam."):].replace(".base_layer.", "."): v for k, v in tensors.items() if k.startswith("sam.")}
    pos = sam_tensors.get("image_encoder.pos_embed")
    if pos is not None:  # stored at the model's input size: only SAM's own grid tells its global blocks apart
        grid = config.base.embedding_size
        sam_tensors["image_encoder.pos_embed"] = torch.empty((1, grid, grid, pos.shape[-1]), device="meta")
    tokens = "mask_decoder.mask_tokens.weight"  # version-1 bundles did not keep SAM's own tokens
    sam_tensors.setdefault(tokens, torch.empty((config.base.num_multimask_outputs + 1, 1), device="meta"))
    try:
        found = infer_architecture(sam_tensors, decoder_num_heads=config.base.decoder_num_heads)
    except KeyError as e:
        raise CheckpointError(f"{path}: the bundle lacks SAM tensor {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: its tensors are not the SAM its record describes ({e})") from None
    if found != config.base:
        differ = [k for k, v in vars(found).items() if getattr(config.base, k) != v]
        raise CheckpointError(f"{path}: its tensors are not the SAM its record describes (they differ in {differ})")


def _check_tensor_keys(model: AdaptedSAM, tensors: dict[str, torch.Tensor], path: Any, adapter: bool) -> None:
    """Adapter files hold exactly the trained tensors; bundles any subset of the state dict."""
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
    base: str | os.PathLike | BaseSam | None = None,
    check_base_hash: bool = True,
) -> AdaptedSAM:
    """Load an adapter file (on its base SAM checkpoint) or a bundle, on the CPU in eval mode; the model remembers
    ``path`` (:func:`model_file`), so that messages about it name the file.

    Args:
        path: a ``.safetensors`` file written by :func:`save_adapter` or :func:`save_bundle`.
        base: the base SAM checkpoint (a path, or a :class:`~.checkpoints.sam_files.BaseSam` already loaded), required
            for adapter files.
        check_base_hash: refuse a base whose sha256 differs from the recorded one. Set False only when you
            know the base is equivalent (for example the same weights re-saved).

    Raises:
        CheckpointError: wrong kind of file, missing or mismatching base, tensors that do not fit.
    """
    from safetensors.torch import load_file

    path = Path(path)
    record = _require_record(path)
    config = model_config(record, path)
    current = record.get("format_version") != 1
    if current:  # names and shapes from the file's header: a misshapen tensor is refused before any is read
        header = _without_decoder_as_loaded(_header_tensors(path))[0]
        model = _check_bundle_or_adapter(path, record, config, header, base, check_base_hash)
    tensors, as_loaded = _without_decoder_as_loaded(load_file(str(path), device="cpu"))
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} tensors hold NaN or infinite values ({bad[0]}, ...): it was saved from a training "
            "run that diverged; use an earlier file of that run (its .best file) or train again"
        )
    if not current:  # version 1 names and shapes are known once converted
        tensors = files_v1.convert_tensors(tensors)
        model = _check_bundle_or_adapter(path, record, config, tensors, base, check_base_hash)
    model.load_state_dict(tensors, strict=False)
    if record["format"] == BUNDLE_FORMAT:
        # SAM's decoder as loaded; a bundle saved before it carried one has only the decoder it trained
        model.decoder_as_loaded = as_loaded or {name: t.detach().clone()
                                                for name, t in model.sam.mask_decoder.state_dict().items()}
    setattr(model, _FILE_ATTRIBUTE, path)
    return model.eval()


def _without_decoder_as_loaded(tensors: dict[str, torch.Tensor]
                               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A file's tensors split into the model's state dict and SAM's decoder as loaded (a bundle's
    ``sam_decoder_as_loaded.*``, named without the prefix)."""
    model = {k: v for k, v in tensors.items() if not k.startswith(DECODER_AS_LOADED)}
    as_loaded = {k[len(DECODER_AS_LOADED):]: v for k, v in tensors.items() if k.startswith(DECODER_AS_LOADED)}
    return model, as_loaded


def _header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as empty ``meta`` tensors of their shapes and dtypes, from the safetensors header alone."""
    from safetensors import safe_open

    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    with safe_open(str(path), framework="pt") as f:
        return {name: torch.empty(f.get_slice(name).get_shape(), device="meta",
                                  dtype=dtypes.get(f.get_slice(name).get_dtype(), torch.float32))
                for name in f.keys()}


def _is_builtin_base(expected: Any) -> bool:
    """Whether an adapter's recorded base is the built-in model of this installation (same file name and sha256)."""
    from .builtin import BUILTIN_FILE, builtin_provenance

    try:
        return expected.file_name == BUILTIN_FILE and expected.sha256 == builtin_provenance().get("sha256")
    except (OSError, CheckpointError, ValueError):
        return False


def _check_bundle_or_adapter(path: Path, record: dict[str, Any], config: ModelConfig,
                             tensors: dict[str, torch.Tensor], base: str | os.PathLike | BaseSam | None,
                             check_base_hash: bool) -> AdaptedSAM:
    """The model ``record`` describes, built (on ``base`` for an adapter), with ``tensors`` (real or ``meta``)
    checked against it: names and shapes. Raises CheckpointError naming ``path``."""
    if record["format"] == BUNDLE_FORMAT:
        _check_bundle_geometry(tensors, config, path)  # before building a model of the size the record claims
        model = AdaptedSAM(build_sam(config.base), config)
        _check_tensor_keys(model, tensors, path, adapter=False)
        missing = set(model.state_dict()) - set(tensors)
        if record.get("format_version") == 1:
            missing -= files_v1.lost_in_v1_bundles(model)
            model.prompt_head.unavailable = files_v1.V1_BUNDLE_PROMPTS
        if missing:
            raise CheckpointError(f"{path}: the bundle lacks tensors {sorted(missing)[:5]}")
        return model

    expected = config.base_checkpoint
    if base is None and _is_builtin_base(expected):
        from .builtin import builtin_checkpoint

        base = builtin_checkpoint()  # trained on the built-in model: it ships with the package
    if base is None:
        raise CheckpointError(
            f"{path}: an adapter file needs its base SAM checkpoint "
            f"('{expected.file_name}', sha256 {expected.sha256[:12]}...)"
        )
    base = base if isinstance(base, BaseSam) else load_base(base)
    base_name = base.checkpoint.file_name if base.checkpoint else "the SAM given (built in memory, no file)"
    if check_base_hash and (base.checkpoint is None or base.checkpoint.sha256 != expected.sha256):
        found = f"has sha256 {base.checkpoint.sha256[:12]}..." if base.checkpoint else "has no checkpoint file to hash"
        raise CheckpointError(
            f"{path}: was trained on '{expected.file_name}' (sha256 {expected.sha256[:12]}...) but {base_name} "
            f"{found}. Use the same base checkpoint, or pass check_base_hash=False if you are sure the weights "
            "are the same."
        )
    try:
        model = AdaptedSAM(base.sam, dataclasses.replace(config, base_checkpoint=base.checkpoint or expected), base.hq)
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot be built on {base_name}: {e}") from None
    _check_tensor_keys(model, tensors, path, adapter=True)
    return model


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """The record of a file this project wrote (with tensor and parameter counts and the file size), or the
    geometry of a SAM checkpoint (any supported format), with its HQ-SAM parts when it has them."""
    path = Path(path)
    if path.suffix == MODEL_SUFFIX and path.is_file():
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
    _, hq_state = split_hq_state(state)
    return {
        "format": SAM_CHECKPOINT_FORMAT,
        "model_type": arch.model_type,
        "architecture": to_record(arch),
        "parameters": sum(t.numel() for t in state.values()),
        "hq": {"parameters": sum(t.numel() for t in hq_state.values()), "tensors": len(hq_state)} if hq_state else None,
        "file_size": path.stat().st_size,
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
