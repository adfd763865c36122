"""Sample data for napari's File > Open Sample menu: image + labels pairs ready to train on, no download."""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..data.samples import CLASS_NAMES, stardist_nuclei, synthetic_cells

LayerData = list[tuple[Any, dict[str, Any], str]]


def _class_features(names: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame({"index": list(range(len(names))), "class": list(names)})


def synthetic_cells_sample() -> LayerData:
    """A generated 16-bit 384 x 384 image with dense labels: background, round nuclei, striped rods."""
    image, labels = synthetic_cells(384, seed=0)
    return [
        (image, {"name": "cells"}, "image"),
        (labels, {"name": "cells labels", "features": _class_features(CLASS_NAMES), "opacity": 0.5}, "labels"),
    ]


def nuclei_sample() -> LayerData:
    """A real 512 x 512 fluorescence image of nuclei with expert instance labels (DSB 2018, CC0), from the
    stardist package when it is installed."""
    found = stardist_nuclei()
    if found is None:
        raise ModuleNotFoundError("this sample comes with the stardist package: pip install stardist")
    image, labels = found
    return [
        (image, {"name": "nuclei"}, "image"),
        (labels, {"name": "nuclei labels", "opacity": 0.5}, "labels"),
    ]
