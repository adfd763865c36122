"""The dock's test fixtures (a pytest plugin named in conftest.py): settings in a temporary folder, a viewer
with the synthetic sample, the dock on a tiny SAM set up to train quickly on the CPU, and waiting helpers."""

from __future__ import annotations

import pytest

# The main thread of a test process builds tiny SAMs: load torch, torchvision and triton before any OpenGL
# context exists (see _napari/native_libs.py). The plugin itself never imports torch there.
import segment_anything  # noqa: F401
from napari_convlora.data.samples import CLASS_NAMES, synthetic_cells

STEPS = 6


@pytest.fixture
def isolated_settings(tmp_path):
    from qtpy.QtCore import QSettings

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "settings"))
    yield tmp_path / "settings"


@pytest.fixture
def viewer(tiny_checkpoint, make_napari_viewer, isolated_settings):
    viewer = make_napari_viewer()
    image, labels = synthetic_cells(160, seed=0)
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="cells labels")
    return viewer


def _idle(widget):
    return not widget.workers


@pytest.fixture
def dock(viewer, tiny_checkpoint, tmp_path, qtbot):
    _, widget = viewer.window.add_plugin_dock_widget("napari-convlora", "Conv-LoRA fine-tuning")
    qtbot.waitUntil(lambda: _idle(widget), timeout=30_000)  # the device probe
    widget.model_form.sam.set_path(str(tiny_checkpoint))
    qtbot.waitUntil(lambda: _idle(widget), timeout=30_000)
    widget.model_form.input_size.setValue(128)
    widget.model_form.device.setCurrentIndex(3)  # CPU
    widget.data_form.length.setValue(STEPS)
    widget.data_form.options.grad_accum.value = 1
    widget.data_form.options.lr.value = 1e-3
    widget.data_form.class_names.setText(", ".join(CLASS_NAMES))
    widget.data_form.options.run_folder.value = tmp_path / "runs"
    return widget


def _wait_idle(widget, qtbot, timeout=120_000):
    """Wait for the dock's jobs to end (its ``finished`` handlers have run then)."""
    qtbot.waitUntil(lambda: _idle(widget), timeout=timeout)


def _train(widget, qtbot, resume=False):
    assert widget.train(resume=resume) is not None
    _wait_idle(widget, qtbot)
    assert widget.events_seen[-1] in ("finished", "stopped")
