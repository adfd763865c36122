"""Square training patches drawn at random, a fixed tiling of the validation pixels, and how an image continues
past its border.

Pure numpy. Inputs are 2D pairs (planes float32 ``Y x X x 3`` in 0..255, targets
int64 ``Y x X`` with IGNORE_INDEX for unlabelled pixels), i.e. after encoding, rescaling, splitting and
slicing stacks. Patches come out channels-first for torch: images ``3 x S x S`` float32 in 0..255,
targets ``S x S`` int64.

Image borders: an image continues past each border as its mirror image, :func:`mirror_margin` pixels wide
(:class:`MirroredBorder`), in training patches and in prediction tiles alike (``prediction.tiling.predict_tiled``
with ``border``). Patches are cut from the image so extended, its targets IGNORE_INDEX in the mirror. Where a
patch still reaches past it (an image smaller than a patch), the patch is padded with 0 and the targets with
IGNORE_INDEX at the bottom and right, as tiled prediction pads a small plane (augmentation flips and rotates the
content before it is padded, so padding is never elsewhere).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from ..constants import IGNORE_INDEX

Pair = tuple[np.ndarray, np.ndarray]
#: Share of patches placed on a labelled pixel when ``labelled_weighting`` is on.
LABELLED_SHARE = 0.8
#: Share of patches placed on a pixel of a class drawn uniformly among the classes present, when ``class_balanced``
#: is on. Half: each of K classes is then in at least 1 / (2K) of the patches however rare it is (a CT lesion on
#: 0.65 % of the pixels was in almost no uniformly placed patch and collapsed to background), while the other half
#: keeps the data's own mix of classes and the context between them, so frequent classes are not under-trained.
CLASS_BALANCED_SHARE = 0.5
#: Uniform draws tried before falling back to a patch placed on a labelled pixel.
UNIFORM_TRIES = 4
GAIN_RANGE = (0.9, 1.1)
OFFSET_RANGE = (-10.0, 10.0)


def _check_pair(image: np.ndarray, targets: np.ndarray, index: int) -> None:
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"pair {index}: expected an image plane Y x X x 3, got shape {image.shape}")
    if targets.shape != image.shape[:2]:
        raise ValueError(f"pair {index}: targets shape {targets.shape} does not match image {image.shape[:2]}")
    if targets.dtype.kind not in "iu":
        raise ValueError(f"pair {index}: targets must be integer class indices, got {targets.dtype}")


def mirror_margin(size: int) -> int:
    """Pixels of mirror image added on every side of an image before training patches or prediction tiles of
    ``size`` pixels are cut from it: ``size // 8`` (32 at 256 px, 128 at 1024).

    Why: a model predicts the first and last rows and columns of a tile with less context, and a fine-tuned SAM
    leans to foreground there (measured on a real time-lapse: 2 to 4 times the foreground probability of the
    tile's inside on the same kind of background). Inside an image, overlapping tiles blend those rows away; an
    image's own border has no neighbouring tile, so without the margin it is always predicted from a tile's edge
    at full weight (the false objects along a border of issue 21, item 8)."""
    return size // 8


def reflect_indices(start: int, stop: int, length: int) -> np.ndarray:
    """Indices into an axis of ``length`` pixels for the positions ``start .. stop - 1`` (any integers): positions
    beyond the axis mirror back, the edge pixel not repeated, as often as needed (``numpy.pad``'s "reflect")."""
    positions = np.arange(start, stop)
    if length == 1:
        return np.zeros_like(positions)
    period = 2 * (length - 1)
    positions = positions % period
    return np.where(positions < length, positions, period - positions)


class MirroredBorder:
    """An image extended by pixels of its mirror image around it, read window by window.

    image: ``Y x X x C`` or ``Y x X``: an array, or an object with that ``shape`` whose ``[rows, cols]`` slices are
        arrays (``images.PlaneView``, which prepares only the windows asked for).
    margin: pixels added on every side, or ``((top, bottom), (left, right))`` as ``numpy.pad`` takes them (a part
        of a plane cut where the plane ends, extended on those sides only).
    ``view[rows, cols]`` (slices of step 1 in the extended image's coordinates, clipped to it as numpy clips) is
    what ``numpy.pad(image, margin, mode="reflect")`` holds there; it reads one window of ``image``: the smallest
    that holds every pixel it shows, no larger than the window asked for when each margin is less than half the
    window's side (a tile or patch of side ``8 x mirror_margin``).
    """

    def __init__(self, image, margin: int | tuple[tuple[int, int], tuple[int, int]]) -> None:
        sides = ((margin, margin), (margin, margin)) if isinstance(margin, (int, np.integer)) else margin
        self.before, self.after = (int(sides[0][0]), int(sides[1][0])), (int(sides[0][1]), int(sides[1][1]))
        if min(self.before + self.after) < 0:
            raise ValueError(f"margins must be >= 0, got {margin}")
        if min(image.shape[:2]) < 1:
            raise ValueError(f"cannot mirror an empty image (shape {tuple(image.shape)})")
        self.image = image
        self.shape = tuple(n + a + b for n, a, b in zip(image.shape[:2], self.before, self.after)) + tuple(
            image.shape[2:])
        self.dtype = np.dtype(getattr(image, "dtype", np.float32))

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        spans = []
        for axis, wanted in enumerate(key):
            start, stop, step = wanted.indices(self.shape[axis])
            if step != 1:
                raise ValueError("a mirrored image is read in windows of step 1")
            offset = self.before[axis]
            spans.append((start - offset, max(stop, start) - offset, self.image.shape[axis]))
        if all(0 <= first and last <= length for first, last, length in spans):  # inside: no mirror needed
            (r0, r1, _), (c0, c1, _) = spans
            return np.asarray(self.image[r0:r1, c0:c1])
        rows_at, cols_at = (reflect_indices(*span) for span in spans)
        if rows_at.size == 0 or cols_at.size == 0:
            return np.zeros((rows_at.size, cols_at.size) + self.shape[2:], dtype=self.dtype)
        r0, c0 = int(rows_at.min()), int(cols_at.min())
        window = np.asarray(self.image[r0 : int(rows_at.max()) + 1, c0 : int(cols_at.max()) + 1])
        return window[np.ix_(rows_at - r0, cols_at - c0)]


def _target_window(targets: np.ndarray, top: int, left: int, size: int, margin: int) -> np.ndarray:
    """The ``size x size`` window at (top, left) of ``targets`` extended by ``margin`` pixels of IGNORE_INDEX on every
    side (the targets of a :class:`MirroredBorder`), clipped to the extended image: int64."""
    height, width = targets.shape
    out = np.full((min(size, height + 2 * margin - top), min(size, width + 2 * margin - left)), IGNORE_INDEX,
                  dtype=np.int64)
    y0, x0 = top - margin, left - margin  # the window's corner in the targets' own coordinates
    r0, r1 = max(y0, 0), min(y0 + out.shape[0], height)
    c0, c1 = max(x0, 0), min(x0 + out.shape[1], width)
    if r1 > r0 and c1 > c0:
        out[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0] = targets[r0:r1, c0:c1]
    return out


def _flat_index_dtype(size: int) -> np.dtype:
    """int32 for the flat indices of a plane of ``size`` pixels when they fit (half the memory), else int64."""
    return np.dtype(np.int32 if size <= np.iinfo(np.int32).max else np.int64)


def _pixels_by_class(targets: np.ndarray, labelled: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """``labelled`` (flat indices of a plane's labelled pixels, raster order) reordered by class, raster order within
    a class, and the pixels of each class: int64 ``targets.max() + 1``. One stable sort of 1-byte keys below 255
    classes (a radix sort), no per-class pass over the plane and no int64 copy of the targets."""
    if int(targets.min()) < IGNORE_INDEX:
        raise ValueError(f"pair {index}: targets must be class indices >= 0 or {IGNORE_INDEX} (not annotated), "
                         f"got {int(targets.min())}")
    top = int(targets.max())
    key_type = np.uint8 if top < 255 else np.uint16 if top < 65535 else np.int64  # room for top + 1
    keys = targets.reshape(-1).astype(key_type)[labelled]
    order = np.argsort(keys, kind="stable")
    starts = np.searchsorted(keys[order], np.arange(top + 2, dtype=key_type))
    return labelled[order], np.diff(starts).astype(np.int64)


def crop_padded(image: np.ndarray, targets: np.ndarray, top: int, left: int, size: int) -> Pair:
    """The ``size x size`` window at (top, left) (top, left >= 0), padded past the image edge.

    Returns (float32 ``S x S x 3`` with 0 padding, int64 ``S x S`` with IGNORE_INDEX padding).
    """
    image_patch = np.zeros((size, size, 3), dtype=np.float32)
    target_patch = np.full((size, size), IGNORE_INDEX, dtype=np.int64)
    window_image = image[top : top + size, left : left + size]
    height, width = window_image.shape[:2]
    image_patch[:height, :width] = window_image
    target_patch[:height, :width] = targets[top : top + size, left : left + size]
    return image_patch, target_patch


class PatchSampler:
    """Random training patches from a list of 2D pairs; all randomness from the ``rng`` passed in.

    pairs: (planes float32 ``Y x X x 3`` in 0..255, targets int64 ``Y x X``) 2D pairs. Pairs
        without a labelled pixel are dropped; at least one must remain.
    patch_size: S, the side of the square patches.
    labelled_weighting: for sparse annotations: 80% of patches are placed on a random labelled
        pixel (which lands anywhere inside the patch), 20% uniformly. Without it every patch is
        placed uniformly (image chosen in proportion to its area).
    class_balanced: first, :data:`CLASS_BALANCED_SHARE` (half) of the patches are placed on a pixel of a class
        drawn uniformly among the classes present in any pair (then a plane in proportion to that class's pixels
        in it, then one of them at random; it lands anywhere inside the patch, so no class learns a position in
        the patch); the rest are placed as ``labelled_weighting`` says. A class on 0.2 % of the pixels is then
        in about 1 / (2K) of the patches or more, K the number of classes present. The flat indices of the
        labelled pixels are kept sorted by class (int32: 64 MiB for a 4096 x 4096 plane), nothing per class.
    augment: random flips and 90-degree rotations (image and targets alike) and an intensity
        jitter of the image (gain 0.9..1.1, offset -10..10, clipped to 0..255; padding stays 0).
    border: pixels of mirror image around every image (see the module), where patches may reach as they reach
        into the image; None: :func:`mirror_margin` of the patch size, as prediction extends a plane; 0: patches
        stay inside the images.

    A uniformly placed patch without any labelled pixel is redrawn; after a few tries the patch is
    placed on a labelled pixel, so patches are never entirely unlabelled. The same generator state
    always gives the same batch (save and restore ``rng.bit_generator.state`` to resume).
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        patch_size: int,
        labelled_weighting: bool = False,
        augment: bool = True,
        border: int | None = None,
        class_balanced: bool = False,
    ) -> None:
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = int(patch_size)
        self.border = mirror_margin(self.patch_size) if border is None else int(border)
        if self.border < 0:
            raise ValueError(f"border must be >= 0, got {border}")
        self.labelled_weighting = bool(labelled_weighting)
        self.class_balanced = bool(class_balanced)
        self.augment = bool(augment)
        self.images: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self._extended: list[MirroredBorder] = []  # the images with their mirror around them
        self._labelled_pixels: list[np.ndarray] = []  # flat indices of labelled pixels, per pair (by class if balanced)
        class_counts: list[np.ndarray] = []
        for index, (image, targets) in enumerate(pairs):
            _check_pair(np.asarray(image), np.asarray(targets), index)
            image, targets = np.asarray(image, dtype=np.float32), np.asarray(targets).astype(np.int64, copy=False)
            labelled = np.flatnonzero(targets != IGNORE_INDEX).astype(_flat_index_dtype(targets.size), copy=False)
            if labelled.size:
                if self.class_balanced:
                    labelled, counts = _pixels_by_class(targets, labelled, index)
                    class_counts.append(counts)
                self.images.append(image)
                self.targets.append(targets)
                self._extended.append(MirroredBorder(image, self.border))
                self._labelled_pixels.append(labelled)
        if not self.images:
            raise ValueError("no labelled pixel in any training plane: nothing to learn from")
        if self.class_balanced:  # pairs x K pixels per class, and where each class starts in a pair's sorted pixels
            self._class_counts = np.zeros((len(class_counts), max(c.size for c in class_counts)), dtype=np.int64)
            for row, counts in zip(self._class_counts, class_counts):
                row[: counts.size] = counts
            self._class_starts = np.cumsum(self._class_counts, axis=1) - self._class_counts
            self._classes_present = np.flatnonzero(self._class_counts.sum(axis=0))
        areas = np.array([t.size for t in self.targets], dtype=np.float64)
        labelled_counts = np.array([p.size for p in self._labelled_pixels], dtype=np.float64)
        self._area_weights = areas / areas.sum()
        self._labelled_weights = labelled_counts / labelled_counts.sum()

    def __len__(self) -> int:
        """Number of pairs (planes) with labelled pixels."""
        return len(self.images)

    def _extended_shape(self, pair: int) -> tuple[int, int]:
        height, width = self.targets[pair].shape
        return height + 2 * self.border, width + 2 * self.border

    def _uniform_corner(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """A window placed uniformly in an image with its mirror border (corner in the extended image)."""
        pair = int(rng.choice(len(self.images), p=self._area_weights))
        height, width = self._extended_shape(pair)
        top = int(rng.integers(0, max(height - self.patch_size, 0) + 1))
        left = int(rng.integers(0, max(width - self.patch_size, 0) + 1))
        return pair, top, left

    def _labelled_corner(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """A window placed uniformly among those that contain a random labelled pixel (in the extended image)."""
        pair = int(rng.choice(len(self.images), p=self._labelled_weights))
        pixels = self._labelled_pixels[pair]
        return self._corner_around(pair, int(pixels[rng.integers(0, pixels.size)]), rng)

    def _class_corner(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """A window containing a random pixel of a class drawn uniformly among the classes present (the pair drawn
        in proportion to that class's pixels in it)."""
        cls = int(self._classes_present[rng.integers(0, self._classes_present.size)])
        counts = self._class_counts[:, cls]
        pair = int(rng.choice(len(self.images), p=counts / counts.sum()))
        index = int(self._class_starts[pair, cls]) + int(rng.integers(0, counts[pair]))
        return self._corner_around(pair, int(self._labelled_pixels[pair][index]), rng)

    def _corner_around(self, pair: int, pixel: int, rng: np.random.Generator) -> tuple[int, int, int]:
        """A window placed uniformly among those that contain the flat index ``pixel`` of pair ``pair``."""
        y, x = divmod(pixel, self.targets[pair].shape[1])
        y, x = y + self.border, x + self.border
        height, width = self._extended_shape(pair)
        corner = []
        for position, length in ((y, height), (x, width)):
            lowest = max(0, position - self.patch_size + 1)
            highest = max(0, min(position, length - self.patch_size))
            corner.append(int(rng.integers(lowest, highest + 1)))
        return pair, corner[0], corner[1]

    def _draw_patch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.class_balanced and rng.random() < CLASS_BALANCED_SHARE:
            placements = [self._class_corner]
        elif self.labelled_weighting and rng.random() < LABELLED_SHARE:
            placements = [self._labelled_corner]
        else:
            placements = [self._uniform_corner] * UNIFORM_TRIES + [self._labelled_corner]
        for place in placements:
            pair, top, left = place(rng)
            targets = _target_window(self.targets[pair], top, left, self.patch_size, self.border)
            if (targets != IGNORE_INDEX).any():
                break
        image = self._extended[pair][top : top + self.patch_size, left : left + self.patch_size]
        if self.augment:
            gain = rng.uniform(*GAIN_RANGE)
            offset = rng.uniform(*OFFSET_RANGE)
            image = np.clip(image * np.float32(gain) + np.float32(offset), 0.0, 255.0)
        if self.augment:  # before padding, so that padding stays at the bottom and right, as in prediction
            image, targets = _flip_rotate(image, targets, rng)
        return crop_padded(image, targets, 0, 0, self.patch_size)

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """A batch: (images float32 ``B x 3 x S x S`` in 0..255, targets int64 ``B x S x S``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        patches = [self._draw_patch(rng) for _ in range(batch_size)]
        images = np.stack([image.transpose(2, 0, 1) for image, _ in patches]).astype(np.float32, copy=False)
        targets = np.stack([targets for _, targets in patches]).astype(np.int64, copy=False)
        return np.ascontiguousarray(images), np.ascontiguousarray(targets)


def _flip_rotate(image: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> Pair:
    """The same random vertical/horizontal flip and 90-degree rotation of ``h x w x 3`` and ``h x w``."""
    flip_y, flip_x = rng.random(2) < 0.5
    quarter_turns = int(rng.integers(0, 4))
    if flip_y:
        image, targets = image[::-1], targets[::-1]
    if flip_x:
        image, targets = image[:, ::-1], targets[:, ::-1]
    image = np.rot90(image, quarter_turns, axes=(0, 1))
    targets = np.rot90(targets, quarter_turns, axes=(0, 1))
    return np.ascontiguousarray(image), np.ascontiguousarray(targets)


def _owned_tiles(first: int, stop: int, length: int, size: int) -> list[tuple[int, int, int]]:
    """Tiles along one axis covering ``[first, stop)`` once: (window start, owned start, owned stop).

    Owned ranges are consecutive, ``size`` long; each window (``size`` long) contains its owned
    range and is shifted back inside ``[0, length)`` where possible, for more image context.
    """
    tiles = []
    for owned_start in range(first, stop, size):
        window_start = min(owned_start, max(length - size, 0))
        tiles.append((window_start, owned_start, min(owned_start + size, stop)))
    return tiles


def validation_patches(pairs: Sequence[Pair], patch_size: int,
                       border: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed list of patches in which every labelled (validation) pixel is counted exactly once.

    The bounding box of each pair's labelled pixels is cut into ``S x S`` tiles; each patch shows the window around
    its tile in the image extended by ``border`` pixels of mirror image (None: :func:`mirror_margin` of ``S``, as
    in training and prediction), shifted inside the extended image where possible, padded at the bottom and right
    otherwise, and keeps the targets of its own tile only, the rest IGNORE_INDEX. Tiles without a labelled pixel
    are skipped. Order: pair, then row, then column.
    Returns [(image float32 ``3 x S x S`` in 0..255, targets int64 ``S x S``), ...].
    """
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    margin = mirror_margin(patch_size) if border is None else int(border)
    if margin < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    patches = []
    for index, (image, targets) in enumerate(pairs):
        _check_pair(np.asarray(image), np.asarray(targets), index)
        labelled = targets != IGNORE_INDEX
        if not labelled.any():
            continue
        extended = MirroredBorder(image, margin)
        rows, cols = np.flatnonzero(labelled.any(axis=1)) + margin, np.flatnonzero(labelled.any(axis=0)) + margin
        height, width = extended.shape[:2]
        for top, row_start, row_stop in _owned_tiles(rows[0], rows[-1] + 1, height, patch_size):
            for left, col_start, col_stop in _owned_tiles(cols[0], cols[-1] + 1, width, patch_size):
                if not labelled[row_start - margin : row_stop - margin, col_start - margin : col_stop - margin].any():
                    continue
                window = extended[top : top + patch_size, left : left + patch_size]
                image_patch, window_targets = crop_padded(
                    window, _target_window(targets, top, left, patch_size, margin), 0, 0, patch_size)
                target_patch = np.full_like(window_targets, IGNORE_INDEX)
                owned = (slice(row_start - top, row_stop - top), slice(col_start - left, col_stop - left))
                target_patch[owned] = window_targets[owned]
                patches.append((np.ascontiguousarray(image_patch.transpose(2, 0, 1)), target_patch))
    return patches
