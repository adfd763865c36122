"""How an image continues past its border: its mirror image, in training patches as in prediction tiles (issue 21,
item 8; ``tests/prediction/test_image_borders.py`` has the prediction side and what was measured)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_convlora.config import InputSpec
from napari_convlora.constants import IGNORE_INDEX
from napari_convlora.data import ImageLayout, PatchSampler, SamPlanes, validation_patches
from napari_convlora.data.sampling import MirroredBorder, mirror_margin, reflect_indices


def test_mirror_margin_is_an_eighth_of_a_tile():
    assert [mirror_margin(s) for s in (64, 256, 1024)] == [8, 32, 128]


@pytest.mark.parametrize("length, start, stop", [(5, -13, 19), (2, -7, 9), (1, -3, 4), (40, -8, 48)])
def test_reflect_indices_are_numpy_reflect_however_far(length, start, stop):
    before, after = -start, stop - length
    expected = np.pad(np.arange(length), (before, after), mode="reflect") if length > 1 else np.zeros(stop - start)
    np.testing.assert_array_equal(reflect_indices(start, stop, length), expected)


@pytest.mark.parametrize("margin", [8, ((3, 0), (0, 5)), 0])
def test_mirrored_border_reads_windows_of_numpy_pad(margin):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (40, 30, 3)).astype(np.float32)
    sides = ((margin, margin), (margin, margin)) if isinstance(margin, int) else margin
    expected = np.pad(image, sides + ((0, 0),), mode="reflect")
    view = MirroredBorder(image, margin)
    assert view.shape == expected.shape
    np.testing.assert_array_equal(view[:, :], expected)
    for _ in range(100):
        top, left = rng.integers(0, expected.shape[0] + 3), rng.integers(0, expected.shape[1] + 3)
        rows, cols = slice(top, top + rng.integers(0, 20)), slice(left, left + rng.integers(0, 20))
        np.testing.assert_array_equal(view[rows, cols], expected[rows, cols])


class _CountingView:
    """A plane view that records the windows read from it."""

    def __init__(self, planes: SamPlanes) -> None:
        self.view, self.reads = planes.input_view(0), []
        self.shape, self.dtype = self.view.shape, self.view.dtype

    def __getitem__(self, key):
        window = self.view[key]
        self.reads.append(window.shape[:2])
        return window


def test_mirrored_border_of_a_lazy_plane_reads_no_more_than_the_window():
    image = np.random.default_rng(1).integers(0, 4000, (100, 90), dtype=np.uint16)
    planes = SamPlanes(image, ImageLayout(), InputSpec())
    view = _CountingView(planes)
    extended = MirroredBorder(view, 8)
    window = extended[0:64, 0:64]  # a tile at the top left corner: 8 mirrored rows and columns
    np.testing.assert_array_equal(window, np.pad(planes.normalised(0), ((8, 8), (8, 8), (0, 0)),
                                                 mode="reflect")[:64, :64])
    assert view.reads == [(56, 56)]  # the image part only: the mirror is made from it


def _position_pair(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose pixels tell where they are (channel 0: row, channel 1: column) and targets holding the flat
    index of each pixel."""
    rows, cols = np.mgrid[:height, :width]
    image = np.stack([rows, cols, np.full_like(rows, 7)], axis=-1).astype(np.float32)
    return image, (rows * width + cols).astype(np.int64)


def test_training_patches_reach_into_the_mirror_border_with_targets_ignored():
    """Patches are cut from the image extended by ``mirror_margin(S)`` (4 px for 32 px patches) on every side, as
    prediction extends a plane: a patch at a border shows the mirror there, whose targets are not learned."""
    image, targets = _position_pair(100, 90)
    extended = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    sampler = PatchSampler([(image, targets)], patch_size=32, augment=False)
    images, batch = sampler.sample(np.random.default_rng(0), 300)
    corners = set()
    for patch, patch_targets in zip(images, batch):
        labelled = np.argwhere(patch_targets != IGNORE_INDEX)
        y, x = labelled[0]
        row, col = divmod(int(patch_targets[y, x]), 90)
        top, left = row + 4 - y, col + 4 - x  # the patch's corner in the extended image
        np.testing.assert_array_equal(patch.transpose(1, 2, 0), extended[top : top + 32, left : left + 32])
        inside = np.zeros((32, 32), bool)
        inside[max(4 - top, 0) : 104 - top, max(4 - left, 0) : 94 - left] = True
        assert np.array_equal(patch_targets != IGNORE_INDEX, inside)
        corners.add((top, left))
    tops, lefts = {t for t, _ in corners}, {c for _, c in corners}
    assert min(tops) == 0 and max(tops) == 108 - 32 and min(lefts) == 0 and max(lefts) == 98 - 32


def test_border_zero_keeps_patches_inside_the_image():
    image, targets = _position_pair(100, 90)
    images, batch = PatchSampler([(image, targets)], patch_size=32, augment=False, border=0).sample(
        np.random.default_rng(0), 50)
    assert (batch != IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="border"):
        PatchSampler([(image, targets)], patch_size=32, border=-1)


def test_validation_windows_at_an_image_border_show_its_mirror():
    """Validation patches are cut from the same extended image: a labelled block at the bottom right corner of a
    100 x 90 image is validated in a window that reaches 8 px into the mirror (64 px patches)."""
    image, targets = _position_pair(100, 90)
    sparse = np.full_like(targets, IGNORE_INDEX)
    sparse[80:, 70:] = targets[80:, 70:]
    ((patch, patch_targets),) = validation_patches([(image, sparse)], patch_size=64)
    extended = np.pad(image, ((8, 8), (8, 8), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(patch.transpose(1, 2, 0), extended[-64:, -64:])
    expected = np.full((64, 64), IGNORE_INDEX)
    expected[36:56, 36:56] = targets[80:, 70:]
    np.testing.assert_array_equal(patch_targets, expected)
