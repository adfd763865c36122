"""Instances of touching objects from the dock (issue 23, item 6): instance labels painted in a Labels layer train
an instance head with the dock's defaults, and Predict writes the head's objects, saying how they were found."""

from __future__ import annotations

import numpy as np

from dock_fixtures import _train, _wait_idle


def test_instance_labels_train_a_head_and_predict_separates_objects(dock, viewer, qtbot):
    from skimage.draw import disk

    ids = np.zeros((160, 160), np.uint16)
    image = np.full((160, 160), 30.0, np.float32)
    count = 0
    for cy in range(16, 150, 26):
        for cx in range(16, 150, 21):  # neighbours in a row touch
            count += 1
            rr, cc = disk((cy, cx), 11, shape=ids.shape)
            ids[rr, cc] = count
            image[rr, cc] = 160
    viewer.layers["cells"].data = image
    viewer.layers["cells labels"].data = ids
    dock.data_form.class_names.setText("")
    dock.data_form.label_mode.setCurrentIndex(dock.data_form.label_mode.findData("instances"))
    _train(dock, qtbot)
    assert dock.model.instance_head is not None  # the default for instance labels
    assert "objects F1@0.5" in dock.log.toPlainText()  # validation scores objects
    dock.predict_image.refresh("cells")
    dock.panel.instances.setChecked(True)
    assert dock.panel.instance_method.isEnabled() and dock.panel.instance_method.currentData() == "auto"
    dock.predict()
    _wait_idle(dock, qtbot)
    assert "'cells instances' (instance head)" in dock.log.toPlainText()
    instances = viewer.layers["cells instances"].data
    assert instances.shape == ids.shape
    dock.panel.evaluate_labels.refresh("cells labels")
    assert dock.evaluate() is not None
    _wait_idle(dock, qtbot)
    assert "Objects (head): F1@0.5" in dock.view.scores.caption.text()
    assert "objects F1@0.5" in dock.log.toPlainText().splitlines()[-1]
    dock.panel.instance_method.setCurrentIndex(dock.panel.instance_method.findData("components"))
    dock.predict()
    _wait_idle(dock, qtbot)
    assert "'cells instances' (connected components)" in dock.log.toPlainText()
    dock.panel.instance_method.setCurrentIndex(dock.panel.instance_method.findData("everything"))
    dock.predict()  # no head needed: SAM's grid of point prompts on the adapted encoder
    _wait_idle(dock, qtbot)
    assert "'cells instances' (segment everything (SAM's grid of points))" in dock.log.toPlainText()
    assert viewer.layers["cells instances"].data.shape == ids.shape  # what it finds: tests/prediction/test_everything.py


def test_a_lazy_image_refuses_the_head_in_one_line(dock, viewer, qtbot):
    """Block-by-block prediction finds objects as connected components: asking for the head there is refused."""
    import dask.array as da

    viewer.add_image(da.from_array(viewer.layers["cells"].data, chunks=64), name="lazy")
    dock.model = object()  # any model: the refusal comes first
    dock.predict_image.refresh("lazy")
    dock.panel.instances.setChecked(True)
    dock.panel.instance_method.setCurrentIndex(dock.panel.instance_method.findData("head"))
    assert dock.predict() is None
    assert "'lazy' is held lazily and predicted block by block" in dock.log.toPlainText().splitlines()[-1]
