"""The uncertainty and suggestion layers on stacks (issue 25), without Qt: planes written one at a time and
remembered, suggestions placed on the plane asked for, refused on a plane never predicted or against training
labels of another shape, and the user's selection kept."""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_convlora._napari.uncertainty_layers import (labelled_pixels, predicted_planes, write_suggestions,
                                                        write_uncertainty)


@pytest.fixture
def stack_viewer():
    viewer = ViewerModel()
    viewer.add_image(np.zeros((4, 96, 96), np.uint8), name="stack", scale=(2.0, 0.5, 0.5))
    viewer.add_labels(np.zeros((4, 96, 96), np.uint8), name="stack labels")
    viewer.layers.selection.active = viewer.layers["stack labels"]
    return viewer


def _unsure_on(plane: int, where: tuple[slice, slice]) -> np.ndarray:
    unsure = np.zeros((4, 96, 96), np.uint8)
    unsure[plane][where] = 200
    return unsure


def test_planes_are_written_one_at_a_time_and_remembered(stack_viewer):
    image = stack_viewer.layers["stack"]
    layer = write_uncertainty(stack_viewer, image, _unsure_on(1, np.s_[10:40, 10:40]), planes=[1])
    assert predicted_planes(layer) == [1] and layer.data[1].max() == 200 and tuple(layer.scale) == (2.0, 0.5, 0.5)
    write_uncertainty(stack_viewer, image, _unsure_on(3, np.s_[50:80, 50:80]), planes=[3])
    assert predicted_planes(layer) == [1, 3]
    assert layer.data[1].max() == 200 and layer.data[3].max() == 200  # plane 1 kept
    assert stack_viewer.layers.selection.active is stack_viewer.layers["stack labels"]
    write_uncertainty(stack_viewer, image, _unsure_on(0, np.s_[0:5, 0:5]))
    assert predicted_planes(layer) is None  # the whole stack


def test_suggestions_land_on_the_plane_asked_for_and_refuse_a_plane_not_predicted(stack_viewer):
    image, labels = stack_viewer.layers["stack"], stack_viewer.layers["stack labels"]
    layer = write_uncertainty(stack_viewer, image, _unsure_on(2, np.s_[60:90, 5:35]), planes=[2])
    labelled = labelled_pixels(labels, 2, "sparse")
    assert labelled.shape == (96, 96) and not labelled.any()
    points = write_suggestions(stack_viewer, image, layer, 2, labelled)
    assert len(points.data) == 1 and points.data[0][0] == 2  # the plane
    assert 60 <= points.data[0][1] < 90 and 5 <= points.data[0][2] < 35
    assert tuple(points.scale) == (2.0, 0.5, 0.5)
    assert stack_viewer.layers.selection.active is labels
    with pytest.raises(ValueError, match="plane 1 of 'stack' has no prediction yet"):
        write_suggestions(stack_viewer, image, layer, 1, None)
    assert labelled_pixels(labels, 2, "dense") is None  # dense labels leave nothing out
    short = stack_viewer.add_labels(np.zeros((2, 96, 96), np.uint8), name="short")
    with pytest.raises(ValueError, match="'short'.*no plane to match the image's plane 3"):
        labelled_pixels(short, 3, "sparse")
