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
