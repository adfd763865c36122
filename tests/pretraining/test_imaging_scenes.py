"""Pretraining scenes like what users image (issue 24): arrays and numbering of every kind, determinism, both
polarities, noise kept inside the pretraining ranges, and the pool that makes a resumed pretraining run exact."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_convlora.pretraining import synthetic as syn
from napari_convlora.pretraining.scene_mix import SCENE_KINDS, ScenePool, mixed_scene, stream_scene

from helpers import local_contrast

KINDS = [k for k in SCENE_KINDS if k != "abstract"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [128, 256])
def test_every_kind_draws_an_rgb_image_with_its_objects_numbered_without_gaps(kind, size):
    make = SCENE_KINDS[kind][0]
    for seed in range(4):
        scene = make(np.random.default_rng(seed), size)
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
        assert scene.instances.shape == (size, size) and scene.instances.dtype == np.int32
        count = int(scene.instances.max())
        assert count >= 1, f"{kind} seed {seed}: no object"
        assert set(np.unique(scene.instances)) - {0} == set(range(1, count + 1))
        assert len(scene.classes) == count and set(scene.classes.tolist()) <= {1, 2, 3}
        areas = np.bincount(scene.instances.ravel())[1:]
        assert areas.min() >= 8
        assert np.ptp(scene.image) > 40, f"{kind} seed {seed}: a flat image"


@pytest.mark.parametrize("kind", KINDS)
def test_a_kind_draws_the_same_scene_from_the_same_seed_and_another_from_another(kind):
    make = SCENE_KINDS[kind][0]
    a, b, c = (make(np.random.default_rng(s), 128) for s in (5, 5, 6))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.instances, b.instances)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("kind", ["cell_sheet", "filaments"])
def test_brightfield_like_kinds_draw_both_polarities(kind):
    """Dark objects on a bright background and bright on dark both occur (issue 24: polarity both ways)."""
    make = SCENE_KINDS[kind][0]
    brighter = []
    for seed in range(16):
        scene = make(np.random.default_rng(seed), 128)
        grey = scene.image.mean(-1)
        outline = scene.instances != ndimage.grey_erosion(scene.instances, size=3)
        background = scene.instances == 0
        if outline.any() and background.any():
            brighter.append(grey[outline & (scene.instances > 0)].mean() > grey[background].mean())
    assert any(brighter) and not all(brighter)


@pytest.mark.parametrize("kind", KINDS)
def test_objects_stand_out_more_than_the_low_contrast_shift_lets_them(kind):
    """The benchmark's low-contrast shift (``synthetic.SHIFT_LOW_CONTRAST_RANGE``) stays unseen: the objects of
    every kind step further from their surroundings than its highest contrast, in the median over scenes."""
    make = SCENE_KINDS[kind][0]
    steps = [abs(local_contrast(make(np.random.default_rng(seed), 256))) for seed in range(8)]
    steps = [s for s in steps if s == s]
    assert np.median(steps) > syn.SHIFT_LOW_CONTRAST_RANGE[1]


def test_the_nuclei_kind_draws_touching_crowds():
    touching = 0
    for seed in range(12):
        scene = SCENE_KINDS["nuclei"][0](np.random.default_rng(seed), 256)
        inst = scene.instances
        grown = ndimage.grey_dilation(inst, size=3)
        touching += int(((grown != inst) & (inst > 0) & (grown > 0)).any())
    assert touching >= 3


def test_finish_keeps_the_noise_at_or_below_the_weakest_contrast_over_the_lowest_snr():
    flat = np.full((128, 128), 0.3, np.float32)
    for seed in range(20):
        out = syn.finish(flat, np.random.default_rng(seed), weakest_contrast=0.2).astype(float) / 255
        residual = out[..., 0] - ndimage.uniform_filter(out[..., 0], 9)
        clean = residual[np.abs(residual) < 0.5]  # salt-and-pepper pixels aside
        assert clean.std() <= 0.2 / syn.MIN_SNR * 1.15 + 2 / 255


def test_mixed_scenes_draw_every_kind_and_refuse_unknown_ones():
    rng = np.random.default_rng(0)
    drawn = {mixed_scene(rng, 64).background_texture for _ in range(120)}
    assert {"nuclei", "cell_sheet", "filaments", "em_like", "histology_like", "anatomy_like"} <= drawn
    assert drawn - set(KINDS)  # and abstract scenes (their background texture names)
    with pytest.raises(ValueError, match="unknown or no scene kinds"):
        mixed_scene(rng, 64, ("nuclei", "photographs"))


def test_a_scene_pool_rebuilt_at_a_step_holds_what_a_pool_advanced_to_it_holds():
    kinds = ("nuclei", "em_like")
    advanced = ScenePool(seed=3, pool=4, size=64, kinds=kinds)
    for step in range(7):
        advanced.advance(step)
    rebuilt = ScenePool(seed=3, pool=4, size=64, kinds=kinds, step=7)
    for a, b in zip(advanced.scenes, rebuilt.scenes):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.instances, b.instances)
    fresh = ScenePool(seed=3, pool=4, size=64, kinds=kinds)  # slot i starts with stream scene i
    assert np.array_equal(fresh.scenes[2].image, stream_scene(3, 2, 64, kinds).image)
    assert not np.array_equal(fresh.scenes[2].image, stream_scene(4, 2, 64, kinds).image)
