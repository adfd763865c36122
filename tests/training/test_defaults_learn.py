"""The command line's defaults learn (issue 22's goals): with only ``--steps``, the built-in model, its own input
size and the small-base learning rate segment the held-out half of the stardist nuclei and a second sample image.
Slow tier (about 2 x 2 minutes on a free core); the dock's counterpart runs in the GUI tier
(``tests/_qt/test_dock_defaults_learn.py``). Figures over seeds: BENCHMARKS.md, "What the defaults learn"."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_convlora.cli import main
from napari_convlora.data.samples import stardist_nuclei, synthetic_cells
from napari_convlora.metrics import evaluate_arrays

pytestmark = pytest.mark.slow


def _train_and_predict(tmp_path, image, labels, test_image) -> np.ndarray:
    for name, array in (("img", image), ("lab", labels), ("test", test_image)):
        tifffile.imwrite(tmp_path / f"{name}.tif", array)
    model = tmp_path / "m.safetensors"
    assert main(["train", "--image", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif"),
                 "--out", str(model), "--steps", "200", "--device", "cpu"]) == 0
    assert main(["predict", "--model", str(model), "--image", str(tmp_path / "test.tif"), "--out",
                 str(tmp_path / "pred.tif"), "--device", "cpu"]) == 0
    return tifffile.imread(tmp_path / "pred.tif")


def test_nuclei_with_only_steps_given(tmp_path):
    data = stardist_nuclei()
    if data is None:
        pytest.skip("stardist is not installed (pip install --no-deps stardist) so its nuclei image is absent")
    image, mask = data
    half = image.shape[1] // 2
    predicted = _train_and_predict(tmp_path, image[:, :half], (mask[:, :half] > 0).astype(np.uint8), image[:, half:])
    truth = mask[:, half:] > 0
    dice = 2 * float(((predicted > 0) & truth).sum()) / float((predicted > 0).sum() + truth.sum())
    assert dice >= 0.90


def test_the_sample_with_only_steps_given(tmp_path):
    image, labels = synthetic_cells(384, seed=0)
    test_image, test_labels = synthetic_cells(384, seed=1)
    predicted = _train_and_predict(tmp_path, image, labels, test_image)
    metrics = evaluate_arrays(predicted.astype(np.int64), test_labels.astype(np.int64), 3)
    assert metrics.mean_iou >= 0.80, metrics.format(("background", "nucleus", "rod"))
