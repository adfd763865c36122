"""Pretraining scenes like electron microscopy, stained histology and CT / MR slices (issue 24). Pure numpy and
scipy; each maker takes a generator and a size and returns a :class:`~.synthetic.Scene` (classes: 1 round,
2 elongated, 3 other).

- :func:`em_like`: organelles on a grainy bright cytoplasm, outlined by dark membranes (mitochondria with cristae,
  vesicles, a large nucleus with its envelope), dark on bright as EM shows them.
- :func:`histology_like`: haematoxylin and eosin in colour by Beer-Lambert absorption: pink fibrous stroma, purple
  nuclei, and glands (a white lumen ringed by nuclei).
- :func:`anatomy_like`: a body on dark air with smooth organs of close grey levels, small lesions inside them and
  a bright bone ring: what a CT or MR slice looks like after windowing.

Their textures, levels and sizes are this module's own, not those of the benchmark's generated families
(``benchmarks/generated_families.py``); blur and noise come from ``synthetic.finish``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .imaging_cells import make_scene, place
from .shapes import SHAPE_CLASSES, draw_shape
from .synthetic import CONTRAST_RANGE, REFERENCE_SIZE, Scene
from .textures import smooth_noise, texture

#: Optical densities per unit stain (R, G, B) of haematoxylin and eosin (Ruifrok and Johnston's stain vectors).
HAEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32)
EOSIN = np.array([0.07, 0.99, 0.11], np.float32)


def _rim(mask: np.ndarray, width: float) -> np.ndarray:
    """float32 in [0, 1]: 1 on ``mask``'s outline, falling off inwards over ``width`` px."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return np.where(mask, np.exp(-np.maximum(depth - 1, 0) / max(width, 0.5)), 0).astype(np.float32)


def em_like(rng: np.random.Generator, size: int = 256) -> Scene:
    """Organelles outlined by dark membranes on a grainy cytoplasm; see the module docstring."""
    scale = size / REFERENCE_SIZE
    cytoplasm = rng.uniform(0.55, 0.8)
    image = cytoplasm + 0.06 * texture("speckle", rng, (size, size), 1.5 * scale) \
        + 0.05 * smooth_noise(rng, (size, size), size / 4)
    raw = np.zeros((size, size), np.int32)
    kinds = ["mitochondrion"] * int(rng.integers(2, 14)) + ["vesicle"] * int(rng.integers(0, 25))
    if rng.random() < 0.4:
        kinds.insert(0, "nucleus")
    classes = np.zeros(len(kinds) + 1, np.int32)
    membrane = rng.uniform(0.25, 0.45)  # how much darker a membrane is than the cytoplasm
    for value, kind in enumerate(kinds, start=1):
        radius = {"nucleus": rng.uniform(40, 70), "mitochondrion": rng.uniform(6, 16),
                  "vesicle": rng.uniform(3, 7)}[kind] * scale
        family = {"nucleus": "blob", "mitochondrion": str(rng.choice(["rod", "ellipse"])), "vesicle": "ellipse"}[kind]
        mask, ay, ax = draw_shape(family, rng, radius)
        cy, cx = rng.uniform(0, size, 2)
        placed = place(raw, mask, int(cy) - ay, int(cx) - ax, value)
        if placed is None:
            continue
        window, crop, inside = placed
        classes[value] = SHAPE_CLASSES[family]
        outline = _rim(mask, 1.0 + 0.5 * scale)[crop]
        fill = {"nucleus": rng.uniform(-0.15, 0.0), "mitochondrion": rng.uniform(-0.25, -0.1),
                "vesicle": rng.uniform(-0.05, 0.1)}[kind]
        body = cytoplasm + fill - membrane * outline
        if kind == "mitochondrion":  # cristae: dark stripes across the body
            stripes = texture("stripes", rng, mask.shape, max(radius / 2, 2.0))[crop]
            body = body - 0.15 * (stripes > 0.6)
        image[window][inside] = body[inside] + 0.04 * texture("speckle", rng, inside.shape, 1.2 * scale)[inside]
    return make_scene(image.astype(np.float32), raw, classes, rng, membrane * 0.6, "em_like")


def histology_like(rng: np.random.Generator, size: int = 256) -> Scene:
    """Haematoxylin and eosin stained tissue in colour; see the module docstring."""
    scale = size / REFERENCE_SIZE
    eosin = rng.uniform(0.2, 0.6) * (0.6 + 0.4 * texture(str(rng.choice(["stripes", "mottled"])), rng, (size, size),
                                                         rng.uniform(4, 12) * scale))
    haem = np.full((size, size), rng.uniform(0.02, 0.1), np.float32)
    raw = np.zeros((size, size), np.int32)
    classes = [0]
    value = 0
    for _ in range(int(rng.integers(0, 4))):  # glands: a white lumen with nuclei around it
        radius = rng.uniform(15, 40) * scale
        mask, ay, ax = draw_shape("irregular", rng, radius)
        cy, cx = rng.uniform(0, size, 2)
        value += 1
        placed = place(raw, mask, int(cy) - ay, int(cx) - ax, value)
        classes.append(SHAPE_CLASSES["irregular"])
        if placed is None:
            continue
        window, _, inside = placed
        eosin[window][inside] *= 0.1
        ring = ndimage.binary_dilation(mask, iterations=max(int(4 * scale), 2)) & ~mask
        for ry, rx in np.argwhere(ring)[rng.permutation(int(ring.sum()))[:int(radius)]]:
            value = _nucleus(rng, raw, haem, int(cy) - ay + ry, int(cx) - ax + rx, value, classes, scale)
    for _ in range(int(rng.integers(10, 90))):
        value = _nucleus(rng, raw, haem, *rng.integers(0, size, 2), value, classes, scale)
    density = haem[:, :, None] * HAEMATOXYLIN + eosin[:, :, None] * EOSIN
    image = np.exp(-density * rng.uniform(1.5, 3.0)).astype(np.float32)
    return make_scene(image, raw, np.array(classes, np.int32), rng, CONTRAST_RANGE[0] * 1.5, "histology_like")


def _nucleus(rng: np.random.Generator, raw: np.ndarray, haem: np.ndarray, cy: int, cx: int, value: int,
             classes: list[int], scale: float) -> int:
    """Paint one haematoxylin-stained nucleus centred near (cy, cx); returns the last id used."""
    family = str(rng.choice(["ellipse", "blob", "rod"], p=[0.5, 0.35, 0.15]))
    mask, ay, ax = draw_shape(family, rng, rng.uniform(3, 8) * scale)
    placed = place(raw, mask, cy - ay, cx - ax, value + 1)
    classes.append(SHAPE_CLASSES[family])
    if placed is None:
        return value + 1
    window, crop, inside = placed
    stain = rng.uniform(0.5, 1.0) * (0.7 + 0.3 * texture("spots", rng, mask.shape, 3 * scale))
    stain = stain + 0.3 * _rim(mask, 1.5)
    haem[window][inside] = stain[crop][inside]
    return value + 1


def anatomy_like(rng: np.random.Generator, size: int = 256) -> Scene:
    """A body with smooth organs of close grey levels and small lesions; see the module docstring."""
    scale = size / REFERENCE_SIZE
    raw = np.zeros((size, size), np.int32)
    image = np.full((size, size), rng.uniform(0.0, 0.08), np.float32)
    body_mask, ay, ax = draw_shape("blob", rng, rng.uniform(0.35, 0.48) * size)
    body_level = rng.uniform(0.3, 0.5)
    placed = place(raw, body_mask, size // 2 - ay, size // 2 - ax, 1)
    classes = [0, SHAPE_CLASSES["blob"]]
    if placed is not None:
        window, _, inside = placed
        image[window][inside] = body_level
    weakest = body_level
    value = 1
    for _ in range(int(rng.integers(2, 7))):  # organs, then lesions inside them
        radius = rng.uniform(14, 45) * scale
        family = str(rng.choice(["blob", "irregular", "ellipse"]))
        mask, ay, ax = draw_shape(family, rng, radius)
        cy, cx = size / 2 + rng.normal(0, 0.18 * size, 2)
        value += 1
        step = rng.choice([-1, 1]) * rng.uniform(CONTRAST_RANGE[0], 0.3)
        weakest = min(weakest, abs(step))
        placed = place(raw, mask, int(cy) - ay, int(cx) - ax, value)
        classes.append(SHAPE_CLASSES[family])
        if placed is None:
            continue
        window, crop, inside = placed
        organ = body_level + step + 0.03 * texture("mottled", rng, mask.shape, rng.uniform(3, 8) * scale)
        image[window][inside] = organ[crop][inside]
        for _ in range(int(rng.integers(0, 3))):
            lesion, ly, lx = draw_shape("ellipse", rng, rng.uniform(3, 9) * scale)
            py, px = np.argwhere(mask)[int(rng.integers(0, int(mask.sum())))]
            value += 1
            contrast = rng.choice([-1, 1]) * rng.uniform(CONTRAST_RANGE[0], 0.35)
            weakest = min(weakest, abs(contrast))
            spot = place(raw, lesion, int(cy) - ay + py - ly, int(cx) - ax + px - lx, value)
            classes.append(SHAPE_CLASSES["ellipse"])
            if spot is not None:
                image[spot[0]][spot[2]] += contrast
    if rng.random() < 0.6:  # a bone: a bright ring, not an object of its own
        ring, ry, rx = draw_shape("ring", rng, rng.uniform(10, 25) * scale)
        cy, cx = size / 2 + rng.normal(0, 0.2 * size, 2)
        bone = np.zeros_like(raw)
        hit = place(bone, ring, int(cy) - ry, int(cx) - rx, 1)
        if hit is not None:
            image[hit[0]][hit[2]] = rng.uniform(0.85, 1.0)
            raw[hit[0]][hit[2]] = 0
    return make_scene(image, raw, np.array(classes, np.int32), rng, weakest, "anatomy_like", min_area=10)
