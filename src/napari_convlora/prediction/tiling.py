"""Sliding-window prediction of any image size with a model that takes fixed square tiles.

Core module: numpy, torch and scikit-image only (no napari, no Qt). Progress and stopping
go through plain callbacks, so a napari worker, the CLI and the tests drive the same code.

Overlapping tiles are blended with weights that fall smoothly to (almost) zero at a tile
edge shared with a neighbouring tile, so the result has no seams; at the image border a
tile keeps full weight, so a single tile reproduces ``prob_fn`` exactly. With ``border``, the image is first
extended by that many pixels of its mirror image on every side (``data.sampling.MirroredBorder``, as training
patches are) and the result cropped back, so that no image pixel is predicted from a tile's first or last rows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from skimage.measure import label as connected_components

from ..data.labels import label_dtype
from ..data.sampling import MirroredBorder

ProbFn = Callable[[torch.Tensor], torch.Tensor]


class PredictionCancelled(Exception):
    """Raised by :func:`predict_tiled` when ``should_stop()`` returned True."""


class NonFiniteProbabilities(ValueError):
    """The model's probabilities on an image are NaN or infinite (a model saved by a training run that diverged):
    raised before any band of rows with them is handed over. One line (:meth:`of`), naming the model's file when
    known; it pickles as its message, so it crosses from a dask worker unchanged."""

    @classmethod
    def of(cls, source: str | Path | None) -> NonFiniteProbabilities:
        who = f"{source}: the model" if source else "the model"
        return cls(f"{who} predicts NaN or infinite probabilities on this image, so it cannot segment it (was it "
                   "saved by a training run that diverged?): use an earlier file of that run, or train again with a "
                   "lower learning rate")


def _check_tile_overlap(tile: int, overlap: float) -> None:
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")


def overlap_pixels(tile: int, overlap: float) -> int:
    """Minimum overlap in pixels between neighbouring tiles: ``ceil(tile * overlap)``, < tile."""
    _check_tile_overlap(tile, overlap)
    margin = math.ceil(round(tile * overlap, 9))
    return min(margin, tile - 1)


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``.

    The first start is 0, the last is ``length - tile`` (flush with the end), and starts
    are spread evenly so that neighbours overlap by at least :func:`overlap_pixels`
    (``>= overlap * tile``, capped at ``tile - 1`` so tiles advance by at least one
    pixel). Returns ``[0]`` when ``length <= tile``.
    """
    _check_tile_overlap(tile, overlap)
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if length <= tile:
        return [0]
    stride = tile - overlap_pixels(tile, overlap)
    span = length - tile
    count = math.ceil(span / stride) + 1
    # Evenly spaced, rounded: consecutive gaps are <= ceil(span / (count - 1)) <= stride.
    return [int(round(i * span / (count - 1))) for i in range(count)]


def _ramp(margin: int) -> np.ndarray:
    """Raised-cosine ramp of ``margin`` float64 values rising strictly inside (0, 1).

    ``ramp + ramp[::-1] == 1``, so two ramps crossing over the same pixels sum to one.
    """
    return 0.5 - 0.5 * np.cos(np.pi * (np.arange(margin) + 0.5) / margin)


def _window_1d(tile: int, margin: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    weights = np.ones(tile, dtype=np.float64)
    if margin > 0:
        ramp = _ramp(margin)
        if ramp_start:
            weights[:margin] *= ramp
        if ramp_end:
            weights[tile - margin :] *= ramp[::-1]
    return weights


def axis_windows(starts: list[int], tile: int, margin: int, length: int) -> list[np.ndarray]:
    """One 1-D float32 blending window per tile start along an axis of ``length`` pixels: 1 in the middle,
    a raised-cosine ramp over ``margin`` pixels on each side that has a neighbouring tile, and full weight up
    to a side at the image border (so a single tile reproduces ``prob_fn`` exactly). A tile's 2-D window is
    the outer product of its row and column windows."""
    return [
        _window_1d(tile, margin, ramp_start=s > 0, ramp_end=s + tile < length).astype(np.float32)
        for s in starts
    ]


def tile_probabilities(prob_fn: "ProbFn", batch: np.ndarray, num_classes: int) -> torch.Tensor:
    """``prob_fn`` on a batch of tiles (float32 ``N x T x T x 3`` on the host) -> float32 ``N x K x T x T`` on the
    device ``prob_fn`` returned it on (no copy to the host), its shape checked."""
    batch_t = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2), np.float32))
    with torch.inference_mode():
        probs_t = prob_fn(batch_t)
    expected = (batch.shape[0], num_classes, batch.shape[1], batch.shape[2])
    if tuple(probs_t.shape) != expected:
        raise ValueError(f"prob_fn returned shape {tuple(probs_t.shape)}, expected {expected}")
    return probs_t.detach().to(torch.float32)


#: Device types whose tile probabilities are blended on the host with numpy rather than in torch where they are:
#: on the CPU both give bitwise the same sums and numpy is as fast or faster (one thread, a 4096 x 4096 image in
#: 1024 px tiles: 0.13 s against 0.17 s; 256 px tiles: equal; ``benchmarks/bench_blending.py``).
HOST_BLENDED = frozenset({"cpu"})


class BandSums:
    """The weighted sums that blend tiles, over a band of ``tile`` rows starting at plane row ``top``: ``sums``
    (``K x tile x width``, window x probability) and ``weight`` (``tile x width``, windows), float32.

    Non-finite probabilities raise :class:`NonFiniteProbabilities` (naming ``source``, the model's file) before a
    band holding them is handed over: on the host each batch is checked as it arrives; on a device a flag stays
    there (one ``isfinite().all()`` per batch, no wait) and is read when a band is finished, after the band's copy
    to the host has waited for the device anyway.

    They live where the tiles' probabilities are: in torch on the model's device (CUDA, MPS), so no tile
    crosses to the host and each finished band is copied there once, or in numpy on the host (``device`` None,
    the CPU: see ``HOST_BLENDED``). On a device they take ``(K + 1) x tile x width x 4`` bytes, as the host band
    does (K = 2, 1024 px tiles, 4096 px wide: 48 MiB); while a band finishes, also its finished rows and a copy of
    the rows that move up (at most ``2 x K x tile x width x 4`` bytes more). Never a whole ``K x Y x X`` plane.
    """

    def __init__(self, num_classes: int, tile: int, width: int, top: int, device: torch.device | None,
                 source: str | Path | None = None) -> None:
        self.tile, self.top, self.device, self.source = tile, top, device, source
        self.sums = self._zeros((num_classes, tile, width))
        self.weight = self._zeros((tile, width))
        self.finite: torch.Tensor | None = None  # on a device: every probability added so far was finite

    @classmethod
    def where(cls, probs: torch.Tensor, num_classes: int, tile: int, width: int, top: int = 0,
              source: str | Path | None = None) -> BandSums:
        """Sums on the device of ``probs`` (``tile_probabilities``' output), or on the host for ``HOST_BLENDED``."""
        return cls(num_classes, tile, width, top, None if probs.device.type in HOST_BLENDED else probs.device, source)

    def _zeros(self, shape: tuple[int, ...]):
        if self.device is None:
            return np.zeros(shape, dtype=np.float32)
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def windows(self, windows: list[np.ndarray]) -> list:
        """``axis_windows`` (1-D float32 ``tile``) moved to where the sums are."""
        return windows if self.device is None else [torch.from_numpy(w).to(self.device) for w in windows]

    def batch(self, probs: torch.Tensor):
        """``N x K x tile x tile`` probabilities (``tile_probabilities``) where the sums are, their finiteness noted
        (see the class)."""
        if self.device is None:
            host = probs.to("cpu").numpy()
            if not np.isfinite(host).all():  # numpy: many times faster than torch's isfinite().all() on a CPU
                raise NonFiniteProbabilities.of(self.source)
            return host
        finite = torch.isfinite(probs).all()
        self.finite = finite if self.finite is None else self.finite & finite
        return probs.to(self.device)

    def add(self, probs, x: int, y_window, x_window) -> None:
        """Blend one tile's ``K x tile x tile`` probabilities in at band column ``x`` with the outer product of its
        row and column windows (from ``windows``)."""
        window = y_window[:, None] * x_window[None, :]  # tile x tile, as np.outer
        self.sums[:, :, x : x + self.tile] += probs * window
        self.weight[:, x : x + self.tile] += window

    def finish(self, rows: int, first: int, last: int, cols: slice) -> np.ndarray | None:
        """The band's top ``rows`` rows are complete (no later tile covers them): return plane rows
        ``[first, last)`` of them (None if empty) at band columns ``cols``, normalised (``sum(w * p) / sum(w)``),
        as ``K x (last - first) x columns`` float32 on the host (one copy from a device), then move the band down
        by ``rows``."""
        done = None
        if last > first:
            a, b = first - self.top, last - self.top
            done = self.sums[:, a:b, cols] / self.weight[a:b, cols]
            if self.device is not None:
                done = done.cpu().numpy()
                if self.finite is not None and not bool(self.finite):  # one byte: the copy has waited already
                    raise NonFiniteProbabilities.of(self.source)
        for sums in (self.sums, self.weight):
            below = sums[..., rows:, :]
            sums[..., : self.tile - rows, :] = below if self.device is None else below.clone()  # torch: no overlap
            sums[..., self.tile - rows :, :] = 0.0
        self.top += rows
        return done


def predict_tiled(
    prob_fn: ProbFn,
    image: np.ndarray,
    tile: int,
    num_classes: int,
    overlap: float = 0.25,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    sink: Callable[[int, np.ndarray], None] | None = None,
    source: str | Path | None = None,
    border: int = 0,
) -> np.ndarray | None:
    """Class probabilities of a whole image from overlapping, blended tiles.

    Tiles are predicted row of tiles by row of tiles; the rows of pixels that no later tile covers are finished
    at once, so the blending holds one band of ``tile`` rows, not the whole image. The band lives where
    ``prob_fn``'s probabilities are (:class:`BandSums`): on a CUDA or MPS device the tiles are blended there and
    each finished band comes to the host in one copy; on the CPU numpy blends them.

    Args:
        prob_fn: maps a ``B x 3 x tile x tile`` float32 CPU tensor (values 0..255) to
            ``B x K x tile x tile`` class probabilities summing to 1 over K (any device or
            float dtype; it moves the batch to its own device, and leaves its output there). Called under
            ``torch.inference_mode()`` with ``B <= batch_size``.
        image: ``Y x X x 3``, RGB in 0..255 (already normalised to that range): an array, or any object with
            that ``shape`` whose ``[rows, cols]`` slices are such arrays (``data.SamPlanes.input_view``: a plane
            prepared tile by tile, never whole).
        tile: the model's square input size in pixels.
        num_classes: K.
        overlap: minimum fraction of a tile shared by neighbouring tiles, in [0, 1).
        batch_size: tiles per ``prob_fn`` call.
        progress: called as ``progress(done_tiles, total_tiles)`` after each batch.
        should_stop: polled before each batch; when it returns True,
            :class:`PredictionCancelled` is raised.
        sink: called as ``sink(first_row, probabilities)`` with ``K x n x X`` float32 for consecutive bands of
            rows, top to bottom; then nothing is returned and no ``K x Y x X`` array is ever made.
        source: the model's file, named in the error when its probabilities are not finite.
        border: pixels of mirror image added on every side before tiling (``data.sampling.mirror_margin`` of the
            tile for a model trained with such borders, as ``prediction.planes`` does); the tiles then cover the
            extended image, and only the image's own pixels are returned. 0: tiles start at the image's border.

    Returns:
        ``K x Y x X`` float32 probabilities (None with ``sink``): per pixel, the weighted average
        ``sum(w * p) / sum(w)`` over the tiles covering it (still summing to 1 over K).
        A side shorter than ``tile`` (after the border is added) is zero-padded to ``tile`` at the bottom or right
        and cropped back.

    Raises:
        NonFiniteProbabilities: ``prob_fn`` returned NaN or infinity, before any band with them reaches ``sink``.
    """
    if len(image.shape) != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be Y x X x 3, got shape {tuple(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_tile_overlap(tile, overlap)
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    height, width = image.shape[:2]  # the image's own pixels, rows and columns [border, border + size) below
    if border:
        image = MirroredBorder(image, border)
    pad_h, pad_w = max(image.shape[0], tile), max(image.shape[1], tile)
    if (pad_h, pad_w) != image.shape[:2]:  # a side shorter than a tile: small enough to hold padded
        padded = np.zeros((pad_h, pad_w, 3), dtype=np.float32)
        padded[: image.shape[0], : image.shape[1]] = image[:, :]
        image = padded

    ys, xs = tile_starts(pad_h, tile, overlap), tile_starts(pad_w, tile, overlap)
    margin = overlap_pixels(tile, overlap)
    y_windows = axis_windows(ys, tile, margin, pad_h)
    x_windows = axis_windows(xs, tile, margin, pad_w)
    positions = [(iy, ix) for iy in range(len(ys)) for ix in range(len(xs))]
    total = len(positions)

    out = None if sink is not None else np.empty((num_classes, height, width), dtype=np.float32)
    band: BandSums | None = None  # rows band.top .. band.top + tile, where prob_fn's output is

    def finish(rows: int) -> None:
        """Hand over the image's pixels among the band's top ``rows`` rows (no later tile covers them) and move the
        band down."""
        first = max(band.top, border) - border  # in the image's rows
        done = band.finish(rows, first + border, min(band.top + rows, border + height), slice(border, border + width))
        if done is None:
            return
        if sink is not None:
            sink(first, done)
        else:
            out[:, first : first + done.shape[1]] = done

    for first in range(0, total, batch_size):
        if should_stop is not None and should_stop():
            raise PredictionCancelled(f"prediction stopped after {first} of {total} tiles")
        chunk = positions[first : first + batch_size]
        batch = np.stack([image[ys[iy] : ys[iy] + tile, xs[ix] : xs[ix] + tile] for iy, ix in chunk])
        probs = tile_probabilities(prob_fn, batch, num_classes)
        if band is None:
            band = BandSums.where(probs, num_classes, tile, pad_w, source=source)
            y_windows, x_windows = band.windows(y_windows), band.windows(x_windows)
        for (iy, ix), tile_probs in zip(chunk, band.batch(probs)):
            if ys[iy] > band.top:  # a new row of tiles: the rows above it are complete
                finish(ys[iy] - band.top)
            band.add(tile_probs, xs[ix], y_windows[iy], x_windows[ix])
        if progress is not None:
            progress(first + len(chunk), total)
    finish(pad_h - band.top)
    return out


def probabilities_to_labels(probs: np.ndarray, class_values: Sequence[int]) -> np.ndarray:
    """``Y x X`` label image: the most probable class per pixel, mapped to its label value.

    Args:
        probs: ``K x Y x X`` (or ``K x ...``) class probabilities.
        class_values: the label value of each of the K classes (0 .. 2**32 - 1).

    Returns:
        The dtype of ``data.label_dtype(class_values)``. Ties go to the lower index.
    """
    probs = np.asarray(probs)
    values = np.asarray(class_values, dtype=np.int64)
    if values.ndim != 1 or len(values) != probs.shape[0]:
        raise ValueError(f"{len(values)} class values for {probs.shape[0]} probability channels")
    if values.size and (values.min() < 0 or values.max() >= 2**32):
        raise ValueError("class values must be in 0..2**32 - 1")
    return values.astype(label_dtype(values.tolist()))[np.argmax(probs, axis=0)]


def instances_from_labels(
    labels: np.ndarray, background_value: int = 0, connectivity: int | None = None, per_plane: bool = True
) -> np.ndarray:
    """Instance ids from a semantic label image: connected components of each class.

    Args:
        labels: integer label image: ``Y x X``, or planes ``... x Y x X`` (a stack, a time series).
        background_value: label value left as instance 0.
        connectivity: as in ``skimage.measure.label`` (None: full connectivity).
        per_plane: label each 2D plane on its own, so that objects do not merge across slices or time points
            (False: components in all dimensions, for a 3D volume with isotropic enough sampling).

    Returns:
        Same shape; ids ``1..N`` unique across all classes and planes (two touching components of
        different classes get different ids), uint16 when ``N < 65536`` else uint32.
    """
    labels = np.asarray(labels)
    planes = labels.reshape((-1,) + labels.shape[-2:]) if per_plane and labels.ndim > 2 else labels[None]
    instances = np.zeros(planes.shape, dtype=np.uint32)
    next_id = 0
    for index, plane in enumerate(planes):
        for value in np.unique(plane):
            if value == background_value:
                continue
            components, count = connected_components(plane == value, connectivity=connectivity, return_num=True)
            mask = components > 0
            instances[index][mask] = components[mask] + next_id
            next_id += count
    instances = instances.reshape(labels.shape)
    return instances.astype(np.uint16) if next_id < 2**16 else instances
