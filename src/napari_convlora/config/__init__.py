"""The configuration tree, importable without torch, Qt or napari.

- :mod:`.sam`: :class:`SamArchitecture`, the geometry any SAM is rebuilt from, and its presets;
- :mod:`.model`: :class:`ModelConfig` = base geometry + :class:`AdapterConfig` + :class:`HeadConfig` +
  input size + :class:`InputSpec` + :class:`BaseCheckpoint`: what a model file records;
- :mod:`.training`: :class:`TrainRecipe` (saved with a run, reused on resume) and :class:`RunOptions`
  (device, precision, threads: never saved);
- :mod:`.choices`: every choice list and file-format name;
- :mod:`.records`: one policy to write these dataclasses as JSON and read them back.
"""

from .choices import DEVICES, LABEL_MODES, METHODS, PRECISIONS
from .model import (
    AdapterConfig,
    BaseCheckpoint,
    HeadConfig,
    InputSpec,
    ModelConfig,
    check_input_size,
    wesam_adapter,
)
from .records import from_record, to_record
from .sam import PRESETS, SMALL, TINY, SamArchitecture
from .training import DATA_FIELDS, RunOptions, TrainRecipe

__all__ = [
    "DATA_FIELDS",
    "DEVICES",
    "LABEL_MODES",
    "METHODS",
    "PRECISIONS",
    "PRESETS",
    "SMALL",
    "TINY",
    "AdapterConfig",
    "BaseCheckpoint",
    "HeadConfig",
    "InputSpec",
    "ModelConfig",
    "RunOptions",
    "SamArchitecture",
    "TrainRecipe",
    "check_input_size",
    "from_record",
    "to_record",
    "wesam_adapter",
]
