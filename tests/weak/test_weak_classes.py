"""The bridge from prompted instances to the prompt-free head, without Qt: each weak object's class from its layer's
``class`` feature, and instances -> a multi-class label image whose features name the values."""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_convlora.weak import (
    WeakObject,
    weak_labels_from_coarse_labels,
    weak_labels_from_points,
    weak_labels_from_shapes,
)
from napari_convlora.weak.classes import class_features, class_labels_from_instances, object_class


def _rect(r0, c0, r1, c1):
    return np.array([[r0, c0], [r0, c1], [r1, c1], [r1, c0]], float)


def test_classes_come_from_the_row_of_each_shape_point_instance_and_label():
    shapes = weak_labels_from_shapes([_rect(1, 1, 5, 5), _rect(10, 10, 15, 15)], "rectangle", (20, 20), layer="boxes")
    table = pd.DataFrame({"class": ["nucleus", "rod"]})
    assert [object_class(o, table) for o in shapes] == ["nucleus", "rod"]

    # one point outside the image is dropped: the others keep their own rows
    points = weak_labels_from_points(np.array([[30, 30], [2, 2], [12, 12]]), None, (20, 20), layer="points")
    table = pd.DataFrame({"class": ["x", "nucleus", "rod"]})
    assert [object_class(o, table) for o in points] == ["nucleus", "rod"]

    grouped = pd.DataFrame({"instance": [7, 7, 3], "label": [True, False, True], "class": ["rod", None, "nucleus"]})
    points = weak_labels_from_points(np.array([[2, 2], [4, 4], [12, 12]]), grouped, (20, 20), layer="points")
    assert sorted(object_class(o, grouped) for o in points) == ["nucleus", "rod"]

    coarse = np.zeros((20, 20), np.uint8)
    coarse[1:4, 1:4], coarse[10:14, 10:14] = 2, 5
    weak = weak_labels_from_coarse_labels(coarse, layer="coarse")
    table = pd.DataFrame({"index": [0, 2, 5], "class": ["background", "rod", "nucleus"]})
    assert [object_class(o, table) for o in weak] == ["rod", "nucleus"]


def test_objects_without_a_class_feature_have_none():
    obj = WeakObject((), "box", box=np.array([0, 0, 4, 4]), source="shape 0")
    assert object_class(obj, None) is None
    assert object_class(obj, pd.DataFrame({"name": ["a"]})) is None
    assert object_class(obj, pd.DataFrame({"class": [""]})) is None
    assert object_class(WeakObject((), "box", box=np.array([0, 0, 4, 4]), source="shape 9"),
                        pd.DataFrame({"class": ["a"]})) is None


def test_instances_become_class_values_named_in_sorted_order():
    instances = np.array([[0, 1, 1], [2, 0, 3], [4, 4, 0]], np.int32)
    labels, names = class_labels_from_instances(instances, {1: "rod", 2: "nucleus", 3: "rod", 4: None})
    assert names == ("background", "nucleus", "object", "rod")
    assert labels.dtype == np.uint8
    assert labels.tolist() == [[0, 3, 3], [1, 0, 3], [2, 2, 0]]
    features = class_features(names)
    assert features["index"].tolist() == [0, 1, 2, 3] and features["class"].tolist() == list(names)


def test_without_classes_every_instance_is_one_class():
    instances = np.zeros((2, 4, 4), np.int32)
    instances[0, :2, :2], instances[1, 2:, 2:] = 1, 9
    labels, names = class_labels_from_instances(instances, {})
    assert names == ("background", "object")
    assert set(np.unique(labels)) == {0, 1} and labels.shape == instances.shape
    assert (labels > 0).sum() == (instances > 0).sum()
