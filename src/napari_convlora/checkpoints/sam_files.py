"""Load SAM checkpoints safely, and write tiny or random SAMs in the official format.

Every ``torch.load`` here is ``map_location="cpu", weights_only=True``: a pickle that would
run code is refused. Nothing is ever downloaded; checkpoints come from the user.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import PRESETS, TINY, BaseCheckpoint, SamArchitecture
from ..config.choices import MODEL_SUFFIX
from ..errors import CheckpointError
from ..io.atomic import atomic_path, sha256_file
from ..io.safety import unreadable_reason
from ..modeling.base_sam import BaseSam
from ..modeling.hq import HQ_CHECKPOINT_PREFIX, HQParts, split_hq_state
from ..modeling.sam_build import build_sam, infer_architecture
from .builtin import OFFICIAL_CHECKPOINTS

#: Keys under which training frameworks nest a SAM state dict (micro-sam, lightning, ...).
_WRAPPER_KEYS = ("model_state", "state_dict", "model")
#: Key prefixes that exporters put in front of SAM's own names.
_PREFIXES = ("sam.", "model.", "module.")
_SAM_KEY = "image_encoder.patch_embed.proj.weight"
#: Key prefixes of TinyViT encoders (sam_hq_vit_tiny, MobileSAM), which segment_anything cannot build.
_TINYVIT_KEYS = ("image_encoder.patch_embed.seq.", "image_encoder.layers.")


def read_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.pth``/``.pt`` (torch zip or legacy pickle) or ``.safetensors`` file safely.

    Raises:
        CheckpointError: missing, truncated, unsafe (would execute code) or unreadable file.
    """
    path = Path(path)
    reason = unreadable_reason(path)
    if reason:
        raise CheckpointError(f"{path}: {reason}")
    if path.suffix == MODEL_SUFFIX or is_safetensors(path):  # also a safetensors file under another name
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    other = other_file_kind(path)
    if other:
        raise CheckpointError(f"{path}: this is {other}, not a model checkpoint (a SAM checkpoint is a .pth file; "
                              f"official ones: {OFFICIAL_CHECKPOINTS})")
    try:
        with warnings.catch_warnings():  # torch's warning about an unknown pickle protocol: the error says it all
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not refused_as_unsafe(e):  # a damaged pickle, not one that names code to run
            raise CheckpointError(f"{path}: could not read it as a PyTorch checkpoint: its pickle is damaged, or it "
                                  "is a file of another format") from e
        raise CheckpointError(
            f"{path}: refused to load. The file holds Python objects beyond tensors, which could run code "
            "when unpickled (torch.load weights_only=True rejected it). If you trust its origin, re-save "
            "only its state dict: torch.save(model.state_dict(), 'clean.pth')."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise CheckpointError(
            f"{path}: could not read it as a PyTorch checkpoint; it may be truncated or of another format ({e})"
        ) from e


def refused_as_unsafe(error: pickle.UnpicklingError) -> bool:
    """Whether torch's safe unpickler refused the file for what it would run (a global it does not allow), rather
    than failing to parse it."""
    text = str(error)
    return "Unsupported global" in text or "GLOBAL " in text


#: File signatures of what people pick by mistake instead of a checkpoint: (leading bytes, what it is).
_SIGNATURES = (
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"), (b"BM", "a BMP image"), (b"\x1f\x8b", "a gzip file (a .nii.gz scan?)"),
    (b"%PDF", "a PDF document"), (b"\x89HDF", "an HDF5 file"), (b"NRRD", "an NRRD image"),
)


def other_file_kind(path: Path) -> str | None:
    """What a file is when it is plainly not a checkpoint (an image, a text file, ...); None when it may be one.

    A torch checkpoint is a zip archive (``PK``) or a pickle (``0x80``); a safetensors file is sniffed apart.
    """
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return None
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "neither a zip archive nor a pickle (damaged, or another format)"
    if text.isprintable() or all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file"
    return "neither a zip archive nor a pickle (damaged, or another format)"


def is_safetensors(path: Path) -> bool:
    """Whether the file starts like a safetensors file: an 8-byte header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def extract_sam_state(obj: Any, path: str | os.PathLike = "<state dict>") -> dict[str, torch.Tensor]:
    """Find SAM's state dict in a loaded object: plain, wrapped (``{"model_state": ...}``) or prefixed (``sam.``)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), found {type(obj).__name__}")
    for key in _WRAPPER_KEYS:
        if _SAM_KEY not in obj and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if _SAM_KEY not in obj:
        for prefix in _PREFIXES:
            if prefix + _SAM_KEY in obj:
                obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
                break
    if _SAM_KEY not in obj and any(str(k).startswith(_TINYVIT_KEYS) for k in obj):
        raise CheckpointError(
            f"{path}: a SAM with a TinyViT image encoder (HQ-SAM's sam_hq_vit_tiny, or MobileSAM): segment_anything "
            "has no TinyViT encoder, so it cannot be built here. Use an HQ-SAM or SAM checkpoint with a ViT encoder "
            "(sam_hq_vit_b / vit_l / vit_h, sam_vit_*)"
        )
    if _SAM_KEY not in obj:
        sample = ", ".join(list(obj)[:4]) or "nothing"
        raise CheckpointError(
            f"{path}: not a SAM checkpoint. Expected SAM's keys such as '{_SAM_KEY}' "
            f"(an official sam_vit_*.pth, MedSAM or a micro-sam export); found {sample}"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(obj):
        odd = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:4]
        raise CheckpointError(f"{path}: entries that are not tensors in the state dict: {odd}")
    return tensors


def _check_keys(sam: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Any) -> None:
    expected = set(sam.state_dict())
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected)
    if missing or extra:
        raise CheckpointError(
            f"{path}: the state dict does not match the SAM geometry read from its tensors. "
            f"Missing {len(missing)} keys {missing[:5]}; unexpected {len(extra)} keys {extra[:5]}"
        )
    for name, target in sam.state_dict().items():
        if state[name].shape != target.shape:
            raise CheckpointError(f"{path}: '{name}' has shape {tuple(state[name].shape)}, expected {tuple(target.shape)}")


def sam_from_state(
    state: Mapping[str, torch.Tensor],
    arch: SamArchitecture | None = None,
    path: Any = "<state dict>",
    decoder_num_heads: int = 8,
) -> BaseSam:
    """Build ``segment_anything``'s ``Sam`` for ``state`` (geometry inferred unless given) and load it strictly;
    an HQ-SAM checkpoint's 25 HQ tensors load strictly into :class:`~.modeling.hq.HQParts`."""
    state, hq_state = split_hq_state(dict(state))
    if arch is None:
        try:
            arch = infer_architecture(state, decoder_num_heads=decoder_num_heads)
        except KeyError as e:
            raise CheckpointError(f"{path}: SAM tensor {e} is missing, so the architecture cannot be read") from None
    sam = build_sam(arch)
    _check_keys(sam, state, path)
    sam.load_state_dict(state, strict=True)
    return BaseSam(sam.eval(), arch, hq=_hq_parts(hq_state, arch, path) if hq_state else None)


def _hq_parts(hq_state: dict[str, torch.Tensor], arch: SamArchitecture, path: Any) -> HQParts:
    """HQ-SAM's parts for ``arch``, loaded strictly from the HQ tensors of a checkpoint (names without ``mask_decoder.``)."""
    hq = HQParts(arch.prompt_embed_dim, arch.encoder_embed_dim)
    expected = hq.state_dict()
    missing = sorted(set(expected) - set(hq_state))
    if missing:
        raise CheckpointError(f"{path}: an HQ-SAM checkpoint without all of its HQ decoder tensors: missing "
                              f"{len(missing)} ({', '.join(HQ_CHECKPOINT_PREFIX + k for k in missing[:3])}, ...)")
    extra = sorted(set(hq_state) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected HQ tensors {[HQ_CHECKPOINT_PREFIX + k for k in extra[:4]]}")
    for name, target in expected.items():
        if hq_state[name].shape != target.shape:
            raise CheckpointError(f"{path}: '{HQ_CHECKPOINT_PREFIX}{name}' has shape {tuple(hq_state[name].shape)}, "
                                  f"expected {tuple(target.shape)} for this SAM")
    hq.load_state_dict(hq_state, strict=True)
    return hq.eval()


_hash_cache: dict[tuple[str, int, int], str] = {}


def checkpoint_identity(path: str | os.PathLike) -> BaseCheckpoint:
    """The file name and sha256 of a checkpoint; the hash is cached by (path, size, mtime), so a file is
    read once per session however often it is loaded."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = sha256_file(path)
    return BaseCheckpoint(path.name, _hash_cache[key])


def load_base(path: str | os.PathLike, model_type: str | None = None, decoder_num_heads: int = 8) -> BaseSam:
    """Load a SAM checkpoint to adapt: like :func:`load_sam`, and also its geometry and sha256.

    Args:
        path: an official checkpoint (``sam_vit_b_01ec64.pth`` ...), any state dict with SAM's key names
            (MedSAM; ``{"model_state": ...}`` or ``sam.``-prefixed as micro-sam exports), ``.pth`` or ``.safetensors``.
        model_type: ``"vit_b"``, ``"vit_l"`` or ``"vit_h"`` to check the inferred geometry against; None accepts any.
        decoder_num_heads: attention heads of the decoder (not stored in the tensors; 8 in every known SAM).

    Raises:
        CheckpointError: unsafe, truncated, foreign or mismatching file; the message names the file.
    """
    state = extract_sam_state(read_tensors(path), path)
    base = sam_from_state(state, path=path, decoder_num_heads=decoder_num_heads)
    if model_type is not None:
        if model_type not in PRESETS:
            raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(PRESETS)} or None")
        found = base.architecture.model_type
        if found != model_type:
            raise CheckpointError(
                f"{path}: expected a {model_type} checkpoint but its tensors describe "
                f"{found or 'a non-standard SAM'} (embed dim {base.architecture.encoder_embed_dim}, "
                f"depth {base.architecture.encoder_depth})"
            )
    base.checkpoint = checkpoint_identity(path)
    return base


def load_sam(path: str | os.PathLike, model_type: str | None = None, decoder_num_heads: int = 8) -> "torch.nn.Module":
    """Load a SAM checkpoint into ``segment_anything.modeling.Sam`` (CPU, eval mode), its architecture read
    off the tensors. Arguments and errors as :func:`load_base`."""
    return load_base(path, model_type, decoder_num_heads).sam


def random_base(arch: SamArchitecture | str, seed: int = 0) -> BaseSam:
    """:func:`random_sam` with its geometry, for building a model in memory (no checkpoint file)."""
    arch = SamArchitecture.preset(arch) if isinstance(arch, str) else arch
    return BaseSam(random_sam(arch, seed), arch)


def random_sam(arch: SamArchitecture | str, seed: int = 0) -> "torch.nn.Module":
    """A SAM with random weights (for benchmarks and tests): ``arch`` is a geometry or ``"vit_b"|"vit_l"|"vit_h"|"tiny"``."""
    arch = SamArchitecture.preset(arch) if isinstance(arch, str) else arch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam(arch)
        # Zero-initialised tables would hide bugs in their interpolation: give them small random values.
        for name, p in sam.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                torch.nn.init.normal_(p, std=0.02)
    return sam


def save_sam_checkpoint(sam: "torch.nn.Module", path: str | os.PathLike, hq: HQParts | None = None) -> Path:
    """Write ``sam.state_dict()`` exactly as the official checkpoints are stored (a torch zip of tensors); with
    ``hq``, as HQ-SAM's are (its 25 tensors merged in under ``mask_decoder.``)."""
    path = Path(path)
    state = dict(sam.state_dict())
    if hq is not None:
        state.update(hq.to_checkpoint_state())
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def random_hq_parts(arch: SamArchitecture | str, seed: int = 0) -> HQParts:
    """HQ-SAM's parts for a SAM of geometry ``arch``, with random weights (seeded; LayerNorms randomised too so that
    tests see them)."""
    arch = SamArchitecture.preset(arch) if isinstance(arch, str) else arch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hq = HQParts(arch.prompt_embed_dim, arch.encoder_embed_dim)
        for module in hq.modules():
            if type(module).__name__ == "LayerNorm2d":  # weight and bias away from 1 and 0
                torch.nn.init.normal_(module.weight, mean=1.0, std=0.1)
                torch.nn.init.normal_(module.bias, std=0.1)
    return hq.eval()


def tiny_hq_checkpoint(path: str | os.PathLike, arch: SamArchitecture | str = "tiny", seed: int = 0) -> Path:
    """Write an HQ-SAM checkpoint in the official format (SAM's keys + 25 HQ keys) with random weights, for tests."""
    return save_sam_checkpoint(random_sam(arch, seed), path, hq=random_hq_parts(arch, seed + 1))


def tiny_sam_checkpoint(path: str | os.PathLike, image_size: int = 256, seed: int = 0) -> Path:
    """Write a tiny SAM (``segment_anything`` classes, random weights) in the official checkpoint format.

    It is an untrained toy (about 0.3 M parameters): it lets the whole pipeline run in seconds on a CPU,
    but it knows nothing about images until fine-tuned.
    """
    if image_size % 16 or image_size < 64:
        raise ValueError(f"image_size must be a multiple of 16 and at least 64, got {image_size}")
    arch = dataclasses.replace(TINY, image_size=image_size)
    return save_sam_checkpoint(random_sam(arch, seed=seed), path)
