"""WeSAM's two views of one training crop (METHODS.md 3.3): a weak view (flips) and a strong view (the weak
view plus photometric changes only), so that teacher and student masks align pixel for pixel.

numpy only. Images are float32 ``S x S x 3`` in 0..255 (the planes SAM sees, ``data.to_sam_planes``); a crop that
reaches past its image is zero outside ``valid`` (``S x S`` bool), and the strong view keeps it zero there.

The photometric changes follow WeSAM's list (each applied with probability 0.5, in this order): posterize,
equalize, sharpen, solarize, brightness/contrast, shadow. Parameters are those of albumentations' defaults where
WeSAM uses them, re-implemented here (albumentations is not a dependency): posterize to 4 bits; histogram
equalisation per channel; sharpening with alpha 0.2-0.5 and lightness 0.5-1.0; solarize above 128; brightness and
contrast factors within +-0.2; one shadow: a random quadrilateral darkened to 0.5 of its brightness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Flips:
    """Which flips the weak view applied: ``horizontal`` mirrors columns (x), ``vertical`` rows (y)."""

    horizontal: bool = False
    vertical: bool = False

    def image(self, array: np.ndarray) -> np.ndarray:
        """Flip an ``S x S (x C)`` array (image, mask or valid area) the same way."""
        if self.horizontal:
            array = array[:, ::-1]
        if self.vertical:
            array = array[::-1]
        return np.ascontiguousarray(array)

    def points(self, xy: np.ndarray, size: int) -> np.ndarray:
        """Flip N x 2 pixel coordinates (x, y) in an S x S frame (pixel centres at +0.5 map onto each other)."""
        xy = np.array(xy, dtype=np.float32, copy=True)
        if self.horizontal:
            xy[..., 0] = size - xy[..., 0]
        if self.vertical:
            xy[..., 1] = size - xy[..., 1]
        return xy

    def boxes(self, boxes: np.ndarray, size: int) -> np.ndarray:
        """Flip N x 4 boxes (x0, y0, x1, y1; pixel edges) in an S x S frame."""
        boxes = np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4)
        if self.horizontal:
            boxes[:, [0, 2]] = size - boxes[:, [2, 0]]
        if self.vertical:
            boxes[:, [1, 3]] = size - boxes[:, [3, 1]]
        return boxes


def random_flips(rng: np.random.Generator) -> Flips:
    """WeSAM's weak view: a horizontal and a vertical flip, each with probability 0.5."""
    horizontal, vertical = rng.random(2) < 0.5
    return Flips(bool(horizontal), bool(vertical))


def _posterize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.floor(image / 16.0) * 16.0  # keep the 4 high bits of 8-bit values


def _equalize(image: np.ndarray, rng: np.random.Generator, valid: np.ndarray) -> np.ndarray:
    out = image.copy()
    for c in range(image.shape[-1]):
        channel = np.clip(image[..., c], 0, 255).astype(np.uint8)
        hist = np.bincount(channel[valid].ravel(), minlength=256).astype(np.float64)
        cdf = np.cumsum(hist)
        if cdf[-1] == 0:
            continue
        lut = np.round(255.0 * (cdf - cdf[cdf > 0][0]) / max(cdf[-1] - cdf[cdf > 0][0], 1.0)).clip(0, 255)
        out[..., c] = lut[channel]
    return out


def _sharpen(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    alpha, lightness = rng.uniform(0.2, 0.5), rng.uniform(0.5, 1.0)
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    neighbours = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:])
    sharpened = (4 + lightness) * image - neighbours  # Laplacian sharpening with a lightness gain
    return (1 - alpha) * image + alpha * sharpened


def _solarize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.where(image >= 128.0, 255.0 - image, image)


def _brightness_contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    brightness, contrast = rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2)
    return image * (1.0 + contrast) + brightness * 255.0


def _shadow(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from skimage.draw import polygon

    size_y, size_x = image.shape[:2]
    rows = rng.uniform(0, size_y, 4)
    cols = rng.uniform(0, size_x, 4)
    order = np.argsort(np.arctan2(rows - rows.mean(), cols - cols.mean()))  # a simple (non-crossing) quadrilateral
    rr, cc = polygon(rows[order], cols[order], shape=(size_y, size_x))
    out = image.copy()
    out[rr, cc] *= 0.5
    return out


def strong_view(image: np.ndarray, rng: np.random.Generator, valid: np.ndarray | None = None) -> np.ndarray:
    """The weak view plus WeSAM's photometric changes, each with probability 0.5; float32 ``S x S x 3`` in 0..255.

    Args:
        image: the weak view, float32 S x S x 3 in 0..255.
        valid: S x S bool, the pixels inside the image (outside stay 0); None: all.
    """
    valid = np.ones(image.shape[:2], bool) if valid is None else valid
    out = image.astype(np.float32, copy=True)
    steps = (_posterize, _equalize, _sharpen, _solarize, _brightness_contrast, _shadow)
    for step, apply in zip(steps, rng.random(len(steps)) < 0.5):
        if apply:
            out = step(out, rng, valid) if step is _equalize else step(out, rng)
            out = np.clip(out, 0.0, 255.0)
    out[~valid] = 0.0
    return out.astype(np.float32)
