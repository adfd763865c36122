"""Tests of sliding-window prediction, blending and label conversion (no napari, no Qt)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_convlora.prediction import tiling
from napari_convlora.prediction.tiling import (
    NonFiniteProbabilities,
    PredictionCancelled,
    axis_windows,
    instances_from_labels,
    overlap_pixels,
    predict_tiled,
    probabilities_to_labels,
    tile_starts,
)

K = 3
_MIX = torch.tensor([[0.02, -0.01, 0.005], [-0.01, 0.015, 0.0], [0.0, 0.0, -0.012]])


def pixelwise_prob_fn(batch: torch.Tensor) -> torch.Tensor:
    """Translation-equivariant: softmax of a fixed linear map of each pixel's RGB (B x K x t x t)."""
    logits = torch.einsum("kc,bchw->bkhw", _MIX, batch)
    return torch.softmax(logits, dim=1)


def position_prob_fn(batch: torch.Tensor) -> torch.Tensor:
    """Depends only on the position inside the tile: p1 = x / (t - 1), p0 = 1 - p1 (B x 2 x t x t)."""
    b, _, t, _ = batch.shape
    p1 = torch.linspace(0.0, 1.0, t).expand(b, 1, t, t)
    return torch.cat([1.0 - p1, p1], dim=1)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, size=(h, w, 3)).astype(np.float32)


def direct(prob_fn, image: np.ndarray) -> np.ndarray:
    batch = torch.from_numpy(image.transpose(2, 0, 1)[None].copy())
    return prob_fn(batch)[0].numpy()


# (a) exactness for one tile ------------------------------------------------------------


def test_single_tile_equals_prob_fn_exactly() -> None:
    image = random_image(64, 64)
    out = predict_tiled(pixelwise_prob_fn, image, tile=64, num_classes=K)
    assert out.dtype == np.float32 and out.shape == (K, 64, 64)
    np.testing.assert_array_equal(out, direct(pixelwise_prob_fn, image))


@pytest.mark.parametrize("shape", [(40, 64), (64, 30), (17, 23)])
def test_small_image_equals_cropped_padded_prediction(shape: tuple[int, int]) -> None:
    image = random_image(*shape, seed=1)
    padded = np.zeros((64, 64, 3), np.float32)
    padded[: shape[0], : shape[1]] = image
    expected = direct(position_prob_fn, padded)[:, : shape[0], : shape[1]]
    out = predict_tiled(position_prob_fn, image, tile=64, num_classes=2)
    np.testing.assert_array_equal(out, expected)


def test_one_side_smaller_than_tile_is_padded_and_tiled_along_the_other() -> None:
    image = random_image(50, 300, seed=2)
    out = predict_tiled(pixelwise_prob_fn, image, tile=64, num_classes=K)
    assert out.shape == (K, 50, 300)
    np.testing.assert_allclose(out, direct(pixelwise_prob_fn, image), atol=1e-5)


# (b) no seams on a constant image --------------------------------------------------------


def test_constant_image_gives_constant_output() -> None:
    image = np.empty((300, 500, 3), np.float32)
    image[:] = [200.0, 40.0, 120.0]
    out = predict_tiled(pixelwise_prob_fn, image, tile=128, num_classes=K, overlap=0.25)
    expected = direct(pixelwise_prob_fn, image[:1, :1])[:, 0, 0]
    assert np.abs(out - expected[:, None, None]).max() < 1e-5


def test_pixelwise_model_is_reproduced_on_random_image() -> None:
    image = random_image(150, 210, seed=3)
    out = predict_tiled(pixelwise_prob_fn, image, tile=64, num_classes=K, batch_size=3)
    np.testing.assert_allclose(out, direct(pixelwise_prob_fn, image), atol=1e-5)


# (c) smooth across tile borders ----------------------------------------------------------


def naive_stitch(prob_fn, image: np.ndarray, tile: int, overlap: float) -> np.ndarray:
    """Last tile wins, no blending: what predict_tiled must improve on."""
    h, w = image.shape[:2]
    out = np.zeros((2, h, w), np.float32)
    for y in tile_starts(h, tile, overlap):
        for x in tile_starts(w, tile, overlap):
            out[:, y : y + tile, x : x + tile] = direct(prob_fn, image[y : y + tile, x : x + tile])
    return out


def test_blending_is_smooth_where_naive_stitching_jumps() -> None:
    tile, overlap = 64, 0.25
    image = random_image(64, 333, seed=4)
    blended = predict_tiled(position_prob_fn, image, tile, num_classes=2, overlap=overlap)
    naive = naive_stitch(position_prob_fn, image, tile, overlap)
    naive_jump = np.abs(np.diff(naive[1], axis=1)).max()
    blended_step = np.abs(np.diff(blended[1], axis=1)).max()
    margin = overlap_pixels(tile, overlap)
    # A raised-cosine cross-fade of a drop of ~1 over `margin` pixels: slope <= pi / (2 margin).
    bound = np.pi / (2 * margin) + 1.0 / (tile - 1) + 1e-3
    assert naive_jump > 0.5
    assert blended_step < bound < naive_jump / 3
    np.testing.assert_allclose(blended.sum(axis=0), 1.0, atol=1e-5)


# (d) coverage, normalisation, batching, progress, cancellation ---------------------------


def test_probabilities_sum_to_one_and_are_finite() -> None:
    image = random_image(97, 131, seed=5)
    out = predict_tiled(pixelwise_prob_fn, image, tile=32, num_classes=K, overlap=0.5)
    assert np.isfinite(out).all() and (out >= 0).all()
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 100])
def test_batch_size_and_progress(batch_size: int) -> None:
    image = random_image(150, 200, seed=6)
    tile, overlap = 64, 0.25
    total = len(tile_starts(150, tile, overlap)) * len(tile_starts(200, tile, overlap))
    sizes: list[int] = []
    reports: list[tuple[int, int]] = []

    def counting_fn(batch: torch.Tensor) -> torch.Tensor:
        assert torch.is_inference_mode_enabled()
        assert batch.dtype == torch.float32 and batch.shape[1:] == (3, tile, tile)
        sizes.append(batch.shape[0])
        return pixelwise_prob_fn(batch)

    predict_tiled(
        counting_fn, image, tile, K, overlap, batch_size=batch_size,
        progress=lambda done, n: reports.append((done, n)),
    )
    assert sum(sizes) == total
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    assert len(sizes) == -(-total // batch_size)
    dones = [d for d, _ in reports]
    assert dones == sorted(set(dones)) and dones[-1] == total
    assert all(n == total for _, n in reports)


def test_should_stop_raises_prediction_cancelled() -> None:
    calls: list[int] = []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return pixelwise_prob_fn(batch)

    with pytest.raises(PredictionCancelled):
        predict_tiled(
            fn, random_image(200, 200), 64, K, batch_size=2, should_stop=lambda: len(calls) >= 2
        )
    assert len(calls) == 2


def test_wrong_prob_fn_output_shape_raises() -> None:
    with pytest.raises(ValueError, match="prob_fn returned shape"):
        predict_tiled(pixelwise_prob_fn, random_image(64, 64), 64, num_classes=5)


# (e) tile starts and window --------------------------------------------------------------


@pytest.mark.parametrize("tile", [1, 7, 32, 64, 128])
@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25, 0.5, 0.9])
def test_tile_starts_properties(tile: int, overlap: float) -> None:
    min_overlap = min(overlap * tile, tile - 1)  # a stride of at least one pixel
    for length in range(1, 4 * tile + 50):
        starts = tile_starts(length, tile, overlap)
        if length <= tile:
            assert starts == [0]
            continue
        assert starts[0] == 0 and starts[-1] == length - tile
        gaps = np.diff(starts)
        assert (gaps > 0).all()
        assert (tile - gaps >= min_overlap - 1e-9).all()  # overlap and hence coverage
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + tile] = True
        assert covered.all()


def test_axis_windows_properties() -> None:
    """The windows predict_tiled blends with: 1 in the middle, ramps only towards neighbours, and ramps of
    neighbours crossing over their overlap sum to one."""
    for length, tile, overlap in [(200, 64, 0.25), (300, 128, 0.5), (64, 16, 0.0), (100, 32, 0.9)]:
        starts, margin = tile_starts(length, tile, overlap), overlap_pixels(tile, overlap)
        windows = axis_windows(starts, tile, margin, length)
        assert len(windows) == len(starts) and all(w.shape == (tile,) and w.dtype == np.float32 for w in windows)
        assert all((w > 0).all() and w.max() <= 1.0 for w in windows)
        assert windows[0][0] == 1.0 and windows[-1][-1] == 1.0  # image borders keep full weight
        total = np.zeros(length)
        for start, window in zip(starts, windows):
            total[start : start + tile] += window
        assert total.min() > 0.99  # every pixel is fully covered
    starts = tile_starts(112, 64, 0.25)  # two tiles overlapping by exactly the margin
    left, right = axis_windows(starts, 64, overlap_pixels(64, 0.25), 112)
    np.testing.assert_allclose(left[48:] + right[:16], 1.0, atol=1e-6)
    assert (left[:48] == 1.0).all() and left[50] < left[49]
    assert (axis_windows([0], 16, 0, 16)[0] == 1.0).all()


# (f) labels and instances ----------------------------------------------------------------


def test_probabilities_to_labels_mapping_and_dtype() -> None:
    probs = np.zeros((3, 2, 2), np.float32)
    probs[0, 0, 0] = probs[1, 0, 1] = probs[2, 1, 0] = probs[2, 1, 1] = 1.0
    labels = probabilities_to_labels(probs, [0, 5, 255])
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, [[0, 5], [255, 255]])
    labels16 = probabilities_to_labels(probs, [0, 5, 300])
    assert labels16.dtype == np.uint16
    np.testing.assert_array_equal(labels16, [[0, 5], [300, 300]])
    with pytest.raises(ValueError):
        probabilities_to_labels(probs, [0, 1])


def test_instances_unique_across_classes() -> None:
    labels = np.array(
        [
            [1, 1, 0, 2, 2],
            [0, 0, 0, 2, 2],
            [1, 0, 3, 3, 0],
            [1, 0, 0, 0, 1],
        ],
        np.uint8,
    )
    inst = instances_from_labels(labels)
    assert inst.dtype == np.uint16
    assert (inst[labels == 0] == 0).all() and (inst[labels != 0] > 0).all()
    # class 1: 3 components, class 2: 1, class 3: 1 (2 and 3 touch but stay apart)
    assert len(np.unique(inst[inst > 0])) == 5
    for value in np.unique(inst[inst > 0]):
        assert len(np.unique(labels[inst == value])) == 1
    assert len(np.unique(inst[labels == 2])) == 1 and inst[0, 3] != inst[2, 3]


def test_instances_dtype_grows_past_uint16() -> None:
    labels = np.zeros((2, 2 * 70000), np.uint8)
    labels[0, ::2] = 1  # 70000 isolated pixels with face connectivity
    inst = instances_from_labels(labels, connectivity=1)
    assert inst.dtype == np.uint32 and inst.max() == 70000


def test_instances_of_a_stack_are_labelled_plane_by_plane_unless_asked_for_3d() -> None:
    """Objects merged across slices and time points when components were taken over the whole stack."""
    stack = np.zeros((3, 6, 6), np.uint8)
    stack[0, 1:3, 1:3] = stack[1, 1:3, 1:3] = 2  # the same place in two slices: two objects, one per plane
    stack[2, 4:6, 4:6] = 2
    per_plane = instances_from_labels(stack)
    assert [len(np.unique(p[p > 0])) for p in per_plane] == [1, 1, 1]
    assert len(np.unique(per_plane[per_plane > 0])) == 3  # ids unique across planes
    volume = instances_from_labels(stack, per_plane=False)
    assert len(np.unique(volume[volume > 0])) == 2
    assert np.array_equal(instances_from_labels(stack[0]), per_plane[0])


class _CountingView:
    """A Y x X x 3 image that records every window asked for (as ``SamPlanes.input_view`` is sliced)."""

    def __init__(self, image: np.ndarray) -> None:
        self.image, self.shape, self.windows = image, image.shape, []

    def __getitem__(self, key):
        window = self.image[key]
        self.windows.append(window.shape[:2])
        return window


def test_streaming_gives_the_same_probabilities_band_by_band_without_the_whole_image() -> None:
    """Prediction held about 60 bytes per pixel (a 4096 x 4096 image peaked at 1.5 GB): now the tiles in flight
    and one band of tile rows."""
    image = np.random.default_rng(3).uniform(0, 255, (300, 230, 3)).astype(np.float32)
    whole = predict_tiled(pixelwise_prob_fn, image, 64, K, overlap=0.25, batch_size=3)
    view, bands = _CountingView(image), []
    assert predict_tiled(pixelwise_prob_fn, view, 64, K, overlap=0.25, batch_size=3,
                         sink=lambda first, band: bands.append((first, band.copy()))) is None
    assert max(h * w for h, w in view.windows) == 64 * 64  # tiles only, never the whole image
    firsts = [first for first, _ in bands]
    assert firsts[0] == 0 and firsts == sorted(firsts)
    assert all(b.shape[0] == K and b.shape[2] == 230 and b.shape[1] <= 64 for _, b in bands)
    streamed = np.concatenate([band for _, band in bands], axis=1)
    assert streamed.shape == whole.shape and np.array_equal(streamed, whole)


@pytest.mark.parametrize("blended_on", ["host", "device"])
def test_non_finite_probabilities_are_refused_before_their_band_is_handed_over(monkeypatch, blended_on) -> None:
    """A model saved after its training diverged predicted NaN everywhere: the labels were the argmax of NaN (all
    background), written with exit status 0 (issue 21). On the host each batch is checked as it comes; on a
    device a flag stays there and is read with the next band's copy, so no batch waits for the device."""
    import pickle

    if blended_on == "device":
        monkeypatch.setattr(tiling, "HOST_BLENDED", frozenset())  # blended in torch where the probabilities are
    calls = []

    def nan_from_the_fourth_batch(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        probs = pixelwise_prob_fn(batch)
        return probs * float("nan") if len(calls) >= 4 else probs

    bands: list[np.ndarray] = []
    image = random_image(300, 230)  # 5 tiles of 64 a row: batches of 2, the 4th in the second row of tiles
    with pytest.raises(NonFiniteProbabilities, match=r"^m\.safetensors: the model predicts NaN or infinite "
                                                     r"probabilities on this image, so it cannot segment it") as error:
        predict_tiled(nan_from_the_fourth_batch, image, 64, K, batch_size=2, source="m.safetensors",
                      sink=lambda first, band: bands.append(band.copy()))
    assert len(bands) == 1 and np.isfinite(bands[0]).all()  # the first row of tiles, before the NaN
    assert len(calls) == (4 if blended_on == "host" else 6)  # the device's flag is read with the next band
    assert str(pickle.loads(pickle.dumps(error.value))) == str(error.value)  # as it comes back from a dask worker
    with pytest.raises(NonFiniteProbabilities, match=r"^the model predicts NaN or infinite probabilities"):
        predict_tiled(lambda batch: pixelwise_prob_fn(batch) + float("inf"), image, 64, K)
