"""A contact sheet of synthetic scenes, to look at them: each scene's image beside the same image with its
instance outlines coloured by class (yellow round, cyan elongated, magenta other)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage.segmentation import find_boundaries

from .synthetic import Scene

CLASS_OUTLINE_COLOURS = np.array([[0, 0, 0], [255, 220, 0], [0, 230, 255], [255, 60, 220]], np.uint8)


def outlined(scene: Scene) -> np.ndarray:
    """``scene.image`` (Y x X x 3 uint8) with each instance's inner boundary drawn in its class colour."""
    out = scene.image.copy()
    edge = find_boundaries(scene.instances, mode="inner") & (scene.instances > 0)
    classes = np.concatenate([[0], scene.classes])[scene.instances]
    out[edge] = CLASS_OUTLINE_COLOURS[np.clip(classes[edge], 0, 3)]
    return out


def contact_sheet(scenes: Sequence[Scene], columns: int, gap: int = 4) -> np.ndarray:
    """A mosaic (uint8 RGB, H x W x 3) of ``scenes``, ``columns`` per row, each as image | outlined image,
    on a mid-grey ground with ``gap`` pixels between tiles. Save it with e.g. ``imageio.imwrite(path, sheet)``."""
    if not scenes or columns < 1:
        raise ValueError("need at least one scene and one column")
    height = max(s.image.shape[0] for s in scenes)
    width = max(s.image.shape[1] for s in scenes)
    rows = -(-len(scenes) // columns)
    tile_w = 2 * width + gap // 2
    sheet = np.full((rows * (height + gap) + gap, columns * (tile_w + gap) + gap, 3), 96, np.uint8)
    for k, scene in enumerate(scenes):
        top = gap + (k // columns) * (height + gap)
        left = gap + (k % columns) * (tile_w + gap)
        h, w = scene.image.shape[:2]
        sheet[top:top + h, left:left + w] = scene.image
        sheet[top:top + h, left + width + gap // 2:left + width + gap // 2 + w] = outlined(scene)
    return sheet
