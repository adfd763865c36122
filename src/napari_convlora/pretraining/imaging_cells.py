"""Pretraining scenes like light microscopy (issue 24): fluorescent nuclei, cells with a cytoplasm and a membrane,
and thin filaments. Pure numpy and scipy; each maker takes a generator and a size and returns a
:class:`~.synthetic.Scene` (classes: 1 round, 2 elongated, 3 other, as ``shapes.CLASS_NAMES``).

What they add to ``synthetic.random_scene``'s abstract shapes: chromatin-textured nuclei dimmer at the rim,
crowded and touching (the neighbour painted later covers the earlier one, as in a projection); epithelial sheets of
cells that share their membranes; networks of crossing filaments 1-4 px wide; and both polarities where the
modality has them (fluorescence bright on dark, brightfield dark outlines on bright). Blur and noise come from
``synthetic.finish``, inside the pretraining ranges, so the benchmark's blur, noise and low-contrast shifts stay
unseen. Lengths are pixels at ``synthetic.REFERENCE_SIZE`` and scale with the size.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from .shapes import SHAPE_CLASSES, draw_shape
from .synthetic import CONTRAST_RANGE, REFERENCE_SIZE, Scene, finish
from .textures import smooth_noise, texture, worley_cells

NUCLEUS_RADIUS = (4.0, 16.0)
NUCLEUS_COUNT = (3, 120)
CELL_SIZE = (10.0, 34.0)  # distance between neighbouring cells' seeds in a sheet
MEMBRANE_WIDTH = (0.8, 2.5)  # half-width of a cell's membrane, px
FILAMENT_COUNT = (3, 30)


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def visible_instances(raw: np.ndarray, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """``raw`` (Y x X int, 0 background, painting order ids) with ids of fewer than ``min_area`` visible pixels
    set to 0 and the rest renumbered 1..N -> (instances Y x X int32, kept raw ids N)."""
    areas = np.bincount(raw.ravel())
    keep = np.flatnonzero(areas >= min_area)
    keep = keep[keep > 0]
    lookup = np.zeros(len(areas), np.int32)
    lookup[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return lookup[raw], keep


def make_scene(image: np.ndarray, raw: np.ndarray, classes_by_raw: np.ndarray, rng: np.random.Generator,
           contrast: float, kind: str, min_area: int = 12) -> Scene:
    """The :class:`Scene` of a float image in [0, 1] (blurred and noised by ``synthetic.finish`` for objects whose
    weakest step is ``contrast``) and its painting-order ids ``raw``, ``classes_by_raw`` indexed by raw id."""
    instances, keep = visible_instances(raw, min_area)
    return Scene(image=finish(np.clip(image, 0, 1), rng, contrast), instances=instances,
                 classes=classes_by_raw[keep].astype(np.int32), shape_families=(kind,) * len(keep),
                 object_textures=(kind,) * len(keep), background_texture=kind)


Window = tuple[slice, slice]


def place(raw: np.ndarray, mask: np.ndarray, top: int, left: int, value: int
          ) -> tuple[Window, Window, np.ndarray] | None:
    """Paint ``mask`` (a crop whose top-left pixel goes to ``top``, ``left``) into ``raw`` as ``value``, clipped to
    the image -> (the window in the image, the same window in the crop, the crop's mask there), or None when
    nothing lands inside."""
    size_y, size_x = raw.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + mask.shape[0], size_y), min(left + mask.shape[1], size_x)
    if y1 <= y0 or x1 <= x0:
        return None
    crop = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
    window = (slice(y0, y1), slice(x0, x1))
    inside = mask[crop]
    raw[window][inside] = value
    return window, crop, inside


def fluorescent_nuclei(rng: np.random.Generator, size: int = 256) -> Scene:
    """Nuclei with chromatin texture, dimmer at the rim, from sparse to crowded and touching, bright on a dark,
    slightly uneven background."""
    scale = size / REFERENCE_SIZE
    count = int(round(_loguniform(rng, *NUCLEUS_COUNT)))
    radius = min(_loguniform(rng, *NUCLEUS_RADIUS), 0.9 * np.sqrt(size * size / (count * np.pi)) / scale + 2) * scale
    background = rng.uniform(0.0, 0.2) + 0.05 * smooth_noise(rng, (size, size), size / 3)
    image = np.array(background, np.float32)
    raw = np.zeros((size, size), np.int32)
    contrasts = []
    centres = rng.uniform(0, size, (count, 2))
    if rng.random() < 0.5:  # crowded: centres on a jittered grid about two radii apart, so that nuclei touch
        step = 2 * radius * rng.uniform(0.85, 1.15)
        ticks = np.arange(step / 2, size, step)
        grid = np.stack(np.meshgrid(ticks, ticks), -1).reshape(-1, 2)
        count = int(len(grid) * rng.uniform(0.6, 1.0)) + 1
        centres = grid[rng.permutation(len(grid))[:count]] + rng.normal(0, 0.2 * step, (min(count, len(grid)), 2))
    for value, (cy, cx) in enumerate(centres, start=1):
        r = radius * float(np.exp(rng.normal(0, 0.2)))
        mask, ay, ax = draw_shape(str(rng.choice(["ellipse", "blob"])), rng, max(r, 2.5))
        placed = place(raw, mask, int(cy) - ay, int(cx) - ax, value)
        if placed is None:
            continue
        window, crop, inside = placed
        level = _loguniform(rng, CONTRAST_RANGE[0] + 0.05, CONTRAST_RANGE[1])
        contrasts.append(level)
        depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        rim = 1 - rng.uniform(0.1, 0.35) * np.exp(-depth / max(r / 3, 1.0))
        chromatin = texture(str(rng.choice(["mottled", "spots", "speckle"])), rng, mask.shape, max(r / 2, 2.0))
        body = level * rim * (1 - rng.uniform(0.1, 0.45) * (1 - chromatin))
        image[window][inside] = background[window][inside] + body[crop][inside]
    classes = np.ones(count + 1, np.int32)
    return make_scene(image, raw, classes, rng, min(contrasts, default=CONTRAST_RANGE[0]) * 0.6, "nuclei")


def cell_sheet(rng: np.random.Generator, size: int = 256) -> Scene:
    """An epithelium-like sheet: Voronoi cells sharing their membranes, each with a cytoplasm level and a nucleus;
    some cells missing (background). Fluorescence (bright membranes on a dark background) or brightfield (dark
    membranes on a bright one), half each."""
    scale = size / REFERENCE_SIZE
    level, edge = worley_cells(rng, (size, size), _loguniform(rng, *CELL_SIZE) * scale)
    _, raw = np.unique(level, return_inverse=True)
    raw = raw.reshape(size, size).astype(np.int32) + 1
    count = int(raw.max())
    present = rng.random(count + 1) < rng.uniform(0.5, 1.0)
    present[0] = False
    raw = np.where(present[raw], raw, 0)
    width = rng.uniform(*MEMBRANE_WIDTH) * max(scale, 0.5)
    membrane_contrast = rng.uniform(0.25, 0.7)
    cytoplasm = rng.uniform(0.15, 0.5, count + 1)[raw] * membrane_contrast
    membrane = np.exp(-((edge / width) ** 2)) * membrane_contrast
    centre = edge > np.percentile(edge, rng.uniform(75, 92))  # each cell's middle: a nucleus, a little brighter
    inside = (raw > 0).astype(np.float32)
    signal = inside * (np.maximum(cytoplasm, membrane) + 0.1 * membrane_contrast * centre)
    signal += 0.15 * membrane_contrast * inside * texture("mottled", rng, (size, size), 6 * scale)
    base = rng.uniform(0.0, 0.15)
    image = base + signal
    if rng.random() < 0.5:  # brightfield: dark membranes and a bright background
        image = 1.0 - image
    classes = np.full(count + 1, 3, np.int32)
    return make_scene(image.astype(np.float32), raw, classes, rng, 0.5 * membrane_contrast, "cell_sheet", min_area=20)


def filaments(rng: np.random.Generator, size: int = 256) -> Scene:
    """Crossing filaments and branching processes 1-4 px wide (cytoskeleton, neurites, vessels), each an object,
    bright on dark or dark on bright, over a textured background."""
    scale = size / REFERENCE_SIZE
    count = int(rng.integers(FILAMENT_COUNT[0], FILAMENT_COUNT[1] + 1))
    raw = np.zeros((size, size), np.int32)
    signal = np.zeros((size, size), np.float32)
    weakest = 1.0
    for value in range(1, count + 1):
        family = str(rng.choice(["filament", "filament", "branching", "rod"]))
        length = _loguniform(rng, 12, 60) * scale
        mask, ay, ax = draw_shape(family, rng, length)
        if rng.random() < 0.6:  # thin: the skeleton, 1 or 3 px wide
            mask = skeletonize(mask)
            mask = ndimage.binary_dilation(mask) if rng.random() < 0.5 else mask
        cy, cx = rng.uniform(0, size, 2)
        placed = place(raw, mask, int(cy) - ay, int(cx) - ax, value)
        if placed is None:
            continue
        window, _, inside = placed
        level = _loguniform(rng, *CONTRAST_RANGE)
        weakest = min(weakest, level)
        signal[window][inside] = level
    background = rng.uniform(0.05, 0.3) + 0.3 * CONTRAST_RANGE[0] * texture(
        str(rng.choice(["mottled", "speckle", "flat"])), rng, (size, size), 8 * scale)
    image = background + signal
    if rng.random() < 0.4:
        image = 1.0 - image
    classes = np.zeros(count + 1, np.int32)
    classes[1:] = SHAPE_CLASSES["filament"]
    return make_scene(image.astype(np.float32), raw, classes, rng, weakest, "filaments", min_area=8)
