"""Shape families for synthetic scenes: each draws one object's mask on a small crop (numpy, scipy, skimage).

``draw_shape(name, rng, radius)`` returns the mask (a boolean crop just large enough for the object) and the
crop pixel that is the object's anchor, which the scene places at the object's position. ``radius`` is the
object's nominal size in pixels (an equivalent radius for compact shapes; elongated and branching shapes are
longer and thinner).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.draw import polygon as fill_polygon

from .textures import smooth_noise

# The class of each shape family (1-based): 1 round, 2 elongated, 3 other.
SHAPE_CLASSES = {"ellipse": 1, "blob": 1, "rod": 2, "filament": 2,
                 "ring": 3, "polygon": 3, "star": 3, "branching": 3, "irregular": 3}
SHAPE_FAMILIES = tuple(SHAPE_CLASSES)
CLASS_NAMES = ("background", "round", "elongated", "other")

Mask = tuple[np.ndarray, int, int]  # (h x w bool crop, anchor row, anchor column)


def _centred_grid(half: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column offsets (float32, (2h+1) x 1 and 1 x (2h+1)) of a square crop centred on 0."""
    r = np.arange(-half, half + 1, dtype=np.float32)
    return r[:, None], r[None, :]


def _radial_profile(rng: np.random.Generator, radius: float, wobble: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Coefficients of a smooth star-convex outline r(theta) = radius * stretch(theta) * (1 + sum of harmonics)."""
    k = np.arange(2, 6)
    amplitude = rng.uniform(0, wobble, k.size) / k
    phase = rng.uniform(0, 2 * np.pi, k.size)
    return amplitude, phase, int(np.ceil(radius * (1 + amplitude.sum()) * 1.45)) + 1


def _star_convex(rng: np.random.Generator, radius: float, wobble: float, hole: float = 0.0) -> Mask:
    """A smooth, possibly elliptic, wobbly disk; with ``hole`` > 0 a ring whose inner edge is ``hole`` x outer."""
    amplitude, phase, half = _radial_profile(rng, radius, wobble)
    aspect, angle = rng.uniform(1.0, 1.8), rng.uniform(0, np.pi)
    y, x = _centred_grid(half)
    u = (np.cos(angle) * x + np.sin(angle) * y) / np.float32(np.sqrt(aspect))
    v = (-np.sin(angle) * x + np.cos(angle) * y) * np.float32(np.sqrt(aspect))
    d = np.hypot(u, v)
    outline = np.full(d.shape, radius, np.float32)
    if wobble > 0:  # r(theta) = radius * (1 + sum_k a_k cos(k theta + p_k)), with powers of e^(i theta)
        direction = ((u + 1j * v) / np.maximum(d, 1e-6)).astype(np.complex64)
        power, harmonics = direction, np.zeros(d.shape, np.float32)
        for a, p in zip(amplitude, phase):
            power = power * direction
            harmonics += np.float32(a) * (power * np.complex64(np.exp(1j * p))).real
        outline *= 1 + harmonics
    mask = (d <= outline) & (d >= hole * outline)
    return mask, half, half


def _ellipse(rng: np.random.Generator, radius: float) -> Mask:
    return _star_convex(rng, radius, wobble=0.0)


def _blob(rng: np.random.Generator, radius: float) -> Mask:
    return _star_convex(rng, radius, wobble=0.5)


def _ring(rng: np.random.Generator, radius: float) -> Mask:
    return _star_convex(rng, max(radius, 4.0), wobble=0.3, hole=rng.uniform(0.4, 0.75))


def _segments_mask(a: np.ndarray, b: np.ndarray, half_widths: np.ndarray) -> Mask:
    """Pixels within ``half_widths[i]`` of the segment from a[i] to b[i] (a, b: S x 2 rows and columns,
    centred near 0; half_widths: S). Anchor: the crop pixel of coordinate (0, 0)."""
    pad = float(half_widths.max()) + 1
    ends = np.concatenate([a, b])
    lo, hi = np.floor(ends.min(0) - pad).astype(int), np.ceil(ends.max(0) + pad).astype(int)
    py = np.arange(lo[0], hi[0] + 1, dtype=np.float32)[:, None, None]
    px = np.arange(lo[1], hi[1] + 1, dtype=np.float32)[None, :, None]
    a, ab = a.astype(np.float32), (b - a).astype(np.float32)
    length2 = np.maximum((ab**2).sum(1), 1e-6)
    t = np.clip(((py - a[:, 0]) * ab[:, 0] + (px - a[:, 1]) * ab[:, 1]) / length2, 0, 1)
    d2 = (py - a[:, 0] - t * ab[:, 0]) ** 2 + (px - a[:, 1] - t * ab[:, 1]) ** 2
    mask = (d2 <= half_widths.astype(np.float32) ** 2).any(-1)
    return mask, -int(lo[0]), -int(lo[1])


def _polyline_mask(points: np.ndarray, half_width: float) -> Mask:
    """Pixels within ``half_width`` of a polyline (points: S+1 x 2, centred near 0)."""
    return _segments_mask(points[:-1], points[1:], np.full(len(points) - 1, half_width))


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, length: float, steps: int,
          turn: float) -> np.ndarray:
    """Points (steps+1 x 2) of a path of total ``length`` whose heading drifts by ~``turn`` radians a step."""
    headings = heading + np.cumsum(rng.normal(0, turn, steps))
    moves = (length / steps) * np.stack([np.sin(headings), np.cos(headings)], 1)
    return np.concatenate([start[None], start + np.cumsum(moves, 0)])


def _rod(rng: np.random.Generator, radius: float) -> Mask:
    """A capsule, straight or gently bent."""
    steps = int(rng.integers(1, 4))
    points = _walk(rng, np.zeros(2), rng.uniform(0, 2 * np.pi), radius * rng.uniform(2.5, 6), steps, 0.15)
    width = max(1.5, radius * rng.uniform(0.3, 0.55))
    return _polyline_mask(points - points.mean(0), width)


def _filament(rng: np.random.Generator, radius: float) -> Mask:
    """A long, thin, curvy fibre."""
    steps = int(rng.integers(6, 15))
    points = _walk(rng, np.zeros(2), rng.uniform(0, 2 * np.pi), radius * rng.uniform(4, 9), steps, 0.3)
    return _polyline_mask(points - points.mean(0), rng.uniform(0.7, 1.8))


def _branching(rng: np.random.Generator, radius: float) -> Mask:
    """A dendrite-like tree: a trunk with branches, and sometimes twigs, that thin out."""
    width = max(0.9, radius * rng.uniform(0.12, 0.3))
    trunk = _walk(rng, np.zeros(2), rng.uniform(0, 2 * np.pi), radius * rng.uniform(2.5, 4.5), 6, 0.25)
    segments, widths = [trunk], [width]
    for level in range(2):
        for parent in list(segments) if level == 0 else segments[1:]:
            for _ in range(int(rng.integers(1, 4 - level))):
                i = int(rng.integers(1, len(parent) - 1))
                heading = np.arctan2(*(parent[i + 1] - parent[i])) + rng.choice([-1, 1]) * rng.uniform(0.4, 1.2)
                length = np.linalg.norm(parent[-1] - parent[0]) * rng.uniform(0.25, 0.6)
                segments.append(_walk(rng, parent[i], heading, length, 3, 0.25))
                widths.append(max(0.7, width * 0.65 ** (level + 1)))
    centre = trunk.mean(0)
    a = np.concatenate([s[:-1] for s in segments]) - centre
    b = np.concatenate([s[1:] for s in segments]) - centre
    half_widths = np.concatenate([np.full(len(s) - 1, w) for s, w in zip(segments, widths)])
    return _segments_mask(a, b, half_widths)


def _polygon_from(angles: np.ndarray, radii: np.ndarray) -> Mask:
    half = int(np.ceil(radii.max())) + 1
    rows, cols = half + radii * np.sin(angles), half + radii * np.cos(angles)
    mask = np.zeros((2 * half + 1, 2 * half + 1), bool)
    mask[fill_polygon(rows, cols, mask.shape)] = True
    return mask, half, half


def _polygon(rng: np.random.Generator, radius: float) -> Mask:
    n = int(rng.integers(3, 9))
    angles = rng.uniform(0, 2 * np.pi) + (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n
    return _polygon_from(angles, radius * rng.uniform(0.8, 1.25, n))


def _star(rng: np.random.Generator, radius: float) -> Mask:
    n = int(rng.integers(4, 9))
    angles = rng.uniform(0, 2 * np.pi) + np.arange(2 * n) * np.pi / n
    radii = np.where(np.arange(2 * n) % 2 == 0, rng.uniform(1.0, 1.4), rng.uniform(0.35, 0.6)) * radius
    return _polygon_from(angles, radii * rng.uniform(0.9, 1.1, 2 * n))


def _irregular(rng: np.random.Generator, radius: float) -> Mask:
    """Thresholded smooth noise under a soft round window: an amoeboid, lobed shape (largest piece kept)."""
    half = int(np.ceil(radius * 1.6)) + 1
    y, x = _centred_grid(half)
    window = 1 - np.hypot(y, x) / np.float32(radius * 1.3)
    field = smooth_noise(rng, (2 * half + 1, 2 * half + 1), max(2.0, radius * rng.uniform(0.4, 0.8)))
    mask = window * 2.2 + 0.6 * field > 1.0
    pieces, count = ndimage.label(mask)
    if count > 1:
        mask = pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
    return mask, half, half


_DRAWERS = {"ellipse": _ellipse, "blob": _blob, "rod": _rod, "filament": _filament, "ring": _ring,
            "polygon": _polygon, "star": _star, "branching": _branching, "irregular": _irregular}


def draw_shape(name: str, rng: np.random.Generator, radius: float) -> Mask:
    """One object of family ``name``: (h x w bool mask crop, anchor row, anchor column)."""
    if name not in _DRAWERS:
        raise ValueError(f"unknown shape family {name!r}; choose from {', '.join(SHAPE_FAMILIES)}")
    return _DRAWERS[name](rng, float(radius))
