"""The built-in model by name, and recipes that follow the base (issue 22, items 1 and 2): the input size and the
learning rate a run gets without options come from the base model, the same on the command line and in the API."""

from __future__ import annotations

import json

import pytest
import tifffile

from napari_convlora import recipe_for
from napari_convlora.checkpoints.builtin import builtin_checkpoint
from napari_convlora.checkpoints.training_state import state_path
from napari_convlora.cli import main
from napari_convlora.config.suggestions import SAM_LR, SMALL_BASE_LR, suggested_input_size, suggested_lr
from napari_convlora.data.samples import synthetic_cells


@pytest.fixture()
def files(tmp_path):
    image, labels = synthetic_cells(128, seed=0)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    return tmp_path


def _saved_recipe(model):
    from napari_convlora.training.loop import resume_recipe

    return resume_recipe(model)[0]


def test_info_builtin_describes_the_shipped_model(capsys):
    assert main(["info", "builtin"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "small" and info["architecture"]["image_size"] == 256


def test_train_without_a_checkpoint_uses_the_built_in_model_at_its_own_size_and_rate(files, capsys):
    """Before: --checkpoint was required (the built-in file had to be found in site-packages), the input size was
    1024 for a 256 px model and the rate 1e-4, at which the small model learns nothing in a short run."""
    model = files / "m.safetensors"
    assert main(["train", "--image", str(files / "img.tif"), "--labels", str(files / "lab.tif"), "--out", str(model),
                 "--steps", "1", "--grad-accum", "1", "--device", "cpu", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "base model: the built-in small SAM" in err and "--checkpoint builtin" in err
    assert "input size 256 px: the checkpoint's own input size (set --input-size to change it)" in err
    assert f"learning rate {SMALL_BASE_LR:g}: a small base" in err
    recipe = _saved_recipe(model)
    assert (recipe.input_size, recipe.lr) == (256, SMALL_BASE_LR) and state_path(model).exists()
    # an adapter trained on the built-in model finds it again: no --checkpoint needed to predict
    out = files / "pred.tif"
    assert main(["predict", "--model", str(model), "--image", str(files / "img.tif"), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert tifffile.imread(out).shape == (128, 128)


def test_values_the_user_sets_win_and_are_logged(files, capsys):
    model = files / "m.safetensors"
    assert main(["train", "--checkpoint", "builtin", "--image", str(files / "img.tif"), "--labels",
                 str(files / "lab.tif"), "--out", str(model), "--steps", "1", "--grad-accum", "1", "--lr", "5e-4",
                 "--input-size", "128", "--device", "cpu", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "base model:" not in err  # named, not defaulted
    assert f"learning rate 0.0005 (--lr; the base's default would be {SMALL_BASE_LR:g})" in err
    assert "input size 128 (--input-size; the base's default would be 256)" in err
    recipe = _saved_recipe(model)
    assert (recipe.input_size, recipe.lr) == (128, 5e-4)


def test_the_api_gets_the_same_recipe_as_the_command_line(tiny_checkpoint):
    recipe = recipe_for("builtin", "cpu", steps=10, class_names=("bg", "nucleus", "rod"))
    assert (recipe.input_size, recipe.lr, recipe.steps) == (256, SMALL_BASE_LR, 10)
    assert recipe_for(builtin_checkpoint(), "cpu").lr == SMALL_BASE_LR
    assert recipe_for(tiny_checkpoint, "cpu", lr=2e-4).lr == 2e-4  # given fields win
    assert recipe_for(tiny_checkpoint, "cpu").input_size == 256


def test_sam_checkpoints_keep_conv_loras_rate_and_their_own_size_on_a_gpu():
    assert suggested_lr(93_735_472)[0] == SAM_LR  # vit_b
    assert suggested_lr(3_813_888)[0] == SMALL_BASE_LR  # the built-in model
    assert suggested_input_size(1024, "cuda")[0] == 1024 and suggested_input_size(1024, "cpu")[0] == 256
