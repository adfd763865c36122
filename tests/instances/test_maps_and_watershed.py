"""Instance targets and the seeded watershed (issue 23, item 1): touching objects that connected components merge
come apart, objects cut or re-used ids are handled, sizes and ids are as documented."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import disk

from napari_convlora.config.instances import InstanceConfig
from napari_convlora.constants import IGNORE_INDEX
from napari_convlora.errors import ConfigError
from napari_convlora.instances.metrics import instance_scores
from napari_convlora.instances import instances_from_maps, object_classes, object_maps


def _touching(radius: int = 12, gap: int = 0) -> np.ndarray:
    """Two discs side by side, touching along a seam (ids 3 and 9)."""
    ids = np.zeros((64, 96), np.int64)
    rr, cc = disk((32, 30), radius, shape=ids.shape)
    ids[rr, cc] = 3
    rr, cc = disk((32, 30 + 2 * radius - 1 + gap), radius, shape=ids.shape)
    ids[rr, cc] = 9
    return ids


def test_maps_are_foreground_centre_and_depth_per_object():
    ids = _touching()
    maps, valid = object_maps(ids)
    assert maps.shape == (3, 64, 96) and maps.dtype == np.float32 and valid.all()
    np.testing.assert_array_equal(maps[0], ids > 0)
    for value in (3, 9):
        inside = ids == value
        assert maps[1][inside].max() == 1.0 and maps[2][inside].max() == 1.0  # per object, not per image
        assert maps[1][inside].min() == pytest.approx(0.0, abs=1e-6)
    assert maps[1][ids == 0].max() == 0 and maps[2][ids == 0].max() == 0
    # the seam between the two objects is an edge of each: shallow there, deep at the centres
    seam = (ids == 3) & ndimage.binary_dilation(ids == 9)
    assert seam.any() and maps[2][seam].max() < 0.2
    assert maps[2][32, 30] == 1.0 and maps[1][32, 30] == 1.0


def test_unannotated_pixels_are_left_out_and_an_id_on_two_blobs_is_two_objects():
    ids = np.zeros((40, 80), np.int64)
    rr, cc = disk((20, 15), 8)
    ids[rr, cc] = 5
    rr, cc = disk((20, 60), 8)
    ids[rr, cc] = 5  # the same id far away
    ids[:, 35:45] = IGNORE_INDEX
    maps, valid = object_maps(ids)
    assert not valid[:, 35:45].any() and valid[:, :35].all()
    assert maps[1][20, 15] == 1.0 and maps[1][20, 60] == 1.0  # each blob has its own centre
    np.testing.assert_array_equal(object_classes(ids), np.where(ids > 0, 1, ids))


def test_the_watershed_separates_touching_objects_that_components_merge():
    ids = _touching()
    maps, _ = object_maps(ids)
    objects = instances_from_maps(maps)
    assert ndimage.label(ids > 0)[1] == 1  # connected components see one object
    assert objects.max() == 2 and objects.dtype == np.uint32
    scores = instance_scores(objects, ids)
    assert scores.f1_50 == 1.0 and scores.mean_matched_iou > 0.95


def test_thresholds_min_size_and_raster_order():
    ids = _touching()
    ids[5:8, 5:8] = 20  # a 9 px speck
    maps, _ = object_maps(ids)
    found = instances_from_maps(maps, InstanceConfig(min_size=10))
    assert found.max() == 2  # the speck dropped
    assert found[32, 30] == 1 and found[32, 60] == 2  # numbered in raster order of their first pixel
    found = instances_from_maps(maps, InstanceConfig(min_size=10), scale=0.5)  # 10 px at the model's scale = 2.5 here
    assert found.max() == 3
    assert instances_from_maps(np.zeros((3, 8, 8), np.float32)).max() == 0
    with pytest.raises(ValueError, match="3 x Y x X"):
        instances_from_maps(np.zeros((2, 8, 8)))
    with pytest.raises(ConfigError, match="foreground threshold"):
        InstanceConfig(foreground=1.0)
    with pytest.raises(ConfigError, match="minimum distance"):
        InstanceConfig(min_distance=0)


def test_the_learned_maps_split_objects_whose_outline_is_not_pinched():
    """Two touching squares make one rectangle: its distance transform has one ridge and no seam, so only the
    learned maps (low at the seam) can split it; the maps of one object keep it whole."""
    ids = np.zeros((40, 80), np.int64)
    ids[10:30, 10:40] = 1
    ids[10:30, 40:70] = 2
    maps, _ = object_maps(ids)
    assert instance_scores(instances_from_maps(maps), ids).f1_50 == 1.0
    whole, _ = object_maps(np.where(ids > 0, 1, 0))
    assert instances_from_maps(whole).max() == 1


def test_foreground_without_a_seed_is_still_an_object():
    maps = np.zeros((3, 32, 32), np.float32)
    maps[0, 4:12, 4:12] = 0.9  # foreground, but centre and depth 0: a flat surface
    found = instances_from_maps(maps, InstanceConfig(min_size=4))
    assert found.max() == 1 and (found == 1).sum() == 64


def test_each_object_becomes_a_box_and_its_innermost_point():
    from napari_convlora.prediction.sam_refined import object_prompts

    ids = _touching()
    prompts = object_prompts(np.where(ids == 3, 1, np.where(ids == 9, 2, 0)))
    assert [p.kind for p in prompts] == ["box", "box"]
    first = prompts[0]
    rows, cols = np.nonzero(ids == 3)
    np.testing.assert_array_equal(first.box, [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    np.testing.assert_allclose(first.positive, [[30.5, 32.5]])  # the disc's centre pixel (30, 32), at its centre


def test_an_id_painted_on_separate_blobs_is_one_object_per_blob_everywhere():
    """Every nucleus painted with label 1 (review of issue 23): training targets, the objects' radius and the
    scores all see one object per blob, also when two blobs of one id are joined only through another object."""
    from napari_convlora.data.training_data import median_object_radius
    from napari_convlora.instances import separate_objects

    ids = np.zeros((20, 60), np.int64)
    ids[5:15, 5:15] = 1
    ids[5:15, 15:25] = 2  # touches both blobs of id 1
    ids[5:15, 25:35] = 1
    ids[5:15, 45:55] = 1
    assert separate_objects(ids).max() == 4
    maps, _ = object_maps(ids)
    assert (maps[1] == 1.0).sum() == 4  # one centre per object
    assert median_object_radius([ids]) == pytest.approx(np.sqrt(100 / np.pi))
    perfect = np.where(ids > 0, separate_objects(ids) + 10, 0)
    assert instance_scores(perfect, separate_objects(ids)).f1_50 == 1.0


def test_a_plane_all_foreground_is_measured_from_its_sides():
    maps = np.ones((3, 24, 48), np.float32)
    maps[1:, :, 23:25] = 0.0  # a seam the head learnt
    found = instances_from_maps(maps, InstanceConfig(min_distance=4))
    assert found.max() == 2 and (found[:, :20] == found[0, 0]).all() and (found[:, 28:] == found[0, -1]).all()


def test_non_finite_instance_maps_count_as_non_finite_outputs():
    import torch

    from napari_convlora.modeling import SegmentationOutput
    from napari_convlora.training.notes import outputs_finite

    out = SegmentationOutput(torch.zeros(1, 1, 4, 4), None, torch.zeros(()), torch.full((1, 3, 16, 16), float("nan")))
    assert not bool(outputs_finite(out))


def test_sam_refinement_polls_stop_between_planes(tiny_checkpoint):
    """A stop asked while SAM refines a stack's objects ends it at the next plane (it did not poll before)."""
    from helpers import make_model

    from napari_convlora.prediction.sam_refined import refine_with_sam
    from napari_convlora.prediction.tiling import PredictionCancelled

    model = make_model(tiny_checkpoint, input_size=64).eval()
    ids = np.zeros((64, 64), np.uint32)
    ids[10:20, 10:20] = 1
    image = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    asked = []

    def stop_on_second_plane() -> bool:
        asked.append(1)
        return len(asked) > 1

    with pytest.raises(PredictionCancelled):
        refine_with_sam(model, image, None, {0: ids, 1: ids, 2: ids}, "cpu", stop_on_second_plane)
    assert len(asked) == 2
    done = refine_with_sam(model, image, None, {0: ids, 1: ids}, "cpu", lambda: False)
    assert set(done) == {0, 1}
