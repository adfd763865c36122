"""Where the model is unsure, from the dock (issue 25, item 2): Predict writes '<image> uncertainty' beside the
prediction without taking the user's selected layer, and "Suggest where to label" marks the most uncertain regions
nobody labelled in a Points layer, refusing in one line before any prediction."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import make_model, perturb_trainable

from dock_fixtures import _wait_idle
from napari_convlora.data.samples import CLASS_NAMES

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("isolated_settings", "one_torch_thread")]


@pytest.fixture
def model(tiny_checkpoint):
    return perturb_trainable(make_model(tiny_checkpoint, num_classes=3, input_size=64,
                                        class_names=tuple(CLASS_NAMES)), 0.3).eval()


def test_predict_writes_the_uncertainty_and_suggestions_avoid_what_was_painted(dock, viewer, model, qtbot):
    from napari.layers import Image, Points

    dock.model = model
    dock.predict_image.refresh("cells")
    assert dock.suggest_where_to_label() is None
    assert "predict 'cells' first" in dock.log.toPlainText().splitlines()[-1]
    painted = viewer.layers["cells labels"]
    viewer.layers.selection.active = painted
    dock.predict()
    _wait_idle(dock, qtbot)
    unsure = viewer.layers["cells uncertainty"]
    assert isinstance(unsure, Image) and unsure.data.shape == viewer.layers["cells"].data.shape
    assert unsure.data.dtype == np.uint8 and tuple(unsure.contrast_limits) == (0, 255)
    assert float(unsure.data.std()) > 0  # not a constant
    assert "and 'cells uncertainty'" in dock.log.toPlainText()
    assert viewer.layers.selection.active is painted  # the user's layer stays selected
    layers = [layer.name for layer in viewer.layers]
    assert layers.index("cells") < layers.index("cells uncertainty") < layers.index("cells prediction")

    dock.data_form.label_mode.setCurrentIndex(dock.data_form.label_mode.findData("sparse"))
    labels = np.zeros_like(painted.data)
    most = np.unravel_index(int(np.argmax(unsure.data)), unsure.data.shape)
    labels[max(most[0] - 20, 0):most[0] + 20, max(most[1] - 20, 0):most[1] + 20] = 1  # a stroke there
    painted.data = labels
    count = dock.suggest_where_to_label()
    points = viewer.layers["cells suggestions"]
    assert isinstance(points, Points) and count == len(points.data) >= 1
    assert all(labels[int(y), int(x)] == 0 for y, x in points.data)
    assert "where labelling would help most" in dock.log.toPlainText().splitlines()[-1]
    assert viewer.layers.selection.active is painted
    assert np.array_equal(painted.data, labels)  # nothing of the user's painting is written
