"""The random-forest baseline of ``adaptation.py`` (issue 22): ilastik's pixel classification, rebuilt from its parts.

Features (ilastik's default set, computed here with scipy.ndimage and skimage.feature): for every channel of the
normalised image (the model rows' normalisation: ``InputSpec()``'s percentiles 1 and 99.8 mapped to 0..1, clipped;
a grey image is one channel, an RGB image three) and every sigma in :data:`SIGMAS`:

- Gaussian smoothing (``ndimage.gaussian_filter``);
- gradient magnitude of Gaussian (``ndimage.gaussian_gradient_magnitude``);
- Laplacian of Gaussian (``ndimage.gaussian_laplace``);
- the two eigenvalues of the Hessian of Gaussian (``hessian_matrix`` with Gaussian derivatives,
  ``hessian_matrix_eigvals``);
- the two eigenvalues of the structure tensor, ilastik's scales: gradients at sigma (Sobel of the image smoothed at
  sigma), their products smoothed at sigma / 2 (``structure_tensor``, ``structure_tensor_eigenvalues``);

7 x 6 = 42 features per channel, float32, borders reflected.

Training pixels: the annotated pixels of the family's training images (dense: every pixel; sparse: the non-zero
labels). Above ``max_pixels`` (default 50,000, as many as a few ilastik brush strokes; at 200,000 one fit took 200 s
on a grey family and 440 s on an RGB one, 126 features, on one core of the shared 2-core machine) they are
subsampled, stratified: a class with at most ``max_pixels / (2 K)`` pixels (K classes) keeps them all, the other
classes' pixels are drawn uniformly without replacement for the rest of the budget (so they keep their proportions).
The forest: scikit-learn's ``RandomForestClassifier`` (``trees`` trees, unlimited depth, Gini, sqrt(features) per
split, bootstrap), ``n_jobs=1``, ``random_state=seed``; the seed also draws the subsample.
Prediction: the most probable label value of every pixel.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage.feature import hessian_matrix, hessian_matrix_eigvals, structure_tensor, structure_tensor_eigenvalues
from sklearn.ensemble import RandomForestClassifier

from napari_convlora.config import InputSpec
from napari_convlora.data import ImageLayout, to_sam_planes

SIGMAS = (0.7, 1.0, 1.6, 3.5, 5.0, 10.0)
FEATURE_NAMES = ("gaussian", "gradient_magnitude", "laplacian", "hessian_eigenvalue_1", "hessian_eigenvalue_2",
                 "structure_tensor_eigenvalue_1", "structure_tensor_eigenvalue_2")
TREES = 100
MAX_PIXELS = 50_000  # ilastik's users paint strokes; 200,000 took 3-7 min a fit on one busy core


def normalised_channels(image: np.ndarray, rgb: bool) -> np.ndarray:
    """C x Y x X float32 in 0..1: the image as the model rows normalise it (C = 3 with ``rgb``, else 1).

    image: Y x X, or Y x X x 3|4 with ``rgb``."""
    planes = to_sam_planes(image, ImageLayout(rgb=rgb), InputSpec())[0] / np.float32(255.0)  # Y x X x 3
    return np.ascontiguousarray(planes.transpose(2, 0, 1) if rgb else planes[None, :, :, 0])


def channel_features(channel: np.ndarray, sigma: float) -> list[np.ndarray]:
    """The 7 features of :data:`FEATURE_NAMES` of one Y x X float channel at ``sigma`` (Y x X float32 each)."""
    channel = channel.astype(np.float64, copy=False)
    hessian = hessian_matrix(channel, sigma=sigma, mode="reflect", order="rc", use_gaussian_derivatives=True)
    smoothed = ndimage.gaussian_filter(channel, sigma, mode="reflect")
    tensor = structure_tensor(smoothed, sigma=sigma / 2, mode="reflect", order="rc")
    features = [smoothed, ndimage.gaussian_gradient_magnitude(channel, sigma, mode="reflect"),
                ndimage.gaussian_laplace(channel, sigma, mode="reflect"),
                *hessian_matrix_eigvals(hessian), *structure_tensor_eigenvalues(tensor)]
    return [f.astype(np.float32) for f in features]


def pixel_features(image: np.ndarray, rgb: bool, sigmas: Sequence[float] = SIGMAS) -> np.ndarray:
    """Y x X x F float32, F = C x 7 x len(sigmas), ordered channel, sigma, then :data:`FEATURE_NAMES`."""
    features = [f for channel in normalised_channels(image, rgb) for sigma in sigmas
                for f in channel_features(channel, sigma)]
    return np.stack(features, axis=-1)


def annotated(labels: np.ndarray, label_mode: str) -> np.ndarray:
    """Y x X bool: the pixels that carry a class (sparse modes: 0 is not annotated)."""
    return labels != 0 if label_mode.startswith("sparse") else np.ones(labels.shape, bool)


def stratified_subsample(classes: np.ndarray, max_pixels: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted int64 indices into ``classes`` (N label values, one per annotated pixel), at most ``max_pixels``:
    all of them if they fit, else every pixel of each class with at most max_pixels / (2 K) pixels and a uniform
    draw without replacement from the other classes' pixels for the rest of the budget."""
    if classes.size <= max_pixels:
        return np.arange(classes.size, dtype=np.int64)
    values, counts = np.unique(classes, return_counts=True)
    rare = values[counts <= max_pixels / (2 * len(values))]
    keep = np.isin(classes, rare)
    kept, others = np.flatnonzero(keep), np.flatnonzero(~keep)
    drawn = rng.choice(others, size=min(others.size, max_pixels - kept.size), replace=False)
    return np.sort(np.concatenate([kept, drawn]))


@dataclass
class ForestBaseline:
    """A fitted forest and what its fit took. ``class_counts``: label value -> training pixels used."""

    forest: RandomForestClassifier
    sigmas: tuple[float, ...]
    fit_s: float
    features_s: float
    class_counts: dict[int, int] = field(default_factory=dict)

    def predict(self, image: np.ndarray, rgb: bool) -> np.ndarray:
        """Y x X label values (the training labels' dtype) for an image laid out like the training images."""
        features = pixel_features(image, rgb, self.sigmas)
        flat = features.reshape(-1, features.shape[-1])
        labels = self.forest.predict(flat)
        return labels.reshape(features.shape[:2])

    def info(self) -> dict:
        """For the JSON record: the forest's settings and sizes."""
        return {"trees": self.forest.n_estimators, "features": int(self.forest.n_features_in_),
                "sigmas": list(self.sigmas), "fit_only_s": self.fit_s, "train_features_s": self.features_s,
                "training_pixels": {str(k): v for k, v in self.class_counts.items()},
                "tree_nodes": int(sum(t.tree_.node_count for t in self.forest.estimators_)),
                "max_depth_reached": int(max(t.tree_.max_depth for t in self.forest.estimators_))}


def fit_forest(train: Sequence[tuple[np.ndarray, np.ndarray, bool]], label_mode: str, seed: int,
               trees: int = TREES, max_pixels: int = MAX_PIXELS, sigmas: Sequence[float] = SIGMAS) -> ForestBaseline:
    """Fit the forest on the annotated pixels of ``train`` ((image, labels, rgb) triples: image Y x X or Y x X x 3,
    labels Y x X label values) as the module docstring says."""
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    blocks, classes = [], []
    for image, labels, rgb in train:
        where = annotated(labels, label_mode)
        blocks.append(pixel_features(image, rgb, sigmas)[where])
        classes.append(labels[where])
    features, classes = np.concatenate(blocks), np.concatenate(classes)
    del blocks
    chosen = stratified_subsample(classes, max_pixels, rng)
    features, classes = features[chosen], classes[chosen]
    features_s = time.perf_counter() - started
    forest = RandomForestClassifier(n_estimators=trees, max_depth=None, n_jobs=1, random_state=seed)
    started = time.perf_counter()
    forest.fit(features, classes)
    values, counts = np.unique(classes, return_counts=True)
    return ForestBaseline(forest, tuple(sigmas), time.perf_counter() - started, features_s,
                          {int(v): int(c) for v, c in zip(values, counts)})
