"""Texture families for synthetic scenes, and the smooth noise they are built from (numpy and scipy only).

Every texture is a float32 field over a crop, with values in [0, 1], drawn from a numpy ``Generator``; the scene
code turns it into brightness (objects) or a faint pattern (background). ``scale`` is the typical size in pixels
of the thing being textured (an object's radius, or a background feature size).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_SPLINE_GAIN = 2.08  # 1 / the standard deviation left by cubic B-spline smoothing in two dimensions
TEXTURE_FAMILIES = ("flat", "gradient", "dome", "speckle", "stripes", "spots", "mottled", "voronoi")


def _spline_taps(n_out: int, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """For n_out samples ``cell`` apart in a grid of control values: the first of the four control values each
    sample reads (n_out int) and the cubic B-spline weights of the four (4 x n_out float32)."""
    t = np.arange(n_out, dtype=np.float32) / np.float32(cell) + 1
    first = np.floor(t).astype(np.intp)
    f = t - first
    weights = np.stack([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3]) / 6
    return first - 1, weights.astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Smooth random field (float32, ``shape``), roughly zero mean and unit standard deviation.

    Random control values on a grid ``cell`` pixels apart are interpolated by a cubic B-spline (four taps per
    axis, no loops over pixels), so a full 256 x 256 field costs about a millisecond.
    """
    cell = max(float(cell), 1.0)
    (iy, wy), (ix, wx) = _spline_taps(shape[0], cell), _spline_taps(shape[1], cell)
    low = rng.standard_normal((int(iy[-1]) + 4, int(ix[-1]) + 4), dtype=np.float32)
    rows = sum(wy[k][:, None] * low[iy + k] for k in range(4))
    field = sum(rows[:, ix + k] * wx[k][None, :] for k in range(4))
    return field * np.float32(_SPLINE_GAIN)


def _normalised(field: np.ndarray) -> np.ndarray:
    """``field`` rescaled to [0, 1] (float32); a constant field becomes ones."""
    lo, hi = float(field.min()), float(field.max())
    if hi - lo < 1e-6:
        return np.ones(field.shape, np.float32)
    return ((field - lo) / (hi - lo)).astype(np.float32)


def _rotated(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Coordinate along a random direction (float32, ``shape``), in pixels, zero at the crop's centre."""
    angle = rng.uniform(0, np.pi)
    y = np.arange(shape[0], dtype=np.float32)[:, None] - shape[0] / 2
    x = np.arange(shape[1], dtype=np.float32)[None, :] - shape[1] / 2
    return np.float32(np.cos(angle)) * x + np.float32(np.sin(angle)) * y


def _gradient(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    return _normalised(_rotated(rng, shape)) ** np.float32(rng.uniform(0.5, 2.0))


def _dome(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Bright centre falling off towards ``scale`` pixels (a nucleus-like dome)."""
    cy, cx = shape[0] / 2 + rng.normal(0, 0.15 * scale), shape[1] / 2 + rng.normal(0, 0.15 * scale)
    y = (np.arange(shape[0], dtype=np.float32)[:, None] - cy) ** 2
    x = (np.arange(shape[1], dtype=np.float32)[None, :] - cx) ** 2
    d2 = (y + x) / np.float32(max(scale, 1.0) ** 2)
    return np.clip(1 - d2, 0, 1) ** np.float32(rng.uniform(0.4, 1.0))


def _speckle(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    grain = rng.random(shape, dtype=np.float32)
    return _normalised(ndimage.gaussian_filter(grain, rng.uniform(0.5, 1.2)))


def _stripes(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    period = max(2.5, scale * rng.uniform(0.2, 0.6))
    wave = np.sin(_rotated(rng, shape) * np.float32(2 * np.pi / period) + np.float32(rng.uniform(0, 2 * np.pi)))
    if rng.random() < 0.4:  # square-wave bands instead of a sinusoid
        wave = np.tanh(3 * wave)
    return (0.5 + 0.5 * wave).astype(np.float32)


def _spots(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """A few Gaussian spots (nucleoli, granules); half the time dark spots on a bright body (vacuoles)."""
    sigma = max(0.8, scale * rng.uniform(0.08, 0.2))
    count = max(2, int(rng.uniform(0.5, 2.0) * shape[0] * shape[1] / (16 * sigma**2)))
    field = np.zeros(shape, np.float32)
    np.add.at(field, (rng.integers(0, shape[0], count), rng.integers(0, shape[1], count)), 1.0)
    field = _normalised(ndimage.gaussian_filter(field, sigma))
    return 1 - field if rng.random() < 0.5 else field


def _mottled(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    return _normalised(smooth_noise(rng, shape, max(2.0, scale * rng.uniform(0.25, 0.7))))


def worley_cells(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi cells of jittered-grid seeds ``cell`` pixels apart.

    Returns:
        level: ``shape`` float32 in [0, 1], one random value per cell; edge: ``shape`` float32, the distance to the
        nearest cell border in pixels (0 on the border).
    """
    cell = max(float(cell), 2.0)
    gh, gw = int(np.ceil(shape[0] / cell)) + 1, int(np.ceil(shape[1] / cell)) + 1
    seed_y = (np.arange(gh)[:, None] + rng.random((gh, gw))) * cell
    seed_x = (np.arange(gw)[None, :] + rng.random((gh, gw))) * cell
    levels = rng.random((gh, gw)).astype(np.float32)
    py = np.arange(shape[0], dtype=np.float32)[:, None]
    px = np.arange(shape[1], dtype=np.float32)[None, :]
    ci, cj = (py // cell).astype(int), (px // cell).astype(int)
    best = np.full(shape, np.inf, np.float32)
    second = np.full(shape, np.inf, np.float32)
    level = np.zeros(shape, np.float32)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            ni, nj = np.clip(ci + di, 0, gh - 1), np.clip(cj + dj, 0, gw - 1)
            d = np.sqrt((py - seed_y[ni, nj]) ** 2 + (px - seed_x[ni, nj]) ** 2).astype(np.float32)
            nearer = d < best
            second = np.where(nearer, best, np.minimum(second, d))
            level = np.where(nearer, levels[ni, nj], level)
            best = np.minimum(best, d)
    return level, (second - best) / 2


def _voronoi(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Cobblestone cells: a flat random level per Voronoi cell, with dark borders (the held-out family)."""
    level, edge = worley_cells(rng, shape, max(3.0, scale * rng.uniform(0.3, 0.7)))
    border = np.clip(edge / np.float32(rng.uniform(0.6, 1.5)), 0, 1)
    return (0.35 + 0.65 * level) * border


_MAKERS = {"flat": lambda rng, shape, scale: np.ones(shape, np.float32), "gradient": _gradient, "dome": _dome,
           "speckle": _speckle, "stripes": _stripes, "spots": _spots, "mottled": _mottled, "voronoi": _voronoi}


def texture(name: str, rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """One texture of family ``name`` (see ``TEXTURE_FAMILIES``): float32, ``shape``, values in [0, 1]."""
    if name not in _MAKERS:
        raise ValueError(f"unknown texture {name!r}; choose from {', '.join(TEXTURE_FAMILIES)}")
    return _MAKERS[name](rng, shape, float(scale))
