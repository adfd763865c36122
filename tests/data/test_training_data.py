"""Assembling napari arrays into training data: every bad input gets its message before training."""

from __future__ import annotations

import numpy as np
import pytest

from napari_convlora.config import TrainRecipe
from napari_convlora.constants import IGNORE_INDEX
from napari_convlora.data import ImageLayout, TrainingPair, prepare_training_data

RNG = np.random.default_rng(0)
IMAGE = (RNG.random((64, 80)) * 1000).astype(np.uint16)
LABELS = np.zeros((64, 80), np.uint8)
LABELS[10:30, 10:30] = 1
LABELS[40:60, 50:70] = 2


def _recipe(mode="dense", **kw):
    return TrainRecipe(input_size=64, label_mode=mode, **kw)


def _prepare(image=IMAGE, labels=LABELS, mode="dense", layout=None, **kw):
    return prepare_training_data([TrainingPair(image, labels, layout or ImageLayout())], _recipe(mode, **kw))


@pytest.mark.parametrize(
    "image, labels, mode, message",
    [
        (IMAGE, LABELS[:-1], "dense", "shape"),
        (IMAGE, LABELS.astype(np.float32), "dense", "integer"),
        (IMAGE, LABELS.astype(np.int16) - 1, "dense", "negative"),
        (IMAGE, np.zeros_like(LABELS), "sparse", "no labelled pixel|nothing is labelled|not annotated"),
        (IMAGE, np.zeros_like(LABELS), "dense", "only one class"),
        (np.where(LABELS > 0, np.nan, IMAGE.astype(np.float32)), LABELS, "dense", "NaN|inf"),
        (IMAGE[:1, :1], LABELS[:1, :1], "dense", "1-pixel|too small|at least 2"),
        (np.zeros((0, 5), np.uint8), np.zeros((0, 5), np.uint8), "dense", "empty"),
        (np.tile(IMAGE, (1, 5)), np.arange(64 * 400).reshape(64, 400) % 300, "dense", "255"),
    ],
)
def test_bad_input_is_explained(image, labels, mode, message):
    with pytest.raises(ValueError, match=message):
        _prepare(image, labels, mode)


def test_sparse_labels_ignore_unpainted_pixels():
    sparse = np.zeros_like(LABELS)
    sparse[5:15, 5:15] = 1  # background painted as 1
    sparse[40:60, 50:70] = 3
    data = _prepare(labels=sparse, mode="sparse", val_fraction=0.0)
    assert data.encoding.class_values == (1, 3) and data.encoding.num_classes == 2
    (_, targets), = data.train_planes
    assert set(np.unique(targets)) == {IGNORE_INDEX, 0, 1}
    assert (targets != IGNORE_INDEX).sum() == (sparse > 0).sum()


def test_stacks_train_on_labelled_slices_and_validation_is_held_out():
    stack = np.stack([IMAGE] * 5)
    labels = np.zeros((5, 64, 80), np.uint8)
    labels[1], labels[3] = LABELS, LABELS
    data = prepare_training_data([TrainingPair(stack, labels)], _recipe(val_fraction=0.25, seed=1))
    assert len(data.train_planes) == 2
    train_pixels = sum((t != IGNORE_INDEX).sum() for _, t in data.train_planes)
    val_pixels = sum((t != IGNORE_INDEX).sum() for _, t in data.validation)
    assert train_pixels + val_pixels == 2 * LABELS.size
    assert 0.1 < val_pixels / (2 * LABELS.size) < 0.45
    again = prepare_training_data([TrainingPair(stack, labels)], _recipe(val_fraction=0.25, seed=1))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(data.validation, again.validation))


def test_explicit_validation_pairs_and_class_names():
    data = prepare_training_data([TrainingPair(IMAGE, LABELS)], _recipe(class_names=["bg", "a", "b"]),
                                 validation_pairs=[TrainingPair(IMAGE[:, ::-1].copy(), LABELS[:, ::-1].copy())])
    assert (data.train_planes[0][1] != IGNORE_INDEX).all()
    assert data.recipe.class_names == ("bg", "a", "b") and data.validation
    with pytest.raises(ValueError, match="2 class names given but the labels hold 3 classes"):
        _prepare(class_names=["bg", "a"])


def test_layouts_rgb_multichannel_and_dtypes():
    rgb = (RNG.random((64, 80, 3)) * 255).astype(np.uint8)
    assert _prepare(rgb, layout=ImageLayout(rgb=True)).train_planes[0][0].shape == (64, 80, 3)
    two = np.stack([IMAGE, IMAGE // 2])
    assert _prepare(two, layout=ImageLayout(channel_axis=0)).train_planes[0][0].shape == (64, 80, 3)
    for dtype in (np.uint8, np.int32, np.float32, np.float64):
        plane = _prepare(IMAGE.astype(dtype), val_fraction=0.0).train_planes[0][0]
        assert plane.dtype == np.float32 and plane.min() >= 0 and plane.max() <= 255


def test_one_visible_rule_for_unpainted_planes_in_every_mode():
    """Dense mode dropped unpainted planes while instance mode trained on them as background: a stack
    annotated on one plane of 25 trained on 24 blank planes and then predicted no foreground at all."""
    stack = np.stack([IMAGE] * 25)
    labels = np.zeros((25, 64, 80), np.uint16)
    labels[4, 10:30, 10:30], labels[4, 40:60, 50:70] = 7, 9  # two objects on one plane
    for mode in ("instances", "dense"):
        skip = prepare_training_data([TrainingPair(stack, labels)], _recipe(mode, val_fraction=0.0))
        assert len(skip.train_planes) == 1 and skip.plane_counts == [(1, 25)]
        assert "image 1: 1 of 25 planes (unpainted planes skipped as not annotated)" in skip.summary()
        negatives = prepare_training_data([TrainingPair(stack, labels)],
                                          _recipe(mode, val_fraction=0.0, unpainted_planes="background"))
        assert len(negatives.train_planes) == 25
        assert all((t == 0).all() for i, (_, t) in enumerate(negatives.train_planes) if i != 4)
    assert "pixels per class (training / validation): class 0 " in skip.summary()


def test_sparse_instance_labels():
    """What people paint: a few objects (any ids) and some background, the rest left 0 (not annotated)."""
    labels = np.zeros((64, 80), np.uint16)
    labels[5:15, 5:60] = 1  # background strokes
    labels[20:30, 20:30], labels[40:50, 50:60] = 17, 230  # two objects with their own ids
    data = _prepare(labels=labels, mode="sparse_instances", val_fraction=0.0)
    assert data.encoding.class_values == (1, 2) and data.encoding.num_classes == 2
    ((_, targets),) = data.train_planes
    assert (targets == 0).sum() == (labels == 1).sum() and (targets == 1).sum() == 200
    assert (targets == IGNORE_INDEX).sum() == (labels == 0).sum()
    assert data.sampler.labelled_weighting
    with pytest.raises(ValueError, match="sparse instances: the background label value 1 is not painted"):
        _prepare(labels=np.where(labels == 1, 0, labels).astype(np.uint16), mode="sparse_instances")
    assert data.encoding.decode(np.array([0, 1])).tolist() == [1, 2]  # predictions copy back as labels
