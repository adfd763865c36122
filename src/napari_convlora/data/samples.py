"""Sample images with labels that need no download: a synthetic two-class image, and a real one when installed.

In the synthetic image the classes differ in shape and texture as well as in brightness: round,
smooth, dome-shaped "nuclei" and dimmer, elongated, striped "rods", over an uneven background with noise.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

CLASS_NAMES = ("background", "nucleus", "rod")


def synthetic_cells(size: int = 256, seed: int = 0, n_objects: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A 16-bit fluorescence-like image and its dense labels (0 background, 1 nucleus, 2 rod).

    Returns:
        image: size x size uint16; labels: size x size uint8.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    labels = np.zeros((size, size), np.uint8)
    signal = np.zeros((size, size), np.float32)
    n_objects = n_objects or max(4, size * size // 2500)
    for i in range(n_objects):
        cy, cx = rng.uniform(0, size, 2)
        if i % 2 == 0:  # nucleus: a smooth, round, dome-shaped disk
            r = rng.uniform(6, 12)
            d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2
            inside = d2 <= 1
            value = 1.0 - 0.5 * d2
            labels[inside] = 1
        else:  # rod: an elongated capsule with stripes across it
            length, width = rng.uniform(18, 32), rng.uniform(3.5, 5.5)
            angle = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
            inside = (np.clip(np.abs(u) - length / 2, 0, None) ** 2 + v**2) <= width**2
            value = 0.45 + 0.25 * np.sign(np.sin(u * 1.4))
            labels[inside] = 2
        signal[inside] = value[inside]
    background = 0.08 + 0.04 * np.sin(xx / 37.0 + seed) * np.cos(yy / 53.0)
    image = np.where(labels > 0, signal, background) + rng.normal(0, 0.06, (size, size))
    image = np.clip(image * 3000 + 400, 0, 65535).astype(np.uint16)
    return image, labels


def stardist_nuclei() -> tuple[np.ndarray, np.ndarray] | None:
    """The stardist package's 512x512 uint16 nuclei image (DSB 2018, CC0) with its expert instance mask,
    or None when stardist is not installed."""
    spec = importlib.util.find_spec("stardist")
    if spec is None or spec.origin is None:
        return None
    import tifffile

    folder = Path(spec.origin).parent / "data" / "images"
    if not (folder / "img2d.tif").is_file():
        return None
    return tifffile.imread(folder / "img2d.tif"), tifffile.imread(folder / "mask2d.tif")
