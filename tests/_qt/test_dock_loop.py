"""The dock as a microscopist meets it (issue 10): defaults from the checkpoint and the machine, files checked
when chosen, no lost annotations, training that continues the current model, and what a run or a prediction
shows (speed, per-class scores, the best step, pixel counts, colours)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from qtpy.QtWidgets import QPushButton

from dock_fixtures import STEPS, _train, _wait_idle
from napari_convlora.data.samples import CLASS_NAMES

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("isolated_settings")]


def test_input_size_is_proposed_from_the_checkpoint_and_the_device(dock):
    """It stayed at 1024 whatever the checkpoint and device: a first CPU step took 248 s (item 2)."""
    form = dock.model_form
    form.device.setCurrentIndex(0)  # automatic
    form.set_devices({"cpu": True, "cuda": False, "mps": False})
    form.suggest_input_size(1024)
    assert form.input_size.value() == 256 and "CPU" in form.input_size.toolTip()
    form.set_devices({"cpu": True, "cuda": True, "mps": False})  # automatic now means the GPU
    assert form.input_size.value() == 1024 and "GPU" in form.input_size.toolTip()
    form.input_size.setValue(512)  # chosen by hand: a device change keeps it
    form.device.setCurrentIndex(3)
    assert form.input_size.value() == 512


def test_the_progress_line_shows_speed_and_a_slow_run_is_pointed_out(dock, monkeypatch):
    """Steps per second in the progress line, the time left in words, and a warning once when a run would
    take hours (items 1, 2, 11)."""
    from napari_convlora._napari.jobs import StepBatch
    from napari_convlora.training.events import TrainingEvent

    told = []
    monkeypatch.setattr("napari_convlora._qt.widget.show_info", told.append)
    dock.model_form.input_size.setValue(512)
    view = dock.view
    view.start_training()
    view.show_event(TrainingEvent("start", 0, 5000, message="training"))
    for step in (1, 2, 3):
        view.show_event(StepBatch([TrainingEvent("step", step, 5000, loss=0.5, eta_s=(5000 - step) * 4.0)]))
        view.draw()
    text = dock.progress.text()
    assert "0.2 steps/s" not in text and "4 s/step" in text and "about 5 h 33 min left" in text
    assert len(told) == 1 and "the run needs 5 h" in told[0] and "smaller input size" in told[0]
    view.show_event(StepBatch([TrainingEvent("step", 10, 100, loss=0.5, eta_s=90 / 3.0)]))
    view.draw()
    assert "3.0 steps/s" in dock.progress.text() and "about 30 s left" in dock.progress.text()
    assert dock.plot.loss_plot.getAxis("bottom").autoSIPrefix is False  # an empty axis read "step (x0.001)"


def test_boundary_iou_is_a_column_of_the_scores_and_a_second_validation_curve(dock):
    """HQ-SAM's boundary IoU beside mIoU: per class in the table (background not scored), its mean in the last
    row, a second line under the loss named in the legend, and nothing for a record without it."""
    from napari_convlora.training.events import TrainingEvent

    view, plot = dock.view, dock.plot
    view.start_training()
    view.show_event(TrainingEvent("start", 0, 10, message="training"))
    assert [label.text for _, label in plot.legend.items] == ["mIoU"]
    metrics = {"per_class_iou": [0.9, 0.6, 0.3], "per_class_dice": [0.95, 0.75, 0.46], "per_class_pixels": [80, 15, 5],
               "mean_iou": 0.6, "mean_dice": 0.72, "num_pixels": 100, "mean_iou_foreground": 0.45,
               "pixel_accuracy": 0.9, "per_class_boundary_iou": [None, 0.42, None], "boundary_iou": 0.42}
    view.show_event(TrainingEvent("validation", 0, 10, metrics=metrics), CLASS_NAMES)
    view.show_event(TrainingEvent("validation", 5, 10, metrics={**metrics, "per_class_boundary_iou": [None, 0.5, 0.25],
                                                                "boundary_iou": 0.375}), CLASS_NAMES)
    view.draw()
    header = [view.scores.table.horizontalHeaderItem(c).text() for c in range(view.scores.table.columnCount())]
    assert header == ["class", "IoU", "Dice", "boundary IoU", "pixels"]
    assert [row[3] for row in view.scores.rows()] == ["–", "50.0%", "25.0%", "37.5%"]
    xs, ys = plot.boundary_curve.getData()
    assert list(xs) == [0, 5] and list(ys) == [0.42, 0.375]
    assert list(plot.miou_curve.getData()[1]) == [0.6, 0.6]
    assert [label.text for _, label in plot.legend.items] == ["mIoU", "boundary IoU"]
    assert "boundary IoU 37.5%" in dock.log.toPlainText()

    view.show_event(TrainingEvent("start", 0, 10, message="again"))  # a new run, validated without boundary IoU
    old = {k: v for k, v in metrics.items() if "boundary" not in k}
    view.show_event(TrainingEvent("validation", 0, 10, metrics=old), CLASS_NAMES)
    view.draw()
    assert plot.boundary_curve.getData()[0] is None or len(plot.boundary_curve.getData()[0]) == 0
    assert [label.text for _, label in plot.legend.items] == ["mIoU"]
    assert [row[3] for row in view.scores.rows()] == ["–"] * 4


def test_a_file_that_is_not_a_checkpoint_is_marked_when_chosen_and_not_remembered(dock, qtbot, tmp_path):
    """A bad path was remembered and accepted, failing only after data preparation with misleading words
    (a TIFF was called a pickle) (item 5)."""
    import tifffile

    from napari_convlora._qt.fields import settings

    bad = tmp_path / "cells.tif"
    tifffile.imwrite(bad, np.zeros((8, 8), np.uint8))
    dock.model_form.sam.set_path(str(bad))
    _wait_idle(dock, qtbot)
    assert "this is a TIFF image, not a model checkpoint" in (dock.model_form.sam.error or "")
    assert "border" in dock.model_form.sam.edit.styleSheet()
    assert not settings().value("sam_checkpoint")
    assert dock.train() is None
    assert "the SAM checkpoint cannot be used" in dock.log.toPlainText()


def test_the_built_in_model_lets_the_dock_be_tried_without_a_checkpoint(dock, qtbot, tmp_path):
    dock.model_form.sam.set_path("", emit=False)
    dock.use_builtin_model()
    _wait_idle(dock, qtbot)
    path = dock.model_form.sam.path()
    assert path.endswith("small_sam_256.pth") and "built-in small SAM" in dock.log.toPlainText()
    assert dock.model_form.sam.error is None and "SAM small, 256 px, 3.8 M parameters" in dock.model_form.info.text()
    assert dock.model_form.input_size.value() == 256
    assert "generated images" in dock.model_form.builtin.toolTip() and "segment-anything" in dock.model_form.sam.toolTip()


def test_every_button_says_what_it_does_and_advanced_has_its_own_tab(dock):
    """Buttons had no tooltips; opening Advanced pushed Predict below the fold (item 11)."""
    untipped = [b.text() for b in dock.findChildren(QPushButton) if not b.toolTip() and b.text() not in ("…", "✕")]
    assert untipped == []
    tabs = [dock.setup.tabText(i) for i in range(dock.setup.count())]
    assert tabs == ["Model", "Training data", "Advanced", "Weak labels"]


def test_continue_training_the_current_model_and_see_its_scores(dock, viewer, qtbot):
    """"Train again" started from the base SAM (item 7); the form did not follow the model (item 4); metrics
    were log lines only (item 9)."""
    _train(dock, qtbot)
    form = dock.model_form
    assert form.continues() and form.start_from.currentData() == "model"
    assert not form.input_size.isEnabled() and form.input_size.value() == 128  # set by the model, locked
    assert "set by the current model" in form.input_size.toolTip()
    rows = dock.view.scores.rows()
    assert [r[0] for r in rows] == [*CLASS_NAMES, "mean"] and all(r[1].endswith("%") or r[1] == "–" for r in rows)
    best = dock.plot.best_step()
    assert best is not None and ".best.safetensors" in dock.view.scores.caption.text()
    assert f"step {best}" in dock.view.scores.caption.text()
    first_run = dock.run_path
    last = [line for line in dock.log.toPlainText().splitlines() if line.startswith(f"step {STEPS}: validation")][-1]

    _train(dock, qtbot)  # again: continues the model just trained, into a new file
    log = dock.log.toPlainText()
    assert f"training {first_run.split('/')[-1]} further" in log and dock.run_path != first_run
    before = [line for line in log.splitlines() if line.startswith("step 0: validation")][-1]
    assert before.split("validation ")[1].split(" (")[0] == last.split("validation ")[1].split(" (")[0]

    form.start_from.setCurrentIndex(0)  # fresh adapters: the fields are free again
    assert form.input_size.isEnabled() and not form.continues()


def test_copy_fills_unpainted_pixels_and_asks_before_replacing_painted_ones(dock, viewer, qtbot):
    """"Copy to training labels" overwrote every painted pixel, without asking (item 6). In sparse mode 0 is not
    annotated (dense mode: see the next test)."""
    _train(dock, qtbot)
    dock.data_form.label_mode.setCurrentIndex(dock.data_form.label_mode.findData("sparse"))
    dock.predict_image.refresh("cells")
    dock.predict()
    _wait_idle(dock, qtbot)
    labels = viewer.layers["cells labels"]
    painted = np.zeros(labels.data.shape, bool)
    painted[:40] = True
    labels.data = np.where(painted, 7, 0).astype(labels.data.dtype)
    prediction = np.asarray(viewer.layers["cells prediction"].data)
    changed = dock.copy_to_training_labels()
    assert (labels.data[painted] == 7).all()  # what was painted stays
    assert changed == int((prediction[~painted] != 0).sum())
    assert (labels.data[~painted] == prediction[~painted]).all()

    asked = []
    dock.confirm = lambda question: asked.append(question) or False
    assert dock.copy_to_training_labels("all") is None and (labels.data[painted] == 7).all()
    assert "Replace" in asked[0] and "Ctrl+Z" in asked[0]
    dock.confirm = lambda question: True
    dock.copy_to_training_labels("all")
    assert (labels.data == prediction).all()
    labels.undo()
    assert (labels.data[painted] == 7).all()



def test_copy_in_dense_mode_asks_before_replacing_painted_background(dock, viewer):
    """In dense mode 0 is painted background: Copy filled it with a bad prediction without asking (issue 21,
    item 1). Every pixel whose value would change is asked for, with the count; no leaves the layer untouched."""
    from napari_convlora._napari.layers import write_prediction

    assert dock.data_form.mode() == "dense"
    labels = viewer.layers["cells labels"]
    before = np.array(labels.data, copy=True)
    bad = np.where(before == 0, 1, before).astype(np.uint8)  # a prediction that fills the background
    background = int((before == 0).sum())
    assert 0 < background < before.size
    write_prediction(viewer, viewer.layers["cells"], bad, (0, 1, 2), CLASS_NAMES)
    dock.predict_image.refresh("cells")
    asked = []
    dock.confirm = lambda question: asked.append(question) or False
    for mode in (None, "all"):  # the copy mode's default (fill unpainted pixels only) and "replace painted too"
        assert dock.copy_to_training_labels(mode) is None
        assert np.array_equal(labels.data, before)
        assert f"Replace {background:,} painted pixels of 'cells labels'" in asked[-1] and "dense" in asked[-1]
    assert len(asked) == 2 and "nothing copied" in dock.log.toPlainText()

    dock.confirm = lambda question: True
    assert dock.copy_to_training_labels() == background and np.array_equal(labels.data, bad)
    labels.undo()
    assert np.array_equal(labels.data, before)

    dock.data_form.label_mode.setCurrentIndex(dock.data_form.label_mode.findData("sparse"))  # 0: not annotated
    dock.confirm = lambda question: pytest.fail(f"asked in sparse mode: {question}")
    assert dock.copy_to_training_labels() == background and np.array_equal(labels.data, bad)


def test_save_never_writes_over_the_models_base_checkpoint(dock, viewer, qtbot, tmp_path, other_tiny_checkpoint,
                                                           monkeypatch):
    """The dock refused the SAM checkpoint chosen in its field, but not the one the model was built on once another
    was chosen (issue 21, item 4): Save and Export bundle refuse it in one line naming the file; it stays as it was."""
    import shutil

    shown = []
    monkeypatch.setattr("napari_convlora._qt.widget.show_error", shown.append)
    base = tmp_path / "sam" / "tiny_sam.pth"
    base.parent.mkdir()
    shutil.copy(dock.model_form.sam.path(), base)
    dock.model_form.sam.set_path(str(base))
    _wait_idle(dock, qtbot)
    _train(dock, qtbot)
    dock.model_form.sam.set_path(str(other_tiny_checkpoint))  # another SAM chosen after training
    _wait_idle(dock, qtbot)
    original = base.read_bytes()
    for bundle in (False, True):
        shown.clear()
        dock.save(bundle=bundle, path=str(base))
        _wait_idle(dock, qtbot)
        assert base.read_bytes() == original
        assert len(shown) == 1 and f"the file chosen {base} is the SAM checkpoint" in shown[0] and "\n" not in shown[0]
    assert f"saved {base}" not in dock.log.toPlainText()
    dock.save(path=str(tmp_path / "adapter.safetensors"))
    _wait_idle(dock, qtbot)
    assert f"saved {tmp_path / 'adapter.safetensors'}" in dock.log.toPlainText()


def test_prediction_shows_class_counts_warns_of_absent_classes_and_keeps_the_training_colours(dock, viewer, qtbot,
                                                                                                 monkeypatch):
    """An empty prediction gave no feedback (item 8); predictions had colours of their own (item 10)."""
    from napari.utils.colormaps import DirectLabelColormap

    from napari_convlora._napari.jobs import PredictResult

    told = []
    monkeypatch.setattr("napari_convlora._qt.widget.show_info", told.append)
    viewer.layers["cells labels"].colormap = DirectLabelColormap(
        color_dict={None: "transparent", 0: "transparent", 1: "#00ff00", 2: "#0000ff"})
    shape = viewer.layers["cells"].data.shape
    empty = np.zeros(shape, np.uint8)
    dock._predicted(PredictResult("cells", empty, None, (0, 1, 2), tuple(CLASS_NAMES), 0))
    legend = dock.panel.legend.text()
    assert f"{CLASS_NAMES[1]}: 0 px" in legend and "absent" in legend
    assert told and f"no {CLASS_NAMES[1]} and no {CLASS_NAMES[2]}" in told[-1]
    labels = empty.copy()
    labels[:10] = 1
    labels[10:12] = 2
    told.clear()
    dock._predicted(PredictResult("cells", labels, None, (0, 1, 2), tuple(CLASS_NAMES), 0))
    assert not told and f"{CLASS_NAMES[1]}: {10 * shape[1]:,} px" in dock.panel.legend.text()
    cmap = viewer.layers["cells prediction"].colormap
    assert np.allclose(cmap.map(np.array([1]))[0][:3], [0, 1, 0]) and np.allclose(cmap.map(np.array([2]))[0][:3],
                                                                                  [0, 0, 1])
    assert "<b>cells prediction</b>" in dock.panel.legend.text()
    viewer.add_image(viewer.layers["cells"].data, name="unpaired")  # not under Training data: the same colours
    dock._predicted(PredictResult("unpaired", labels, None, (0, 1, 2), tuple(CLASS_NAMES), 0))
    assert np.allclose(viewer.layers["unpaired prediction"].colormap.map(np.array([2]))[0][:3], [0, 0, 1])


def test_class_names_come_from_the_labels_layers_features(dock, viewer, qtbot):
    """Class names were typed again although the Labels layer named its values (item 10)."""
    dock.data_form.class_names.setText("")
    viewer.layers["cells labels"].features = pd.DataFrame({"index": [0, 1, 2], "class": ["bg", "blob", "stick"]})
    _train(dock, qtbot)
    assert "class names from the Labels layers' features: bg, blob, stick" in dock.log.toPlainText()
    assert tuple(dock.model.config.head.class_names) == ("bg", "blob", "stick")


def test_evaluate_and_instances_from_the_dock(dock, viewer, qtbot):
    """An Evaluate action on a chosen Image + Labels pair (item 9) and instance output (item 12)."""
    _train(dock, qtbot)
    dock.predict_image.refresh("cells")
    dock.panel.evaluate_labels.refresh("cells labels")
    assert dock.evaluate() is not None
    _wait_idle(dock, qtbot)
    assert "Evaluation of 'cells' against 'cells labels'" in dock.view.scores.caption.text()
    assert "evaluated 'cells' against 'cells labels': mIoU" in dock.log.toPlainText()
    dock.panel.instances.setChecked(True)
    dock.predict()
    _wait_idle(dock, qtbot)
    instances = viewer.layers["cells instances"].data
    prediction = viewer.layers["cells prediction"].data
    assert instances.shape == prediction.shape and ((instances > 0) == (prediction > 0)).all()


def test_predict_files_from_the_dock(dock, qtbot, tmp_path):
    """Many images: predict a list of files, one output per input, a bad file skipped (item 13)."""
    import tifffile

    from napari_convlora.data.samples import synthetic_cells

    _train(dock, qtbot)
    for seed in (1, 2):
        tifffile.imwrite(tmp_path / f"new{seed}.tif", synthetic_cells(96, seed=seed)[0])
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    paths = [str(tmp_path / n) for n in ("new1.tif", "broken.tif", "new2.tif")]
    assert dock.predict_files(paths, str(tmp_path / "out")) is not None
    _wait_idle(dock, qtbot)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new1_labels.tif", "new2_labels.tif"]
    log = dock.log.toPlainText()
    assert "[2/3] broken.tif: skipped" in log and "predicted 2 of 3 image(s)" in log and "1 failed: broken.tif" in log


def test_export_for_the_model_zoo_from_the_dock(dock, qtbot, tmp_path):
    """Models that leave the plugin (item 14): the package's test image is cut from the chosen image."""
    import zipfile

    pytest.importorskip("bioimageio.spec")
    _train(dock, qtbot)
    dock.predict_image.refresh("cells")
    assert dock.export_model_zoo(str(tmp_path / "cells.txt")) is not None  # refused in the job: not a .zip
    _wait_idle(dock, qtbot)
    assert "a BioImage Model Zoo package is a .zip file" in dock.log.toPlainText()
    dock.export_model_zoo(str(tmp_path / "cells-model.zip"))
    _wait_idle(dock, qtbot)
    names = zipfile.ZipFile(tmp_path / "cells-model.zip").namelist()
    assert {"rdf.yaml", "test_input.npy", "test_output.npy", "cover.png"} <= set(names)
    assert "wrote the BioImage Model Zoo package" in dock.log.toPlainText()
