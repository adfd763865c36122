"""HQ-SAM in the dock: an HQ-SAM checkpoint proposes HQ, the HQ-SAM method cannot run without it, training and
prediction on it, and a trained model sets (and locks) its HQ mode while training continues from it."""

from __future__ import annotations

import numpy as np
import pytest

from dock_fixtures import _train, _wait_idle
from napari_convlora.config.choices import HQ_MODES, METHODS

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("isolated_settings")]


def _choose(dock, qtbot, checkpoint):
    dock.model_form.sam.set_path(str(checkpoint))
    _wait_idle(dock, qtbot, 30_000)


def test_an_hq_checkpoint_proposes_hq_and_a_plain_one_turns_it_off(dock, qtbot, tiny_hq_checkpoint, tiny_checkpoint):
    form = dock.model_form
    assert form.hq_mode() == "off"
    _choose(dock, qtbot, tiny_hq_checkpoint)
    assert form.hq_mode() == "sam+hq" and form.info.text().startswith("HQ-SAM")
    _choose(dock, qtbot, tiny_checkpoint)
    assert form.hq_mode() == "off" and form.info.text().startswith("SAM")


def test_the_hq_method_needs_hq_and_freezes_the_adapter_options(dock):
    form = dock.model_form
    form.method.setCurrentIndex(METHODS.index("hq"))
    assert form.hq_mode() == "sam+hq"
    assert not form.hq.model().item(HQ_MODES.index("off")).isEnabled()
    assert not form.rank.isEnabled() and not form.experts.isEnabled()
    assert dock.recipe().hq == "sam+hq" and dock.recipe().adapter.method == "hq"
    form.method.setCurrentIndex(METHODS.index("lora"))
    assert form.hq.model().item(HQ_MODES.index("off")).isEnabled() and form.rank.isEnabled()
    assert "finer boundaries" in form.hq.toolTip()


def test_train_and_predict_on_an_hq_checkpoint_then_continue_from_the_model(dock, viewer, qtbot, tiny_hq_checkpoint):
    form = dock.model_form
    _choose(dock, qtbot, tiny_hq_checkpoint)
    form.input_size.setValue(128)
    form.method.setCurrentIndex(METHODS.index("conv_lora"))
    form.hq.setCurrentIndex(HQ_MODES.index("hq"))
    _train(dock, qtbot)
    assert dock.model.config.head.hq == "hq" and dock.model.hq is not None
    assert "HQ only" in form.info.text() or form.continues()
    dock.predict()
    _wait_idle(dock, qtbot)
    prediction = np.asarray(viewer.layers["cells prediction"].data)
    assert prediction.shape == viewer.layers["cells"].data.shape
    # continuing from the model: its HQ mode is its own and cannot be changed
    assert form.continues() and form.hq_mode() == "hq" and not form.hq.isEnabled()
    assert "set by the current model" in form.hq.toolTip()
    _train(dock, qtbot)
    assert dock.model.config.head.hq == "hq"
