"""Rare classes are learned (class-balanced patches), validated honestly (a split by class) and pointed out when
they cannot be; instance ids painted in a class mode are pointed out (issue 22, items 3, 5 and 6)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_convlora.config import TrainRecipe
from napari_convlora.constants import IGNORE_INDEX
from napari_convlora.data import ImageLayout, PatchSampler, TrainingPair, prepare_training_data, split_pairs
from napari_convlora.data.split import split_by_class

IMAGE = (np.random.default_rng(0).random((128, 128)) * 1000).astype(np.uint16)


def _rare_class_plane() -> tuple[np.ndarray, np.ndarray]:
    """256 x 256 targets: background, class 1 on the left half, class 2 on 0.2 % of the pixels (one 11 x 12 spot)."""
    targets = np.zeros((256, 256), np.int64)
    targets[:, :128] = 1
    targets[200:211, 40:52] = 2
    return np.zeros((256, 256, 3), np.float32), targets


def test_class_balanced_patches_show_a_class_on_0_2_percent_of_the_pixels_often_and_reproducibly():
    """Uniform patches showed a 0.2 % class in ~4 % of the patches (a CT lesion collapsed to background); half of
    the class-balanced patches are placed on a class drawn uniformly, so it is in over 1 / 6 of them. A second plane
    without that class must not be drawn for it."""
    plane, other = _rare_class_plane(), (np.zeros((64, 64, 3), np.float32), np.ones((64, 64), np.int64))
    assert (plane[1] == 2).mean() == pytest.approx(0.002, abs=1e-4)
    share = {}
    for balanced in (False, True):
        sampler = PatchSampler([plane, other], patch_size=32, augment=True, class_balanced=balanced)
        _, targets = sampler.sample(np.random.default_rng(0), 600)
        share[balanced] = (targets == 2).any(axis=(1, 2)).mean()
    assert share[True] > 0.14 and share[True] > 3 * share[False]
    rng = np.random.default_rng(7)
    state = rng.bit_generator.state
    first = sampler.sample(rng, 8)
    rng.bit_generator.state = state
    again = sampler.sample(rng, 8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_class_balanced_sparse_patches_keep_every_patch_labelled():
    targets = np.full((256, 256), IGNORE_INDEX, np.int64)
    targets[::16, ::16] = 0
    targets[100:104, 100:104] = 1
    targets[30:60, 200:230] = 2
    sampler = PatchSampler([(np.zeros((256, 256, 3), np.float32), targets)], patch_size=24,
                           labelled_weighting=True, class_balanced=True)
    _, batch = sampler.sample(np.random.default_rng(1), 300)
    assert (batch != IGNORE_INDEX).any(axis=(1, 2)).all()
    assert (batch == 1).any(axis=(1, 2)).mean() > 0.15


def _recipe(**kw) -> TrainRecipe:
    return TrainRecipe(input_size=64, **kw)


def test_a_class_with_a_few_pixels_in_one_place_is_pointed_out_by_name():
    labels = np.zeros((128, 128), np.uint8)
    labels[10:60, 10:60] = 1
    labels[80:83, 90:94] = 2  # 12 pixels in one spot
    recipe = _recipe(val_fraction=0.0, class_names=("background", "cell", "lesion"))
    data = prepare_training_data([TrainingPair(IMAGE, labels)], recipe)
    assert data.warnings == ["paint more examples of class 'lesion' (12 training pixels in 1 place): too few to "
                             "learn it from"]
    assert data.sampler.class_balanced
    unnamed = prepare_training_data([TrainingPair(IMAGE, labels)], _recipe(val_fraction=0.0))
    assert unnamed.warnings[0].startswith("paint more examples of label value 2 (12 training pixels in 1 place)")


def _four_class_targets() -> np.ndarray:
    """128 x 128 targets on a grid of 16 px blocks: background, class 1 (the top half), class 2 (a band), class 3
    (rare: 4 pixels in each of two blocks far apart), class 4 (9 pixels inside one block)."""
    targets = np.zeros((128, 128), np.int64)
    targets[:64] = 1
    targets[96:112, :] = 2
    targets[20:22, 20:22], targets[100:102, 120:122] = 3, 3
    targets[70:73, 70:73] = 4
    return targets


@pytest.mark.parametrize("seed", range(8))
def test_the_split_validates_every_class_that_spans_two_blocks_and_keeps_a_single_block_class_in_training(seed):
    """A random 10 % block split left a class with 16 validation pixels, or none; now every class with 2+ blocks
    gets validation pixels, and a class in one block stays in training and is named."""
    targets = _four_class_targets()
    image = np.zeros((128, 128, 3), np.float32)
    split = split_by_class([(image, targets)], 0.1, seed, block=16)
    ((_, train),), ((_, val),) = split.train_pairs, split.val_pairs
    for cls in (0, 1, 2, 3):
        assert (val == cls).any() and (train == cls).any(), cls
    assert (train == 4).sum() == 9 and not (val == 4).any()
    assert split.unvalidated == {4: "one_region"}
    assert np.array_equal(np.where(val != IGNORE_INDEX, val, train), targets)
    assert 0.05 < (val != IGNORE_INDEX).mean() < 0.25
    again = split_pairs([(image, targets)], 0.1, seed, block=16)
    assert np.array_equal(again[1][0][1], val)
    train_only, val_none = split_pairs([(image, targets)], 0.0, seed, block=16)
    assert val_none == [] and np.array_equal(train_only[0][1], targets)


def test_across_planes_a_class_of_one_plane_is_validated_there():
    common = np.zeros((64, 64), np.int64)
    common[:32] = 1
    rare = common.copy()
    rare[5:7, 5:7], rare[50:52, 50:52] = 2, 2  # class 2 in plane 1 only, in two blocks
    image = np.zeros((64, 64, 3), np.float32)
    for seed in range(5):
        split = split_by_class([(image, common), (image, rare)], 0.1, seed, block=16)
        assert split.unvalidated == {}
        assert sum((v == 2).sum() for _, v in split.val_pairs) == 4
        assert sum((t == 2).sum() for _, t in split.train_pairs) == 4


def test_unvalidated_classes_are_listed_with_a_warning():
    labels = _four_class_targets().astype(np.uint8)
    recipe = _recipe(val_fraction=0.1, class_names=("bg", "tissue", "band", "dots", "lesion"))
    data = prepare_training_data([TrainingPair(IMAGE, labels)], recipe)
    assert data.unvalidated_classes == (4,)
    assert ("class 'lesion' has no validation pixels (all its 9 pixels lie in one region): its validation score is "
            "not measured; paint it in another place too, or give validation images (--val-image)") in data.warnings
    assert data.validation_pixels()[:4].min() > 0
    explicit = prepare_training_data([TrainingPair(IMAGE, labels)], recipe,
                                     validation_pairs=[TrainingPair(IMAGE, np.where(labels == 3, 0, labels))])
    assert explicit.unvalidated_classes == (3,)
    assert any(line.startswith("class 'dots' has no validation pixels (it is not in the validation images)")
               for line in explicit.warnings)


def _instance_mask(count: int = 65) -> np.ndarray:
    """256 x 256: ``count`` separate 10 x 10 objects with ids 1..count on background 0."""
    labels = np.zeros((256, 256), np.uint16)
    for index in range(count):
        row, col = divmod(index, 9)
        labels[4 + 28 * row : 14 + 28 * row, 4 + 28 * col : 14 + 28 * col] = index + 1
    return labels


@pytest.mark.parametrize("mode, suggested", [("dense", "instances"), ("sparse", "sparse_instances")])
def test_instance_ids_in_a_class_mode_are_pointed_out(mode, suggested):
    labels = _instance_mask()
    if mode == "sparse":
        labels = np.where(labels > 0, labels + 1, 1).astype(np.uint16)  # background painted as 1
    image = np.tile(IMAGE, (2, 2))
    data = prepare_training_data([TrainingPair(image, labels)], TrainRecipe(input_size=64, label_mode=mode))
    expected = (f"image 1: the labels hold 65 values, each one connected object: they look like instance ids; to "
                f"segment objects of one class, use label mode '{suggested}' (--label-mode {suggested}, or Labels "
                "in the dock)")
    assert expected in data.warnings


def test_classes_and_atlases_are_not_taken_for_instance_ids():
    image = np.tile(IMAGE, (2, 2))
    three = np.zeros((256, 256), np.uint8)
    three[20:120, 20:120], three[150:250, 30:200] = 1, 2
    atlas = np.repeat(np.repeat(np.arange(8, dtype=np.uint8).reshape(2, 4), 128, axis=0), 64, axis=1)
    stack = np.stack([_instance_mask(12)] * 3)  # 12 objects: too few values to say
    for labels in (three, atlas, stack):
        layers = image if labels.ndim == 2 else np.stack([image] * 3)
        data = prepare_training_data([TrainingPair(layers, labels, ImageLayout())], _recipe())
        assert not any("instance ids" in line for line in data.warnings)
    instances = prepare_training_data([TrainingPair(image, _instance_mask())], _recipe(label_mode="instances"))
    assert not any("instance ids" in line for line in instances.warnings)
