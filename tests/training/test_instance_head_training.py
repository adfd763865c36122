"""Training and predicting with an instance head from the command line (issue 23, items 1 and 6): instance labels
train one by default, validation scores objects and chooses the watershed's thresholds, ``predict --instances``
uses the head (or components when asked), and what cannot work is refused in one line."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import tifffile
from skimage.draw import disk

from napari_convlora import load_model
from napari_convlora.checkpoints.training_state import metrics_path
from napari_convlora.cli import main
from napari_convlora.config import TrainRecipe
from napari_convlora.constants import IGNORE_INDEX
from napari_convlora.data import ImageLayout, TrainingPair, prepare_training_data
from napari_convlora.errors import ConfigError
from napari_convlora.config.instances import InstanceConfig
from napari_convlora.training.instance_validation import ValidationObjects, setting_after
from napari_convlora.instances import object_maps
from napari_convlora.prediction.planes import predict_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def touching_cells(size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A grid of bright discs, neighbours in a row touching: (image float32, ids uint16)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((size, size), np.uint16)
    image = np.full((size, size), 30.0)
    count = 0
    for cy in range(14, size - 8, 26):
        for cx in range(14, size - 8, 21):
            count += 1
            rr, cc = disk((cy + int(rng.integers(-2, 3)), cx), 11, shape=ids.shape)
            ids[rr, cc] = count
            image[rr, cc] = 150 + rng.normal(0, 10)
    return (image + rng.normal(0, 5, image.shape)).astype(np.float32), ids


def _train(tmp_path, *extra):
    image, ids = touching_cells()
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "ids.tif", ids)
    model = tmp_path / "m.safetensors"
    code = main(["train", "--checkpoint", "builtin", "--image", str(tmp_path / "img.tif"), "--labels",
                 str(tmp_path / "ids.tif"), "--out", str(model), "--input-size", "64", "--steps", "2",
                 "--grad-accum", "1", "--device", "cpu", "--threads", "1", *extra])
    return code, model


def test_instance_labels_train_a_head_that_predict_uses(tmp_path, capsys):
    code, model = _train(tmp_path, "--label-mode", "instances")
    assert code == 0
    err = capsys.readouterr().err
    assert "objects F1@0.5" in err  # validation scores objects
    loaded = load_model(model)
    assert loaded.instance_head is not None and loaded.config.instances.min_distance in (5, 6)
    with open(metrics_path(model), newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"instance_f1_50", "instance_mean_f1", "instance_foreground", "instance_min_distance"} <= set(rows[0])
    assert rows[-1]["instance_foreground"] != ""
    out = tmp_path / "inst.tif"
    assert main(["predict", "--model", str(model), "--image", str(tmp_path / "img.tif"), "--out",
                 str(tmp_path / "p.tif"), "--instances", str(out), "--device", "cpu"]) == 0
    assert "instances (instance head)" in capsys.readouterr().out
    assert tifffile.imread(out).shape == (128, 128)
    assert main(["predict", "--model", str(model), "--image", str(tmp_path / "img.tif"), "--out",
                 str(tmp_path / "p.tif"), "--instances", str(out), "--instance-method", "components",
                 "--device", "cpu"]) == 0
    assert "instances (connected components)" in capsys.readouterr().out
    prediction = predict_image(load_model(model), tifffile.imread(tmp_path / "img.tif"), device="cpu",
                               instances=True, instance_method="sam_refined")
    assert prediction.instance_method == "sam_refined" and prediction.instances.shape == (128, 128)


def test_what_cannot_work_is_refused_in_one_line(tmp_path, capsys):
    code, model = _train(tmp_path, "--label-mode", "instances", "--instance-head", "off")
    assert code == 0 and load_model(model).instance_head is None
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--image", str(tmp_path / "img.tif"), "--out",
                 str(tmp_path / "p.tif"), "--instances", str(tmp_path / "i.tif"), "--instance-method", "head",
                 "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert "has no instance head" in err and "Traceback" not in err and not (tmp_path / "i.tif").exists()
    with pytest.raises(ConfigError, match="learns from instance labels"):
        TrainRecipe(label_mode="dense", instance_head="on")


def test_sparse_instance_labels_keep_unannotated_pixels_out_of_the_objects():
    image, ids = touching_cells()
    labels = ids.astype(np.uint16) + 1  # background 1, objects 2..; 0 = not annotated
    labels[:, 64:] = 0
    recipe = TrainRecipe(label_mode="sparse_instances", background_value=1, input_size=64, val_fraction=0.0)
    data = prepare_training_data([TrainingPair(image, labels, ImageLayout())], recipe)
    assert data.object_ids
    targets = data.sampler.targets[0]
    assert (targets[:, 64:] == IGNORE_INDEX).all()  # not annotated
    assert set(np.unique(targets[:, :64])) - {0} <= set(np.unique(labels[:, :64]).tolist()) - {0, 1}
    assert data.train_planes[0][1].max() == 1  # the class planes stay classes


def test_validation_chooses_the_thresholds_that_score_best():
    _, ids = touching_cells()
    maps, _ = object_maps(ids.astype(np.int64))
    noisy = maps.copy()
    noisy[0] = maps[0] * 0.45  # foreground probability 0.45: only the threshold 0.4 finds the objects
    chosen = ValidationObjects()
    chosen.add(noisy[None], ids[None].astype(np.int64))
    config, scores = chosen.choose(None)
    assert config.foreground == 0.4 and config.chosen_on == "validation" and scores["chosen"]
    assert scores["f1_50"] == 1.0
    assert setting_after(InstanceConfig(), {"instances": scores}) == config
    nothing = ValidationObjects()  # no objects found at any threshold: the setting stays
    nothing.add(np.zeros_like(maps)[None], ids[None].astype(np.int64))
    kept, scores = nothing.choose(InstanceConfig(foreground=0.6))
    assert kept == InstanceConfig(foreground=0.6) and not scores["chosen"]
    assert setting_after(kept, {"instances": scores}) is kept


def test_evaluate_scores_objects_for_a_model_of_instance_labels(tmp_path, capsys):
    import json

    code, model = _train(tmp_path, "--label-mode", "instances")
    assert code == 0
    capsys.readouterr()
    args = ["evaluate", "--model", str(model), "--image", str(tmp_path / "img.tif"), "--labels",
            str(tmp_path / "ids.tif"), "--device", "cpu"]
    assert main(args) == 0
    assert "instances: F1@0.5" in capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["instances"]["method"] == "head" and record["instances"]["num_true"] == 30


def test_seeds_are_half_the_objects_radius_apart_and_runs_resume_and_continue(tmp_path, capsys):
    """The seed distance comes from the painted objects (radius 11 px here: 5 or 6 px, at the 64 px input the
    images are not rescaled); a run whose threshold validation changed resumes, and a new run continues it."""
    _, ids = touching_cells()
    image = touching_cells()[0]
    data = prepare_training_data([TrainingPair(image, ids, ImageLayout())],
                                 TrainRecipe(label_mode="instances", input_size=64))
    assert 10.5 < data.object_radius < 11.5
    code, model = _train(tmp_path, "--label-mode", "instances", "--val-every", "1")
    assert code == 0 and load_model(model).config.instances.min_distance in (5, 6)
    resumed, again = tmp_path / "r.safetensors", tmp_path / "i.safetensors"
    common = ["--checkpoint", "builtin", "--image", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "ids.tif"),
              "--grad-accum", "1", "--device", "cpu", "--threads", "1"]
    assert main(["train", *common, "--steps", "3", "--out", str(resumed), "--resume", str(model)]) == 0
    assert main(["train", *common, "--steps", "1", "--out", str(again), "--init-from", str(model)]) == 0
    assert load_model(again).instance_head is not None
    assert "instance_head" not in capsys.readouterr().err  # "auto" asks for nothing to set aside


def test_the_summary_says_an_instance_head_learns_the_objects():
    image, ids = touching_cells()
    data = prepare_training_data([TrainingPair(image, ids, ImageLayout())],
                                 TrainRecipe(label_mode="instances", input_size=64))
    assert "objects of median radius 10.9 px: an instance head learns to separate them" in data.summary()
    plain = prepare_training_data([TrainingPair(image, ids, ImageLayout())],
                                  TrainRecipe(label_mode="instances", input_size=64, instance_head="off"))
    assert "objects" not in plain.summary() and plain.object_radius is None and not plain.object_ids


@pytest.mark.parametrize("method", ["head", "sam_refined"])
def test_objects_of_a_stack_are_numbered_across_its_planes(tmp_path, method):
    code, model = _train(tmp_path, "--label-mode", "instances")
    assert code == 0
    image = tifffile.imread(tmp_path / "img.tif")
    # SAM's decoder as loaded answers the prompts of a two-step, 64 px model on one orientation of this image only:
    # the same plane twice keeps SAM-refined objects on both planes (numbering is what is tested here)
    stack = np.stack([image, image[::-1] if method == "head" else image])
    loaded = load_model(model)  # two steps: a low threshold so that both planes hold objects
    loaded.config.instances = dataclasses.replace(loaded.config.instances, foreground=0.01)
    found = predict_image(loaded, stack, device="cpu", instances=True, instance_method=method).instances
    assert found.shape == stack.shape and found.dtype == np.uint16
    first, second = np.unique(found[0][found[0] > 0]), np.unique(found[1][found[1] > 0])
    assert len(first) and len(second) and first.max() < second.min()


def test_one_value_on_separate_blobs_is_pointed_out():
    image, ids = touching_cells()
    painted = (ids > 0).astype(np.uint16) * 7  # every cell painted with 7: touching rows merge, rows stay apart
    data = prepare_training_data([TrainingPair(image, painted, ImageLayout())],
                                 TrainRecipe(label_mode="instances", input_size=64))
    assert any("1 label value(s) are painted on separate blobs (value 7 on 5)" in w for w in data.warnings)
    clean = prepare_training_data([TrainingPair(image, ids, ImageLayout())],
                                  TrainRecipe(label_mode="instances", input_size=64))
    assert not any("separate blobs" in w for w in clean.warnings)
