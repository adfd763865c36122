"""The one resizer of the plugin: how images, targets and probabilities change size for ``InputSpec.rescale``.

Training and prediction resize with these functions alone, so a model sees the same pixels in both. Pure
numpy and scikit-image (no torch): images and probabilities bilinearly, anti-aliased when shrinking; targets
by nearest neighbour. A side of ``n`` pixels becomes ``max(1, round(n * factor))``.
"""

from __future__ import annotations

import numpy as np
from skimage.transform import resize


def scaled_shape(shape: tuple[int, ...], factor: float) -> tuple[int, ...]:
    """The (Y, X) shape after rescaling by ``factor``."""
    if not factor > 0:
        raise ValueError(f"rescale must be > 0, got {factor}")
    return tuple(max(1, round(n * factor)) for n in shape)


def rescale_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``Y x X x C`` float -> float32 ``shape[0] x shape[1] x C`` (bilinear; anti-aliased when shrinking)."""
    if tuple(image.shape[:2]) == tuple(shape):
        return np.asarray(image, dtype=np.float32)
    shrinking = shape[0] < image.shape[0] or shape[1] < image.shape[1]
    out = resize(image, tuple(shape) + image.shape[2:], order=1, preserve_range=True, anti_aliasing=shrinking)
    return out.astype(np.float32, copy=False)


def rescale_targets(targets: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``Y x X`` integer targets -> int64 ``shape`` (nearest neighbour: no new values appear)."""
    if tuple(targets.shape) == tuple(shape):
        return np.asarray(targets).astype(np.int64, copy=False)
    out = resize(targets, tuple(shape), order=0, preserve_range=True, anti_aliasing=False)
    return np.rint(out).astype(np.int64)


def rescale_probabilities(probabilities: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``K x Y x X`` -> float32 ``K x shape`` (bilinear, anti-aliased when shrinking); sums over K stay 1."""
    if tuple(probabilities.shape[1:]) == tuple(shape):
        return probabilities
    return np.ascontiguousarray(rescale_image(np.moveaxis(probabilities, 0, -1), shape).transpose(2, 0, 1))
