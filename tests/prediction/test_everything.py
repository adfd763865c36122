"""Segment everything (issue 23, item 3): SAM's automatic mask generator on the adapted model's own SAM, its masks
as one instance image per plane, thresholds that follow the base, large planes covered by crop layers, and what
cannot work refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from skimage.measure import label

from helpers import make_model

from napari_convlora.checkpoints.builtin import builtin_checkpoint
from napari_convlora.config.suggestions import SAM_EVERYTHING_THRESHOLDS, everything_thresholds
from napari_convlora.data import ImageLayout
from napari_convlora.data.samples import synthetic_cells
from napari_convlora.instances.metrics import InstanceScoreAccumulator
from napari_convlora.prediction.everything import crop_layers_for, masks_to_instances, segment_everything
from napari_convlora.prediction.planes import predict_image
from napari_convlora.config import InputSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def builtin_model():
    return make_model(builtin_checkpoint(), input_size=256).eval()


def test_the_built_in_sam_finds_most_cells_of_the_sample_without_labels(builtin_model):
    image, classes = synthetic_cells(256, seed=1)
    truth = label(classes > 0)
    mean = builtin_model.sam.pixel_mean.clone()
    prediction = predict_image(builtin_model, image, ImageLayout(), device="cpu", instances=True,
                               instance_method="everything")
    assert prediction.instance_method == "everything" and prediction.instances.shape == image.shape[:2]
    scores = InstanceScoreAccumulator()
    scores.update(prediction.instances, truth)
    found = scores.compute()
    assert found.true_positives[0] >= 10 and found.num_true == 20  # measured: 14 of 20 at IoU 0.5
    assert found.num_predicted <= 2 * found.num_true
    torch.testing.assert_close(builtin_model.sam.pixel_mean, mean)  # SAM's normalisation is put back


def test_masks_become_one_instance_image_smaller_masks_on_top():
    big = np.zeros((20, 20), bool)
    big[2:18, 2:18] = True
    small = np.zeros((20, 20), bool)
    small[5:9, 5:9] = True
    speck = np.zeros((20, 20), bool)
    speck[0, 0] = True
    inner_speck = np.zeros((20, 20), bool)
    inner_speck[14, 14] = True
    out = masks_to_instances([{"segmentation": small, "area": 16}, {"segmentation": big, "area": 256},
                              {"segmentation": speck, "area": 1}, {"segmentation": inner_speck, "area": 1}],
                             (20, 20), min_size=2)
    assert out.dtype == np.uint32 and out[6, 6] == 2 and out[12, 12] == 1  # the small one stays visible
    assert out[0, 0] == 0 and set(np.unique(out)) == {0, 1, 2}  # the specks are under min_size; ids consecutive
    assert out[14, 14] == 1  # a speck left out leaves no hole in the mask under it
    assert masks_to_instances([], (4, 4)).max() == 0


def test_thresholds_follow_the_base_and_large_planes_get_crop_layers():
    assert everything_thresholds(91_000_000) == SAM_EVERYTHING_THRESHOLDS
    assert everything_thresholds(3_800_000) < SAM_EVERYTHING_THRESHOLDS
    assert crop_layers_for((256, 300), 256) == 0
    assert crop_layers_for((1024, 1024), 256) == 2 and crop_layers_for((20000, 20000), 256) == 3


def test_what_cannot_work_is_refused_in_one_line(tiny_checkpoint):
    rescaled = make_model(tiny_checkpoint, input_size=64, input=InputSpec(rescale=0.5))
    image = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match="rescales images"):
        predict_image(rescaled, image, instances=True, instance_method="everything", device="cpu")
    model = make_model(tiny_checkpoint, input_size=64)
    with pytest.raises(ValueError, match="finds objects plane by plane"):
        predict_image(model, np.zeros((2, 64, 64), np.float32), instances=True, instance_method="everything",
                      instances_3d=True, device="cpu")
    with pytest.raises(ValueError, match="points per side"):
        segment_everything(model, image, points_per_side=0)


def test_predict_instance_method_everything_on_the_command_line(builtin_model, tmp_path, capsys):
    from napari_convlora import save_adapter
    from napari_convlora.cli import main

    image, classes = synthetic_cells(256, seed=1)
    tifffile.imwrite(tmp_path / "img.tif", image)
    model = save_adapter(builtin_model, tmp_path / "m.safetensors")
    code = main(["predict", "--model", str(model), "--checkpoint", "builtin", "--image", str(tmp_path / "img.tif"),
                 "--out", str(tmp_path / "labels.tif"), "--instances", str(tmp_path / "objects.tif"),
                 "--instance-method", "everything", "--device", "cpu", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    objects = tifffile.imread(tmp_path / "objects.tif")
    assert objects.shape == classes.shape and objects.max() >= 10
    code = main(["predict", "--model", str(model), "--checkpoint", "builtin", "--image", str(tmp_path / "img.tif"),
                 "--out", str(tmp_path / "out.zarr"), "--instances", "--instance-method", "everything",
                 "--device", "cpu"])
    assert code != 0 and "block-by-block prediction" in capsys.readouterr().err
