"""One policy for turning configuration dataclasses into JSON records and back.

- :func:`to_record`: a dataclass -> plain JSON types (nested dataclasses become dicts, tuples lists).
- :func:`from_record`: the inverse, for every dataclass of the config tree alike. Unknown keys (written by a
  newer version) are dropped with a warning; a missing key is an error that names where the record came
  from (a file) and the key's full path (``config.adapter.rank``). Nested dataclass fields are read
  recursively; values are checked by each dataclass's own ``__post_init__``, whose message is kept.

Files from an older format version are first converted to the current shape (``checkpoints/model_files.py``), so that the
reader here can stay strict. The one exception: a field declared with ``metadata=ADDED_LATER`` (a setting
introduced after format version 2 whose default reproduces what older files meant, like ``hq="off"``) takes its
default when a record lacks it, so that adapters, bundles and training states written before stay readable.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
import warnings
from typing import Any, Mapping, TypeVar

from ..errors import ConfigError

T = TypeVar("T")

#: Field metadata of a setting added after a format was released: older records lack it and mean its default.
ADDED_LATER = {"added_later": True}


def added_later(before: Any) -> dict[str, Any]:
    """Field metadata of a setting added after a format was released whose default has changed since: older records
    lack it and mean ``before`` (what they were trained with), not the current default."""
    return {"added_later": True, "before": before}


def to_record(obj: Any) -> Any:
    """A dataclass (or a value inside one) as JSON-serialisable Python: dict, list, str, int, float, bool, None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_record(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_record(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_record(v) for k, v in obj.items()}
    return obj


@functools.lru_cache(maxsize=None)
def _nested_types(cls: type) -> dict[str, tuple[type, bool]]:
    """Field name -> (dataclass type, whether None is allowed), for the fields of ``cls`` holding a dataclass."""
    nested = {}
    for name, hint in typing.get_type_hints(cls).items():
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        for option in options:
            if dataclasses.is_dataclass(option):
                nested[name] = (option, type(None) in options)
    return nested


def from_record(cls: type[T], record: Any, where: str, path: str = "") -> T:
    """Build ``cls`` from a record written by :func:`to_record`.

    Args:
        where: what the record is, for messages (a file name and the part of it: ``"model.safetensors"``).
        path: the key path of ``record`` inside that file (``"config.adapter"``).

    Raises:
        ConfigError: not a mapping, a missing key, or a value the dataclass rejects.
    """
    label = f"{where}: {path}" if path else where
    if not isinstance(record, Mapping):
        raise ConfigError(f"{label}: expected a record of keys and values, found {type(record).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(record) - set(fields))
    if unknown:
        warnings.warn(f"{label}: ignoring unknown keys {unknown} (written by a newer napari-convlora?)", stacklevel=2)
    missing = [name for name, f in fields.items() if name not in record and not f.metadata.get("added_later")]
    if missing:
        keys = ", ".join(f"'{path + '.' if path else ''}{name}'" for name in missing)
        raise ConfigError(f"{where}: the record lacks {keys}")
    nested = _nested_types(cls)
    values = {}
    for name in fields:
        if name not in record:  # added later: the dataclass's default, or what older records meant
            if "before" in fields[name].metadata:
                values[name] = fields[name].metadata["before"]
            continue
        value = record[name]
        if name in nested:
            kind, optional = nested[name]
            if value is not None or not optional:
                value = from_record(kind, value, where, f"{path}.{name}" if path else name)
        values[name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # this level's own check (nested records were built above)
        raise ConfigError(f"{label}: {e}") from None
