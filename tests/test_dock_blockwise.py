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
from napari_convlora.sample_data import CLASS_NAMES, synthetic_cells

da = pytest.importorskip("dask.array")
zarr = pytest.importorskip("zarr")

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("isolated_settings")]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

    dock.predict()  # again: the layer is replaced and the temporary store it read is deleted
    _wait_idle(dock, qtbot)
    second = viewer.layers["pyramid prediction"].metadata["napari_convlora"]["store"]
    assert second != first and not Path(first).exists()
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
        def __call__(self, done, total):
            super().__call__(done, total)
            if done == 1:  # on the compute thread, after the first block: what the Stop button does
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
    monkeypatch.setattr("napari_convlora._napari.block_predict.LARGE_BYTES", 1000)
    image = synthetic_cells(160, seed=3)[0]
    viewer.add_image(image, name="large numpy")
    lazy_dock.predict_image.refresh("large numpy")
    lazy_dock.predict()
    _wait_idle(lazy_dock, qtbot)
    layer = viewer.layers["large numpy prediction"]
    assert isinstance(layer.data, zarr.Array) and "numpy array 160 x 160" in lazy_dock.log.toPlainText()
