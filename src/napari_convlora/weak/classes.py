"""Classes of weakly labelled objects, and segmented instances -> one multi-class label image: the bridge from
prompted objects to the prompt-free head (train Conv-LoRA on it, and unprompted planes get segmented too).

numpy and pandas only. A class is read from a ``class`` feature of the layer an object came from: a Shapes
layer's row of the shape, a Points layer's row of the point (of the first point of an ``instance`` that names one),
a Labels layer's row whose ``index`` is the label id (its row number without an ``index`` column).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from .objects import WeakObject

#: The feature naming an object's class.
CLASS_COLUMN = "class"
#: The class of objects without one (every object, when no layer has a ``class`` feature).
DEFAULT_CLASS = "object"
BACKGROUND = "background"


def _rows(source: str, table: pd.DataFrame) -> pd.DataFrame:
    """The feature rows of the object named ``source`` (``"shape 3"``, ``"point 5"``, ``"instance 'a'"``,
    ``"label 7"``, as the ``weak`` readers name them)."""
    kind, _, key = source.partition(" ")
    if kind in ("shape", "point", "label") and key.lstrip("-").isdigit():
        number = int(key)
        if kind == "label" and "index" in table.columns:
            return table[pd.to_numeric(table["index"], errors="coerce") == number]
        return table.iloc[[number]] if 0 <= number < len(table) else table.iloc[[]]
    if kind == "instance" and "instance" in table.columns:  # the points reader names instances by repr()
        values = table["instance"].to_numpy(dtype=object)
        return table[[repr(v) == key for v in values]]
    return table.iloc[[]]


def object_class(obj: WeakObject, features: pd.DataFrame | None, column: str = CLASS_COLUMN) -> str | None:
    """The class name of ``obj`` from the features of the layer it came from; None when they name none."""
    if features is None or column not in getattr(features, "columns", ()) or len(features) == 0:
        return None
    rows = _rows(obj.source, pd.DataFrame(features).reset_index(drop=True))
    names = [str(v).strip() for v in rows[column] if not pd.isna(v) and str(v).strip()]
    return names[0] if names else None


def class_labels_from_instances(
    instances: np.ndarray, classes: Mapping[int, str | None], default: str = DEFAULT_CLASS
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Instances (integer ids, 0 background, any shape) -> a class label image of the same shape and the class
    names, ``"background"`` first.

    classes: instance id -> class name (None, or an id left out: ``default``). Classes take the values 1..K in
    the sorted order of their names; without any named class every instance is class 1 (``default``).
    The dtype follows ``data.label_dtype`` (uint8 below 256 classes).
    """
    from ..data.labels import label_dtype

    instances = np.asarray(instances)
    if np.issubdtype(instances.dtype, np.signedinteger) and instances.size and instances.min() < 0:
        raise ValueError(f"instance ids must not be negative (smallest {instances.min()})")
    ids = [int(i) for i in np.unique(instances) if i != 0]
    named = {i: (classes.get(i) or default) for i in ids}
    names = sorted(set(named.values()))
    values = {name: k for k, name in enumerate(names, start=1)}
    lookup = np.zeros(max(ids, default=0) + 1, label_dtype([len(names)]))
    for i, name in named.items():
        lookup[i] = values[name]
    return lookup[instances], (BACKGROUND, *names)


def class_features(names: tuple[str, ...]) -> pd.DataFrame:
    """A Labels layer's features naming its values: ``index`` 0..K and ``class`` (what Training data reads)."""
    return pd.DataFrame({"index": list(range(len(names))), "class": list(names)})
