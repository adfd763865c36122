"""Predicting an Image layer held lazily from the dock (issue 14): a dask-backed stack or a multiscale layer is
predicted block by block, never loaded whole, into a Zarr store (chosen or temporary) that a Labels layer reads
lazily; the labels equal the in-memory prediction; Stop leaves nothing; a bad store is refused in one line."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from dock_fixtures import _wait_idle
from helpers import make_model, perturb_trainable
from napari_convlora._napari.block_predict import BLOCKS_TEXT, session_folder
from napari_convlora.data.samples import CLASS_NAMES, synthetic_cells

da = pytest.importorskip("dask.array")
zarr = pytest.importorskip("zarr")

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("isolated_settings", "one_torch_thread")]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """A 3-class model on the tiny SAM with 64 px tiles (a 160 px plane is 3 x 3 tiles)."""
    return perturb_trainable(make_model(tiny_checkpoint, num_classes=3, input_size=64,
                                        class_names=tuple(CLASS_NAMES)), 0.3).eval()


@pytest.fixture
def lazy_dock(dock, model, monkeypatch):
    """The dock with ``model``, blocks of one tile (3 x 3 blocks a plane) and the whole image forbidden:
    ``np.asarray`` or ``compute`` of an array of the full image's shape raises on the compute thread, and on
    the main thread while ``predict()`` runs (where the layer used to be copied)."""
    dock.model = model
    monkeypatch.setattr("napari_convlora._napari.block_predict.BLOCK_TILES", 1)
    dock.forbidden, dock.loaded_whole = set(), []
    armed = threading.Event()
    original_array, original_compute = da.Array.__array__, da.Array.compute

    def guard(array):
        if tuple(array.shape) in dock.forbidden and (armed.is_set() or threading.current_thread()
                                                     is not threading.main_thread()):
            dock.loaded_whole.append(array.shape)
            raise AssertionError(f"the whole image {array.shape} was loaded")

    def array(self, *args, **kwargs):
        guard(self)
        return original_array(self, *args, **kwargs)

    def compute(self, *args, **kwargs):
        guard(self)
        return original_compute(self, *args, **kwargs)

    monkeypatch.setattr(da.Array, "__array__", array)
    monkeypatch.setattr(da.Array, "compute", compute)
    predict = dock.predict

    def guarded_predict(*args, **kwargs):
        armed.set()
        try:
            return predict(*args, **kwargs)
        finally:
            armed.clear()

    dock.predict = guarded_predict
    return dock


def _stack() -> np.ndarray:
    return np.stack([synthetic_cells(160, seed=s)[0] for s in (0, 1)])  # 2 x 160 x 160 uint16


def _in_memory(dock, viewer, qtbot, image, name="in memory"):
    """The dock's ordinary prediction of the same image held as a numpy array: (labels, instances or None)."""
    viewer.add_image(image, name=name)
    dock.predict_image.refresh(name)
    dock.predict(whole_stack=True)
    _wait_idle(dock, qtbot)
    instances = viewer.layers[f"{name} instances"].data if f"{name} instances" in viewer.layers else None
    return viewer.layers[f"{name} prediction"].data, instances


def _paint(layer, value=None):
    """A brush stroke at (20, 20) of plane 0 (what the user does), in a class other than the one predicted there."""
    value = value if value is not None else 1 + int(layer.data[0, 20, 20]) % 2
    layer.brush_size = 9
    layer.paint((0, 20, 20), value)
    return value


def _same_partition(a, b):
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def test_a_dask_stack_is_predicted_block_by_block_into_the_chosen_store(lazy_dock, viewer, qtbot, tmp_path):
    dock, image = lazy_dock, _stack()
    viewer.add_image(da.from_array(image, chunks=(1, 64, 64)), name="big")
    dock.forbidden.add(image.shape)
    dock.panel.instances.setChecked(True)
    dock.predict_image.refresh("big")
    dock.panel.store.edit.setText(str(tmp_path / "big.zarr"))
    assert dock.predict(whole_stack=True) is not None
    assert dock.progress.format() == "block %v / %m"
    _wait_idle(dock, qtbot)
    assert dock.loaded_whole == [] and "Error" not in dock.log.toPlainText()
    labels, instances = viewer.layers["big prediction"], viewer.layers["big instances"]
    assert isinstance(labels.data, zarr.Array) and isinstance(instances.data, zarr.Array)  # read lazily
    assert labels.metadata["napari_convlora"]["store"] == str(tmp_path / "big.zarr")
    assert (tmp_path / "big-instances.zarr").is_dir()
    assert dock.progress.maximum() == dock.progress.value() == 18  # 2 planes x 3 x 3 blocks
    log = dock.log.toPlainText()
    assert "block by block" in log and "without loading it whole" in log and f"read lazily from {tmp_path}" in log

    expected, expected_instances = _in_memory(dock, viewer, qtbot, image)
    assert np.array_equal(labels.data[...], expected) and labels.data.dtype == expected.dtype
    assert _same_partition(instances.data[...], expected_instances)
    assert f"{CLASS_NAMES[1]}: {int((expected == 1).sum()):,} px" in dock.panel.legend.text()


def test_a_multiscale_layer_is_predicted_at_level_0_into_a_temporary_store(lazy_dock, viewer, qtbot):
    dock, image = lazy_dock, synthetic_cells(160, seed=2)[0]
    level0 = da.from_array(image, chunks=64)
    viewer.add_image([level0, image[::2, ::2]], multiscale=True, name="pyramid")
    dock.forbidden.add(image.shape)
    dock.predict_image.refresh("pyramid")
    assert dock.predict() is not None
    _wait_idle(dock, qtbot)
    assert dock.loaded_whole == []
    layer = viewer.layers["pyramid prediction"]
    meta = layer.metadata["napari_convlora"]
    assert layer.data.shape == image.shape and meta["temporary"] and meta["store"].endswith(".zarr")
    assert "level 0 of 2" in dock.log.toPlainText() and "deleted when napari closes" in dock.log.toPlainText()
    first = meta["store"]

    dock.predict()  # again: written into the store the layer reads (as in memory); the fresh store is removed
    _wait_idle(dock, qtbot)
    assert viewer.layers["pyramid prediction"] is layer and meta["store"] == first
    assert [p.name for p in Path(first).parent.glob("pyramid*")] == [Path(first).name]
    dock.forbidden.clear()
    expected, _ = _in_memory(dock, viewer, qtbot, image)
    assert np.array_equal(viewer.layers["pyramid prediction"].data[...], expected)


def test_stop_leaves_nothing_under_the_chosen_name(lazy_dock, viewer, qtbot, tmp_path, monkeypatch):
    from napari_convlora._napari.jobs import TileProgress

    dock = lazy_dock
    viewer.add_image(da.from_array(_stack(), chunks=(1, 64, 64)), name="big")
    dock.predict_image.refresh("big")
    dock.panel.store.edit.setText(str(tmp_path / "stopped.zarr"))
    dock.panel.instances.setChecked(True)

    class StopAfterOneBlock(TileProgress):
        def __call__(self, done, total, text=None):
            super().__call__(done, total, text)
            if done == 1 and self.text == BLOCKS_TEXT:  # on the compute thread, after the first block: Stop
                dock.workers[-1].quit()

    monkeypatch.setattr(dock.view, "start_prediction", lambda text="": StopAfterOneBlock())
    assert dock.predict(whole_stack=True) is not None
    _wait_idle(dock, qtbot)
    assert "prediction stopped: nothing was written" in dock.log.toPlainText()
    assert list(tmp_path.glob("*stopped*")) == [] and "big prediction" not in viewer.layers
    assert dock.predict_button.isEnabled()  # idle again


@pytest.mark.parametrize("store, expected", [
    ("out.tif", "name it <name>.zarr"),
    ("exists.zarr", "exists; a Zarr output is never overwritten"),
    ("a-file/out.zarr", "is not a folder"),
])
def test_a_bad_store_is_refused_in_one_line(lazy_dock, viewer, tmp_path, monkeypatch, store, expected):
    told = []
    monkeypatch.setattr("napari_convlora._qt.widget.show_info", told.append)
    (tmp_path / "exists.zarr").mkdir()
    (tmp_path / "a-file").write_text("")
    viewer.add_image(da.from_array(_stack(), chunks=(1, 64, 64)), name="big")
    lazy_dock.predict_image.refresh("big")
    lazy_dock.panel.store.edit.setText(str(tmp_path / store))
    assert lazy_dock.predict() is None and not lazy_dock.workers
    assert len(told) == 1 and expected in told[0] and "\n" not in told[0]


def test_a_numpy_layer_over_the_size_limit_is_predicted_block_by_block(lazy_dock, viewer, qtbot, monkeypatch):
    monkeypatch.setattr("napari_convlora._napari.layers.LARGE_BYTES", 1000)
    image = synthetic_cells(160, seed=3)[0]
    viewer.add_image(image, name="large numpy")
    lazy_dock.predict_image.refresh("large numpy")
    lazy_dock.predict()
    _wait_idle(lazy_dock, qtbot)
    layer = viewer.layers["large numpy prediction"]
    assert isinstance(layer.data, zarr.Array) and "numpy array 160 x 160" in lazy_dock.log.toPlainText()


def test_plane_by_plane_adds_to_the_store_and_keeps_what_was_painted(lazy_dock, viewer, qtbot, tmp_path):
    """Review 1: plane 1 predicted after plane 0 (painted on) goes into the same store, as in memory: plane 0 and
    its painting stay, the planes merge, and the store named for plane 0 is not refused for plane 1."""
    dock, image = lazy_dock, _stack()
    viewer.add_image(da.from_array(image, chunks=(1, 64, 64)), name="big")
    dock.forbidden.add(image.shape)
    dock.panel.instances.setChecked(True)
    dock.predict_image.refresh("big")
    dock.panel.store.edit.setText(str(tmp_path / "big.zarr"))
    viewer.dims.set_current_step(0, 0)
    assert dock.predict() is not None
    _wait_idle(dock, qtbot)
    layer = viewer.layers["big prediction"]
    value = _paint(layer)
    painted = np.array(layer.data[0])
    viewer.dims.set_current_step(0, 1)
    assert dock.predict() is not None
    _wait_idle(dock, qtbot)
    assert viewer.layers["big prediction"] is layer and "Error" not in dock.log.toPlainText()
    meta = layer.metadata["napari_convlora"]
    assert meta["planes"] == [0, 1] and meta["store"] == str(tmp_path / "big.zarr") and meta["painted"]
    assert sorted(p.name for p in tmp_path.glob("*.zarr")) == ["big-instances.zarr", "big.zarr"]
    assert list(session_folder().glob("big_*")) == []  # the fresh stores of plane 1, copied in, are removed
    assert viewer.layers["big instances"].metadata["napari_convlora"]["planes"] == [0, 1]
    assert "added plane 1 to 'big prediction'" in dock.log.toPlainText()

    dock.forbidden.clear()
    expected, expected_instances = _in_memory(dock, viewer, qtbot, image)
    assert np.array_equal(layer.data[0], painted) and painted[20, 20] == value
    assert np.array_equal(layer.data[1], expected[1])
    instances = viewer.layers["big instances"].data
    assert _same_partition(instances[1], expected_instances[1]) and instances[0].any()


def test_a_painted_temporary_store_is_kept_when_another_store_is_chosen(lazy_dock, viewer, qtbot, tmp_path):
    dock = lazy_dock
    viewer.add_image(da.from_array(_stack(), chunks=(1, 64, 64)), name="big")
    dock.predict_image.refresh("big")
    dock.predict()
    _wait_idle(dock, qtbot)
    first = viewer.layers["big prediction"].metadata["napari_convlora"]["store"]
    _paint(viewer.layers["big prediction"])
    dock.panel.store.edit.setText(str(tmp_path / "other.zarr"))
    dock.predict()  # another store named: a new layer over it; the painted temporary store is not deleted
    _wait_idle(dock, qtbot)
    meta = viewer.layers["big prediction"].metadata["napari_convlora"]
    assert meta["store"] == str(tmp_path / "other.zarr") and meta["planes"] == [0] and Path(first).is_dir()
    assert f"the painted store {first} of the replaced 'big prediction' is kept" in dock.log.toPlainText()


@pytest.mark.parametrize("stage, counted", [("intensity range", "chunk"), ("instance ids", "block")])
def test_stop_during_a_whole_image_pass(lazy_dock, viewer, qtbot, tmp_path, monkeypatch, stage, counted):
    """Review 3: the intensity-range pass and the instance relabelling poll Stop, and say what they do."""
    from napari_convlora._napari.jobs import TileProgress

    monkeypatch.setattr("napari_convlora.prediction.blockwise.ranges.RANGE_STEP_BYTES", 1)  # a chunk at a time
    dock = lazy_dock
    viewer.add_image(da.from_array(_stack(), chunks=(1, 64, 64)), name="big")
    dock.predict_image.refresh("big")
    dock.panel.store.edit.setText(str(tmp_path / "stopped.zarr"))
    dock.panel.instances.setChecked(True)
    seen = []

    class StopInPass(TileProgress):
        def __call__(self, done, total, text=None):
            super().__call__(done, total, text)
            seen.append((self.text, done, total))
            if self.text.startswith(stage) and done == 1:
                dock.workers[-1].quit()

    monkeypatch.setattr(dock.view, "start_prediction", lambda text="": StopInPass(text=text))
    assert dock.predict(whole_stack=True) is not None
    _wait_idle(dock, qtbot)
    assert "prediction stopped: nothing was written" in dock.log.toPlainText()
    assert list(tmp_path.glob("*stopped*")) == [] and "big prediction" not in viewer.layers
    assert (f"{stage}: {counted} %v / %m", 1, 18) in seen  # 18 chunks; 18 blocks
    assert max(done for text, done, _ in seen if text == BLOCKS_TEXT) == (0 if stage == "intensity range" else 18)


def test_chunks_much_larger_than_a_block_are_warned_about_once(lazy_dock, viewer, qtbot):
    """Review 4: a dask-image-like stack (a chunk a plane) makes every block compute its whole plane."""
    dock = lazy_dock
    viewer.add_image(da.from_array(_stack(), chunks=(1, 160, 160)), name="planes")
    dock.predict_image.refresh("planes")
    for plane in (0, 1):
        viewer.dims.set_current_step(0, plane)
        dock.predict()
        _wait_idle(dock, qtbot)
    log = dock.log.toPlainText()
    assert log.count("'planes' is stored in chunks of 1 x 160 x 160 pixels") == 1 and "rechunk" in log


def test_training_and_evaluation_refuse_a_lazy_layer_over_the_limit(lazy_dock, viewer, qtbot, monkeypatch):
    """Review 2: what reads a layer whole refuses one over LARGE_BYTES in one line naming it; a smaller dask
    layer is read whole (evaluated here)."""
    told = []
    monkeypatch.setattr("napari_convlora._qt.widget.show_info", told.append)
    monkeypatch.setattr("napari_convlora._napari.layers.LARGE_BYTES", 1000)
    dock, (image, labels) = lazy_dock, synthetic_cells(160, seed=4)
    viewer.add_image(da.from_array(image, chunks=64), name="big")
    viewer.add_labels(labels, name="big labels")
    monkeypatch.setattr(dock.data_form, "pairs", lambda: [("big", "big labels")])
    dock.predict_image.refresh("big")
    dock.panel.evaluate_labels.refresh("big labels")
    assert dock.train() is None and dock.evaluate() is None and not dock.workers
    assert len(told) == 2 and all("layer 'big' (dask array 160 x 160" in t and "crop a region into a new layer"
                                  in t and "\n" not in t for t in told)

    monkeypatch.setattr("napari_convlora._napari.layers.LARGE_BYTES", 1 << 30)
    assert dock.evaluate() is not None
    _wait_idle(dock, qtbot)
    assert "evaluated 'big' against 'big labels'" in dock.log.toPlainText()


def test_model_zoo_export_reads_a_crop_of_the_plane_shown(lazy_dock, viewer, tmp_path, qtbot, monkeypatch):
    """Review 2: the package's test input comes from one plane: only that plane's centre crop is read."""
    captured = {}

    def job(model, path, image, plane):
        captured.update(image=image, plane=plane)
        yield from ()
        return path

    monkeypatch.setattr("napari_convlora._napari.jobs.model_zoo_job", job)
    image = _stack()
    viewer.add_image(da.from_array(image, chunks=(1, 64, 64)), name="big")
    viewer.dims.set_current_step(0, 1)
    lazy_dock.predict_image.refresh("big")
    assert lazy_dock.export_model_zoo(str(tmp_path / "m.zip")) is not None
    _wait_idle(lazy_dock, qtbot)
    assert np.array_equal(captured["image"].image, image[1]) and captured["plane"] is None
