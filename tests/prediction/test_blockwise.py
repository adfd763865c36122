"""Prediction of images larger than memory, block by block on dask: equal to the in-memory tiled prediction,
Zarr / OME-Zarr / TIFF in and out, instance ids global across block borders, a local cluster, and refusals."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from helpers import make_model, perturb_trainable

zarr = pytest.importorskip("zarr")
pytest.importorskip("distributed")

from napari_convlora import load_model, save_adapter  # noqa: E402
from napari_convlora.prediction.blockwise.instances import BlockEdges, border_pairs, id_offsets, merge_ids  # noqa: E402
from napari_convlora.prediction.blockwise.tiles import BlockPlan, TileGrid  # noqa: E402
from napari_convlora.prediction.blockwise.run import ModelSource, predict_blockwise  # noqa: E402
from napari_convlora.cli import main  # noqa: E402
from napari_convlora.data import ImageLayout  # noqa: E402
from napari_convlora.errors import ConfigError  # noqa: E402
from napari_convlora.prediction.planes import predict_image  # noqa: E402
from napari_convlora.prediction.tiling import instances_from_labels  # noqa: E402
from napari_convlora.io.zarr_stores import open_lazy, require_large  # noqa: E402

VALUES = (0, 2, 5)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_file(tiny_checkpoint, tmp_path_factory):
    """A 3-class adapter (64 px input) on the tiny SAM, written as workers read it."""
    model = perturb_trainable(make_model(tiny_checkpoint, num_classes=3, input_size=64, class_values=VALUES), 0.3)
    return save_adapter(model.eval(), tmp_path_factory.mktemp("model") / "m.safetensors"), tiny_checkpoint


@pytest.fixture(scope="module")
def source(model_file):
    return ModelSource.of(*model_file)


@pytest.fixture(scope="module")
def in_memory(model_file):
    """The in-memory tiled prediction of the same model file."""
    model = load_model(*model_file)

    def predict(image, layout=None, batch_size=1):
        return predict_image(model, image, layout, device="cpu", batch_size=batch_size, return_probabilities=True,
                             instances=True)

    return predict


def _image(shape, seed=0):
    return (np.random.default_rng(seed).random(shape) * 4000).astype(np.uint16)


def _zarr(path, image, chunks=(48, 48), zarr_format=2):
    array = zarr.create_array(str(path), shape=image.shape, chunks=chunks[-image.ndim:], dtype=image.dtype,
                              zarr_format=zarr_format)
    array[...] = image
    return path


def _same_partition(a, b):
    """True when the ids of ``a`` and ``b`` name the same objects (a one-to-one map between their ids)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def test_blocks_equal_the_in_memory_tiled_prediction_exactly(tmp_path, source, in_memory):
    image = _image((150, 170))  # blocks of 70: 3 x 3 blocks, the last ones 10 and 30 pixels; tiles of 64
    result = predict_blockwise(source, open_lazy(_zarr(tmp_path / "in.zarr", image)), tmp_path / "labels.zarr",
                               probabilities=tmp_path / "probs.zarr", batch_size=1, block_size=70)
    expected = in_memory(image)
    labels, probs = zarr.open(str(tmp_path / "labels.zarr"))[...], zarr.open(str(tmp_path / "probs.zarr"))[...]
    assert np.array_equal(labels, expected.labels) and labels.dtype == expected.labels.dtype
    assert np.array_equal(probs, expected.probabilities)  # bitwise: the same tiles, weights and order of sums
    assert result.blocks == 9 and result.tiles > result.unique_tiles == 16  # 4 x 4 over the 166 x 186 extended plane
    assert result.pixel_counts == {v: int((expected.labels == v).sum()) for v in VALUES}


def test_batched_tiles_agree_to_float_rounding(tmp_path, source, in_memory):
    """With batches of 4 a tile's output may differ in the last bits with its batch companions (CPU kernels),
    not through the blending."""
    image = _image((130, 140), seed=1)
    predict_blockwise(source, open_lazy(_zarr(tmp_path / "in.zarr", image)), tmp_path / "labels.zarr",
                      probabilities=tmp_path / "probs.zarr", batch_size=4, block_size=100)
    expected = in_memory(image, batch_size=4)
    assert np.array_equal(zarr.open(str(tmp_path / "labels.zarr"))[...], expected.labels)
    np.testing.assert_allclose(zarr.open(str(tmp_path / "probs.zarr"))[...], expected.probabilities, atol=1e-4)


def test_ome_zarr_round_trip_with_channels_and_planes(tmp_path, source, in_memory):
    image = _image((2, 2, 90, 100), seed=2)  # c, z, y, x
    store = zarr.open_group(str(tmp_path / "in.ome.zarr"), mode="w", zarr_format=2)
    store.create_array("0", shape=image.shape, chunks=(1, 1, 40, 40), dtype=image.dtype)[...] = image
    axes = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    store.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 2.0, 0.5, 0.5]}]}]}]
    lazy = open_lazy(tmp_path / "in.ome.zarr")
    assert lazy.axes == "czyx" and lazy.channel_axis == 0
    predict_blockwise(source, lazy, tmp_path / "labels.ome.zarr", instances=tmp_path / "inst.ome.zarr",
                      block_size=64, batch_size=1)
    expected = in_memory(image, ImageLayout(channel_axis=0))
    out = zarr.open_group(str(tmp_path / "labels.ome.zarr"), mode="r")
    assert np.array_equal(out["0"][...], expected.labels)
    (meta,) = out.attrs["multiscales"]
    assert [a["name"] for a in meta["axes"]] == ["z", "y", "x"] and meta["axes"][1]["unit"] == "micrometer"
    assert meta["datasets"] == [{"path": "0", "coordinateTransformations": [{"type": "scale",
                                                                             "scale": [2.0, 0.5, 0.5]}]}]
    assert "image-label" in out.attrs
    instances = zarr.open_group(str(tmp_path / "inst.ome.zarr"), mode="r")["0"][...]
    assert instances.dtype == np.uint32 and _same_partition(instances, expected.instances)


def test_tiff_input_and_zarr_v3_round_trip(tmp_path, source, in_memory):
    import tifffile

    image = _image((100, 120), seed=3)
    tifffile.imwrite(tmp_path / "in.tif", image, tile=(32, 32))
    predict_blockwise(source, open_lazy(tmp_path / "in.tif"), tmp_path / "labels.zarr", block_size=64, batch_size=1)
    assert np.array_equal(zarr.open(str(tmp_path / "labels.zarr"))[...], in_memory(image).labels)
    v3 = _zarr(tmp_path / "v3.zarr", image, zarr_format=3)
    predict_blockwise(source, open_lazy(v3), tmp_path / "out3.zarr", block_size=64, batch_size=1)
    out = zarr.open(str(tmp_path / "out3.zarr"), mode="r")
    assert out.metadata.zarr_format == 3 and np.array_equal(out[...], in_memory(image).labels)


def _blockwise_instances(labels, block):
    """Instances of ``labels`` made as blockwise prediction makes them: per block, then merged."""
    grid = TileGrid.of(*labels.shape, tile=8, overlap=0.25)
    blocks = BlockPlan(grid, block, (0,)).blocks()
    local, edges = [], []
    for b in blocks:
        part = labels[slice(*b.rows), slice(*b.cols)]
        ids = instances_from_labels(part).astype(np.uint32)
        local.append(ids)
        edges.append(BlockEdges.of(part, ids))
    offsets = id_offsets([e.count for e in edges])
    table = merge_ids(int(offsets[-1]), border_pairs(blocks, edges, offsets, background=0))
    out = np.zeros(labels.shape, np.uint32)
    for b, ids in zip(blocks, local):
        out[slice(*b.rows), slice(*b.cols)] = table[np.where(ids > 0, ids + offsets[b.index], 0)]
    return out


def test_instance_ids_are_global_across_block_borders():
    labels = np.zeros((40, 40), np.uint8)
    labels[5:35, 8:11] = 1  # crosses the horizontal borders at 10, 20 and 30
    labels[18, 11:38] = 2  # crosses the vertical borders, touches the first object (another class)
    labels[9, 9 + 10] = 1  # one pixel of class 1 touching block (0, 1) only diagonally: [9, 19] and [10, 20]
    labels[10, 20] = 1
    labels[29, 29], labels[30, 30] = 1, 1  # two pixels meeting diagonally where four blocks meet
    labels[0:3, 37:40] = 1  # inside one block
    merged = _blockwise_instances(labels, block=10)
    whole = instances_from_labels(labels)
    assert _same_partition(merged, whole)
    assert len(np.unique(merged[5:35, 8:11])) == 1 and len(np.unique(merged[18, 11:38])) == 1
    assert merged[9, 19] == merged[10, 20] and merged[29, 29] == merged[30, 30]
    assert set(np.unique(merged)) == set(range(int(merged.max()) + 1))  # numbered 1..N


def test_random_objects_get_the_components_of_the_whole_image():
    rng = np.random.default_rng(0)
    labels = (rng.random((67, 53)) < 0.45).astype(np.uint8) * rng.integers(1, 3, (67, 53)).astype(np.uint8)
    for block in (5, 16, 30):
        assert _same_partition(_blockwise_instances(labels, block), instances_from_labels(labels))


def test_a_local_cluster_of_two_workers_gives_the_same_result(tmp_path, source, in_memory):
    from napari_convlora.prediction.blockwise.cluster import dask_client

    image = _image((120, 130), seed=4)
    with dask_client(workers=2, processes=False, memory_limit=None) as client:
        result = predict_blockwise(source, open_lazy(_zarr(tmp_path / "in.zarr", image)), tmp_path / "labels.zarr",
                                   instances=tmp_path / "inst.zarr", batch_size=1, block_size=64, client=client)
    expected = in_memory(image)
    assert np.array_equal(zarr.open(str(tmp_path / "labels.zarr"))[...], expected.labels)
    assert _same_partition(zarr.open(str(tmp_path / "inst.zarr"))[...], expected.instances)
    assert result.peak_rss and all(v > 0 for v in result.peak_rss.values())


def test_refusals_are_one_line_and_leave_no_output(tmp_path, model_file, source, capsys, monkeypatch,
                                                   other_tiny_checkpoint):
    from napari_convlora.prediction.blockwise import run as blockwise
    from napari_convlora.prediction.blockwise.cluster import dask_client
    from napari_convlora.errors import CheckpointError

    model, checkpoint = map(str, model_file)
    base = ["predict", "--model", model, "--checkpoint", checkpoint]
    assert main(base + ["--image", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "o.zarr")]) == 1
    err = capsys.readouterr().err.strip()
    assert "missing.zarr: no such file or Zarr store" in err and "\n" not in err
    image = _zarr(tmp_path / "in.zarr", _image((60, 60)))
    (tmp_path / "exists.zarr").mkdir()
    assert main(base + ["--image", str(image), "--out", str(tmp_path / "exists.zarr")]) == 2
    assert "exists.zarr exists" in capsys.readouterr().err
    assert main(base + ["--image", str(image), "--out", str(tmp_path / "o.tif")]) == 2  # a .zarr in, a .tif out
    assert "--out" in capsys.readouterr().err
    assert main(base + ["--image", str(tmp_path / "a.tif"), "--out", str(tmp_path / "b.tif"), "--workers", "2"]) == 2
    assert "--workers applies to images predicted into a Zarr store" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="was trained on 'tiny_sam.pth'"):  # before any worker starts
        ModelSource.of(model_file[0], other_tiny_checkpoint).config()
    with pytest.raises(ConfigError, match="--scheduler tcp://127.0.0.1:9: no dask scheduler answered within 1 s"):
        with dask_client("tcp://127.0.0.1:9", timeout=1):
            pass

    calls = []

    def fail_second(job, block):  # a block that fails half way through the run
        calls.append(block.index)
        if len(calls) == 2:
            raise ValueError("boom")
        return predict_one_block(job, block)

    predict_one_block = blockwise.predict_one_block
    monkeypatch.setattr(blockwise, "predict_one_block", fail_second)
    with pytest.raises(ValueError, match="boom"):
        predict_blockwise(source, open_lazy(image), tmp_path / "half.zarr", block_size=32)
    assert not (tmp_path / "half.zarr").exists() and not list(tmp_path.glob(".half.zarr.*"))


def test_an_array_open_in_this_process_chosen_planes_and_a_stop_between_tile_batches(tmp_path, model_file,
                                                                                    in_memory):
    """What the dock uses (issue 14): a dask array and the model in memory, no client; one plane of a stack; a
    stop inside a block raises PredictionCancelled and leaves nothing under the output names."""
    da = pytest.importorskip("dask.array")
    from napari_convlora.io.arrays import open_array
    from napari_convlora.prediction.tiling import PredictionCancelled
    from napari_convlora.prediction.blockwise.worker_model import LoadedModel

    model = LoadedModel(load_model(*model_file))
    image = _image((2, 100, 110), seed=6)
    result = predict_blockwise(model, open_array(da.from_array(image, chunks=(1, 40, 40))), tmp_path / "one.zarr",
                               batch_size=1, block_size=64, planes=[1])
    labels = zarr.open(str(tmp_path / "one.zarr"))[...]
    assert np.array_equal(labels[1], in_memory(image).labels[1]) and not labels[0].any() and result.blocks == 4
    polls = []
    with pytest.raises(PredictionCancelled):
        predict_blockwise(model, open_array(image), tmp_path / "stopped.zarr", instances=tmp_path / "i.zarr",
                          batch_size=1, block_size=64, should_stop=lambda: polls.append(1) or len(polls) > 3)
    assert len(polls) == 4 and list(tmp_path.glob("*stopped*")) == list(tmp_path.glob("*i.zarr*")) == []
    with pytest.raises(ValueError, match="plane indices \\[2\\] out of range"):
        predict_blockwise(model, open_array(image), tmp_path / "bad.zarr", planes=[2])


def test_the_command_line_predicts_a_zarr_store(tmp_path, model_file, capsys, monkeypatch):
    import contextlib

    from napari_convlora.prediction.blockwise import cluster as dask_cluster

    real = dask_cluster.dask_client
    asked = {}

    @contextlib.contextmanager
    def in_process(scheduler, workers, memory_limit):  # workers as threads: no new interpreters in the test
        asked.update(scheduler=scheduler, workers=workers)
        with real(None, workers, None, processes=False) as client:
            yield client

    monkeypatch.setattr(dask_cluster, "dask_client", in_process)
    image = _image((80, 90), seed=5)
    model, checkpoint = map(str, model_file)
    code = main(["predict", "--model", model, "--checkpoint", checkpoint, "--image",
                 str(_zarr(tmp_path / "in.zarr", image)), "--out", str(tmp_path / "labels.zarr"), "--workers", "2",
                 "--block-size", "48", "--batch-size", "1", "--instances", str(tmp_path / "inst.zarr")])
    out = capsys.readouterr().out
    assert code == 0 and asked == {"scheduler": None, "workers": 2}
    assert "labels 80 x 90 ->" in out and "instances ->" in out
    expected = predict_image(load_model(model, checkpoint), image, device="cpu", batch_size=1)
    assert np.array_equal(zarr.open(str(tmp_path / "labels.zarr"))[...], expected.labels)


@pytest.fixture(scope="module")
def nan_model_file(tiny_checkpoint, tmp_path_factory):
    """Finite weights whose every output is NaN, as a training run that diverged saved them (issue 21)."""
    model = make_model(tiny_checkpoint, num_classes=3, input_size=64, class_values=VALUES).eval()
    with torch.no_grad():
        model.head.mask_tokens.weight.mul_(1e36)  # the decoder's attention overflows
    return save_adapter(model, tmp_path_factory.mktemp("nan") / "diverged.safetensors"), tiny_checkpoint


def test_a_model_that_predicts_nan_stops_at_the_first_block_and_leaves_nothing(tmp_path, nan_model_file, capsys,
                                                                                monkeypatch):
    """Block-wise prediction wrote all-background labels from NaN probabilities (issue 21): the first block whose
    probabilities are not finite stops it, with one line naming the model's file, and nothing is left under the
    output names; from the command line (workers), the API (no client) and the dock (the model in memory)."""
    import contextlib

    from napari_convlora.prediction.blockwise import cluster as dask_cluster
    from napari_convlora.prediction.blockwise import run as blockwise
    from napari_convlora.prediction.blockwise.worker_model import LoadedModel
    from napari_convlora.prediction.tiling import NonFiniteProbabilities

    real = dask_cluster.dask_client

    @contextlib.contextmanager
    def in_process(scheduler, workers, memory_limit):  # workers as threads: no new interpreters in the test
        with real(None, workers, None, processes=False) as client:
            yield client

    monkeypatch.setattr(dask_cluster, "dask_client", in_process)
    model, checkpoint = map(str, nan_model_file)
    image = _zarr(tmp_path / "in.zarr", _image((100, 110), seed=8))
    outputs = ["--out", str(tmp_path / "labels.zarr"), "--probabilities", str(tmp_path / "p.zarr"), "--instances",
               str(tmp_path / "i.zarr")]
    code = main(["predict", "--model", model, "--checkpoint", checkpoint, "--image", str(image), *outputs,
                 "--workers", "2", "--block-size", "64", "--batch-size", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1] == f"napari-convlora predict: error: {model}: the model predicts NaN or infinite " \
        "probabilities on this image, so it cannot segment it (was it saved by a training run that diverged?): use " \
        "an earlier file of that run, or train again with a lower learning rate"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]

    calls = []
    real_block = blockwise.predict_one_block
    monkeypatch.setattr(blockwise, "predict_one_block", lambda job, block: calls.append(block) or real_block(job, block))
    named = rf"^{re.escape(model)}: the model predicts NaN or infinite probabilities"
    with pytest.raises(NonFiniteProbabilities, match=named):
        predict_blockwise(ModelSource.of(model, checkpoint), open_lazy(image), tmp_path / "api.zarr", block_size=64)
    assert len(calls) == 1  # 4 blocks: the first stopped it
    with pytest.raises(NonFiniteProbabilities, match=named):  # the dock: a model loaded from its file
        predict_blockwise(LoadedModel(load_model(model, checkpoint)), open_lazy(image), tmp_path / "dock.zarr")
    in_memory = make_model(nan_model_file[1], num_classes=3, input_size=64, class_values=VALUES)
    with torch.no_grad():
        in_memory.head.mask_tokens.weight.mul_(1e36)
    with pytest.raises(NonFiniteProbabilities, match=r"^the current model: the model predicts NaN"):
        predict_blockwise(LoadedModel(in_memory), open_lazy(image), tmp_path / "dock.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]


def test_a_missing_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(ValueError, match=r"pip install 'napari-convlora\[large\]'"):
        require_large("zarr")


@pytest.mark.parametrize("shape, chunks, layout, dtype, budget, spatial_chunks", [
    ((2, 1500, 1500), (1, 333, 250), ImageLayout(), np.uint16, 300_000, 60),  # a strided sample (step 2)
    ((2, 1500, 1500), (1, 333, 251), ImageLayout(), np.uint16, 550_000, 60),  # 3 chunks a slab: odd offsets
    ((700, 900, 3), (256, 300, 3), ImageLayout(rgb=True), np.uint8, 300_000, 9),
    ((2, 300, 400), (1, 128, 128), ImageLayout(channel_axis=0), np.float32, 300_000, 12),
])
def test_intensity_ranges_read_in_slabs_equal_the_in_memory_ranges(monkeypatch, shape, chunks, layout, dtype, budget,
                                                                   spatial_chunks):
    """Review 3: read a few chunks at a time (Stop polled between), the ranges are those of the whole image in
    memory, and progress counts chunks."""
    da = pytest.importorskip("dask.array")
    from napari_convlora.prediction.blockwise import run as blockwise
    from napari_convlora.io.arrays import open_array
    from napari_convlora.config import InputSpec
    from napari_convlora.data import SamPlanes

    image = (np.random.default_rng(1).random(shape) * 4000).astype(dtype)
    expected = SamPlanes(image, layout, InputSpec()).ranges
    monkeypatch.setattr("napari_convlora.prediction.blockwise.ranges.RANGE_STEP_BYTES", budget)
    seen, polls = [], []
    ranges = blockwise.intensity_ranges(open_array(da.from_array(image, chunks=chunks)), layout, InputSpec(),
                                        should_stop=lambda: polls.append(1) and False,
                                        progress=lambda done, total: seen.append((done, total)))
    assert list(ranges) == [tuple(r) for r in expected]
    assert len(seen) == len(polls) > 1 and seen[-1] == (spatial_chunks, spatial_chunks)


def test_stop_during_the_intensity_range_pass_and_the_instance_relabelling(tmp_path, model_file):
    """Review 3: Stop is polled before any chunk is read for the ranges, and between blocks of the relabelling;
    either way nothing is left under the output names."""
    da = pytest.importorskip("dask.array")
    from napari_convlora.io.arrays import open_array
    from napari_convlora.prediction.tiling import PredictionCancelled
    from napari_convlora.prediction.blockwise.worker_model import LoadedModel

    model = LoadedModel(load_model(*model_file))
    image, reads = _image((2, 100, 110), seed=7), []

    class Recording:  # a lazily read array (what dask reads chunk by chunk)
        shape, dtype, ndim = image.shape, image.dtype, image.ndim

        def __getitem__(self, key):
            reads.append(key)
            return image[key]

    lazy = open_array(da.from_array(Recording(), chunks=(1, 40, 40)))
    with pytest.raises(PredictionCancelled):
        predict_blockwise(model, lazy, tmp_path / "ranges.zarr", block_size=64, should_stop=lambda: True)
    assert reads == [] and list(tmp_path.iterdir()) == []

    blocks, passes = [], []
    with pytest.raises(PredictionCancelled):
        predict_blockwise(model, open_array(image), tmp_path / "ids.zarr", instances=tmp_path / "ids-i.zarr",
                          block_size=64, progress=lambda done, total, _: blocks.append((done, total)),
                          should_stop=lambda: bool(blocks) and blocks[-1][0] == blocks[-1][1],
                          pass_progress=lambda name, done, total: passes.append((name, done, total)))
    assert blocks[-1] == (8, 8) and passes == [("intensity range", 1, 1)]  # stopped before the first relabel
    assert list(tmp_path.iterdir()) == []


def test_chunks_much_larger_than_a_block_are_named_in_a_warning(tmp_path):
    """Review 4: a chunk is read whole by every block touching it; over 4 blocks' pixels, say so in one line."""
    da = pytest.importorskip("dask.array")
    from napari_convlora.io.arrays import chunk_warning

    image = np.zeros((3, 256, 256), np.uint8)
    assert chunk_warning(image, 64) is None
    assert chunk_warning(da.from_array(image, chunks=(1, 128, 128)), 64) is None  # 4 blocks: not more
    text = chunk_warning(da.from_array(image, chunks=(1, 256, 256)), 64, "'img'")
    assert text.startswith("'img' is stored in chunks of 1 x 256 x 256 pixels, 16 times a block of 64 x 64")
    assert "rechunk" in text and "\n" not in text
    stored = zarr.create_array(str(tmp_path / "a.zarr"), shape=image.shape, chunks=(1, 256, 256), dtype=np.uint8)
    assert "1 x 256 x 256" in chunk_warning(stored, 64)
    rgb = da.from_array(np.zeros((256, 256, 3), np.uint8), chunks=(128, 128, 3))
    assert chunk_warning(rgb, 64, channel_axis=2) is None
