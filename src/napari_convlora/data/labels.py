"""Label modes (dense, sparse, instances), their encoding to class indices, and input validation.

Pure numpy: no torch, no napari, no Qt. Labels arrive exactly as a napari Labels layer holds them
(non-negative integers, or bool). :class:`LabelEncoding` maps label values to class indices
``0..K-1`` (class 0 is background) and unlabelled pixels to ``IGNORE_INDEX``:

- ``"dense"``: every pixel is labelled. Label value 0 (or ``background_value``) is the background
  class; every other value present is a class, in sorted order.
- ``"sparse"``: a partial annotation painted in napari. 0 means "not annotated" and is ignored by
  losses and metrics; ``background_value`` (default 1) is the background class 0; every other
  non-zero value is a class 1.., in sorted order.
- ``"instances"``: instance masks (e.g. nuclei): 0 is background, every non-zero id is the single
  foreground class 1.
- ``"sparse_instances"``: instance masks painted in part: 0 means "not annotated", ``background_value``
  (default 1) is background, every other id is the foreground class. Predictions write background as
  ``background_value`` and foreground as the next free value, so they can be copied back into the labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..config import InputSpec
from ..config.choices import LABEL_MODES
from ..constants import IGNORE_INDEX
from .images import ImageLayout, spatial_shape, validate_image
#: Modes where 0 means "not annotated".
SPARSE_MODES = ("sparse", "sparse_instances")
#: The label value painted as background in sparse mode unless the user says otherwise.
DEFAULT_SPARSE_BACKGROUND = 1
#: Most classes (background included) a model can predict.
MAX_CLASSES = 255
#: Label values below this are encoded through a lookup table (int64, 8 MiB at most).
LOOKUP_TABLE_SIZE = 2**20


def check_labels_dtype(labels: np.ndarray) -> None:
    """Raise ValueError unless ``labels`` holds integers or bools (what a napari Labels layer holds)."""
    if labels.dtype.kind not in "biu":
        raise ValueError(
            f"labels must be integers (a napari Labels layer), got {labels.dtype}. "
            "Convert an integral float mask with labels.astype(np.uint16) if that is what you meant."
        )


def present_values(labels: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer/bool array (int64); linear time for small dtypes."""
    flat = labels.reshape(-1)
    if labels.dtype == bool or (labels.dtype.kind == "u" and labels.dtype.itemsize <= 2):
        return np.flatnonzero(np.bincount(flat.astype(np.intp, copy=False))).astype(np.int64)
    return np.unique(flat).astype(np.int64)


def _plain_ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def label_dtype(values: Sequence[int]) -> np.dtype:
    """The dtype of a label image holding ``values`` (>= 0): uint8 below 256, else uint16, else uint32.
    The one rule for every label image the plugin writes."""
    top = max(values, default=0)
    return np.dtype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32)


@dataclass(frozen=True)
class LabelEncoding:
    """Label values <-> class indices (rebuilt from a model's :class:`~napari_convlora.config.HeadConfig`).

    mode: ``"dense"``, ``"sparse"``, ``"instances"`` or ``"sparse_instances"`` (see the module docstring).
    class_values: ``class_values[i]`` is the label value of class ``i``; class 0 is background.
    background_value: the label value of the background class (== ``class_values[0]``).
    """

    mode: str
    class_values: tuple[int, ...]
    background_value: int
    _sorted_values: np.ndarray = field(init=False, repr=False, compare=False)
    _class_of_sorted: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = _plain_ints(self.class_values)
        object.__setattr__(self, "class_values", values)
        object.__setattr__(self, "background_value", int(self.background_value))
        if self.mode not in LABEL_MODES:
            raise ValueError(f"unknown label mode {self.mode!r}; expected one of {LABEL_MODES}")
        if len(values) < 2 or len(set(values)) != len(values) or min(values) < 0:
            raise ValueError(f"class_values must be >= 2 distinct non-negative label values, got {values}")
        if len(values) > MAX_CLASSES:
            raise ValueError(f"{len(values)} classes; at most {MAX_CLASSES} are supported")
        if values[0] != self.background_value:
            raise ValueError(f"class 0 must be the background value {self.background_value}, got {values[0]}")
        if self.mode == "sparse" and 0 in values:
            raise ValueError("in sparse mode the label value 0 means 'not annotated' and cannot be a class")
        if self.mode == "instances" and values != (0, 1):
            raise ValueError(f"instances mode has class_values (0, 1), got {values}")
        if self.mode == "sparse_instances" and (len(values) != 2 or 0 in values):
            raise ValueError(f"sparse instances mode has two non-zero class values, got {values}")
        order = np.argsort(values)
        object.__setattr__(self, "_sorted_values", np.asarray(values, dtype=np.int64)[order])
        object.__setattr__(self, "_class_of_sorted", order.astype(np.int64))

    @property
    def num_classes(self) -> int:
        """K, the number of classes including background."""
        return len(self.class_values)

    def encode(self, labels: np.ndarray) -> np.ndarray:
        """Label values (any shape, integer or bool) -> int64 class indices 0..K-1, same shape.

        Unlabelled pixels (0 in sparse mode) and values that are not classes of this encoding
        (e.g. a new value in a validation image) become ``IGNORE_INDEX``.
        """
        labels = np.asarray(labels)
        check_labels_dtype(labels)
        if self.mode == "instances":
            return (labels > 0).astype(np.int64)
        if self.mode == "sparse_instances":
            encoded = (labels > 0).astype(np.int64)  # any object id: foreground
            encoded[labels == 0] = IGNORE_INDEX
            encoded[labels == self.background_value] = 0
            return encoded
        if labels.dtype == bool:
            labels = labels.view(np.uint8)
        if labels.size and labels.min() >= 0 and labels.max() < LOOKUP_TABLE_SIZE:
            lookup = self._encode_values(np.arange(int(labels.max()) + 1, dtype=np.int64))
            return lookup[labels]  # a table is much faster than searchsorted on large stacks
        return self._encode_values(labels.astype(np.int64, copy=False))

    def encode_objects(self, labels: np.ndarray) -> np.ndarray:
        """Instance label values (any shape) -> int64 object ids, same shape: IGNORE_INDEX not annotated, 0
        background, > 0 the object's own id (what an instance head learns from). Instance modes only.

        instances: 0 is background, every other value an object. sparse instances: 0 is not annotated, the
        background value is background, every other value an object."""
        if self.mode not in ("instances", "sparse_instances"):
            raise ValueError(f"object ids are read from instance labels, not in {self.mode!r} mode")
        labels = np.asarray(labels)
        check_labels_dtype(labels)
        ids = labels.astype(np.int64)
        if self.mode == "sparse_instances":
            ids[labels == self.background_value] = 0
            ids[labels == 0] = IGNORE_INDEX
        return ids

    def _encode_values(self, values: np.ndarray) -> np.ndarray:
        position = np.searchsorted(self._sorted_values, values)
        np.clip(position, 0, len(self._sorted_values) - 1, out=position)
        known = self._sorted_values[position] == values
        return np.where(known, self._class_of_sorted[position], IGNORE_INDEX).astype(np.int64, copy=False)

    @property
    def label_dtype(self) -> np.dtype:
        """The dtype of label images of this encoding (see :func:`label_dtype`)."""
        return label_dtype(self.class_values)

    def decode(self, class_indices: np.ndarray) -> np.ndarray:
        """Class indices (any shape, 0..K-1 or IGNORE_INDEX) -> label values for a napari Labels layer.

        ``IGNORE_INDEX`` becomes 0. dtype: :attr:`label_dtype`. In instances mode foreground is 1.
        """
        class_indices = np.asarray(class_indices)
        if class_indices.dtype.kind not in "biu":
            raise ValueError(f"class indices must be integers, got {class_indices.dtype}")
        indices = class_indices.astype(np.int64, copy=False)
        bad = (indices != IGNORE_INDEX) & ((indices < 0) | (indices >= self.num_classes))
        if bad.any():
            raise ValueError(
                f"class indices must be in 0..{self.num_classes - 1} (or {IGNORE_INDEX}); "
                f"found {int(indices[bad].flat[0])}"
            )
        lookup = np.asarray(self.class_values + (0,), dtype=self.label_dtype)  # index -1 -> 0
        return lookup[indices]


def _one_class_error(description: str) -> ValueError:
    return ValueError(
        f"only one class ({description}) found; paint at least background and one object class"
    )


def make_label_encoding(
    labels_list: Sequence[np.ndarray], mode: str = "dense", background_value: int | None = None
) -> LabelEncoding:
    """The encoding of a training set, built over ALL its label arrays (any shapes).

    background_value: dense: default 0; sparse modes: default :data:`DEFAULT_SPARSE_BACKGROUND` (1),
        must be > 0 (0 means "not annotated") and must be painted somewhere; instances: 0 only.
    Raises ValueError for non-integer or negative labels, a single class, or > MAX_CLASSES classes.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"unknown label mode {mode!r}; expected one of {LABEL_MODES}")
    if isinstance(labels_list, np.ndarray):
        labels_list = [labels_list]
    if len(labels_list) == 0:
        raise ValueError("no label arrays given")
    present: set[int] = set()
    for labels in labels_list:
        labels = np.asarray(labels)
        check_labels_dtype(labels)
        values = present_values(labels)
        if values.size and values[0] < 0:
            raise ValueError(f"labels contain negative values (min {int(values[0])}); label values must be >= 0")
        present.update(_plain_ints(values))

    if mode == "instances":
        if background_value not in (None, 0):
            raise ValueError(f"instances mode: background is always 0, got background_value={background_value}")
        if present == {0}:
            raise _one_class_error("background 0 only, no object")
        if 0 not in present:
            raise _one_class_error("objects only, no background 0")
        return LabelEncoding("instances", (0, 1), 0)

    if mode == "sparse_instances":
        background = DEFAULT_SPARSE_BACKGROUND if background_value is None else int(background_value)
        if background <= 0:
            raise ValueError(f"sparse instances: 0 means 'not annotated', so background_value must be > 0, "
                             f"got {background}")
        painted = present - {0}
        if background not in painted:
            raise ValueError(f"sparse instances: the background label value {background} is not painted anywhere "
                             f"(painted values: {sorted(painted)[:10]}); paint background with {background}")
        if painted == {background}:
            raise _one_class_error(f"label value {background} = background, no object")
        return LabelEncoding("sparse_instances", (background, background + 1), background)

    if mode == "sparse":
        background = DEFAULT_SPARSE_BACKGROUND if background_value is None else int(background_value)
        if background <= 0:
            raise ValueError(f"sparse mode: 0 means 'not annotated', so background_value must be > 0, got {background}")
        painted = present - {0}
        if not painted:
            raise ValueError("sparse mode: no annotated pixel (every label is 0, which means 'not annotated')")
        if background not in painted:
            raise ValueError(
                f"sparse mode: the background label value {background} is not painted anywhere "
                f"(painted values: {sorted(painted)}); paint background with {background} or set background_value"
            )
        if len(painted) == 1:
            raise _one_class_error(f"label value {background} = background")
        classes = (background,) + tuple(sorted(painted - {background}))
    else:
        background = 0 if background_value is None else int(background_value)
        if len(present) < 2:
            raise _one_class_error(f"label value {next(iter(present))}")
        classes = (background,) + tuple(sorted(present - {background}))

    if len(classes) > MAX_CLASSES:
        raise ValueError(
            f"{len(classes)} classes found (label values {classes[0]}..{max(classes)}); at most {MAX_CLASSES} "
            "are supported. Are these instance ids (one value per object)? Then use mode='instances'."
        )
    return LabelEncoding(mode, classes, background)


def _shape_hint(image_shape: tuple[int, ...], labels_shape: tuple[int, ...], layout: ImageLayout) -> str:
    if layout.rgb or layout.channel_axis is not None:
        return ""
    if image_shape[:-1] == labels_shape and image_shape[-1] in (3, 4):
        return " If the image is RGB(A), set rgb=True."
    for axis in range(len(image_shape)):
        if image_shape[:axis] + image_shape[axis + 1 :] == labels_shape:
            return f" If axis {axis} of the image holds channels, set channel_axis={axis}."
    return ""


def validate_pair(
    image: np.ndarray, labels: np.ndarray, layout: ImageLayout, mode: str = "dense", spec: InputSpec | None = None
) -> None:
    """Check one (image, labels) training pair before any training; raise ValueError with the reason.

    Checks the image (see :func:`~.images.validate_image`), that labels are integers or bools,
    non-negative, shaped like the image's spatial shape, and (sparse mode) that something is painted.
    """
    image, labels = np.asarray(image), np.asarray(labels)
    validate_image(image, layout, spec)
    check_labels_dtype(labels)
    expected = spatial_shape(image, layout)
    if labels.shape != expected:
        raise ValueError(
            f"image spatial shape {expected} (image shape {image.shape}) does not match labels shape "
            f"{labels.shape}.{_shape_hint(image.shape, labels.shape, layout)}"
        )
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise ValueError(f"labels contain negative values (min {int(labels.min())}); label values must be >= 0")
    if mode in SPARSE_MODES and not labels.any():
        raise ValueError(
            "labels have no annotated pixel: in sparse mode 0 means 'not annotated'; paint some pixels"
        )


def label_planes(encoded: np.ndarray) -> np.ndarray:
    """View of an encoded ``(..., Y, X)`` array as ``N x Y x X`` planes (same order as to_sam_planes)."""
    encoded = np.asarray(encoded)
    if encoded.ndim < 2:
        raise ValueError(f"expected at least 2 axes (Y, X), got shape {encoded.shape}")
    return encoded.reshape((-1,) + encoded.shape[-2:])


def labelled_plane_indices(encoded: np.ndarray) -> list[int]:
    """Indices of the 2D planes of an encoded ``(..., Y, X)`` array with a pixel != IGNORE_INDEX.

    Planes are numbered in C order over the leading axes, like :func:`~.images.to_sam_planes`;
    a 2D array is the single plane 0.
    """
    planes = label_planes(encoded)
    return [int(i) for i in np.flatnonzero((planes != IGNORE_INDEX).any(axis=(1, 2)))]
