"""Weak labels as napari users draw them (Shapes, Points, coarse Labels, napari's CSV files) -> per-plane
prompt sets for WeSAM, without Qt; including the bad inputs and stacks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from skimage.draw import polygon as fill_polygon

from napari_convlora.weak import (
    KINDS,
    WeakLabelError,
    WeakLabels,
    WeakObject,
    combine_weak_labels,
    csv_layer_kind,
    draw_points,
    read_points_csv,
    read_shapes_csv,
    step_points,
    weak_labels_from_coarse_labels,
    weak_labels_from_csv,
    weak_labels_from_points,
    weak_labels_from_shapes,
)


def rect(r0, c0, r1, c1, *lead):
    """napari's rectangle vertices (corners in order) with leading coordinates ``lead``."""
    corners = [(r0, c0), (r0, c1), (r1, c1), (r1, c0)]
    return np.array([[*lead, r, c] for r, c in corners], float)


# --------------------------------------------------------------------------------------------------- objects
def test_weak_object_validates_and_pastes_its_cropped_mask():
    mask = np.array([[1, 0], [1, 1]], bool)
    obj = WeakObject((2,), "coarse", [3, 1, 5, 3], mask=mask, mask_origin=(1, 3), source="label 4")
    full = obj.full_mask((5, 6))
    assert full.shape == (5, 6) and full.sum() == 3 and full[1, 3] and full[2, 4] and not full[1, 4]
    assert obj.positive.shape == (0, 2) and obj.box.dtype == np.float32
    with pytest.raises(ValueError, match="kind 'mask'"):
        WeakObject((), "mask", [0, 0, 1, 1])
    with pytest.raises(ValueError, match="needs a box"):
        WeakObject((), "box")
    with pytest.raises(ValueError, match="needs a positive point"):
        WeakObject((), "points", negative=[[1, 1]])
    assert WeakObject((), "box", [0, 0, 1, 1]).full_mask((4, 4)) is None


def test_container_groups_by_plane_combines_and_summarises():
    a = WeakLabels((3, 8, 8), {(2,): [WeakObject((2,), "box", [0, 0, 2, 2])]}, ["x skipped"])
    b = WeakLabels((3, 8, 8), {(0,): [WeakObject((0,), "points", positive=[[1, 1]])],
                               (2,): [WeakObject((2,), "points", positive=[[3, 3]])]}, ["y skipped"])
    both = combine_weak_labels([a, b])
    assert both.planes() == [(0,), (2,)] and len(both) == 3
    assert [o.kind for o in both.on_plane((2,))] == ["box", "points"] and both.on_plane((1,)) == []
    assert both.plane_shape == (8, 8) and both.leading_shape == (3,) and both.flat_plane_index((2,)) == 2
    summary = both.summary()
    assert summary.per_kind == {"box": 1, "points": 2, "coarse": 0} and summary.total == 3
    assert summary.per_plane == {(0,): {"box": 0, "points": 1, "coarse": 0}, (2,): {"box": 1, "points": 1, "coarse": 0}}
    assert summary.skipped == ("x skipped", "y skipped")
    lines = summary.lines()
    assert lines[0] == "3 weak object(s) on 2 plane(s): 1 box, 2 points"
    assert "plane (2,): 1 box, 1 points" in lines and "skipped: y skipped" in lines
    with pytest.raises(WeakLabelError, match=r"image shapes \(3, 8, 8\) and \(8, 8\)"):
        combine_weak_labels([a, WeakLabels((8, 8))])
    with pytest.raises(WeakLabelError, match="at least one"):
        combine_weak_labels([])


def test_dense_labels_are_kept_for_evaluation_only_and_checked():
    weak = WeakLabels((2, 6, 7), {(1,): [WeakObject((1,), "box", [0, 0, 2, 2])]})
    dense = np.zeros((2, 6, 7), np.uint8)
    evaluated = weak.with_evaluation_labels(dense, "truth")
    assert evaluated.dense_labels is dense and weak.dense_labels is None and len(evaluated) == 1
    assert combine_weak_labels([weak, evaluated]).dense_labels is dense
    with pytest.raises(WeakLabelError, match=r"'truth' has shape \(6, 7\); expected the image's \(2, 6, 7\)"):
        weak.with_evaluation_labels(np.zeros((6, 7), np.uint8), "truth")
    with pytest.raises(WeakLabelError, match="dtype float"):
        weak.with_evaluation_labels(dense.astype(float), "truth")


# ---------------------------------------------------------------------------------------------------- shapes
def test_rectangle_gives_its_box_on_pixel_edges():
    weak = weak_labels_from_shapes([rect(1, 2, 4, 7)], ["rectangle"], (10, 12), layer="boxes")
    (obj,) = list(weak)
    assert obj.plane == () and obj.kind == "box" and obj.mask is None and obj.layer == "boxes"
    # napari's pixel centres are integers: +0.5 gives SAM's edges; x = column, y = row
    np.testing.assert_allclose(obj.box, [2.5, 1.5, 7.5, 4.5])
    assert obj.source == "shape 0" and weak.skipped == []
    # drawn exactly around pixels 1..4 (rows) and 2..7 (columns): the box encloses those pixels
    (tight,) = list(weak_labels_from_shapes([rect(0.5, 1.5, 4.5, 7.5)], "rectangle", (10, 12)))
    np.testing.assert_allclose(tight.box, [2, 1, 8, 5])


def test_polygon_gives_its_box_and_optionally_its_mask():
    vertices = np.array([[1.0, 1.0], [2.0, 8.0], [7.0, 5.0]])
    (plain,) = list(weak_labels_from_shapes([vertices], ["polygon"], (9, 10)))
    assert plain.kind == "box" and plain.mask is None
    np.testing.assert_allclose(plain.box, [1.5, 1.5, 8.5, 7.5])
    (coarse,) = list(weak_labels_from_shapes([vertices], ["polygon"], (9, 10), coarse_masks=True))
    expected = np.zeros((9, 10), bool)
    expected[fill_polygon(vertices[:, 0], vertices[:, 1], (9, 10))] = True
    assert coarse.kind == "coarse" and expected.sum() > 10
    np.testing.assert_array_equal(coarse.full_mask((9, 10)), expected)
    assert coarse.mask.shape[0] * coarse.mask.shape[1] < 90  # cropped, not the whole plane


def test_ellipse_box_is_the_ellipse_bounds_and_its_mask_is_the_inside():
    # napari stores an ellipse as the 4 corners of its bounding rectangle
    corners = rect(2, 3, 8, 13)
    (obj,) = list(weak_labels_from_shapes([corners], ["ellipse"], (12, 16), coarse_masks=True))
    np.testing.assert_allclose(obj.box, [3.5, 2.5, 13.5, 8.5], atol=1e-6)
    rows, cols = np.mgrid[:12, :16]
    inside = ((rows - 5) / 3) ** 2 + ((cols - 8) / 5) ** 2 < 0.97
    border = np.abs(((rows - 5) / 3) ** 2 + ((cols - 8) / 5) ** 2 - 1) < 0.1
    full = obj.full_mask((12, 16))
    assert (full[inside]).all() and not full[~inside & ~border].any()

    # rotated by 45 degrees: the box is the ellipse's, smaller than the rotated rectangle's bounds
    centre, a, b = np.array([10.0, 10.0]), np.array([4.0, 4.0]) / np.sqrt(2), np.array([-2.0, 2.0]) / np.sqrt(2)
    rotated = np.stack([centre - a - b, centre + a - b, centre + a + b, centre - a + b])
    (tilted,) = list(weak_labels_from_shapes([rotated], "ellipse", (20, 20)))
    half = np.sqrt(a**2 + b**2)  # = sqrt(10) on both axes
    np.testing.assert_allclose(tilted.box, [10.5 - half[1], 10.5 - half[0], 10.5 + half[1], 10.5 + half[0]],
                               rtol=1e-5)
    assert tilted.box[2] - tilted.box[0] < rotated[:, 1].max() - rotated[:, 1].min()


@pytest.mark.parametrize("shape_type", ["path", "line"])
def test_paths_and_lines_are_refused_naming_layer_and_shape(shape_type):
    shapes = [rect(1, 1, 3, 3), np.array([[1.0, 1.0], [5.0, 5.0]])]
    with pytest.raises(WeakLabelError, match=f"Shapes layer 'roi', shape 1 is a {shape_type}"):
        weak_labels_from_shapes(shapes, ["rectangle", shape_type], (10, 10), layer="roi")


def test_shapes_partly_outside_are_clipped_and_wholly_outside_skipped():
    shapes = [rect(-5, -5, 3, 4), rect(20, 20, 30, 30), rect(2, 2, 6, 40)]
    weak = weak_labels_from_shapes(shapes, "rectangle", (10, 12), layer="roi")
    boxes = [o.box.tolist() for o in weak]
    assert boxes == [[0, 0, 4.5, 3.5], [2.5, 2.5, 12, 6.5]]
    assert [o.source for o in weak] == ["shape 0", "shape 2"]
    assert len(weak.skipped) == 1 and weak.skipped[0].startswith("Shapes layer 'roi', shape 1: wholly outside")
    assert weak.summary().skipped == tuple(weak.skipped)
    # a clipped polygon's mask stays inside the plane
    (poly,) = list(weak_labels_from_shapes([np.array([[-4.0, -4], [-4, 5], [5, -4]])], "polygon", (10, 12),
                                           coarse_masks=True))
    assert poly.mask_origin == (0, 0) and poly.full_mask((10, 12))[0, 0]


def test_shapes_of_a_stack_land_on_their_planes():
    shapes = [rect(1, 1, 4, 4, 0), rect(2, 2, 5, 6, 2), rect(0, 0, 3, 3, 2), rect(1, 1, 2, 2, 7)]
    weak = weak_labels_from_shapes(shapes, "rectangle", (3, 10, 10), layer="cells")
    assert weak.planes() == [(0,), (2,)] and [len(weak.on_plane(p)) for p in weak.planes()] == [1, 2]
    assert [o.source for o in weak.on_plane((2,))] == ["shape 1", "shape 2"]
    assert weak.skipped == ["Shapes layer 'cells', shape 3: on plane (7,), which the image (planes (3,)) "
                            "does not have"]
    # time series of stacks: two leading axes
    weak4 = weak_labels_from_shapes([rect(1, 1, 4, 4, 1, 2)], "rectangle", (2, 3, 10, 10))
    assert weak4.planes() == [(1, 2)] and weak4.flat_plane_index((1, 2)) == 5


def test_shapes_bad_planes_and_empty_layers_have_clear_messages():
    with pytest.raises(WeakLabelError, match="Shapes layer 'roi' is empty"):
        weak_labels_from_shapes([], [], (10, 10), layer="roi")
    with pytest.raises(WeakLabelError, match=r"Shapes layer 'roi': no shape lies on the image .*plane \(5,\)"):
        weak_labels_from_shapes([rect(1, 1, 4, 4, 5)], "rectangle", (3, 10, 10), layer="roi")
    with pytest.raises(WeakLabelError, match="no shape lies on the image .*wholly outside"):
        weak_labels_from_shapes([rect(-9, -9, -5, -5)], "rectangle", (10, 10), layer="roi")
    with pytest.raises(WeakLabelError, match="shape 0: coordinate 1.5 on axis 0 is not a whole plane index"):
        weak_labels_from_shapes([rect(1, 1, 4, 4, 1.5)], "rectangle", (3, 10, 10), layer="roi")
    across = rect(1, 1, 4, 4, 0)
    across[2, 0] = 2
    with pytest.raises(WeakLabelError, match="shape 0 spans planes 0 to 2 of axis 0"):
        weak_labels_from_shapes([across], "rectangle", (3, 10, 10), layer="roi")
    with pytest.raises(WeakLabelError, match="shape 0 has 2 coordinate axes but the image has 3"):
        weak_labels_from_shapes([rect(1, 1, 4, 4)], "rectangle", (3, 10, 10), layer="roi")
    with pytest.raises(WeakLabelError, match="has 2 shapes but 1 shape types"):
        weak_labels_from_shapes([rect(1, 1, 4, 4), rect(1, 1, 4, 4)], ["rectangle"], (10, 10), layer="roi")


def test_shapes_layer_scale_and_translate_map_to_image_pixels():
    # a layer at half the image's pixel size, shifted by 10 pixels along x
    weak = weak_labels_from_shapes([rect(2, 4, 8, 12, 2)], "rectangle", (2, 10, 20), scale=(0.5, 0.5, 0.5),
                                   translate=(0, 0, 10))
    (obj,) = list(weak)
    assert obj.plane == (1,)
    np.testing.assert_allclose(obj.box, [12.5, 1.5, 16.5, 4.5])


# ---------------------------------------------------------------------------------------------------- points
def test_points_one_object_per_positive_with_the_planes_negatives():
    data = np.array([[2, 3], [6, 7], [1, 1], [8, 2]], float)
    weak = weak_labels_from_points(data, {"label": [True, True, False, False]}, (10, 10), layer="clicks")
    objs = list(weak)
    assert [o.kind for o in objs] == ["points", "points"] and [o.source for o in objs] == ["point 0", "point 1"]
    np.testing.assert_allclose(objs[0].positive, [[3.5, 2.5]])  # (x, y) on pixel edges
    np.testing.assert_allclose(objs[1].positive, [[7.5, 6.5]])
    for obj in objs:  # every negative of the plane goes with every object
        np.testing.assert_allclose(obj.negative, [[1.5, 1.5], [2.5, 8.5]])
        assert obj.box is None


@pytest.mark.parametrize("labels", [[1, 0, 1], ["positive", "negative", "Positive"], [True, False, True],
                                    ["pos", "background", "1"]])
def test_points_label_values_as_napari_features_carry_them(labels):
    features = pd.DataFrame({"label": labels})
    weak = weak_labels_from_points(np.array([[1, 1], [2, 2], [3, 3]], float), features, (5, 5))
    assert len(weak) == 2 and all(len(o.negative) == 1 for o in weak)


def test_points_without_label_are_all_positive_and_bad_labels_refused():
    weak = weak_labels_from_points(np.array([[1, 1], [2, 2]], float), None, (5, 5))
    assert len(weak) == 2 and all(len(o.negative) == 0 for o in weak)
    with pytest.raises(WeakLabelError, match="Points layer 'p': feature 'label' of point 1 is 'maybe'"):
        weak_labels_from_points(np.array([[1, 1], [2, 2]], float), {"label": ["pos", "maybe"]}, (5, 5), layer="p")
    with pytest.raises(WeakLabelError, match="has 2 points but its features have 3 rows"):
        weak_labels_from_points(np.array([[1, 1], [2, 2]], float), {"label": [1, 1, 0]}, (5, 5), layer="p")


def test_points_grouped_by_instance_per_plane():
    data = np.array([[0, 1, 1], [0, 2, 2], [0, 5, 5], [1, 3, 3], [1, 4, 4], [0, 6, 6]], float)
    features = {"label": [1, 1, 0, 1, 0, 0], "instance": ["a", "a", "a", "a", "b", "c"]}
    weak = weak_labels_from_points(data, features, (2, 8, 8), layer="clicks")
    assert weak.planes() == [(0,), (1,)]
    (a0,) = weak.on_plane((0,))
    assert a0.source == "instance 'a'"
    np.testing.assert_allclose(a0.positive, [[1.5, 1.5], [2.5, 2.5]])
    np.testing.assert_allclose(a0.negative, [[5.5, 5.5]])
    (a1,) = weak.on_plane((1,))  # same id on another plane: another object
    np.testing.assert_allclose(a1.positive, [[3.5, 3.5]])
    assert a1.negative.shape == (0, 2)
    assert sorted(weak.skipped) == [
        "Points layer 'clicks', instance 'b' on plane (1,): 1 negative point(s) and no positive one",
        "Points layer 'clicks', instance 'c' on plane (0,): 1 negative point(s) and no positive one"]
    with pytest.raises(WeakLabelError, match="feature 'instance' of point 1 is empty"):
        weak_labels_from_points(data[:2], {"instance": [1, None]}, (2, 8, 8))


def test_points_outside_dropped_negative_only_planes_skipped_and_no_positive_refused():
    data = np.array([[0, 2, 2], [0, 20, 2], [1, 3, 3], [4, 3, 3], [0, -1, 3]], float)
    features = {"label": [True, True, False, True, True]}
    weak = weak_labels_from_points(data, features, (2, 10, 10), layer="clicks")
    assert [o.source for o in weak] == ["point 0"] and weak.planes() == [(0,)]
    assert weak.skipped == ["Points layer 'clicks': 3 point(s) outside the image dropped (points 1, 3, 4)",
                            "Points layer 'clicks', plane (1,): 1 negative point(s) and no positive one"]
    with pytest.raises(WeakLabelError, match="Points layer 'neg' has no positive point"):
        weak_labels_from_points(data[:2], {"label": [0, 0]}, (2, 10, 10), layer="neg")
    with pytest.raises(WeakLabelError, match="Points layer 'far' has no positive point inside the image"):
        weak_labels_from_points(data[[1, 3]], None, (2, 10, 10), layer="far")
    with pytest.raises(WeakLabelError, match="Points layer 'none' is empty"):
        weak_labels_from_points(np.zeros((0, 3)), None, (2, 10, 10), layer="none")
    with pytest.raises(WeakLabelError, match="coordinate 0.5 on axis 0 is not a whole plane index"):
        weak_labels_from_points(np.array([[0.5, 2, 2]]), None, (2, 10, 10), layer="p")
    # the edge of the image: napari's pixel -0.5..W-0.5 is inside
    edge = weak_labels_from_points(np.array([[-0.5, -0.5], [9.49, 9.49], [9.5, 0]]), None, (10, 10))
    assert len(edge) == 2 and "points 2" in edge.skipped[0]


# ---------------------------------------------------------------------------------------------------- coarse
def coarse_stack():
    labels = np.zeros((2, 12, 10), np.uint16)
    labels[0, 1:4, 2:6] = 7
    labels[0, 6:11, 1:3] = 300
    labels[1, 2:5, 5:9] = 7
    return labels


def test_coarse_labels_one_object_per_id_per_plane():
    labels = coarse_stack()
    weak = weak_labels_from_coarse_labels(labels, labels.shape, layer="rough")
    assert weak.image_shape == (2, 12, 10) and weak.planes() == [(0,), (1,)]
    assert [o.source for o in weak] == ["label 7", "label 300", "label 7"]
    first, second, third = weak
    assert first.kind == "coarse" and first.layer == "rough"
    np.testing.assert_allclose(first.box, [2, 1, 6, 4])  # tight: min col, min row, max + 1
    np.testing.assert_allclose(second.box, [1, 6, 3, 11])
    np.testing.assert_allclose(third.box, [5, 2, 9, 5])
    for obj in weak:
        np.testing.assert_array_equal(obj.full_mask(weak.plane_shape), labels[obj.plane] == int(obj.source[6:]))
    assert weak.summary().per_plane == {(0,): {"box": 0, "points": 0, "coarse": 2},
                                        (1,): {"box": 0, "points": 0, "coarse": 1}}


def test_coarse_labels_bad_inputs():
    with pytest.raises(WeakLabelError, match="Labels layer 'rough' has no labelled pixel"):
        weak_labels_from_coarse_labels(np.zeros((5, 5), np.uint8), layer="rough")
    with pytest.raises(WeakLabelError, match=r"has shape \(5, 5\); expected the image's \(6, 5\)"):
        weak_labels_from_coarse_labels(np.ones((5, 5), np.uint8), (6, 5), layer="rough")
    with pytest.raises(WeakLabelError, match="dtype float"):
        weak_labels_from_coarse_labels(np.ones((5, 5)), layer="rough")
    with pytest.raises(WeakLabelError, match="negative ids"):
        weak_labels_from_coarse_labels(-np.ones((5, 5), np.int32), layer="rough")
    # a plane without background still gives its objects
    full = weak_labels_from_coarse_labels(np.full((4, 5), 9, np.uint8))
    (obj,) = list(full)
    assert obj.source == "label 9" and obj.mask.all() and obj.box.tolist() == [0, 0, 5, 4]


def test_points_are_drawn_afresh_from_the_mask_and_its_complement():
    labels = coarse_stack()
    weak = weak_labels_from_coarse_labels(labels)
    obj = weak.on_plane((0,))[0]  # label 7 on plane 0
    mask = obj.full_mask(weak.plane_shape)
    rng = np.random.default_rng(3)
    pos, neg = draw_points(obj, weak.plane_shape, rng, 5, 5)
    assert pos.shape == (5, 2) and neg.shape == (5, 2) and pos.dtype == neg.dtype == np.float32
    draws = [draw_points(obj, weak.plane_shape, rng, 50, 400) for _ in range(4)]
    all_pos = np.concatenate([p for p, _ in draws])
    all_neg = np.concatenate([n for _, n in draws])
    cols, rows = (all_pos - 0.5).astype(int).T
    assert mask[rows, cols].all() and np.all(all_pos % 1 == 0.5)
    cols, rows = (all_neg - 0.5).astype(int).T
    assert not mask[rows, cols].any()
    assert (labels[0][rows, cols] == 300).any()  # other objects belong to the complement, as in WeSAM
    assert len({(r, c) for r, c in zip(rows, cols)}) > 60  # spread over the plane
    assert not np.array_equal(draws[0][0], draws[1][0])  # afresh at every step
    again = draw_points(obj, weak.plane_shape, np.random.default_rng(3), 5, 5)
    np.testing.assert_array_equal(again[0], pos)
    np.testing.assert_array_equal(again[1], neg)
    assert [a.shape for a in draw_points(obj, weak.plane_shape, rng, 2, 0)] == [(2, 2), (0, 2)]


def test_negatives_of_a_large_mask_and_of_a_full_plane():
    labels = np.ones((10, 10), np.uint8)
    labels[9, 9] = 0
    (big,) = list(weak_labels_from_coarse_labels(labels))
    _, neg = draw_points(big, (10, 10), np.random.default_rng(0), 1, 20)
    np.testing.assert_array_equal(neg, np.full((20, 2), 9.5, np.float32))
    (whole,) = list(weak_labels_from_coarse_labels(np.ones((10, 10), np.uint8)))
    _, neg = draw_points(whole, (10, 10), np.random.default_rng(0), 5, 5)
    assert neg.shape == (0, 2)


def test_step_points_by_kind():
    rng = np.random.default_rng(0)
    (coarse,) = list(weak_labels_from_coarse_labels(np.pad(np.ones((3, 3), np.uint8), 2)))
    assert [a.shape for a in step_points(coarse, (7, 7), rng)] == [(5, 2), (5, 2)]
    clicked = WeakObject((), "points", positive=[[1, 2]], negative=[[3, 4], [5, 6]])
    pos, neg = step_points(clicked, (7, 7), rng)
    assert pos.tolist() == [[1, 2]] and neg.tolist() == [[3, 4], [5, 6]]
    box = WeakObject((), "box", [0, 0, 3, 3])
    assert [a.shape for a in step_points(box, (7, 7), rng)] == [(0, 2), (0, 2)]
    with pytest.raises(WeakLabelError, match="box prompt has no mask"):
        draw_points(box, (7, 7), rng)


# ------------------------------------------------------------------------------------------------------- CSV
class _Lazy:
    """napari's layers and writers, imported only by the tests that save a real layer."""

    def __getattr__(self, name):
        module = {"Points": "napari.layers", "Shapes": "napari.layers"}.get(name, "napari_builtins.io")
        return getattr(pytest.importorskip(module), name)


napari_layers = napari_io = _Lazy()


def save_layer(layer, path):
    """Save as napari does for File > Save Selected Layer(s) to .csv, with napari's own writer functions."""
    data, meta, kind = layer.as_layer_data_tuple()
    writer = {"points": napari_io.napari_write_points, "shapes": napari_io.napari_write_shapes}[kind]
    assert writer(str(path), data, meta) == str(path)
    return path


def test_napari_shapes_csv_round_trip(tmp_path):
    shapes = napari_layers.Shapes(
        [rect(1, 1, 4, 5, 0), np.array([[1, 2, 2], [1, 3, 8], [1, 8, 3]], float), rect(2, 2, 6, 8, 2)],
        shape_type=["rectangle", "polygon", "ellipse"], name="cells")
    path = save_layer(shapes, tmp_path / "cells.csv")
    header = path.read_text().splitlines()[0]
    assert header == "index,shape-type,vertex-index,axis-0,axis-1,axis-2"
    data, types = read_shapes_csv(path)
    assert types == ["rectangle", "polygon", "ellipse"] and csv_layer_kind(path) == "shapes"
    for ours, theirs in zip(data, shapes.data):
        np.testing.assert_allclose(ours, theirs)
    direct = weak_labels_from_shapes(shapes.data, shapes.shape_type, (3, 10, 10), layer="cells.csv",
                                     coarse_masks=True)
    from_file = weak_labels_from_csv(path, (3, 10, 10), coarse_masks=True)
    assert from_file.planes() == [(0,), (1,), (2,)] == direct.planes()
    for a, b in zip(from_file, direct):
        assert (a.plane, a.kind, a.source, a.layer) == (b.plane, b.kind, b.source, b.layer)
        np.testing.assert_allclose(a.box, b.box)
        np.testing.assert_array_equal(a.full_mask((10, 10)), b.full_mask((10, 10)))


def test_napari_points_csv_round_trip_with_features(tmp_path):
    points = napari_layers.Points(
        np.array([[0, 2, 3], [0, 5, 5], [1, 4, 4], [1, 7, 1]], float),
        features={"label": [True, False, True, True], "instance": [1, 1, 2, 3], "note": ["a", "b,c", "", "d"]},
        name="clicks")
    path = save_layer(points, tmp_path / "clicks.csv")
    assert path.read_text().splitlines()[0] == "index,axis-0,axis-1,axis-2,label,instance,note"
    data, features = read_points_csv(path)
    np.testing.assert_allclose(data, points.data)
    assert list(features.columns) == ["label", "instance", "note"]
    assert features["label"].tolist() == [True, False, True, True] and features["instance"].tolist() == [1, 1, 2, 3]
    assert csv_layer_kind(path) == "points"
    weak = weak_labels_from_csv(path, (2, 10, 10))
    assert [o.source for o in weak] == ["instance 1", "instance 2", "instance 3"]
    np.testing.assert_allclose(weak.on_plane((0,))[0].negative, [[5.5, 5.5]])
    # without features napari writes only the index and the axes (the index as a float)
    bare = save_layer(napari_layers.Points(np.array([[2.0, 3.0], [4.0, 4.0]])), tmp_path / "bare.csv")
    data, features = read_points_csv(bare)
    assert data.shape == (2, 2) and features.columns.tolist() == []
    assert len(weak_labels_from_csv(bare, (10, 10))) == 2


def test_csv_of_the_wrong_kind_or_layout_is_refused(tmp_path):
    shapes = save_layer(napari_layers.Shapes([rect(1, 1, 3, 3)], shape_type="rectangle"), tmp_path / "s.csv")
    points = save_layer(napari_layers.Points(np.array([[1.0, 1.0]])), tmp_path / "p.csv")
    with pytest.raises(WeakLabelError, match="p.csv' lacks column.*shape-type.*looks like a Points CSV"):
        read_shapes_csv(points)
    with pytest.raises(WeakLabelError, match="s.csv' is a Shapes CSV"):
        read_points_csv(shapes)
    with pytest.raises(WeakLabelError, match="s.csv' is a Shapes CSV"):
        weak_labels_from_csv(shapes, (10, 10), kind="points")
    odd = tmp_path / "odd.csv"
    odd.write_text("x,y,label\n1,2,True\n")
    with pytest.raises(WeakLabelError, match="odd.csv' has columns x, y, label; expected index, axis-0, axis-1"):
        read_points_csv(odd)
    with pytest.raises(WeakLabelError, match="odd.csv' has columns x, y, label; expected napari's Shapes layout"):
        weak_labels_from_csv(odd, (10, 10))
    words = tmp_path / "words.csv"
    words.write_text("index,axis-0,axis-1\n0,one,2\n")
    with pytest.raises(WeakLabelError, match="column 'axis-0' holds values that are not numbers"):
        read_points_csv(words)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(WeakLabelError, match="empty.csv' is empty"):
        read_points_csv(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("index,axis-0,axis-1,label\n")
    with pytest.raises(WeakLabelError, match="Points layer 'header.csv' is empty"):
        weak_labels_from_csv(header_only, (10, 10))
    line = tmp_path / "line.csv"
    line.write_text("index,shape-type,vertex-index,axis-0,axis-1\n0,line,0,1,1\n0,line,1,5,5\n")
    with pytest.raises(WeakLabelError, match="Shapes layer 'line.csv', shape 0 is a line"):
        weak_labels_from_csv(line, (10, 10))


# --------------------------------------------------------------------------------------------------- layering
def test_weak_labels_import_neither_torch_nor_napari_nor_qt():
    code = "import sys, json\nimport napari_convlora.weak\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    roots = {m.split(".")[0] for m in json.loads(out.splitlines()[-1])}
    assert not roots & {"torch", "napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy"}
    assert set(KINDS) == {"box", "points", "coarse"}


def test_a_csv_that_is_not_utf8_is_named_with_what_to_do(tmp_path):
    """A non-UTF-8 CSV gave a decode error naming neither the file nor the option (issue 21)."""
    latin = tmp_path / "points.csv"
    latin.write_bytes("index,axis-0,axis-1,label\n0,1,2,Zelle \u00e4\u00df\n".encode("latin-1"))
    with pytest.raises(WeakLabelError, match=r"Points CSV '.*points.csv' is not UTF-8 text .*save the Points layer"):
        read_points_csv(latin)


def test_shapes_csv_is_read_at_once_and_absurd_counts_are_refused(tmp_path, monkeypatch):
    """200,000 boxes took 17 minutes of silence (5 ms per shape in pandas, issue 21): the file is read in one pass
    (vertices sorted per shape as napari wrote them), and more shapes than weak labels can be are refused."""
    import time

    from napari_convlora.weak import csv_files

    rng = np.random.default_rng(0)
    lines = ["index,shape-type,vertex-index,axis-0,axis-1"]
    for i in range(20_000):
        y, x = rng.integers(0, 1000, 2)
        corners = [(y, x), (y, x + 5), (y + 5, x + 5), (y + 5, x)]
        for v in rng.permutation(4):  # vertex rows in any order: read back in vertex order
            lines.append(f"{i},rectangle,{v},{corners[v][0]},{corners[v][1]}")
    big = tmp_path / "boxes.csv"
    big.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    data, types = read_shapes_csv(big)
    assert time.perf_counter() - start < 10  # was minutes; about 0.05 s here
    assert len(data) == 20_000 and set(types) == {"rectangle"}
    assert data[0][:, 1].tolist()[:2] == [data[0][0, 1], data[0][0, 1] + 5]  # vertex 0 then vertex 1
    monkeypatch.setattr(csv_files, "MAX_SHAPES", 1000)
    with pytest.raises(WeakLabelError, match=r"boxes.csv' holds 20,000 shapes; at most 1,000 are read"):
        read_shapes_csv(big)
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("index,shape-type,vertex-index,axis-0,axis-1\n0,rectangle,0,1,1\n0,rectangle,1,1,3\n"
                     "1,polygon,0,1,1\n1,ellipse,1,2,2\n")
    with pytest.raises(WeakLabelError, match=r"shape 1 has several shape types \(polygon, ellipse\)"):
        read_shapes_csv(mixed)
