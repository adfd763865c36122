"""Tiles are blended where the model's probabilities are (issue 14): on a device in torch, with one copy per
finished band to the host; on the CPU in numpy. The torch sums, forced on the CPU, equal the numpy ones; a run on
the 'meta' device shows which tensors come to the host."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import make_model
from napari_convlora.prediction import tiling
from napari_convlora.prediction.blockwise.tiles import Block, TileGrid, block_input_region, predict_block
from napari_convlora.prediction.planes import predict_image
from napari_convlora.prediction.tiling import BandSums, predict_tiled, tile_starts

_MIX = torch.tensor([[0.02, -0.01, 0.005], [-0.01, 0.015, 0.0], [0.0, 0.0, -0.012], [0.004, 0.006, -0.02]])


def content_and_position_prob_fn(batch: torch.Tensor) -> torch.Tensor:
    """B x 3 x t x t -> B x 4 x t x t: softmax of a linear map of the pixels plus a ramp across the tile, so that
    overlapping tiles disagree and the blending weights matter."""
    t = batch.shape[-1]
    ramp = torch.linspace(-1.0, 1.0, t)
    logits = torch.einsum("kc,bchw->bkhw", _MIX, batch)
    logits[:, 1] += 2.0 * ramp[None, None, :]
    logits[:, 2] -= 1.5 * ramp[None, :, None]
    return torch.softmax(logits, dim=1)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (h, w, 3)).astype(np.float32)


@pytest.fixture
def torch_on_cpu(monkeypatch):
    """Blend CPU probabilities in torch, as on a CUDA or MPS device."""
    monkeypatch.setattr(tiling, "HOST_BLENDED", frozenset())


CASES = [  # (height, width, overlap, batch size): one tile, sizes that are not multiples of the tile, overlaps
    (64, 64, 0.25, 1), (150, 210, 0.0, 1), (150, 210, 0.25, 4), (300, 230, 0.25, 1), (97, 131, 0.5, 4),
    (40, 300, 0.25, 4), (17, 23, 0.0, 1),
]


@pytest.mark.parametrize("height, width, overlap, batch_size", CASES)
def test_torch_sums_on_the_cpu_equal_the_numpy_sums(height, width, overlap, batch_size, monkeypatch):
    image = _image(height, width, seed=height)
    host = predict_tiled(content_and_position_prob_fn, image, 64, 4, overlap=overlap, batch_size=batch_size)
    monkeypatch.setattr(tiling, "HOST_BLENDED", frozenset())
    blended_in_torch = predict_tiled(content_and_position_prob_fn, image, 64, 4, overlap=overlap,
                                     batch_size=batch_size)
    assert blended_in_torch.dtype == np.float32 and blended_in_torch.shape == (4, height, width)
    np.testing.assert_allclose(blended_in_torch, host, rtol=0, atol=1e-6)
    assert np.array_equal(blended_in_torch.argmax(0), host.argmax(0))


def test_band_sums_in_torch_and_numpy_agree_step_by_step():
    """The same tiles added, the same bands finished: equal sums, equal weights, equal finished rows."""
    rng = np.random.default_rng(0)
    windows = [rng.uniform(0.1, 1.0, 32).astype(np.float32) for _ in range(3)]
    probs = torch.from_numpy(rng.random((3, 2, 32, 32), dtype=np.float32))
    host, dev = BandSums(2, 32, 80, 10, None), BandSums(2, 32, 80, 10, torch.device("cpu"))
    for sums in (host, dev):
        win = sums.windows(windows)
        for i, (x, tile_probs) in enumerate(zip((0, 24, 48), sums.batch(probs))):
            sums.add(tile_probs, x, win[i], win[2 - i])
    assert isinstance(host.sums, np.ndarray) and isinstance(dev.sums, torch.Tensor)
    np.testing.assert_array_equal(dev.sums.numpy(), host.sums)
    np.testing.assert_array_equal(dev.weight.numpy(), host.weight)
    for rows, first, last in ((20, 12, 30), (12, 30, 42)):  # the second band starts at row 30 = 10 + 20
        a, b = host.finish(rows, first, last, slice(3, 70)), dev.finish(rows, first, last, slice(3, 70))
        assert isinstance(b, np.ndarray) and b.shape == (2, last - first, 67)
        np.testing.assert_array_equal(a, b)
    assert host.top == dev.top == 42
    np.testing.assert_array_equal(dev.sums.numpy(), host.sums)  # moved down, zeros below
    assert host.finish(32, 80, 80, slice(0, 80)) is None and dev.finish(32, 80, 80, slice(0, 80)) is None


@pytest.mark.parametrize("overlap", [0.0, 0.25])
def test_blocks_blended_in_torch_equal_the_whole_plane(overlap, torch_on_cpu):
    """Block-wise prediction shares the sums: with torch sums the blocks still equal the whole plane bitwise."""
    image = _image(150, 170, seed=3)
    whole = predict_tiled(content_and_position_prob_fn, image, 64, 4, overlap=overlap, batch_size=1)
    grid = TileGrid.of(150, 170, 64, overlap, border=0)  # the whole plane above has none
    for rows, cols in (((0, 70), (0, 70)), ((70, 140), (70, 140)), ((140, 150), (140, 170))):
        block = Block(0, 0, 0, 0, rows, cols)
        (r0, r1), (c0, c1) = block_input_region(grid, block)
        probs = predict_block(content_and_position_prob_fn, image[r0:r1, c0:c1], grid, block, 4, batch_size=1)
        assert np.array_equal(probs, whole[:, rows[0] : rows[1], cols[0] : cols[1]])


def test_a_tiny_sam_predicts_the_same_labels_with_torch_sums(tiny_checkpoint, monkeypatch):
    """Multi-class, batches of 4, a plane that is not a multiple of the tile: the labels stay the same."""
    torch.manual_seed(0)
    model = make_model(tiny_checkpoint, num_classes=3, input_size=64, class_values=(0, 2, 5)).eval()
    image = (np.random.default_rng(1).random((150, 170)) * 4000).astype(np.uint16)
    host = predict_image(model, image, device="cpu", batch_size=4, return_probabilities=True)
    monkeypatch.setattr(tiling, "HOST_BLENDED", frozenset())
    dev = predict_image(model, image, device="cpu", batch_size=4, return_probabilities=True)
    assert np.array_equal(dev.labels, host.labels)
    np.testing.assert_allclose(dev.probabilities, host.probabilities, rtol=0, atol=1e-6)


class HostCopies(TorchDispatchMode):
    """Records every tensor that leaves the 'meta' device for the host (``.cpu()``, ``.to("cpu")``, a ``copy_``
    into a CPU tensor: each an operation that fails on 'meta', which has no data) and hands back zeros of its
    shape in its place; counts the scalars read (``.item()``, ``bool()``: the finite flag reads True)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.scalars = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            return func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as error:
            metas = [a for a in args if isinstance(a, torch.Tensor) and a.device.type == "meta"]
            if not metas or "meta" not in str(error):
                raise
        source = metas[-1]
        if func._overloadpacket is torch.ops.aten._local_scalar_dense:
            self.scalars += 1
            return True if source.dtype == torch.bool else 0
        self.shapes.append(tuple(source.shape))
        if func._overloadpacket is torch.ops.aten.copy_:
            return args[0]
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), source.dtype)
        return torch.zeros(source.shape, dtype=dtype)


def meta_prob_fn(num_classes: int):
    """A model on the 'meta' device: probabilities with shapes but no values, which cannot reach numpy unseen."""
    return lambda batch: torch.empty((batch.shape[0], num_classes, *batch.shape[2:]), device="meta")


@pytest.mark.parametrize("with_sink", [True, False])
def test_on_a_device_only_each_finished_band_comes_to_the_host_once(with_sink):
    """300 x 230 in 64 px tiles, overlap 0.25: 6 x 5 = 30 tiles in 8 batches of 4, 6 bands of rows; every copy to
    the host is one band (K x rows x 230), never a tile's probabilities; with each, the one byte that says whether
    all probabilities so far were finite (read after the band's copy has waited for the device)."""
    height, width, k = 300, 230, 3
    bands: list[tuple[int, tuple[int, ...]]] = []
    sink = (lambda first, band: bands.append((first, band.shape))) if with_sink else None
    with HostCopies() as copies:
        out = predict_tiled(meta_prob_fn(k), _image(height, width), 64, k, overlap=0.25, batch_size=4, sink=sink)
    rows_of_tiles = len(tile_starts(height, 64, 0.25))
    assert rows_of_tiles == 6 and len(copies.shapes) == rows_of_tiles == copies.scalars
    assert all(len(s) == 3 and s[0] == k and s[2] == width for s in copies.shapes)
    assert sum(s[1] for s in copies.shapes) == height
    if with_sink:
        assert [shape for _, shape in bands] == copies.shapes and bands[0][0] == 0
    else:
        assert isinstance(out, np.ndarray) and out.shape == (k, height, width)


def test_a_block_on_a_device_copies_only_its_owned_bands():
    grid = TileGrid.of(300, 230, 64, 0.25, border=0)
    block = Block(0, 0, 1, 1, (100, 200), (100, 200))
    (r0, r1), (c0, c1) = block_input_region(grid, block)
    with HostCopies() as copies:
        probs = predict_block(meta_prob_fn(2), _image(300, 230)[r0:r1, c0:c1], grid, block, 2, batch_size=4)
    assert probs.shape == (2, 100, 100)
    assert copies.shapes and all(s[0] == 2 and s[2] == 100 for s in copies.shapes)
    assert sum(s[1] for s in copies.shapes) == 100  # the owned rows only, each once
    assert copies.scalars == len(copies.shapes)  # the finite flag, read with each band


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_blending_equals_the_cpu():
    image = _image(700, 530, seed=7)

    def on_cuda(batch: torch.Tensor) -> torch.Tensor:
        return content_and_position_prob_fn(batch).cuda()  # the CPU's values, left on the device

    host = predict_tiled(content_and_position_prob_fn, image, 256, 4, overlap=0.25, batch_size=4)
    dev = predict_tiled(on_cuda, image, 256, 4, overlap=0.25, batch_size=4)
    np.testing.assert_allclose(dev, host, rtol=0, atol=1e-6)
    assert np.array_equal(dev.argmax(0), host.argmax(0))
