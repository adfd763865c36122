"""The CSV files napari writes for Shapes and Points layers (File > Save Selected Layer(s), ``.csv``), read back.

The layouts, from napari's own writers (``napari_builtins.io._write.napari_write_shapes`` and
``napari_write_points``, napari 0.5-0.9):

* Shapes: ``index, shape-type, vertex-index, axis-0, ..., axis-{D-1}``, one row per vertex; ``index`` numbers the
  shapes, ``shape-type`` is "rectangle", "ellipse", "polygon", "path" or "line", ``vertex-index`` counts the
  vertices of each shape, ``axis-k`` are the data coordinates (the last two row, column).
* Points: ``index, axis-0, ..., axis-{D-1}``, then one column per feature (``label``, ``instance``, ...), one
  row per point. Booleans are written ``True``/``False``; without features even ``index`` is written as a float.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .objects import WeakLabelError, WeakLabels
from .points import weak_labels_from_points
from .shapes import weak_labels_from_shapes

SHAPES_COLUMNS = ("index", "shape-type", "vertex-index")
#: The most shapes (or points) one CSV is read with: far beyond hand-made weak labels, and each object costs a
#: prompt; a file with more is refused in seconds rather than read for minutes.
MAX_SHAPES = 100_000
_AXIS = re.compile(r"^axis-(\d+)$")


def _read_table(path: str | Path, kind: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise WeakLabelError(f"{kind} CSV {str(path)!r} is empty; expected the header napari writes") from None
    except pd.errors.ParserError as error:
        raise WeakLabelError(f"{kind} CSV {str(path)!r} cannot be parsed: {' '.join(str(error).split())}") from None
    except UnicodeDecodeError:
        raise WeakLabelError(f"{kind} CSV {str(path)!r} is not UTF-8 text (a spreadsheet's export in another encoding, "
                             f"or not a CSV file): save the {kind} layer from napari as .csv") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _axis_columns(table: pd.DataFrame, path: str | Path, kind: str, layout: str) -> list[str]:
    found = sorted((int(m.group(1)), c) for c in table.columns if (m := _AXIS.match(c)))
    if [k for k, _ in found] != list(range(len(found))) or len(found) < 2:
        raise WeakLabelError(f"{kind} CSV {str(path)!r} has columns {', '.join(table.columns)}; expected "
                             f"{layout} (as napari saves a {kind} layer)")
    columns = [c for _, c in found]
    for column in columns:
        if len(table) and not pd.api.types.is_numeric_dtype(table[column]):
            raise WeakLabelError(f"{kind} CSV {str(path)!r}: column {column!r} holds values that are not numbers")
    return columns


def read_shapes_csv(path: str | Path) -> tuple[list[np.ndarray], list[str]]:
    """A napari Shapes CSV -> (``data``: one ``V x D`` float64 vertex array per shape in the file's order,
    ``shape_type``: one name per shape), as a Shapes layer holds them."""
    table = _read_table(path, "Shapes")
    missing = [c for c in SHAPES_COLUMNS if c not in table.columns]
    if missing:
        hint = " (it looks like a Points CSV; give it as points)" if "axis-0" in table.columns else ""
        raise WeakLabelError(f"Shapes CSV {str(path)!r} lacks column(s) {', '.join(missing)}{hint}; expected "
                             "index, shape-type, vertex-index, axis-0, axis-1, ...")
    axes = _axis_columns(table, path, "Shapes", "index, shape-type, vertex-index, axis-0, axis-1, ...")
    if table.empty:
        return [], []
    codes, shape_ids = pd.factorize(table["index"], sort=False)  # the shapes in the file's order
    if len(shape_ids) > MAX_SHAPES:
        raise WeakLabelError(f"Shapes CSV {str(path)!r} holds {len(shape_ids):,} shapes; at most {MAX_SHAPES:,} are "
                             "read as weak labels: split the layer, or give a coarse label image instead")
    order = np.lexsort((table["vertex-index"].to_numpy(), codes))  # by shape, then vertex (stable)
    codes = codes[order]
    coords = table[axes].to_numpy(np.float64)[order]
    kinds = table["shape-type"].astype(str).str.strip().to_numpy()[order]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    mixed = kinds != np.repeat(kinds[starts], np.diff(np.r_[starts, len(codes)]))
    if mixed.any():
        code = codes[np.argmax(mixed)]
        found = ", ".join(pd.unique(kinds[codes == code]))
        raise WeakLabelError(f"Shapes CSV {str(path)!r}: shape {shape_ids[code]} has several shape types ({found})")
    return np.split(coords, starts[1:]), [str(k) for k in kinds[starts]]


def read_points_csv(path: str | Path) -> tuple[np.ndarray, pd.DataFrame]:
    """A napari Points CSV -> (``data``: ``N x D`` float64 coordinates, ``features``: the other columns but
    ``index``, one row per point), as a Points layer holds them."""
    table = _read_table(path, "Points")
    if "shape-type" in table.columns or "vertex-index" in table.columns:
        raise WeakLabelError(f"Points CSV {str(path)!r} is a Shapes CSV (it has a 'shape-type' column); give it as "
                             "shapes")
    axes = _axis_columns(table, path, "Points", "index, axis-0, axis-1, ..., then feature columns such as label")
    if len(table) > MAX_SHAPES:
        raise WeakLabelError(f"Points CSV {str(path)!r} holds {len(table):,} points; at most {MAX_SHAPES:,} are read "
                             "as weak labels: split the layer, or give a coarse label image instead")
    features = table.drop(columns=[*axes, *(["index"] if "index" in table.columns else [])])
    return table[axes].to_numpy(np.float64), features.reset_index(drop=True)


def csv_layer_kind(path: str | Path) -> str:
    """"shapes" or "points", from the header of a CSV that napari wrote."""
    columns = _read_table(path, "layer").columns
    if "shape-type" in columns:
        return "shapes"
    if "axis-0" in columns:
        return "points"
    raise WeakLabelError(f"CSV {str(path)!r} has columns {', '.join(columns)}; expected napari's Shapes layout "
                         "(index, shape-type, vertex-index, axis-0, ...) or Points layout (index, axis-0, ...)")


def weak_labels_from_csv(
    path: str | Path, image_shape: Sequence[int], *, kind: str | None = None, coarse_masks: bool = False,
) -> WeakLabels:
    """Weak labels from a napari Shapes or Points CSV (``kind`` "shapes" / "points", or None to tell from the
    header); the layer is named after the file in messages."""
    kind = kind or csv_layer_kind(path)
    name = Path(path).name
    if kind == "shapes":
        data, types = read_shapes_csv(path)
        return weak_labels_from_shapes(data, types, image_shape, layer=name, coarse_masks=coarse_masks)
    if kind == "points":
        points, features = read_points_csv(path)
        return weak_labels_from_points(points, features, image_shape, layer=name)
    raise WeakLabelError(f"CSV kind {kind!r} for {str(path)!r} is not 'shapes' or 'points'")
