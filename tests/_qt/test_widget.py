"""The dock under Xvfb: the whole annotate-train-predict loop on a tiny SAM, stop and resume, errors,
sample data, closing the dock or the viewer during training, and lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dock_fixtures import STEPS, _train, _wait_idle
from napari_convlora.data.samples import CLASS_NAMES, synthetic_cells

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("isolated_settings")]


def test_widget_module_does_not_import_torch():
    code = ("import sys, json; import napari_convlora._qt.widget, napari_convlora._napari.sample_data; "
            "print(json.dumps(['torch' in sys.modules, 'napari_convlora.model' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == [False, False]


def test_manifest_is_valid():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-convlora")
    assert [w.display_name for w in manifest.contributions.widgets] == ["Conv-LoRA fine-tuning"]
    assert {s.key for s in manifest.contributions.sample_data} >= {"synthetic_cells"}
    out = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-convlora"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sample_data_opens(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-convlora", "synthetic_cells")
    image, labels = viewer.layers["cells"], viewer.layers["cells labels"]
    assert image.data.dtype == np.uint16 and labels.data.shape == image.data.shape
    assert set(np.unique(labels.data)) == {0, 1, 2}
    assert list(labels.features["class"]) == list(CLASS_NAMES)


def test_devices_and_remembered_checkpoint(dock, viewer, tiny_checkpoint):
    from napari_convlora._qt.widget import ConvLoRAWidget

    device = dock.model_form.device
    assert device.model().item(3).isEnabled()  # CPU
    cuda = device.model().item(1)
    assert cuda.isEnabled() or "not available" in cuda.text()
    assert "SAM" in dock.model_form.info.text()
    again = ConvLoRAWidget(viewer)  # a new session: the checkpoint path comes back from the settings
    assert again.model_form.sam.path() == str(tiny_checkpoint)
    again.deleteLater()


def test_whole_loop(dock, viewer, qtbot, tmp_path):
    _train(dock, qtbot)
    kinds = dock.events_seen
    assert kinds[0] == "start" and kinds.count("step") == STEPS and "validation" in kinds and kinds[-1] == "finished"
    assert dock.progress.value() == STEPS and dock.progress.maximum() == STEPS
    qtbot.waitUntil(lambda: dock.plot.loss_curve.getData()[0] is not None and len(dock.plot.loss_curve.getData()[0]) == STEPS)
    assert len(dock.plot.miou_points[0]) >= 2
    (x0, x1), _ = dock.plot.loss_plot.viewRange()
    assert x0 <= 0 and STEPS <= x1 < 1.1 * STEPS  # the step axis spans the whole run
    lines = dock.log.toPlainText().splitlines()  # lines gathered during training are all shown, in order
    assert lines[-2].startswith("finished") and any(line.startswith("training new adapters into") for line in lines)
    assert lines[-1].startswith("Predict uses the")  # which model Predict uses: the best or the last (issue 22)
    assert "validation mIoU" in dock.log.toPlainText() and f"{CLASS_NAMES[2]} " in dock.log.toPlainText()
    runs = sorted(p.name for p in (tmp_path / "runs").glob("*.safetensors"))
    assert dock.run_path and Path(dock.run_path).name in runs and len(runs) == 2  # the run and its best
    assert dock.model is not None and dock.predict_button.isEnabled()

    checkpoint = Path(dock.model_form.sam.path())
    before = checkpoint.read_bytes()
    assert dock.save(path=str(checkpoint)) is None  # refused: never over the SAM checkpoint
    assert checkpoint.read_bytes() == before and "is the same file as the SAM checkpoint" in dock.log.toPlainText()
    dock.save(path=str(tmp_path / "adapter.safetensors"))
    _wait_idle(dock, qtbot)
    dock.save(bundle=True, path=str(tmp_path / "bundle.safetensors"))
    _wait_idle(dock, qtbot)
    from napari_convlora.checkpoints.model_files import describe

    assert describe(tmp_path / "adapter.safetensors")["format"] == "napari-convlora-adapter"
    assert describe(tmp_path / "bundle.safetensors")["format"] == "napari-convlora-bundle"

    dock.predict_image.refresh("cells")
    assert dock.predict() is not None
    _wait_idle(dock, qtbot)
    prediction = viewer.layers["cells prediction"]
    assert prediction.data.shape == viewer.layers["cells"].data.shape
    assert np.issubdtype(prediction.data.dtype, np.integer)
    assert set(np.unique(prediction.data)) <= {0, 1, 2}
    assert list(prediction.features["class"]) == list(CLASS_NAMES)
    assert prediction.colormap.map(np.array([2]))[0][3] > 0  # classes are coloured
    assert prediction.colormap.map(np.array([0]))[0][3] == 0  # background is transparent

    viewer.layers["cells labels"].data = np.zeros_like(viewer.layers["cells labels"].data)
    dock.confirm = lambda question: True  # dense mode: 0 is painted background, replaced only when agreed to
    changed = dock.copy_to_training_labels()
    assert changed == int((prediction.data != 0).sum())
    np.testing.assert_array_equal(viewer.layers["cells labels"].data, prediction.data)


def test_predict_current_plane_of_a_stack(dock, viewer, qtbot):
    _train(dock, qtbot)
    stack = np.stack([synthetic_cells(96, seed=s)[0] for s in range(3)])
    viewer.add_image(stack, name="stack")
    viewer.dims.set_current_step(0, 1)
    dock.predict_image.refresh("stack")
    assert dock.predict(whole_stack=False) is not None
    _wait_idle(dock, qtbot)
    layer = viewer.layers["stack prediction"]
    assert layer.data.shape == stack.shape
    assert layer.metadata["napari_convlora"]["planes"] == [1]


def test_stop_then_resume(dock, qtbot, tmp_path):
    dock.data_form.length.setValue(400)
    dock.train()
    qtbot.waitUntil(lambda: dock.events_seen.count("step") >= 2, timeout=60_000)
    assert dock.stop_button.isEnabled()
    dock.stop_button.click()
    _wait_idle(dock, qtbot)
    assert dock.events_seen[-1] == "stopped"
    stopped_at = dock.progress.value()
    assert 2 <= stopped_at < 400
    assert dock.resumable and dock.resume_button.isEnabled() and dock.model is not None

    dock.events_seen.clear()
    run_path = dock.run_path
    # changed after the stop, all set aside on resume: the saved recipe continues in the run's own file
    dock.data_form.length.setValue(1)
    dock.model_form.input_size.setValue(64)
    dock.model_form.device.setCurrentIndex(0)  # auto (the CPU here)
    dock.data_form.options.run_folder.value = tmp_path / "elsewhere"
    dock.resume_button.click()
    qtbot.waitUntil(lambda: dock.events_seen.count("step") >= 2, timeout=60_000)
    dock.stop()
    _wait_idle(dock, qtbot)
    assert dock.events_seen[0] == "start" and dock.events_seen[-1] == "stopped"
    assert dock.progress.maximum() == 400 and dock.progress.value() > stopped_at
    log = dock.log.toPlainText()
    assert "resuming with the run's saved input_size: 64 asked, 128 saved" in log
    assert "resuming with the run's saved steps: 1 asked, 400 saved" in log
    assert dock.run_path == run_path and not (tmp_path / "elsewhere").exists()


def test_error_is_shown_and_dock_stays_usable(dock, viewer, qtbot, monkeypatch):
    shown = []
    monkeypatch.setattr("napari_convlora._qt.widget.show_error", shown.append)
    viewer.layers["cells labels"].data = np.zeros((100, 90), dtype=np.uint8)
    viewer.layers["cells labels"].data[10:20, 10:20] = 1
    dock.train()
    _wait_idle(dock, qtbot)
    assert "shape" in shown[0] and "'cells' with 'cells labels':" in shown[0]  # the layers, not "image 1"
    assert "Error:" in dock.log.toPlainText() and "shape" in dock.log.toPlainText()
    assert dock.train_button.isEnabled() and not dock.stop_button.isEnabled()
    assert len(viewer.layers) == 2  # napari is still running


def _closing_during_training(dock, qtbot, close):
    from napari_convlora.checkpoints.model_files import describe
    from napari_convlora.checkpoints.training_state import load_training_state, state_path

    dock.data_form.length.setValue(100_000)
    dock.train()
    qtbot.waitUntil(lambda: dock.events_seen.count("step") >= 2, timeout=60_000)
    compute, run_path = dock.compute, dock.run_path or dock.log.toPlainText().split(" into ")[1].split()[0]
    close()
    qtbot.waitUntil(lambda: not compute.busy, timeout=60_000)
    assert describe(run_path)["format"] == "napari-convlora-adapter"
    assert 1 <= load_training_state(state_path(run_path))[0]["step"] < 100_000


def test_closing_the_viewer_during_training_stops_and_saves(dock, viewer, qtbot):
    _closing_during_training(dock, qtbot, viewer.close)


def test_closing_the_dock_during_training_stops_and_saves(dock, viewer, qtbot):
    _closing_during_training(dock, qtbot, lambda: viewer.window.remove_dock_widget(dock))


def test_eta_texts():
    from napari_convlora._qt.progress_view import eta_text

    assert [eta_text(s) for s in (None, 0, 40.4, 61, 3569, 3600, 3725, 11 * 3600)] == \
        ["", "about 1 s left", "about 40 s left", "about 1 min left", "about 59 min left", "about 1 h 00 min left",
         "about 1 h 02 min left", "about 11 h 00 min left"]  # was "1:02:05": read like a clock time


def test_forms_build_the_core_config_objects(dock, tmp_path):
    """The dock hands the core a TrainRecipe and RunOptions built from its forms; the Advanced form is magicgui."""
    from magicgui.widgets import Container

    from napari_convlora.config import AdapterConfig, RunOptions, TrainRecipe
    from napari_convlora.config.choices import DEVICES, LABEL_MODES, METHODS, PRECISIONS

    form, data = dock.model_form, dock.data_form
    assert isinstance(data.options, Container)
    assert [form.method.itemData(i) for i in range(form.method.count())] == list(METHODS)
    assert [form.device.itemData(i) for i in range(form.device.count())] == list(DEVICES)
    assert [form.precision.itemData(i) for i in range(form.precision.count())] == list(PRECISIONS)
    assert [data.label_mode.itemData(i) for i in range(data.label_mode.count())] == list(LABEL_MODES)
    form.method.setCurrentIndex(1)  # LoRA
    form.rank.setValue(5)
    data.label_mode.setCurrentIndex(1)  # sparse
    data.options.batch_size.value = 2
    data.options.threads.value = 1
    data.unpainted.setCurrentIndex(1)  # unpainted planes are background
    assert dock.recipe() == TrainRecipe(adapter=AdapterConfig(method="lora", rank=5), input_size=128,
                                        label_mode="sparse", unpainted_planes="background", class_names=CLASS_NAMES,
                                        val_fraction=0.1, steps=STEPS, lr=1e-3, batch_size=2, grad_accum=1)
    data.options.mask_loss.value = "hq_points"  # HQ-SAM's loss is for binary models: refused for three classes
    with pytest.raises(ValueError, match="mask loss 'hq_points'"):
        dock.recipe()
    data.class_names.setText("background, cell")  # two classes: taken
    assert dock.recipe().mask_loss == "hq_points"
    data.class_names.setText(", ".join(CLASS_NAMES))
    data.options.mask_loss.value = "structure"
    data.options.multiclass_head.value = "matched"  # Conv-LoRA's matched tokens instead of the per-class default
    assert dock.recipe().multiclass_head == "matched"
    assert dock.recipe().detail_head == "auto" and dock.recipe().trains_detail_head  # on by default at 256 px
    data.options.detail_head.value = "off"  # SAM's quarter-resolution masks, as before the detail head
    assert not dock.recipe().trains_detail_head
    assert data.options.run_options(form.device_name(), form.precision_name()) == RunOptions("cpu", "auto", 1)
    data.options.low_memory.value = True  # the dock's switch for small GPUs
    assert data.options.run_options(form.device_name(), form.precision_name()) == RunOptions(
        "cpu", "auto", 1, activation_checkpointing=True)


def test_log_lines_wait_for_the_redraw_while_a_job_runs_and_the_log_follows_them(qtbot):
    from napari_convlora._qt.progress_view import ProgressView

    view = ProgressView()
    qtbot.addWidget(view)
    view.resize(400, 500)
    view.show()
    qtbot.waitExposed(view)
    for i in range(30):
        view.say(f"idle {i}")  # shown at once
    assert view.log.toPlainText().splitlines()[-1] == "idle 29"
    bar = view.log.verticalScrollBar()
    view.set_running(True)
    for i in range(20):
        view.say(f"running {i}")
    assert view.log.toPlainText().splitlines()[-1] == "idle 29"  # held for the next redraw
    view.draw()
    lines = view.log.toPlainText().splitlines()
    assert lines[-21:] == ["idle 29"] + [f"running {i}" for i in range(20)]
    assert bar.value() == bar.maximum() > 0  # scrolled to the newest line
    bar.triggerAction(bar.SliderAction.SliderToMinimum)  # the user scrolls up to read...
    view.say("more")
    view.set_running(False)  # ...the job ends and all held lines are shown, without pulling the view away
    assert view.log.toPlainText().splitlines()[-1] == "more" and bar.value() == 0
    bar.triggerAction(bar.SliderAction.SliderToMaximum)  # back at the end: follow again
    view.say("last")
    assert bar.value() == bar.maximum() and view.log.toPlainText().endswith("last")


def test_the_openmp_pool_is_released_once_when_the_compute_thread_starts(qapp, monkeypatch):
    from napari_convlora._qt import compute

    calls = []
    monkeypatch.setattr(compute, "release_openmp_threads", lambda: calls.append(1) or False)
    thread = compute.ComputeThread()

    def job():
        yield None

    for _ in range(3):
        thread.start(job)
        assert thread.pool.waitForDone(10_000)
    assert calls == [1]
