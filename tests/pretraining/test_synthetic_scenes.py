"""Generated pretraining scenes and shifted benchmark scenes (issue 11): arrays and numbering, determinism,
variety over many scenes, and that every shift changes what it says, beyond what pretraining ever shows."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import find_boundaries

from napari_convlora.pretraining import (HELD_OUT_TEXTURE, MIN_AREA, SHIFTS, TRAIN_TEXTURES, Scene, class_labels,
                                         contact_sheet, random_scene, shifted_scene)
from napari_convlora.pretraining import synthetic as syn
from napari_convlora.pretraining.shapes import SHAPE_CLASSES

from helpers import local_contrast

SEEDS = range(12)  # paired clean/shifted draws per shift


def edge_gradient(scene: Scene) -> float:
    """Mean gradient magnitude on object boundaries of the (lightly smoothed) grey image."""
    grey = ndimage.gaussian_filter(scene.image.astype(np.float64).mean(-1), 1.0)
    magnitude = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))
    return float(magnitude[find_boundaries(scene.instances, mode="thick")].mean())


def residual_variance(scene: Scene) -> float:
    """Variance of the grey image minus its Gaussian smoothing (sigma 1): mostly noise."""
    grey = scene.image.astype(np.float64).mean(-1)
    return float(np.var(grey - ndimage.gaussian_filter(grey, 1.0)))


@pytest.fixture(scope="module")
def many_scenes() -> list[Scene]:
    rng = np.random.default_rng(2024)
    return [random_scene(rng) for _ in range(200)]


@pytest.mark.parametrize("size", [64, 256])
def test_scene_arrays_and_numbering(size):
    rng = np.random.default_rng(size)
    for _ in range(5):
        scene = random_scene(rng, size)
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
        assert scene.instances.shape == (size, size) and scene.instances.dtype == np.int32
        n = len(scene.classes)
        assert n >= 1 and np.issubdtype(scene.classes.dtype, np.integer)
        assert set(np.unique(scene.instances)) <= set(range(n + 1))
        areas = np.bincount(scene.instances.ravel(), minlength=n + 1)[1:]
        assert len(areas) == n and areas.min() >= MIN_AREA  # every number 1..N is used, no gaps
        assert set(scene.classes.tolist()) <= {1, 2, 3}
        assert len(scene.shape_families) == len(scene.object_textures) == n
        assert [SHAPE_CLASSES[f] for f in scene.shape_families] == scene.classes.tolist()


def test_class_labels_map_each_object_to_its_class():
    scene = random_scene(np.random.default_rng(3))
    labels = class_labels(scene)
    assert labels.shape == scene.instances.shape and labels.dtype == np.uint8
    assert np.array_equal(labels == 0, scene.instances == 0)
    for i, c in enumerate(scene.classes, start=1):
        assert np.all(labels[scene.instances == i] == c)


def test_same_state_same_scene_other_seed_differs():
    a, b = random_scene(np.random.default_rng(7)), random_scene(np.random.default_rng(7))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.instances, b.instances)
    assert np.array_equal(a.classes, b.classes)
    c = random_scene(np.random.default_rng(8))
    assert not np.array_equal(a.image, c.image)
    rng = np.random.default_rng(7)
    first, second = random_scene(rng), random_scene(rng)  # the generator advances
    assert np.array_equal(first.image, a.image) and not np.array_equal(second.image, a.image)


def test_grey_scenes_repeat_one_channel(many_scenes):
    grey = [s for s in many_scenes if np.array_equal(s.image[..., 0], s.image[..., 1])
            and np.array_equal(s.image[..., 0], s.image[..., 2])]
    assert 0.4 * len(many_scenes) < len(grey) < 0.85 * len(many_scenes)  # both grey and colour scenes occur


def test_variety_over_many_scenes(many_scenes):
    counts = np.array([len(s.classes) for s in many_scenes])
    assert counts.min() <= 2 and counts.max() >= 50
    assert (counts <= 5).mean() > 0.1 and (counts >= 30).mean() > 0.2  # sparse and dense scenes
    families = {f for s in many_scenes for f in s.shape_families}
    assert families == set(SHAPE_CLASSES)
    assert {c for s in many_scenes for c in s.classes.tolist()} == {1, 2, 3}
    textures = {t for s in many_scenes for t in s.object_textures}
    assert textures == set(TRAIN_TEXTURES)
    assert {s.background_texture for s in many_scenes} == set(TRAIN_TEXTURES)
    background_means = [np.median(s.image[s.instances == 0]) for s in many_scenes]
    assert np.ptp(background_means) > 60  # dark and brighter backgrounds


def test_pretraining_objects_are_brighter_than_their_surroundings(many_scenes):
    contrasts = np.array([local_contrast(s) for s in many_scenes[:60]])
    assert contrasts.min() > 0.08  # always positive, and above anything low_contrast shows
    assert np.ptp(contrasts) > 0.2  # low and high contrast


def test_random_scene_never_uses_the_held_out_texture(many_scenes):
    assert HELD_OUT_TEXTURE not in TRAIN_TEXTURES
    assert all(HELD_OUT_TEXTURE not in s.object_textures + (s.background_texture,) for s in many_scenes)


def test_shift_ranges_lie_outside_pretraining_ranges():
    assert syn.SHIFT_BLUR_SIGMA_RANGE[0] > syn.BLUR_SIGMA_RANGE[1]
    assert syn.SHIFT_SNR_RANGE[1] < syn.MIN_SNR
    lowest_shifted_noise = syn.SHIFT_NOISE_CONTRAST_RANGE[1] / syn.SHIFT_SNR_RANGE[1]
    assert lowest_shifted_noise > syn.NOISE_STD_RANGE[1]
    assert syn.SHIFT_NOISE_CONTRAST_RANGE[1] / lowest_shifted_noise < syn.MIN_SNR  # the brightest object's SNR
    assert syn.SHIFT_LOW_CONTRAST_RANGE[1] < syn.CONTRAST_RANGE[0]
    assert 1 - syn.BACKGROUND_LEVEL_RANGE[1] > syn.BACKGROUND_LEVEL_RANGE[1]  # inverted backgrounds are brighter


@pytest.mark.parametrize("shift", SHIFTS)
def test_shifted_scene_keeps_the_layout(shift):
    clean = random_scene(np.random.default_rng(11))
    shifted = shifted_scene(np.random.default_rng(11), shift)
    assert shifted.image.shape == clean.image.shape and shifted.image.dtype == np.uint8
    assert np.array_equal(shifted.instances, clean.instances) and np.array_equal(shifted.classes, clean.classes)
    assert not np.array_equal(shifted.image, clean.image)


def _pairs(shift: str, seeds: range = SEEDS) -> list[tuple[Scene, Scene]]:
    """(clean, shifted) scenes drawn from generators in the same state, so with the same layout."""
    return [(random_scene(np.random.default_rng(s)), shifted_scene(np.random.default_rng(s), shift)) for s in seeds]


def test_blur_shift_softens_every_edge():
    ratios = [edge_gradient(b) / edge_gradient(a) for a, b in _pairs("blur")]
    assert max(ratios) < 0.8


def test_noise_shift_raises_residual_variance():
    ratios = [residual_variance(b) / residual_variance(a) for a, b in _pairs("noise")]
    assert min(ratios) > 2


def test_low_contrast_shift_is_below_pretraining_minimum():
    for clean, low in _pairs("low_contrast"):
        assert 0 < local_contrast(low) < syn.CONTRAST_RANGE[0] * 0.5 < local_contrast(clean)


def test_inverted_shift_makes_objects_darker():
    for clean, inverted in _pairs("inverted"):
        assert local_contrast(clean) > 0 > local_contrast(inverted)
        assert np.median(inverted.image[inverted.instances == 0]) > 255 * (1 - syn.BACKGROUND_LEVEL_RANGE[1]) - 20


def test_new_texture_shift_uses_only_the_held_out_family():
    for _, shifted in _pairs("new_texture", range(4)):
        assert set(shifted.object_textures) == {HELD_OUT_TEXTURE} and shifted.background_texture == HELD_OUT_TEXTURE


def test_unknown_shift_or_texture_raises():
    with pytest.raises(ValueError, match="blur"):
        shifted_scene(np.random.default_rng(0), "fog")
    with pytest.raises(ValueError, match="voronoi"):
        random_scene(np.random.default_rng(0), textures=("plaid",))


def test_contact_sheet_shows_images_and_outlines():
    scenes = [random_scene(np.random.default_rng(s), 64) for s in range(5)]
    sheet = contact_sheet(scenes, columns=2, gap=4)
    assert sheet.dtype == np.uint8 and sheet.shape == (3 * 68 + 4, 2 * (128 + 2 + 4) + 4, 3)
    assert np.array_equal(sheet[4:68, 4:68], scenes[0].image)
    outlined = sheet[4:68, 4 + 66:4 + 130]
    assert (outlined != scenes[0].image).any(-1).sum() > 0
