"""Weak labels as napari users draw them -> per-plane prompt sets for weakly supervised adaptation (WeSAM).

numpy, scipy, scikit-image and pandas only: no torch, no napari, no Qt. Each source gives a ``WeakLabels``
(one image's ``WeakObject``s grouped by plane, and what was skipped and why)::

    boxes = weak_labels_from_shapes(shapes.data, shapes.shape_type, image_shape, layer=shapes.name)
    points = weak_labels_from_points(pts.data, pts.features, image_shape, layer=pts.name)
    coarse = weak_labels_from_coarse_labels(labels.data, image_shape, layer=labels.name)
    weak = combine_weak_labels([boxes, points, coarse]).with_evaluation_labels(dense)  # evaluation only
    weak.summary().lines()                                   # for the log
    pos, neg = step_points(obj, weak.plane_shape, rng)       # WeSAM's 5 + 5 points, afresh at every step

and from the CSV files napari saves: ``weak_labels_from_csv(path, image_shape)``. Coordinates are SAM's
``(x, y)`` on pixel edges (``objects.py``); layer coordinates are taken as image pixels (``coordinates.py``).
"""

from .coarse import WESAM_POINTS, draw_points, step_points, weak_labels_from_coarse_labels
from .csv_files import csv_layer_kind, read_points_csv, read_shapes_csv, weak_labels_from_csv
from .objects import KINDS, WeakLabelError, WeakLabels, WeakLabelSummary, WeakObject, combine_weak_labels
from .points import weak_labels_from_points
from .shapes import PROMPT_SHAPES, weak_labels_from_shapes

__all__ = [
    "KINDS", "PROMPT_SHAPES", "WESAM_POINTS", "WeakLabelError", "WeakLabelSummary", "WeakLabels", "WeakObject",
    "combine_weak_labels", "csv_layer_kind", "draw_points", "read_points_csv", "read_shapes_csv", "step_points",
    "weak_labels_from_coarse_labels", "weak_labels_from_csv", "weak_labels_from_points", "weak_labels_from_shapes",
]
