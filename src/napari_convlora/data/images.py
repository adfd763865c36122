"""Image layouts (2D, RGB/RGBA, multichannel, stacks) turned into the RGB planes SAM sees.

numpy and scikit-image: no torch, no napari, no Qt. An image arrives exactly as a napari Image layer holds it;
:class:`ImageLayout` says how to read its axes. :func:`to_sam_planes` returns float32
``N x Y x X x 3`` planes in 0..255, one per 2D slice of the image (N = 1 for a 2D image, N = Z for a
``(Z, Y, X)`` stack, N = T * Z for ``(T, Z, Y, X)``, planes in C order over the leading axes).

Normalisation is computed once per image (the whole array given: one 2D image or the whole stack)
and per channel: the low percentile maps to 0, the high percentile to 255, clipped. When the two
percentiles coincide (e.g. a few bright spots on a dark background) the channel's min..max is used
instead; a constant channel maps to 0. Boolean images map False -> 0 and True -> 255 directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import InputSpec
from .rescale import rescale_image, scaled_shape

#: Above this many elements per channel, percentiles are computed on a strided subsample.
PERCENTILE_SAMPLE_SIZE = 4_000_000


@dataclass
class ImageLayout:
    """How to read the axes of one image array (what is stored with the model is the :class:`InputSpec`).

    rgb: the napari Image layer's ``rgb`` flag: the last axis holds 3 (RGB) or 4 (RGBA) colour
        channels; alpha is dropped.
    channel_axis: an axis (negative allowed) holding channels of a multichannel image; exclusive
        with ``rgb``. The remaining axes are spatial: ``(Y, X)``, ``(Z, Y, X)``, ...
    """

    rgb: bool = False
    channel_axis: int | None = None

    def __post_init__(self) -> None:
        if self.rgb and self.channel_axis is not None:
            raise ValueError("an image is either rgb (colour in the last axis) or has a channel_axis, not both")


def check_image_dtype(image: np.ndarray) -> None:
    """Raise ValueError unless ``image`` holds real numbers (bool, integer or float)."""
    kind = image.dtype.kind
    if kind == "c":
        raise ValueError(
            f"image has complex dtype {image.dtype}; expected real intensities (uint8, uint16, int or float). "
            "Take the magnitude (np.abs) or the real part first."
        )
    if kind not in "biuf":
        raise ValueError(f"image has unsupported dtype {image.dtype}; expected bool, integer or float intensities")


def _channel_axis(shape: tuple[int, ...], layout: ImageLayout) -> int | None:
    """The channel axis as a non-negative index (the last one for rgb), or None for one channel."""
    if layout.rgb:
        if len(shape) < 3 or shape[-1] not in (3, 4):
            raise ValueError(
                f"rgb=True expects the last axis to hold 3 (RGB) or 4 (RGBA) colour channels and at least "
                f"2 spatial axes before it; got an image of shape {shape}"
            )
        return len(shape) - 1
    if layout.channel_axis is None:
        return None
    axis = layout.channel_axis
    if not -len(shape) <= axis < len(shape):
        raise ValueError(
            f"channel_axis={axis} is out of range for an image with {len(shape)} axes (shape {shape}); "
            f"expected -{len(shape)}..{len(shape) - 1}"
        )
    return axis % len(shape)


def spatial_shape(image: np.ndarray, layout: ImageLayout) -> tuple[int, ...]:
    """Shape of the matching Labels array: the image shape without its channel axis.

    E.g. ``(Y, X)`` for a 2D or RGB image, ``(Z, Y, X)`` for a stack. Raises ValueError when the
    layout does not fit the shape or the image is too small (empty, a side < 2 pixels).
    """
    shape = tuple(int(n) for n in np.shape(image))
    axis = _channel_axis(shape, layout)
    spatial = shape if axis is None else shape[:axis] + shape[axis + 1 :]
    if len(spatial) < 2:
        raise ValueError(
            f"image of shape {shape} has {len(spatial)} spatial axis/axes; expected at least 2 (Y, X)"
            + ("" if axis is None else f" besides the channel axis {axis}")
        )
    if 0 in shape:
        raise ValueError(f"image is empty (shape {shape})")
    if min(spatial[-2:]) < 2:
        raise ValueError(
            f"image is too small: its spatial shape is {spatial}; Y and X must be at least 2 pixels"
        )
    return spatial


def _used_channels(num_channels: int, layout: ImageLayout, spec: InputSpec, axis: int | None) -> tuple[int, ...]:
    """Indices of the channels to use (alpha of RGBA excluded)."""
    available = 3 if layout.rgb else num_channels
    if spec.channels is None:
        if available > 3:
            raise ValueError(
                f"the image has {available} channels along axis {axis}; SAM takes at most 3. "
                f"Choose up to 3 of them with channels=(i, j, k) (indices 0..{available - 1})"
            )
        return tuple(range(available))
    bad = [c for c in spec.channels if not 0 <= c < available]
    if bad:
        raise ValueError(
            f"channels {bad} do not exist: the image has {available} channel(s) along axis {axis} "
            f"(valid indices 0..{available - 1})"
        )
    return spec.channels


def rgb_slots(num_used: int, spec: InputSpec) -> tuple[tuple[int, ...], ...]:
    """For each used channel, the RGB slots it fills: ``spec.rgb_slots``, or by default one channel into all
    three, two into red and green, three into red, green and blue."""
    if spec.rgb_slots is None:
        if num_used == 1:
            return ((0, 1, 2),)
        return tuple((slot,) for slot in range(num_used))
    if len(spec.rgb_slots) != num_used:
        raise ValueError(
            f"rgb_slots={spec.rgb_slots} names {len(spec.rgb_slots)} slot(s) for {num_used} channel(s); "
            "give one RGB slot per channel used"
        )
    return tuple((slot,) for slot in spec.rgb_slots)


def _check_finite(image: np.ndarray) -> None:
    if image.dtype.kind != "f":
        return
    low, high = image.min(), image.max()  # both propagate NaN; inf shows up as an extreme
    if not (np.isfinite(low) and np.isfinite(high)):
        what = "NaN" if np.isnan(low) or np.isnan(high) else "infinite"
        raise ValueError(
            f"image ({image.dtype}, shape {image.shape}) contains {what} values; replace them "
            "(e.g. np.nan_to_num) before training"
        )


def validate_image(image: np.ndarray, layout: ImageLayout, spec: InputSpec | None = None) -> tuple[int, ...]:
    """All checks of :func:`to_sam_planes` without converting; returns :func:`spatial_shape`."""
    image = np.asarray(image)
    spec = spec or InputSpec()
    check_image_dtype(image)
    shape = spatial_shape(image, layout)
    axis = _channel_axis(image.shape, layout)
    used = _used_channels(1 if axis is None else image.shape[axis], layout, spec, axis)
    rgb_slots(len(used), spec)
    _check_finite(image)
    return shape


def _sample_step(shape: tuple[int, ...]) -> int:
    """The stride of :func:`_strided_sample` along every axis of a channel of ``shape`` (1: every element)."""
    size = math.prod(shape)
    return 1 if size <= PERCENTILE_SAMPLE_SIZE else math.ceil((size / PERCENTILE_SAMPLE_SIZE) ** (1.0 / len(shape)))


def _strided_sample(channel: np.ndarray) -> np.ndarray:
    """A regular strided subsample of ``channel`` (any ndim) with <= ~PERCENTILE_SAMPLE_SIZE elements."""
    step = _sample_step(tuple(channel.shape))
    return channel if step == 1 else channel[(slice(None, None, step),) * channel.ndim]


def intensity_range(channel: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """(low, high) intensities of one channel (any shape) mapped to 0 and 255.

    Percentiles of a strided subsample; falls back to min..max when they coincide. A constant
    channel returns low == high (callers map it to 0).
    """
    sample = _strided_sample(channel)
    low, high = (float(v) for v in np.percentile(sample, percentiles))
    if high <= low:
        low, high = float(channel.min()), float(channel.max())
    return low, high


class SamPlanes:
    """The 2D planes of one image as SAM sees them, made one at a time on demand.

    Built once per image: it checks the image against ``layout`` and ``spec`` and computes each channel's
    intensity range over the whole image (so every plane of a stack is normalised alike); converting a
    plane then touches only that plane, so predicting one plane of a large stack makes no float copy of
    the rest.

    image: as a napari Image layer holds it: ``(Y, X)``, ``(Y, X, 3|4)`` with ``rgb``, ``(Z, Y, X)``,
        ``(Z, Y, X, 3|4)``, or channels along ``layout.channel_axis``; bool, integer or float.
    Planes are numbered in C order over the leading axes (a 2D image is the single plane 0).
    ranges: each used channel's (low, high) intensities when already known (computed over a whole image of
        which ``image`` is a part, e.g. by ``blockwise``); None computes them from ``image``.
    """

    def __init__(self, image: np.ndarray, layout: ImageLayout, spec: InputSpec,
                 ranges: Sequence[tuple[float, float]] | None = None) -> None:
        image = np.asarray(image)
        validate_image(image, layout, spec)
        self.spec = spec
        axis = _channel_axis(image.shape, layout)
        self._channels_last = image[..., None] if axis is None else np.moveaxis(image, axis, -1)
        self._used = _used_channels(self._channels_last.shape[-1], layout, spec, axis)
        self._slots = rgb_slots(len(self._used), spec)
        self.leading = self._channels_last.shape[:-3]
        self.shape = tuple(self._channels_last.shape[-3:-1])  # Y, X
        if ranges is not None and len(ranges) != len(self._used):
            raise ValueError(f"{len(ranges)} intensity ranges for {len(self._used)} channel(s) used")
        self.ranges = [(float(low), float(high)) for low, high in ranges] if ranges is not None else [
            (0.0, 1.0) if image.dtype == bool else intensity_range(self._channels_last[..., c], spec.percentiles)
            for c in self._used
        ]

    def __len__(self) -> int:
        return math.prod(self.leading)

    def check_indices(self, indices: Sequence[int]) -> list[int]:
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"plane indices {bad} out of range: the image has {len(self)} plane(s)")
        return indices

    def normalised(self, index: int, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """Plane ``index`` (or its ``rows`` x ``cols`` window) as float32 ``Y x X x 3`` in 0..255, at the image's
        own resolution."""
        (index,) = self.check_indices([index])
        where = np.unravel_index(index, self.leading) if self.leading else ()
        height = len(range(*rows.indices(self.shape[0])))
        width = len(range(*cols.indices(self.shape[1])))
        out = np.zeros((height, width, 3), dtype=np.float32)
        for channel, slots, (low, high) in zip(self._used, self._slots, self.ranges):
            raw = self._channels_last[where + (rows, cols, channel)]
            with np.errstate(over="ignore"):  # a range beyond float32 is told apart below
                low32, high32 = np.float32(low), np.float32(high)
            if high > low and not (np.isfinite(low32) and np.isfinite(high32) and high32 > low32):
                # a float64 range that float32 cannot hold (beyond 3.4e38, or distinct values that round to one):
                # normalised in float64, so that the plane is not blank
                wide = (np.asarray(raw, dtype=np.float64) - low) / (high - low) * 255.0
                values = np.clip(wide, 0.0, 255.0).astype(np.float32)
            else:
                values = raw.astype(np.float32)
                values -= low32
                if high32 > low32:  # divide in float32 so that ``high`` maps to exactly 255
                    values /= high32 - low32
                    values *= np.float32(255.0)
                else:
                    values[...] = 0.0
                np.clip(values, 0.0, 255.0, out=values)
            for slot in slots:
                out[..., slot] = values
        return out

    @property
    def input_shape(self) -> tuple[int, int]:
        """(Y', X') of a plane as the model sees it, after ``spec.rescale``."""
        return scaled_shape(self.shape, self.spec.rescale)

    def input_view(self, index: int) -> "np.ndarray | PlaneView":
        """Plane ``index`` as the model sees it, for tiled prediction: without rescaling, a view that prepares
        only the windows asked for (a tile at a time, never the whole plane); with rescaling, the whole plane."""
        if self.spec.rescale != 1.0:
            return self.model_input(index)
        self.check_indices([index])
        return PlaneView(self, index)

    def model_input(self, index: int) -> np.ndarray:
        """Plane ``index`` as the model sees it: normalised, then rescaled by ``spec.rescale`` (float32
        ``Y' x X' x 3``). Training and prediction both take their planes from here."""
        return rescale_image(self.normalised(index), self.input_shape)


class PlaneView:
    """One plane of :class:`SamPlanes` as a ``Y x X x 3`` float32 array that is prepared window by window:
    ``view[y0:y1, x0:x1]`` normalises just that window (the same values as the whole plane would have)."""

    def __init__(self, planes: SamPlanes, index: int) -> None:
        self.planes, self.index = planes, index
        self.shape = planes.shape + (3,)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        return self.planes.normalised(self.index, rows, cols)


def to_sam_planes(
    image: np.ndarray, layout: ImageLayout, spec: InputSpec | None = None, plane_indices: Sequence[int] | None = None
) -> np.ndarray:
    """The normalised 2D RGB planes of an image (see :class:`SamPlanes`), at the image's own resolution.

    plane_indices: which planes to return; default all. The normalisation uses the whole image either way.
    Returns: float32 ``N x Y x X x 3`` in 0..255 (N = number of planes, or len(plane_indices)).
    """
    planes = SamPlanes(image, layout, spec or InputSpec())
    indices = range(len(planes)) if plane_indices is None else planes.check_indices(plane_indices)
    out = np.zeros((len(indices),) + planes.shape + (3,), dtype=np.float32)
    for k, index in enumerate(indices):
        out[k] = planes.normalised(index)
    return out
