"""The napari-convlora command line, end to end on tiny files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file

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


def _train_args(files, tiny_checkpoint, *extra):
    return ["train", "--checkpoint", str(tiny_checkpoint), "--image", str(files / "img.tif"), "--labels",
            str(files / "lab.tif"), "--device", "cpu", "--grad-accum", "1", *extra]


def test_a_finished_run_resumed_into_a_new_file_writes_it(files, tiny_checkpoint, capsys):
    model, again = files / "m.safetensors", files / "m2.safetensors"
    assert main([*_train_args(files, tiny_checkpoint, "--input-size", "64", "--steps", "3"), "--out", str(model)]) == 0
    assert main([*_train_args(files, tiny_checkpoint), "--out", str(again), "--resume", str(model)]) == 0
    assert again.is_file() and (files / "m2.training.pt").is_file()
    a, b = load_file(str(model)), load_file(str(again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("changed", [["--input-size", "128"], []])
def test_resume_after_changing_the_input_size_or_leaving_it_out(files, tiny_checkpoint, capsys, changed):
    """Stopped at 64 px; resumed with --input-size 128, or with no --input-size (the default, 1024): the saved
    size is kept (with a note when it was asked for) and the run finishes where an uninterrupted one would."""
    import napari_convlora.train as train_module

    full, part, resumed = files / "full.safetensors", files / "part.safetensors", files / "resumed.safetensors"
    common = ["--input-size", "64", "--steps", "4", "--val-every", "2"]
    assert main([*_train_args(files, tiny_checkpoint, *common), "--out", str(full)]) == 0
    real_train = train_module.train

    def stopping_train(*args, stop=None, **kwargs):  # a Stop after step 2, as the dock's button gives it
        for event in real_train(*args, stop=stop, **kwargs):
            if event.kind == "step" and event.step == 2:
                stop.set()
            yield event

    train_module.train = stopping_train
    try:
        assert main([*_train_args(files, tiny_checkpoint, *common), "--out", str(part)]) == 0
    finally:
        train_module.train = real_train
    assert torch.load(files / "part.training.pt", map_location="cpu", weights_only=True)["step"] == 2
    capsys.readouterr()
    assert main([*_train_args(files, tiny_checkpoint, *changed), "--out", str(resumed), "--resume", str(part)]) == 0
    err = capsys.readouterr().err
    assert ("with its saved recipe: input_size: 128 asked, 64 saved" in err) == bool(changed)
    assert "1024" not in err  # an option left out is no request
    a, b = load_file(str(full)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


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


def test_help_does_not_import_torch():
    code = ("import sys, contextlib, io\nfrom napari_convlora.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['train', '--help'])\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_choices_come_from_the_config(capsys):
    from napari_convlora.config.choices import DEVICES, LABEL_MODES, METHODS, PRECISIONS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for choices in (METHODS, LABEL_MODES, PRECISIONS):
        assert "{" + ",".join(choices) + "}" in text
    assert f"one of {', '.join(DEVICES)}, or cuda:N" in text
    assert main(["predict", "--model", "m.safetensors",
                "--image", "i.tif", "--out", "o.tif", "--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err
