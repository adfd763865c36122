"""The napari-facing helpers without Qt: layer copies, the plane shown, predictions written as Labels,
copying a prediction into training labels, sample data, and the native-library fixes."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_convlora._napari import jobs, native_libs
from napari_convlora._napari.layers import (
    class_colormap,
    copy_image,
    copy_pair,
    copy_prediction,
    painted_pixels_to_replace,
    current_plane,
    find_labels_for,
    write_prediction,
)
from napari_convlora._napari.sample_data import synthetic_cells_sample

NAMES = ("background", "nucleus", "rod")


def test_copies_are_independent_of_the_layers():
    viewer = ViewerModel()
    image = viewer.add_image(np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3), rgb=True, name="rgb")
    labels = viewer.add_labels(np.zeros((12, 10), np.uint8), name="rgb labels")
    pair = copy_pair(image, labels)
    image.data[0, 0] = 255
    labels.data[0, 0] = 2
    assert pair.rgb and pair.image.shape == (12, 10, 3) and pair.image[0, 0, 0] == 0 and pair.labels[0, 0] == 0
    assert copy_image(image).name == "rgb"


def test_current_plane_counts_leading_axes_in_c_order():
    viewer = ViewerModel()
    assert current_plane(viewer, viewer.add_image(np.zeros((8, 8)))) is None
    stack = viewer.add_image(np.zeros((2, 3, 8, 8)), name="tzyx")
    viewer.dims.set_current_step(0, 1)
    viewer.dims.set_current_step(1, 2)
    assert current_plane(viewer, stack) == 1 * 3 + 2


def test_write_prediction_adds_then_updates_planes():
    viewer = ViewerModel()
    image = viewer.add_image(np.zeros((3, 6, 6)), name="stack", scale=(2, 0.5, 0.5))
    first = np.zeros((3, 6, 6), np.uint8)
    first[1] = 2
    layer = write_prediction(viewer, image, first, (0, 1, 2), NAMES, planes=[1])
    assert layer.name == "stack prediction" and tuple(layer.scale) == (2, 0.5, 0.5)
    assert list(layer.features["class"]) == list(NAMES) and list(layer.features["index"]) == [0, 1, 2]
    assert layer.metadata["napari_convlora"]["planes"] == [1]
    assert layer.colormap.map(np.array([0]))[0][3] == 0 and layer.colormap.map(np.array([1]))[0][3] == 1

    second = np.zeros((3, 6, 6), np.uint8)
    second[2] = 1
    again = write_prediction(viewer, image, second, (0, 1, 2), NAMES, planes=[2])
    assert again is layer and len(viewer.layers) == 2
    assert (layer.data[1] == 2).all() and (layer.data[2] == 1).all()  # plane 1 kept, plane 2 written
    assert layer.metadata["napari_convlora"]["planes"] == [1, 2]
    write_prediction(viewer, image, second, (0, 1, 2), NAMES)  # the whole stack
    assert layer.metadata["napari_convlora"]["planes"] is None and (layer.data[1] == 0).all()


def test_copy_prediction_writes_predicted_planes_only_and_is_undoable():
    viewer = ViewerModel()
    image = viewer.add_image(np.zeros((2, 5, 5)), name="img")
    target = viewer.add_labels(np.full((2, 5, 5), 3, np.uint16), name="img labels")
    prediction = np.zeros((2, 5, 5), np.uint8)
    prediction[1, :2] = 1
    layer = write_prediction(viewer, image, prediction, (0, 1, 2), NAMES, planes=[1])
    assert copy_prediction(layer, target, label_mode="sparse") == 0  # by default only unpainted (0) pixels: none
    assert painted_pixels_to_replace(layer, target, label_mode="sparse") == 25
    assert copy_prediction(layer, target, "all", label_mode="sparse") == 25
    assert (target.data[0] == 3).all() and (target.data[1] == prediction[1]).all()
    assert target.data.dtype == np.uint16
    target.undo()
    assert (target.data == 3).all()
    assert find_labels_for(viewer, "img", [("img", "img labels")]) is target
    assert find_labels_for(viewer, "img", [("other", "img labels")]) is None


def test_copy_prediction_refuses_other_shapes():
    viewer = ViewerModel()
    image = viewer.add_image(np.zeros((5, 5)), name="img")
    layer = write_prediction(viewer, image, np.ones((5, 5), np.uint8), (0, 1), ("bg", "fg"))
    with pytest.raises(ValueError, match="shape"):
        copy_prediction(layer, viewer.add_labels(np.zeros((4, 5), np.uint8)), label_mode="sparse")


class PlaneReads:
    """An array read as a Zarr store is (napari reads the planes it shows): records the planes read and refuses a
    read of more than one plane."""

    def __init__(self, array):
        self.array, self.read = array, []
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        first = key[0] if key else None
        if isinstance(first, slice) and first.step in (None, 1) and first.stop == (first.start or 0) + 1:
            first = first.start or 0  # napari reads the plane it shows as [i:i + 1]
        if not isinstance(first, (int, np.integer)):
            raise AssertionError(f"more than one plane read: {key}")
        self.read.append(int(first))
        return self.array[key]


def test_copy_prediction_reads_only_the_predicted_planes_of_a_lazy_prediction(monkeypatch):
    """Review 2: a Zarr-backed prediction is read plane by plane, the predicted planes only."""
    from types import SimpleNamespace

    viewer = ViewerModel()
    target = viewer.add_labels(np.zeros((3, 5, 5), np.uint8), name="img labels")
    target.data[1, 0, 0] = 2  # painted
    predicted = np.zeros((3, 5, 5), np.uint8)
    predicted[1], predicted[2] = 1, 2
    data = PlaneReads(predicted)
    prediction = SimpleNamespace(name="img prediction", data=data, metadata={"napari_convlora": {"planes": [1]}})
    assert painted_pixels_to_replace(prediction, target, label_mode="sparse") == 1 and data.read == [1]
    assert copy_prediction(prediction, target, label_mode="sparse") == 24 and data.read == [1, 1]
    assert target.data[1, 0, 0] == 2 and (target.data[1].ravel()[1:] == 1).all() and not target.data[[0, 2]].any()
    target.undo()
    assert target.data.sum() == 2

    monkeypatch.setattr("napari_convlora._napari.layers.LARGE_BYTES", 10)  # planes to read over the limit
    with pytest.raises(ValueError, match="'img prediction' is held lazily .*whole stack off"):
        copy_prediction(prediction, target, label_mode="sparse")


def test_a_layer_over_the_limit_is_refused_and_one_plane_is_read(monkeypatch):
    """Review 2: whole copies refuse a layer over LARGE_BYTES in one line naming it; the Model Zoo's plane copy reads
    only the centre crop of one plane, the same crop the export cuts from the whole image."""
    from napari_convlora.bioimageio.export import TEST_SIDE, sample_crop
    from napari_convlora.config import InputSpec
    from napari_convlora.data import ImageLayout

    from napari_convlora._napari.layers import copy_plane

    viewer = ViewerModel()
    stack = np.random.default_rng(0).integers(0, 255, (3, 701, 555), dtype=np.uint8)
    data = PlaneReads(stack)
    layer = viewer.add_image(data, name="big", contrast_limits=(0, 255))
    monkeypatch.setattr("napari_convlora._napari.layers.LARGE_BYTES", 1000)
    with pytest.raises(ValueError, match=r"^layer 'big' \(\w+ array 3 x 701 x 555, .*crop a region"):
        copy_image(layer)
    data.read.clear()
    plane = copy_plane(layer, 2, TEST_SIDE)
    assert data.read == [2] and plane.image.shape == (TEST_SIDE, TEST_SIDE) and plane.name == "big"
    spec = InputSpec()
    assert np.array_equal(sample_crop(plane.image, ImageLayout(), spec), sample_crop(stack, ImageLayout(), spec, 2))
    rgb = viewer.add_image(np.zeros((40, 30, 3), np.uint8), rgb=True)
    assert copy_plane(rgb, None).image.shape == (40, 30, 3)
    in_memory = viewer.add_image(stack, name="in memory")  # numpy: in memory already, copied whatever its size
    assert np.array_equal(copy_image(in_memory).image, stack)


def test_sparse_background_is_transparent():
    cmap = class_colormap((1, 2, 5), background=1)
    assert cmap.map(np.array([1]))[0][3] == 0 and cmap.map(np.array([5]))[0][3] == 1


def test_synthetic_sample_has_labels_with_class_names():
    (image, _, kind), (labels, meta, labels_kind) = synthetic_cells_sample()
    assert (kind, labels_kind) == ("image", "labels") and image.shape == labels.shape
    assert list(meta["features"]["class"]) == list(NAMES)


def test_train_and_predict_jobs_without_qt(tiny_checkpoint, tmp_path):
    from napari_convlora.data.samples import synthetic_cells

    image, labels = synthetic_cells(128, seed=0)
    from napari_convlora.config import AdapterConfig, RunOptions, TrainRecipe

    pair = jobs.LayerCopy("cells", image, False, labels)
    recipe = TrainRecipe(adapter=AdapterConfig(method="lora"), input_size=64, steps=2, grad_accum=1, class_names=NAMES)
    gen = jobs.train_job(str(tiny_checkpoint), [pair], recipe, RunOptions(device="cpu"),
                         str(tmp_path / "run" / "m.safetensors"), stop=threading.Event())
    kinds = []
    try:
        while True:
            kinds.append(getattr(next(gen), "kind", "message"))
    except StopIteration as done:
        result = done.value
    assert kinds[0] == "message" and "start" in kinds and kinds[-1] == "finished"
    assert result.resumable and not result.stopped and (tmp_path / "run" / "m.safetensors").is_file()

    progress = jobs.TileProgress()
    gen = jobs.predict_job(result.model, jobs.LayerCopy("cells", image, False), None, "cpu", progress)
    try:
        while True:
            next(gen)
    except StopIteration as done:
        predicted = done.value
    assert predicted.labels.shape == image.shape and predicted.class_names == NAMES
    assert progress.total > 0 and progress.done == progress.total


def test_release_openmp_threads_after_main_thread_torch():
    import torch

    torch.randn(256, 256) @ torch.randn(256, 256)  # the calling thread now owns an OpenMP pool
    released = native_libs.release_openmp_threads()
    assert released or not sys.platform.startswith("linux")
    assert torch.allclose(torch.ones(3) * 2, torch.full((3,), 2.0))  # torch still works afterwards


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_openmp_runtime_released_is_the_one_torch_linked(monkeypatch):
    """Another libgomp earlier in the library list (found first by path) is not the one torch uses."""
    import torch

    real = native_libs._loaded_libraries()
    torch_lib = Path(torch.__file__).parent / "lib"
    decoy = "/usr/lib/x86_64-linux-gnu/libgomp.so.1"
    monkeypatch.setattr(native_libs, "_loaded_libraries", lambda: [decoy] + real)
    found = native_libs.torch_openmp_pause()
    assert found is not None
    pause, library = found
    assert Path(library).parent == torch_lib and Path(library).name.startswith(("libgomp", "libomp", "libiomp"))


def test_releasing_openmp_fires_once_logs_and_can_be_turned_off(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(native_libs, "torch_openmp_pause",
                        lambda: ((lambda kind: calls.append(kind) or 0), "/torch/lib/libgomp-fake.so.1"))
    monkeypatch.setenv(native_libs.KEEP_POOL_VARIABLE, "1")
    assert native_libs.release_openmp_threads() is False and calls == []
    monkeypatch.delenv(native_libs.KEEP_POOL_VARIABLE)
    with caplog.at_level(logging.INFO, logger=native_libs.__name__):
        assert native_libs.release_openmp_threads() is True
    assert calls == [native_libs.OMP_PAUSE_SOFT]
    assert "released this thread's OpenMP thread pool in /torch/lib/libgomp-fake.so.1" in caplog.text


def test_isolate_triton_does_nothing_when_already_imported_or_no_llvm(monkeypatch):
    monkeypatch.setattr(native_libs, "_loaded_libraries", lambda: ["/usr/lib/libc.so.6"])
    assert native_libs.isolate_triton() is False


@pytest.mark.skipif(not hasattr(os, "RTLD_DEEPBIND"), reason="RTLD_DEEPBIND is Linux-only")
def test_isolate_triton_fires_with_another_llvm_loaded(monkeypatch, caplog):
    """With Mesa's LLVM in the process (a fake library list), triton >= 3.7 is imported with RTLD_DEEPBIND;
    older triton, which keeps its LLVM symbols to itself, is left alone."""
    flags_seen = []
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setattr(native_libs, "_loaded_libraries", lambda: ["/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1"])
    monkeypatch.setattr(native_libs.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(native_libs, "_import_triton", lambda: flags_seen.append(sys.getdlopenflags()))
    monkeypatch.setattr(native_libs, "_triton_version", lambda: (3, 6))
    assert native_libs.isolate_triton() is False and flags_seen == []
    monkeypatch.setattr(native_libs, "_triton_version", lambda: (3, 8))
    before = sys.getdlopenflags()
    with caplog.at_level(logging.INFO, logger=native_libs.__name__):
        assert native_libs.isolate_triton() is True
    assert flags_seen[0] & os.RTLD_DEEPBIND and sys.getdlopenflags() == before
    assert "loaded triton 3.8 with RTLD_DEEPBIND" in caplog.text


def _events(kinds):
    from napari_convlora.training.events import TrainingEvent

    yield from (TrainingEvent(kind, step, len(kinds)) for step, kind in enumerate(kinds))
    return "the model"


def _drain(gen):
    out = []
    try:
        while True:
            out.append(next(gen))
    except StopIteration as done:
        return out, done.value


def test_step_events_reach_the_gui_in_batches_in_order():
    kinds = ["start", "step", "step", "step", "validation", "saved", "step", "step", "finished"]
    seen: set[str] = set()
    out, value = _drain(jobs.batch_steps(_events(kinds), interval_s=3600, seen=seen))
    assert value == "the model" and seen == set(kinds)
    assert [e.kind for e in out] == ["start", "steps", "validation", "saved", "steps", "finished"]
    assert [e.step for e in out[1].events] == [1, 2, 3] and [e.step for e in out[4].events] == [6, 7]
    # the steps before a non-step event are flushed first; a trailing batch is flushed at the end
    out, _ = _drain(jobs.batch_steps(_events(["step", "step"]), interval_s=3600))
    assert [[e.step for e in b.events] for b in out] == [[0, 1]]
    out, _ = _drain(jobs.batch_steps(_events(["step", "step", "step"]), interval_s=0.0))
    assert [[e.step for e in b.events] for b in out] == [[0], [1], [2]]


def test_redraws_are_spaced_by_what_they_cost_the_gui_thread():
    from napari_convlora._qt.pacing import GUI_CPU_BUDGET, MAX_MS, MIN_MS, RefreshPacer, next_interval_ms

    # software OpenGL: 25 ms of GUI CPU per redraw -> towards 2.5 s, reached within a few redraws
    interval = 1000
    for _ in range(8):
        interval = next_interval_ms(0.025, interval / 1000, interval)
    assert abs(interval - 1000 * 0.025 / GUI_CPU_BUDGET) < 20
    # a GPU driver: 1 ms per redraw -> the fastest rate; a busy GUI (the user panning): the slowest
    assert next_interval_ms(0.001, 1.0, MIN_MS) == MIN_MS
    assert next_interval_ms(0.5, 1.0, MAX_MS) == MAX_MS
    assert next_interval_ms(0.0, 0.0, 1234) == 1234  # nothing measured: unchanged

    pacer = RefreshPacer(initial_ms=800)
    assert pacer.tick() == 800  # the first redraw of a job has nothing to measure yet
    busy_until = time.thread_time() + 0.05  # 50 ms of this thread's CPU "drawing"
    while time.thread_time() < busy_until:
        pass
    assert pacer.tick() > 800  # 50 ms per redraw: slow down
    pacer.reset()
    assert pacer.last is None


def test_copy_prediction_fills_only_unpainted_pixels_by_default():
    """It overwrote every painted pixel with the prediction (issue 10, item 6)."""
    viewer = ViewerModel()
    image = viewer.add_image(np.zeros((6, 6)), name="img")
    painted = np.zeros((6, 6), np.uint8)
    painted[:2] = 5
    target = viewer.add_labels(painted.copy(), name="img labels")
    layer = write_prediction(viewer, image, np.ones((6, 6), np.uint8), (0, 1), ("bg", "fg"))
    assert copy_prediction(layer, target, label_mode="sparse") == 24
    assert (target.data[:2] == 5).all() and (target.data[2:] == 1).all()
    with pytest.raises(ValueError, match="copy mode"):
        copy_prediction(layer, target, "everything", label_mode="sparse")



def test_in_dense_and_instances_modes_every_pixel_is_painted_and_a_copy_counts_what_it_would_replace():
    """Copy filled the background painted in dense mode (0) with the prediction, without asking (issue 21, item 1):
    the label mode says what is painted; the plan counts the painted pixels a copy would replace."""
    from napari_convlora._napari.layers import plan_copy

    viewer = ViewerModel()
    image = viewer.add_image(np.zeros((6, 6)), name="img")
    painted = np.zeros((6, 6), np.uint8)
    painted[:2] = 2  # 12 pixels of class 2; in dense mode the other 24 are painted background
    target = viewer.add_labels(painted.copy(), name="img labels")
    layer = write_prediction(viewer, image, np.ones((6, 6), np.uint8), (0, 1, 2), NAMES)
    for label_mode in ("dense", "instances"):
        for mode in ("unpainted", "all"):
            plan = plan_copy(layer, target, mode, label_mode)
            assert (plan.mode, plan.painted) == ("all", 36), (label_mode, mode)
        assert copy_prediction(layer, target, "unpainted", label_mode=label_mode) == 0
        assert painted_pixels_to_replace(layer, target, label_mode=label_mode) == 36
    assert (target.data == painted).all()
    for label_mode in ("sparse", "sparse_instances"):  # 0 is "not annotated": filled without asking
        assert (plan_copy(layer, target, "unpainted", label_mode).mode,
                plan_copy(layer, target, "unpainted", label_mode).painted) == ("unpainted", 0)
        assert plan_copy(layer, target, "all", label_mode).painted == 12
    with pytest.raises(ValueError, match="label mode"):
        plan_copy(layer, target, "unpainted", "painted")


def test_in_dense_mode_an_unpainted_plane_of_a_stack_is_filled_as_training_reads_it():
    """In a stack, a plane where nothing is painted is not annotated when training skips such planes
    (``unpainted_planes="skip"``): a copy fills it without asking; with "background" it is painted background."""
    from napari_convlora._napari.layers import plan_copy

    viewer = ViewerModel()
    image = viewer.add_image(np.zeros((3, 4, 4)), name="img")
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[1, :1] = 2  # plane 1 annotated (4 pixels of class 2, 12 of background); planes 0 and 2 not
    target = viewer.add_labels(labels.copy(), name="img labels")
    layer = write_prediction(viewer, image, np.ones((3, 4, 4), np.uint8), (0, 1, 2), NAMES)
    assert plan_copy(layer, target, "unpainted", "dense", "skip").painted == 16
    assert plan_copy(layer, target, "unpainted", "dense", "background").painted == 48
    assert copy_prediction(layer, target, "unpainted", label_mode="dense", unpainted_planes="skip") == 32
    assert (target.data[[0, 2]] == 1).all() and (target.data[1] == labels[1]).all()


def test_class_names_are_read_from_a_labels_layers_features():
    import pandas as pd

    from napari_convlora._napari.layers import copy_pair, feature_class_names

    viewer = ViewerModel()
    image = viewer.add_image(np.zeros((4, 4)), name="img")
    labels = viewer.add_labels(np.zeros((4, 4), np.uint8), name="lab")
    assert feature_class_names(labels) is None
    labels.features = pd.DataFrame({"index": [0, 2], "name": ["background", "mito"]})
    assert feature_class_names(labels) == {0: "background", 2: "mito"}
    assert copy_pair(image, labels).class_names == {0: "background", 2: "mito"}
