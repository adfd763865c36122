"""Reading model files of format version 1 (napari-convlora 0.1.0): their record and tensor names converted
to the current shape, so that one strict reader serves every version.

What changed in version 2: the prompt-free head became a module of its own (its tokens and class head are
saved under ``head.``, SAM's decoder keeps its own four mask tokens and MLPs), the normalisation record
became the input spec plus the model's pixel mean and std, the base checkpoint moved into the config, and
the one-file "merged" model was renamed a bundle (it never merged weights).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..config.choices import ADAPTER_FORMAT, BUNDLE_FORMAT, BUNDLE_FORMAT_V1
from ..constants import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from ..errors import CheckpointError

#: Version 1 tensor names -> version 2 names (prefix replacements).
_RENAMED = (
    ("sam.mask_decoder.mask_tokens.", "head.mask_tokens."),
    ("class_head.", "head.class_head."),
)

V1_BUNDLE_PROMPTS = (
    "this model was loaded from a version-1 one-file model, which did not keep SAM's own mask tokens and "
    "hypernetwork MLPs 1-3, so SAM's promptable decoding is not available on it; load its adapter on the "
    "base SAM checkpoint instead"
)


def convert_record(record: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """A version 1 record in the current shape (``format_version`` stays 1, so tensors get converted too)."""
    config = record.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: its version-1 record lacks 'config'")
    normalisation = config.get("normalisation", {})
    base_checkpoint = record.get("base_checkpoint")
    converted = {
        "base": config.get("base"),
        "adapter": config.get("adapter"),
        "head": config.get("head"),
        "input_size": config.get("input_size"),
        "input": {
            "channels": None,
            "rgb_slots": None,
            "percentiles": normalisation.get("percentiles", (1.0, 99.8)),
            "rescale": normalisation.get("rescale", 1.0),
        },
        "pixel_mean": normalisation.get("pixel_mean", SAM_PIXEL_MEAN),
        "pixel_std": normalisation.get("pixel_std", SAM_PIXEL_STD),
        "base_checkpoint": None if base_checkpoint is None else {
            "file_name": base_checkpoint.get("file_name"), "sha256": base_checkpoint.get("sha256"),
        },
    }
    file_format = {BUNDLE_FORMAT_V1: BUNDLE_FORMAT}.get(record.get("format"), record.get("format"))
    if file_format == ADAPTER_FORMAT and converted["base_checkpoint"] is None:
        raise CheckpointError(f"{path}: a version-1 adapter without its 'base_checkpoint' record")
    return {**record, "format": file_format, "config": converted}


def convert_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Version 1 tensor names -> version 2 names."""
    out = {}
    for name, tensor in tensors.items():
        for old, new in _RENAMED:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = tensor
    return out


def lost_in_v1_bundles(model: torch.nn.Module) -> set[str]:
    """Tensor names of SAM's own decoder that version-1 bundles did not keep (they replaced them by the
    head's): SAM's mask tokens and its hypernetwork MLPs 1-3."""
    return {name for name in model.state_dict()
            if name.startswith("sam.mask_decoder.mask_tokens.")
            or (name.startswith("sam.mask_decoder.output_hypernetworks_mlps.")
                and not name.startswith("sam.mask_decoder.output_hypernetworks_mlps.0."))}
