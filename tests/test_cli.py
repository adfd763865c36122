"""The napari-convlora command line, end to end on tiny files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_convlora.cli import main
from napari_convlora.sample_data import synthetic_cells


@pytest.fixture()
def files(tmp_path):
    image, labels = synthetic_cells(160, seed=0)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    tifffile.imwrite(tmp_path / "bad_lab.tif", labels[:-3])
    return tmp_path


def test_train_predict_evaluate_info(files, tiny_checkpoint, capsys):
    model = files / "model.safetensors"
    code = main(["train", "--checkpoint", str(tiny_checkpoint), "--image", str(files / "img.tif"),
                 "--labels", str(files / "lab.tif"), "--out", str(model), "--input-size", "64", "--steps", "4",
                 "--class-names", "bg,nucleus,rod", "--device", "cpu", "--grad-accum", "1"])
    assert code == 0 and model.exists()
    assert "finished 4 steps" in capsys.readouterr().err

    code = main(["predict", "--model", str(model), "--checkpoint", str(tiny_checkpoint), "--image",
                 str(files / "img.tif"), "--out", str(files / "pred.tif"), "--probabilities", str(files / "p.tif"),
                 "--device", "cpu"])
    assert code == 0
    pred = tifffile.imread(files / "pred.tif")
    assert pred.shape == (160, 160) and pred.dtype == np.uint8 and set(np.unique(pred)) <= {0, 1, 2}
    assert tifffile.imread(files / "p.tif").shape == (3, 160, 160)

    capsys.readouterr()
    code = main(["evaluate", "--model", str(model), "--checkpoint", str(tiny_checkpoint), "--image",
                 str(files / "img.tif"), "--labels", str(files / "lab.tif"), "--json", "--device", "cpu"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"per_class_iou", "mean_iou", "mean_iou_foreground", "pixel_accuracy"}
    assert len(metrics["per_class_iou"]) == 3

    code = main(["info", str(model)])
    info = json.loads(capsys.readouterr().out)
    assert code == 0 and info["config"]["head"]["class_names"] == ["bg", "nucleus", "rod"]


def test_resume_from_cli(files, tiny_checkpoint):
    model = files / "m.safetensors"
    args = ["train", "--checkpoint", str(tiny_checkpoint), "--image", str(files / "img.tif"), "--labels",
            str(files / "lab.tif"), "--input-size", "64", "--steps", "3", "--device", "cpu", "--grad-accum", "1"]
    assert main([*args, "--out", str(model)]) == 0
    # Resuming a finished run does nothing more but succeeds; the state file makes it possible.
    assert main([*args, "--out", str(files / "m2.safetensors"), "--resume", str(model)]) == 0


def test_errors_are_reported_not_raised(files, tiny_checkpoint, capsys):
    code = main(["train", "--checkpoint", str(tiny_checkpoint), "--image", str(files / "img.tif"),
                 "--labels", str(files / "bad_lab.tif"), "--out", str(files / "x.safetensors"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "shape" in err and "(157, 160)" in err
    assert not (files / "x.safetensors").exists()
    code = main(["info", str(files / "img.tif")])
    assert code == 2 and "img.tif" in capsys.readouterr().err


def test_console_script_is_installed(tiny_checkpoint):
    exe = shutil.which("napari-convlora") or str(__import__("pathlib").Path(sys.executable).parent / "napari-convlora")
    out = subprocess.run([exe, "info", str(tiny_checkpoint)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["format"] == "sam-checkpoint"
