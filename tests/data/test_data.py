"""Data preparation: layouts and normalisation, label modes, validation split, patches."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_convlora.config import InputSpec
from napari_convlora.constants import IGNORE_INDEX
from napari_convlora.data import (
    ImageLayout,
    LabelEncoding,
    PatchSampler,
    intensity_range,
    labelled_plane_indices,
    labelled_plane_pairs,
    make_label_encoding,
    spatial_shape,
    split_pairs,
    split_train_validation,
    to_sam_planes,
    validate_pair,
    validation_patches,
)

RNG = np.random.default_rng(0)


def _gray(image: np.ndarray) -> np.ndarray:
    """Reference: a single 2D channel normalised alone (Y x X float32)."""
    return to_sam_planes(image, ImageLayout())[0, ..., 0]


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32])
def test_2d_dtypes_give_one_gray_plane_in_0_255(dtype):
    image = (np.arange(40 * 50).reshape(40, 50) % 200).astype(dtype)
    planes = to_sam_planes(image, ImageLayout())
    assert planes.shape == (1, 40, 50, 3) and planes.dtype == np.float32
    assert planes.min() == 0.0 and planes.max() == 255.0
    assert np.array_equal(planes[..., 0], planes[..., 1]) and np.array_equal(planes[..., 0], planes[..., 2])
    assert spatial_shape(image, ImageLayout()) == (40, 50)


def test_bool_image_maps_to_0_and_255():
    image = np.zeros((30, 30), bool)
    image[3, 4] = True  # far below the 99.8th percentile: must still show up
    planes = to_sam_planes(image, ImageLayout())
    assert planes[0, 3, 4, 0] == 255.0 and planes[0].sum() == 3 * 255.0


def test_linear_ramp_maps_percentiles_to_0_and_255():
    image = np.arange(100 * 100, dtype=np.float64).reshape(100, 100)
    low, high = np.percentile(image, [1.0, 99.0])
    planes = to_sam_planes(image, ImageLayout(), InputSpec(percentiles=(1.0, 99.0)))
    expected = np.clip((image - low) / (high - low) * 255.0, 0, 255)
    np.testing.assert_allclose(planes[0, ..., 0], expected, atol=1e-3)
    assert (planes[0, ..., 0][image <= low] == 0).all() and (planes[0, ..., 0][image >= high] == 255).all()


def test_constant_image_maps_to_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        planes = to_sam_planes(np.full((20, 20), 7, np.uint16), ImageLayout())
    assert (planes == 0).all()


def test_sparse_bright_spots_fall_back_to_min_max():
    image = np.zeros((100, 100), np.uint16)
    image[5, 5] = 1000  # the 99.8th percentile is still 0
    assert to_sam_planes(image, ImageLayout())[0, 5, 5, 0] == 255.0


def test_large_images_use_a_subsample_close_to_exact_percentiles():
    ramp = np.arange(3000 * 3000, dtype=np.float32).reshape(3000, 3000)
    low, high = intensity_range(ramp, (1.0, 99.8))
    exact_low, exact_high = np.percentile(ramp, [1.0, 99.8])
    assert abs(low - exact_low) < 0.001 * ramp.size and abs(high - exact_high) < 0.001 * ramp.size


@pytest.mark.parametrize("alpha", [False, True])
def test_rgb_and_rgba_normalise_each_colour_and_drop_alpha(alpha):
    rgb = RNG.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    image = np.concatenate([rgb, RNG.integers(0, 256, (32, 48, 1), dtype=np.uint8)], -1) if alpha else rgb
    planes = to_sam_planes(image, ImageLayout(rgb=True))
    assert planes.shape == (1, 32, 48, 3) and spatial_shape(image, ImageLayout(rgb=True)) == (32, 48)
    for c in range(3):
        np.testing.assert_allclose(planes[0, ..., c], _gray(rgb[..., c]), atol=1e-4)


def _multichannel(num_channels: int, axis: int) -> tuple[np.ndarray, list[np.ndarray]]:
    channels = [RNG.normal(100 * (c + 1), 10 * (c + 1), (24, 36)).astype(np.float32) for c in range(num_channels)]
    return np.stack(channels, axis=axis), channels


@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize(
    "num_channels, layout_kwargs, expected_slots",
    [
        (1, {}, {0: 0, 1: 0, 2: 0}),
        (2, {}, {0: 0, 1: 1, 2: None}),
        (2, {"rgb_slots": (2, 0)}, {0: 1, 1: None, 2: 0}),
        (4, {"channels": (3, 1, 0)}, {0: 3, 1: 1, 2: 0}),
        (4, {"channels": (2,)}, {0: 2, 1: 2, 2: 2}),
    ],
)
def test_multichannel_layouts(axis, num_channels, layout_kwargs, expected_slots):
    image, channels = _multichannel(num_channels, axis)
    layout = ImageLayout(channel_axis=axis)
    planes = to_sam_planes(image, layout, InputSpec(**layout_kwargs))
    assert planes.shape == (1, 24, 36, 3) and spatial_shape(image, layout) == (24, 36)
    for slot, channel in expected_slots.items():
        expected = np.zeros((24, 36)) if channel is None else _gray(channels[channel])
        np.testing.assert_allclose(planes[0, ..., slot], expected, atol=1e-3)


def test_stack_is_normalised_as_a_whole_and_split_into_planes():
    stack = np.stack([np.full((16, 20), 10.0), np.linspace(0, 1000, 16 * 20).reshape(16, 20)])
    planes = to_sam_planes(stack, ImageLayout())
    assert planes.shape == (2, 16, 20, 3) and spatial_shape(stack, ImageLayout()) == (2, 16, 20)
    assert planes[0].max() < 10  # dim plane stays dim: one normalisation for the whole stack
    np.testing.assert_array_equal(to_sam_planes(stack, ImageLayout(), plane_indices=[1])[0], planes[1])


def test_rgb_stack_and_channel_axis_in_the_middle():
    rgb_stack = RNG.integers(0, 256, (3, 10, 12, 4), dtype=np.uint8)
    assert to_sam_planes(rgb_stack, ImageLayout(rgb=True)).shape == (3, 10, 12, 3)
    zcyx = RNG.random((5, 2, 10, 12)).astype(np.float32)
    layout = ImageLayout(channel_axis=1)
    assert spatial_shape(zcyx, layout) == (5, 10, 12)
    planes = to_sam_planes(zcyx, layout)
    assert planes.shape == (5, 10, 12, 3)
    np.testing.assert_allclose(planes[..., 1], to_sam_planes(zcyx[:, 1], ImageLayout())[..., 0], atol=1e-4)


@pytest.mark.parametrize(
    "image, layout, spec, message",
    [
        (np.array([[1.0, np.nan], [0.0, 1.0]]), ImageLayout(), None, "contains NaN"),
        (np.array([[1.0, np.inf], [0.0, 1.0]], np.float32), ImageLayout(), None, "contains infinite"),
        (np.zeros((0, 5)), ImageLayout(), None, r"image is empty \(shape \(0, 5\)\)"),
        (np.zeros((1, 5)), ImageLayout(), None, r"too small.*\(1, 5\)"),
        (np.zeros((4, 4), np.complex64), ImageLayout(), None, "complex dtype complex64"),
        (np.array([["a", "b"], ["c", "d"]]), ImageLayout(), None, "unsupported dtype"),
        (np.zeros(10), ImageLayout(), None, "expected at least 2"),
        (np.zeros((8, 8, 5)), ImageLayout(rgb=True), None, r"3 \(RGB\) or 4 \(RGBA\).*\(8, 8, 5\)"),
        (np.zeros((2, 8, 8)), ImageLayout(channel_axis=3), None, "channel_axis=3 is out of range.*3 axes"),
        (np.zeros((2, 8, 8)), ImageLayout(channel_axis=-4), None, "channel_axis=-4 is out of range"),
        (np.zeros((5, 8, 8)), ImageLayout(channel_axis=0), None, "has 5 channels.*Choose up to 3"),
        (np.zeros((2, 8, 8)), ImageLayout(channel_axis=0), InputSpec(channels=(0, 2)), r"channels \[2\] do not exist"),
        (np.zeros((2, 8, 8)), ImageLayout(channel_axis=0), InputSpec(rgb_slots=(0,)), "one RGB slot per channel"),
    ],
)
def test_bad_images_are_explained(image, layout, spec, message):
    with pytest.raises(ValueError, match=message):
        to_sam_planes(image, layout, spec)


@pytest.mark.parametrize(
    "kind, kwargs, message",
    [
        (ImageLayout, {"rgb": True, "channel_axis": 0}, "not both"),
        (InputSpec, {"channels": (0, 1, 2, 3)}, "choose 1 to 3 channels"),
        (InputSpec, {"rgb_slots": (0, 3)}, "among 0, 1, 2"),
        (InputSpec, {"channels": (0, 1), "rgb_slots": (2,)}, r"names 1 slot\(s\) for 2 channel"),
        (InputSpec, {"percentiles": (50.0, 10.0)}, "0 <= low < high <= 100"),
        (InputSpec, {"rescale": 0.0}, "rescale must be in"),
    ],
)
def test_bad_layouts_and_specs_are_explained(kind, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kind(**kwargs)


def test_input_spec_json_round_trip():
    from napari_convlora.config import from_record, to_record

    spec = InputSpec(channels=(2, 0), rgb_slots=(1, 2), percentiles=(0.5, 99.0), rescale=0.5)
    assert from_record(InputSpec, json.loads(json.dumps(to_record(spec))), "test") == spec


# ---------------------------------------------------------------- labels


def test_dense_mode_classes_encode_decode():
    labels = np.array([[0, 2, 2], [5, 0, 5]], np.uint16)
    encoding = make_label_encoding([labels, np.array([[0, 2], [2, 0]], np.int32)], mode="dense")
    assert encoding.class_values == (0, 2, 5) and encoding.num_classes == 3 and encoding.background_value == 0
    encoded = encoding.encode(labels)
    assert encoded.dtype == np.int64 and encoded.tolist() == [[0, 1, 1], [2, 0, 2]]
    decoded = encoding.decode(encoded)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, labels)
    assert encoding.encode(np.array([[9]])).item() == IGNORE_INDEX  # a value the model never saw
    big = make_label_encoding([np.array([[0, 300]], np.uint16)])
    assert big.decode(np.array([1])).dtype == np.uint16 and big.decode(np.array([1])).item() == 300
    huge = make_label_encoding([np.array([[0, 2**21, 7]], np.int64)])  # beyond the lookup table
    assert huge.encode(np.array([[7, 2**21, 5, 0]])).tolist() == [[1, 2, IGNORE_INDEX, 0]]
    assert huge.decode(np.array([2])).dtype == np.uint32


def test_sparse_mode_zero_is_ignored_and_background_defaults_to_1():
    labels = np.array([[0, 1, 3], [7, 0, 1]], np.uint8)
    encoding = make_label_encoding([labels], mode="sparse")
    assert encoding.class_values == (1, 3, 7) and encoding.background_value == 1
    encoded = encoding.encode(labels)
    assert encoded.tolist() == [[IGNORE_INDEX, 0, 1], [2, IGNORE_INDEX, 0]]
    assert np.array_equal(encoding.decode(encoded), labels)  # IGNORE decodes to 0 (unpainted)
    custom = make_label_encoding([labels], mode="sparse", background_value=7)
    assert custom.class_values == (7, 1, 3) and custom.encode(labels)[1, 0] == 0


def test_instances_mode_is_binary():
    labels = np.array([[0, 4, 4], [125, 0, 3]], np.int32)
    encoding = make_label_encoding([labels], mode="instances")
    assert encoding.class_values == (0, 1) and encoding.num_classes == 2
    assert encoding.encode(labels).tolist() == [[0, 1, 1], [1, 0, 1]]
    assert encoding.decode(encoding.encode(labels)).tolist() == [[0, 1, 1], [1, 0, 1]]


def test_bool_labels_are_0_and_1():
    labels = np.eye(4, dtype=bool)
    encoding = make_label_encoding([labels])
    assert encoding.class_values == (0, 1) and encoding.encode(labels).sum() == 4
    validate_pair(np.zeros((4, 4)), labels, ImageLayout())


def test_encoding_is_rebuilt_from_a_head_config_and_refuses_bad_indices():
    from napari_convlora.config import HeadConfig

    encoding = make_label_encoding([np.array([[0, 1, 2]])], mode="sparse")
    head = HeadConfig(num_classes=2, class_values=encoding.class_values, label_mode="sparse",
                      background_value=encoding.background_value)
    assert LabelEncoding(head.label_mode, head.class_values, head.background_value) == encoding
    with pytest.raises(ValueError, match=r"class indices must be in 0..1 \(or -1\); found 3"):
        encoding.decode(np.array([3]))


@pytest.mark.parametrize(
    "labels, mode, kwargs, message",
    [
        (np.zeros((4, 4), np.uint8), "dense", {}, r"only one class \(label value 0\).*paint at least background"),
        (np.ones((4, 4), np.uint8), "sparse", {}, r"only one class \(label value 1 = background\)"),
        (np.zeros((4, 4), np.uint8), "sparse", {}, "no annotated pixel"),
        (np.array([[0, 2, 3]]), "sparse", {}, "background label value 1 is not painted"),
        (np.array([[0, 2, 3]]), "sparse", {"background_value": 0}, "must be > 0"),
        (np.zeros((4, 4), np.uint8), "instances", {}, r"only one class \(background 0 only"),
        (np.arange(300).reshape(15, 20), "dense", {}, "300 classes found.*at most 255.*mode='instances'"),
        (np.array([[0.0, 1.0]], np.float32), "dense", {}, r"labels must be integers \(a napari Labels layer\), got float32"),
        (np.array([[0, -2, 1]]), "dense", {}, r"negative values \(min -2\)"),
        (np.array([[0, 1]]), "semantic", {}, "unknown label mode"),
    ],
)
def test_bad_label_sets_are_explained(labels, mode, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_label_encoding([labels], mode=mode, **kwargs)


@pytest.mark.parametrize(
    "image, labels, layout, mode, message",
    [
        (np.zeros((8, 8)), np.zeros((8, 9), np.uint8), ImageLayout(), "dense",
         r"image spatial shape \(8, 8\).*labels shape \(8, 9\)"),
        (np.zeros((8, 8, 3)), np.zeros((8, 8), np.uint8), ImageLayout(), "dense", "set rgb=True"),
        (np.zeros((2, 8, 8)), np.zeros((8, 8), np.uint8), ImageLayout(), "dense", "set channel_axis=0"),
        (np.zeros((8, 8)), np.ones((8, 8), np.float32), ImageLayout(), "dense",
         r"labels must be integers \(a napari Labels layer\), got float32"),
        (np.zeros((8, 8)), -np.ones((8, 8), np.int32), ImageLayout(), "dense", "negative values"),
        (np.zeros((8, 8)), np.zeros((8, 8), np.uint8), ImageLayout(), "sparse", "no annotated pixel"),
        (np.full((8, 8), np.nan), np.zeros((8, 8), np.uint8), ImageLayout(), "dense", "NaN"),
    ],
)
def test_bad_pairs_are_explained(image, labels, layout, mode, message):
    with pytest.raises(ValueError, match=message):
        validate_pair(image, labels, layout, mode)


def test_stack_labelled_on_two_slices():
    stack = RNG.integers(0, 4000, (6, 20, 24), dtype=np.uint16)
    labels = np.zeros((6, 20, 24), np.uint8)
    labels[2, :5, :5], labels[2, 10:, 10:] = 1, 2
    labels[5, 3:8, 3:8] = 1
    encoding = make_label_encoding([labels], mode="sparse")
    assert labelled_plane_indices(encoding.encode(labels)) == [2, 5]
    pairs = labelled_plane_pairs(stack, labels, ImageLayout(), InputSpec(), encoding)
    full = to_sam_planes(stack, ImageLayout())
    assert len(pairs) == 2
    np.testing.assert_array_equal(pairs[0][0], full[2])
    np.testing.assert_array_equal(pairs[1][1], encoding.encode(labels[5]))
    assert labelled_plane_indices(encoding.encode(labels[2])) == [0]


# ---------------------------------------------------------------- split


def _full_targets(shape=(256, 256), classes=3) -> np.ndarray:
    return np.random.default_rng(1).integers(0, classes, shape).astype(np.int64)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_split_is_deterministic_disjoint_complete_and_near_the_fraction(fraction):
    targets = _full_targets()
    targets[:40] = IGNORE_INDEX
    train, val = split_train_validation(targets, fraction, seed=3, block=32)
    again = split_train_validation(targets, fraction, seed=3, block=32)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, split_train_validation(targets, fraction, seed=4, block=32)[1])
    in_train, in_val, labelled = train != IGNORE_INDEX, val != IGNORE_INDEX, targets != IGNORE_INDEX
    assert not (in_train & in_val).any() and np.array_equal(in_train | in_val, labelled)
    assert np.array_equal(np.where(in_train, train, val)[labelled], targets[labelled])
    assert abs(in_val.sum() / labelled.sum() - fraction) < 0.05
    blocks = in_val[40:].reshape(-1)  # whole blocks: each 32 x 32 block is all-val or all-train
    per_block = in_val.reshape(8, 32, 8, 32).sum(axis=(1, 3))[2:]
    assert set(np.unique(per_block)) <= {0, 32 * 32} and blocks.any()


def test_split_fraction_zero_and_single_pixel():
    targets = _full_targets((64, 64))
    train, val = split_train_validation(targets, 0.0, seed=0, block=16)
    assert np.array_equal(train, targets) and (val == IGNORE_INDEX).all()
    one = np.full((64, 64), IGNORE_INDEX, np.int64)
    one[5, 5] = 1
    train, val = split_train_validation(one, 0.3, seed=0, block=16)
    assert train[5, 5] == 1 and (val == IGNORE_INDEX).all()


def test_split_of_a_single_labelled_block_halves_it():
    targets = np.full((128, 128), IGNORE_INDEX, np.int64)
    targets[10:20, 10:20] = 1  # inside one 64 x 64 block
    train, val = split_train_validation(targets, 0.3, seed=0, block=64)
    assert (train != IGNORE_INDEX).any() and (val != IGNORE_INDEX).any()
    assert (train != IGNORE_INDEX).sum() + (val != IGNORE_INDEX).sum() == 100


def test_split_pairs_drops_empty_sides():
    image = np.zeros((64, 64, 3), np.float32)
    train_pairs, val_pairs = split_pairs([(image, _full_targets((64, 64)))], 0.0, seed=0, block=16)
    assert len(train_pairs) == 1 and val_pairs == [] and train_pairs[0][0] is image


# ---------------------------------------------------------------- sampler


def _coded_pair(shape=(96, 80)) -> tuple[np.ndarray, np.ndarray]:
    """Targets in 3 classes (8 x 8 random blocks); the image value encodes the class, robust to jitter."""
    coarse = np.random.default_rng(2).integers(0, 3, (shape[0] // 8, shape[1] // 8))
    targets = np.kron(coarse, np.ones((8, 8), np.int64))
    image = np.repeat(np.array([30.0, 120.0, 210.0], np.float32)[targets][..., None], 3, axis=-1)
    return image, targets


def _decode_class(image_patch: np.ndarray) -> np.ndarray:
    return np.digitize(image_patch[0], [75.0, 165.0])


def test_sampler_shapes_dtypes_and_determinism():
    sampler = PatchSampler([_coded_pair()], patch_size=32, augment=True)
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    images, targets = sampler.sample(rng, 4)
    assert images.shape == (4, 3, 32, 32) and images.dtype == np.float32
    assert targets.shape == (4, 32, 32) and targets.dtype == np.int64
    assert images.min() >= 0 and images.max() <= 255
    rng.bit_generator.state = state
    again = sampler.sample(rng, 4)
    assert np.array_equal(images, again[0]) and np.array_equal(targets, again[1])
    assert not np.array_equal(targets, sampler.sample(rng, 4)[1])


def test_augmentation_keeps_image_and_targets_aligned_and_really_transforms():
    image, targets = _coded_pair((32, 32))
    sampler = PatchSampler([(image, targets)], patch_size=32, augment=True, border=0)  # whole-image patches
    images, batch_targets = sampler.sample(np.random.default_rng(0), 64)
    dihedral = [np.rot90(t, k) for t in (targets, targets[::-1]) for k in range(4)]
    seen = set()
    for image_patch, target_patch in zip(images, batch_targets):
        assert np.array_equal(_decode_class(image_patch), target_patch)
        seen.add(next(i for i, d in enumerate(dihedral) if np.array_equal(d, target_patch)))
    assert len(seen) >= 6
    assert not np.allclose(images[:, 0][batch_targets == 0], 30.0)  # intensity jitter happened


def test_small_images_are_padded_with_zero_and_ignore():
    """A 24 x 40 image in 64 px patches: its 8 px mirror border around it (targets ignored there), then zeros."""
    image, targets = _coded_pair((24, 40))
    sampler = PatchSampler([(image, targets)], patch_size=64, augment=False)
    images, batch_targets = sampler.sample(np.random.default_rng(0), 2)
    expected_targets = np.full((64, 64), IGNORE_INDEX)
    expected_targets[8:32, 8:48] = targets
    expected_image = np.zeros((64, 64, 3), np.float32)
    expected_image[:40, :56] = np.pad(image, ((8, 8), (8, 8), (0, 0)), mode="reflect")
    assert all(np.array_equal(t, expected_targets) for t in batch_targets)
    assert all(np.array_equal(i, expected_image.transpose(2, 0, 1)) for i in images)


def test_patches_are_never_unlabelled_and_weighting_favours_labelled_regions():
    targets = np.full((512, 512), IGNORE_INDEX, np.int64)
    targets[::32, ::32] = 0  # a sparse scatter of background clicks
    targets[200:208, 300:308] = 1  # one small painted object
    image = np.zeros((512, 512, 3), np.float32)
    hits = {}
    for weighting in (False, True):
        sampler = PatchSampler([(image, targets)], patch_size=24, labelled_weighting=weighting, augment=False)
        _, batch = sampler.sample(np.random.default_rng(0), 400)
        assert (batch != IGNORE_INDEX).any(axis=(1, 2)).all()
        hits[weighting] = int((batch == 1).any(axis=(1, 2)).sum())
    assert hits[True] > 40 and hits[True] > 5 * max(hits[False], 1)


def test_rescaled_planes_and_empty_sampler_input():
    stack = RNG.integers(0, 4000, (2, 96, 80), dtype=np.uint16)
    labels = np.zeros((2, 96, 80), np.uint8)
    labels[1, 10:50, 20:60], labels[1, 60:, :] = 1, 2
    encoding = make_label_encoding([labels], mode="sparse")
    ((planes, targets),) = labelled_plane_pairs(stack, labels, ImageLayout(), InputSpec(rescale=0.5), encoding)
    assert planes.shape == (48, 40, 3) and targets.shape == (48, 40) and set(np.unique(targets)) <= {-1, 0, 1}
    empty = np.full((20, 20), IGNORE_INDEX, np.int64)
    with pytest.raises(ValueError, match="no labelled pixel"):
        PatchSampler([(np.zeros((20, 20, 3), np.float32), empty)], patch_size=8)


def test_validation_patches_count_every_val_pixel_exactly_once():
    height, width = 250, 200
    yy, xx = np.mgrid[:height, :width]
    image = np.stack([yy, xx, np.zeros_like(yy)], -1).astype(np.float32)
    pixel_ids = (yy * width + xx).astype(np.int64)
    labelled = np.random.default_rng(3).random((height, width)) < 0.02
    labelled[30:90, 20:60] = True
    targets = np.where(labelled, pixel_ids, IGNORE_INDEX)
    small = (image[:20, :30], targets[:20, :30])
    patches = validation_patches([(image, targets), small], patch_size=64)
    seen = []
    for image_patch, target_patch in patches:
        assert image_patch.shape == (3, 64, 64) and target_patch.shape == (64, 64)
        assert image_patch.dtype == np.float32 and target_patch.dtype == np.int64
        mask = target_patch != IGNORE_INDEX
        assert mask.any()
        assert np.array_equal(image_patch[0][mask] * width + image_patch[1][mask], target_patch[mask])
        seen.append(target_patch[mask])
    seen = np.concatenate(seen)
    expected = np.concatenate([pixel_ids[labelled], small[1][small[1] != IGNORE_INDEX]])
    assert np.array_equal(np.sort(seen), np.sort(expected))
    last_image, last_targets = patches[-1]  # the 20 x 30 pair: its 8 px mirror border (64 // 8), then zeros
    assert (last_targets[:8] == IGNORE_INDEX).all() and (last_targets[28:] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(last_image[:, :36, :46], np.pad(small[0], ((8, 8), (8, 8), (0, 0)),
                                                                   mode="reflect").transpose(2, 0, 1))
    assert (last_image[:, 36:] == 0).all() and (last_image[:, :, 46:] == 0).all()
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(patches, validation_patches([(image, targets), small], 64)))


# ---------------------------------------------------------------- real data, isolation


def test_stardist_nuclei_in_instances_mode():
    spec = importlib.util.find_spec("stardist")
    if spec is None or spec.origin is None:
        pytest.skip("stardist is not installed (optional test data: pip install --no-deps stardist)")
    tifffile = pytest.importorskip("tifffile")
    folder = Path(spec.origin).parent / "data" / "images"
    image, mask = tifffile.imread(folder / "img2d.tif"), tifffile.imread(folder / "mask2d.tif")
    assert image.shape == mask.shape == (512, 512)
    validate_pair(image, mask, ImageLayout(), "instances")
    encoding = make_label_encoding([mask], mode="instances")
    assert encoding.num_classes == 2
    encoded = encoding.encode(mask)
    assert 0.1 < encoded.mean() < 0.6  # nuclei cover a sensible share of the field
    ((planes, targets),) = labelled_plane_pairs(image, mask, ImageLayout(), InputSpec(), encoding)
    assert planes[..., 0][targets == 1].mean() > planes[..., 0][targets == 0].mean() + 50
    train, val = split_pairs([(planes, targets)], 0.2, seed=0, block=64)
    images, batch = PatchSampler(train, patch_size=128).sample(np.random.default_rng(0), 2)
    assert images.shape == (2, 3, 128, 128) and set(np.unique(batch)) <= {IGNORE_INDEX, 0, 1}
    assert sum((t != IGNORE_INDEX).sum() for _, t in validation_patches(val, 128)) == (val[0][1] != -1).sum()


def test_data_package_imports_no_torch_napari_or_qt():
    code = "import sys, napari_convlora.data; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for forbidden in ("torch", "napari", "qtpy", "PyQt5", "PyQt6", "PySide6", "magicgui"):
        assert f"'{forbidden}'" not in loaded


def test_training_patches_show_image_borders_as_prediction_tiles_do():
    """A patch larger than its image was padded at the bottom and right and then flipped and rotated, so the
    model was trained with black padding on every side, while prediction pads only the bottom and right (issue 9,
    item 12); then image borders were a patch's edge in training and a tile's edge in prediction, where a model
    leans to foreground (issue 21, item 8). Now the image continues past its border as its mirror image, 4 px for
    32 px patches (``mirror_margin``), as prediction extends a plane, and is flipped and rotated with that border
    before the rest is padded: content at (4, 4), mirror around it, zeros only at the bottom and right."""
    from napari_convlora.constants import IGNORE_INDEX
    from napari_convlora.data import PatchSampler

    image = np.full((20, 12, 3), 100.0, dtype=np.float32)
    targets = np.ones((20, 12), dtype=np.int64)
    sampler = PatchSampler([(image, targets)], patch_size=32, augment=True)
    rng = np.random.default_rng(0)
    shapes = set()
    for _ in range(40):
        images, patch_targets = sampler.sample(rng, 1)
        labelled = patch_targets[0] != IGNORE_INDEX
        rows, cols = np.flatnonzero(labelled.any(axis=1)), np.flatnonzero(labelled.any(axis=0))
        assert rows[0] == 4 and cols[0] == 4  # the content starts after the mirror border
        assert labelled[4 : rows[-1] + 1, 4 : cols[-1] + 1].all()
        shown = images[0][0] > 0
        assert shown[: rows[-1] + 5, : cols[-1] + 5].all() and not shown[rows[-1] + 5 :].any()
        assert not shown[:, cols[-1] + 5 :].any()
        shapes.add((rows[-1] - 3, cols[-1] - 3))
    assert shapes == {(20, 12), (12, 20)}  # rotations still happen


@pytest.mark.parametrize("scale, offset", [(1e39, 0.0), (1.0, 1e12)])
def test_float64_images_beyond_float32_are_normalised_not_blanked(scale, offset):
    """Values beyond float32's range (1e39), or distinct values that float32 rounds to one (1e12 + 0..255), were
    turned into blank planes; they are normalised in float64 as a plane of the same image scaled into range is."""
    import warnings

    from napari_convlora.config import InputSpec
    from napari_convlora.data.images import SamPlanes

    rng = np.random.default_rng(0)
    ramp = np.linspace(0.0, 255.0, 64 * 64).reshape(64, 64) + rng.normal(0, 1, (64, 64))
    image = ramp * scale + offset
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warnings either
        plane = SamPlanes(image, ImageLayout(), InputSpec()).normalised(0)
    expected = SamPlanes(ramp.astype(np.float32), ImageLayout(), InputSpec()).normalised(0)
    assert plane.std() > 50  # not blank
    np.testing.assert_allclose(plane, expected, atol=0.5)
