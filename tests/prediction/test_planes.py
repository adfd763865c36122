"""Prediction on arrays as napari holds them: 2D, RGB, stacks, rescale; evaluation against labels."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from helpers import make_model, perturb_trainable

from napari_convlora.config import InputSpec
from napari_convlora.data import ImageLayout, SamPlanes
from napari_convlora.prediction.planes import evaluate_image, predict_image, predict_plane_probabilities
from napari_convlora.prediction.tiling import PredictionCancelled


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    m = make_model(tiny_checkpoint, num_classes=3, input_size=64, class_values=(0, 2, 5))
    return perturb_trainable(m, scale=0.3).eval()


def _image(shape, seed=0, dtype=np.uint16):
    return (np.random.default_rng(seed).random(shape) * 4000).astype(dtype)


def test_2d_prediction_shape_dtype_and_values(model):
    image = _image((90, 150))
    result = predict_image(model, image, device="cpu", return_probabilities=True, instances=True)
    assert result.labels.shape == (90, 150) and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= {0, 2, 5}
    assert result.probabilities.shape == (3, 90, 150)
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-5)
    lookup = np.array([0, 2, 5])
    assert np.array_equal(lookup[result.probabilities.argmax(0)], result.labels)
    assert result.instances.shape == (90, 150) and (result.instances > 0).sum() == (result.labels != 0).sum()


def test_single_tile_equals_direct_model_output(model):
    """A 48 px plane with its 8 px mirror border on every side (``mirror_margin(64)``) is one 64 px tile."""
    image = _image((48, 48), seed=1)
    planes = SamPlanes(image, ImageLayout(), model.config.input)
    plane = np.pad(planes.model_input(0), ((8, 8), (8, 8), (0, 0)), mode="reflect")
    probs = predict_plane_probabilities(model, planes, 0, torch.device("cpu"))
    with torch.no_grad():
        direct = model.class_probabilities(torch.from_numpy(plane).permute(2, 0, 1)[None])[0].numpy()
    np.testing.assert_allclose(probs, direct[:, 8:56, 8:56], atol=1e-6)


def test_stack_slices_and_chosen_planes(model):
    stack = _image((3, 70, 80), seed=2)
    full = predict_image(model, stack, device="cpu")
    assert full.labels.shape == (3, 70, 80)
    for z in range(3):  # each plane is predicted like the same plane alone (normalised over the stack)
        alone = predict_image(model, stack, device="cpu", planes=[z])
        assert np.array_equal(alone.labels[z], full.labels[z])
        assert not alone.labels[[i for i in range(3) if i != z]].any()


def test_rgb_and_multichannel_layouts(model):
    rgb = _image((50, 60, 3), seed=3, dtype=np.uint8)
    assert predict_image(model, rgb, ImageLayout(rgb=True), device="cpu").labels.shape == (50, 60)
    two_channel = _image((2, 50, 60), seed=4)
    result = predict_image(model, two_channel, ImageLayout(channel_axis=0), device="cpu")
    assert result.labels.shape == (50, 60)


def test_rescale_returns_input_shape(model):
    model.config.input = InputSpec(rescale=0.5)
    try:
        result = predict_image(model, _image((100, 130), seed=5), device="cpu")
    finally:
        model.config.input = InputSpec()
    assert result.labels.shape == (100, 130)


def test_cancel_and_progress(model):
    seen = []
    predict_image(model, _image((150, 150)), device="cpu", batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    with pytest.raises(PredictionCancelled):
        predict_image(model, _image((150, 150)), device="cpu", should_stop=lambda: True)


def test_evaluate_against_own_prediction_is_perfect(model):
    image = _image((80, 80), seed=6)
    labels = predict_image(model, image, device="cpu").labels
    metrics = evaluate_image(model, image, labels, device="cpu")
    assert metrics.pixel_accuracy == 1.0
    wrong = np.where(labels == 0, 2, 0).astype(np.uint8)
    assert evaluate_image(model, image, wrong, device="cpu").pixel_accuracy < 1.0
    with pytest.raises(ValueError, match="shape"):
        evaluate_image(model, image, labels[:-1], device="cpu")


def test_training_and_prediction_prepare_an_image_identically(tmp_path, tiny_checkpoint):
    """Channels, RGB slots, percentiles and rescaling are stored with the model and applied by the same code:
    the tiles prediction feeds the model are windows of the plane training cut its patches from, with the same
    mirror border (8 px for 64 px tiles). (Training resized with scikit-image and prediction with torch, and the
    channel choice had to be repeated by hand.)"""
    from napari_convlora import load_model
    from napari_convlora.config import RunOptions, TrainRecipe
    from napari_convlora.data import TrainingPair, prepare_training_data
    from napari_convlora.training.loop import train

    rng = np.random.default_rng(0)
    image = rng.integers(0, 5000, (4, 120, 100), dtype=np.uint16)  # C x Y x X
    labels = np.zeros((120, 100), np.uint8)
    labels[20:70, 30:80] = 1
    spec = InputSpec(channels=(3, 1), rgb_slots=(0, 2), percentiles=(2.0, 98.0), rescale=0.5)
    recipe = TrainRecipe(input_size=64, input=spec, val_fraction=0.0, augment=False, steps=1, grad_accum=1)
    layout = ImageLayout(channel_axis=0)
    data = prepare_training_data([TrainingPair(image, labels, layout)], recipe)
    ((plane, targets),) = data.train_planes
    assert plane.shape == (60, 50, 3) and targets.shape == (60, 50) and not plane[..., 1].any()
    for _ in train(tiny_checkpoint, data, tmp_path / "m.safetensors", recipe, RunOptions(device="cpu")):
        pass
    model = load_model(tmp_path / "m.safetensors", base=tiny_checkpoint)
    assert model.config.input == spec
    seen = []
    real = model.class_probabilities
    model.class_probabilities = lambda x: (seen.append(x.clone()), real(x))[1]
    result = predict_image(model, image, layout, device="cpu")
    assert result.labels.shape == (120, 100) and len(seen) == 1 and len(seen[0]) == 4
    extended = np.pad(plane, ((8, 8), (8, 8), (0, 0)), mode="reflect")  # 76 x 66: tiles at rows 0, 12, cols 0, 2
    corners = [(0, 0), (0, 2), (12, 0), (12, 2)]
    for tile, (y, x) in zip(seen[0].permute(0, 2, 3, 1).numpy(), corners):
        assert np.array_equal(tile, extended[y : y + 64, x : x + 64])


def test_label_values_above_65535_train_predict_and_evaluate(tmp_path, tiny_checkpoint):
    """They trained but prediction and evaluation failed afterwards (labels were capped at uint16)."""
    from napari_convlora import load_model
    from napari_convlora.config import RunOptions, TrainRecipe
    from napari_convlora.data import TrainingPair, prepare_training_data
    from napari_convlora.io.images import read_image, write_image
    from napari_convlora.training.loop import train

    image = _image((96, 96), seed=7)
    labels = np.zeros((96, 96), np.uint32)
    labels[10:40, 10:40], labels[50:90, 50:90] = 70_000, 5
    recipe = TrainRecipe(input_size=64, steps=2, grad_accum=1)
    data = prepare_training_data([TrainingPair(image, labels)], recipe)
    assert data.encoding.class_values == (0, 5, 70_000)
    for _ in train(tiny_checkpoint, data, tmp_path / "m.safetensors", recipe, RunOptions(device="cpu")):
        pass
    model = load_model(tmp_path / "m.safetensors", base=tiny_checkpoint)
    result = predict_image(model, image, device="cpu")
    assert result.labels.dtype == np.uint32 and set(np.unique(result.labels)) <= {0, 5, 70_000}
    assert 0 <= evaluate_image(model, image, labels, device="cpu").pixel_accuracy <= 1
    write_image(tmp_path / "p.tif", result.labels)
    assert np.array_equal(read_image(tmp_path / "p.tif"), result.labels)


def test_a_model_that_predicts_nan_is_refused_naming_its_file(tmp_path, tiny_checkpoint):
    """Finite weights whose every output is NaN (saved by a training run that diverged): predict returned all
    background and evaluate scored it (issue 21). Now one line that names the model's file when it has one."""
    from napari_convlora import load_model, save_adapter
    from napari_convlora.checkpoints.model_files import model_file

    broken = make_model(tiny_checkpoint, num_classes=3, input_size=64, class_values=(0, 2, 5)).eval()
    with torch.no_grad():
        broken.head.mask_tokens.weight.mul_(1e36)  # finite, but the decoder's attention overflows: NaN outputs
    image, labels = _image((90, 150)), np.zeros((90, 150), np.uint8)
    assert model_file(broken) is None
    with pytest.raises(ValueError, match=r"^the model predicts NaN or infinite probabilities on this image"):
        predict_image(broken, image, device="cpu")
    path = save_adapter(broken, tmp_path / "diverged.safetensors")
    model = load_model(path, base=tiny_checkpoint)
    assert model_file(broken) == model_file(model) == path
    named = rf"^{re.escape(str(path))}: the model predicts NaN or infinite probabilities on this image"
    with pytest.raises(ValueError, match=named):
        predict_image(model, image, device="cpu", planes=None, return_probabilities=True)
    with pytest.raises(ValueError, match=named):
        evaluate_image(model, image, labels, device="cpu")
