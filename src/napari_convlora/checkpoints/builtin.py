"""The built-in small SAM: pretrained in this repository on generated scenes and shipped with the package.

``scripts/pretrain_small_sam.py`` made it (SAM's promptable objective, ``config.SMALL`` geometry, 256 px); the
file is an ordinary checkpoint in the official format (``load_sam`` infers its architecture like any other),
and the JSON beside it records how it was made and what it reaches. It is the default base model of the demo
and the dock. For real work an official checkpoint is better:
github.com/facebookresearch/segment-anything#model-checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

BUILTIN_FILE = "small_sam_256.pth"
#: The name that stands for the built-in model wherever a SAM checkpoint is asked for (``--checkpoint builtin``).
BUILTIN_NAME = "builtin"
OFFICIAL_CHECKPOINTS = "github.com/facebookresearch/segment-anything#model-checkpoints"


def builtin_checkpoint() -> Path:
    """The path of the built-in small SAM's checkpoint inside the installed package.

    Raises:
        CheckpointError: the file is missing from this installation.
    """
    path = Path(__file__).resolve().parent.parent / "models" / BUILTIN_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: the built-in small SAM is missing from this installation; reinstall "
                              f"napari-convlora, or choose a SAM checkpoint ({OFFICIAL_CHECKPOINTS})")
    return path


def resolve_base(checkpoint: str | Path | None) -> Path:
    """The file of a base SAM given by path, by the name ``"builtin"``, or None (the built-in model)."""
    if checkpoint is None or str(checkpoint) == BUILTIN_NAME:
        return builtin_checkpoint()
    return Path(checkpoint)


def builtin_provenance() -> dict[str, Any]:
    """How the built-in model was made (script, seed, steps, commit, sha256, time) and its held-out quality."""
    return json.loads(builtin_checkpoint().with_suffix(".json").read_text())


def describe_builtin() -> str:
    """One paragraph for logs and the demo: what the built-in model is, how good, and what to use instead."""
    record = builtin_provenance()
    held_out = record.get("held_out", {})
    return (f"the built-in small SAM ({record['parameters'] / 1e6:.1f} M parameters, 256 px), pretrained in this "
            f"repository for {record['steps']} steps on generated scenes (box-prompt mIoU "
            f"{held_out.get('box_miou', float('nan')):.2f} and one-point mIoU {held_out.get('point_miou', float('nan')):.2f}"
            f" on held-out generated scenes); it has never seen real images. For real work, choose an official "
            f"SAM checkpoint ({OFFICIAL_CHECKPOINTS})")
