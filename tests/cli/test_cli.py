"""The napari-convlora command line, end to end on tiny files."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file

from napari_convlora.cli import main
from napari_convlora.data.samples import synthetic_cells


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
    err = capsys.readouterr().err
    assert "finished 4 steps" in err
    assert re.search(r"validation at step 4: mIoU .*, boundary IoU (\d+\.\d%|n/a), pixel accuracy", err)

    code = main(["predict", "--model", str(model), "--checkpoint", str(tiny_checkpoint), "--image",
                 str(files / "img.tif"), "--out", str(files / "pred.tif"), "--probabilities", str(files / "p.tif"),
                 "--device", "cpu"])
    assert code == 0
    err = capsys.readouterr().err  # in-memory prediction shows its tiles (it printed nothing, issue 21)
    assert re.search(r"predicting img.tif: .*\b(\d+)/\1 \[", err), err
    pred = tifffile.imread(files / "pred.tif")
    assert pred.shape == (160, 160) and pred.dtype == np.uint8 and set(np.unique(pred)) <= {0, 1, 2}
    assert tifffile.imread(files / "p.tif").shape == (3, 160, 160)

    capsys.readouterr()
    code = main(["evaluate", "--model", str(model), "--checkpoint", str(tiny_checkpoint), "--image",
                 str(files / "img.tif"), "--labels", str(files / "lab.tif"), "--json", "--device", "cpu"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"per_class_iou", "mean_iou", "mean_iou_foreground", "pixel_accuracy", "boundary_iou"}
    assert len(metrics["per_class_iou"]) == 3
    assert len(metrics["per_class_boundary_iou"]) == 3 and metrics["per_class_boundary_iou"][0] is None
    code = main(["evaluate", "--model", str(model), "--checkpoint", str(tiny_checkpoint), "--image",
                 str(files / "img.tif"), "--labels", str(files / "lab.tif"), "--device", "cpu"])
    table = capsys.readouterr().out.splitlines()
    assert code == 0 and table[0].split() == ["class", "IoU", "Dice", "bIoU", "pixels"]
    assert "boundary IoU" in table[-2] and "bIoU" in table[-1]

    code = main(["info", str(model)])
    info = json.loads(capsys.readouterr().out)
    assert code == 0 and info["config"]["head"]["class_names"] == ["bg", "nucleus", "rod"]


def _train_args(files, tiny_checkpoint, *extra):
    return ["train", "--checkpoint", str(tiny_checkpoint), "--image", str(files / "img.tif"), "--labels",
            str(files / "lab.tif"), "--device", "cpu", "--grad-accum", "1", *extra]


def test_resuming_with_fewer_steps_is_not_called_longer_and_float_labels_are_named(files, tiny_checkpoint, capsys):
    """Resuming with fewer steps said "for longer: 400 -> 50 steps"; float labels got numpy advice (issue 21)."""
    import tifffile

    model = files / "m.safetensors"
    assert main([*_train_args(files, tiny_checkpoint, "--input-size", "64", "--steps", "4"), "--out", str(model)]) == 0
    capsys.readouterr()
    main([*_train_args(files, tiny_checkpoint, "--steps", "3"), "--out", str(files / "s.safetensors"), "--resume",
          str(model)])
    err = capsys.readouterr().err
    assert "for a shorter run: 4 -> 3 steps" in err and "for longer" not in err
    tifffile.imwrite(files / "float.tif", tifffile.imread(files / "lab.tif").astype(np.float32))
    args = _train_args(files, tiny_checkpoint, "--steps", "1")
    args[args.index("--labels") + 1] = str(files / "float.tif")
    assert main([*args, "--out", str(files / "f.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err == (f"napari-convlora train: error: --labels {files / 'float.tif'}: holds float32 values, not integer "
                   "labels: save the label image with an integer type (uint8 or uint16, as napari saves a Labels "
                   "layer)\n")


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
    import napari_convlora.training.loop as train_module

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
    assert code == 1 and "shape" in err and "(157, 160)" in err
    assert not (files / "x.safetensors").exists()
    code = main(["info", str(files / "img.tif")])
    assert code == 1 and "img.tif" in capsys.readouterr().err


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


@pytest.mark.parametrize("output, input_option", [("--checkpoint", None), ("--image", None), ("--labels", None)])
def test_train_refuses_an_output_that_is_an_input(files, tiny_checkpoint, capsys, output, input_option):
    """`train --out` equal to an input overwrote it and exited 0."""
    target = {"--checkpoint": tiny_checkpoint, "--image": files / "img.tif", "--labels": files / "lab.tif"}[output]
    before = Path(target).read_bytes()
    link = files / "link.safetensors"
    link.symlink_to(target)  # also through a link
    for out in (target, link):
        code = main([*_train_args(files, tiny_checkpoint, "--steps", "1", "--input-size", "64"), "--out", str(out)])
        assert code == 2 and f"is the same file as {output}" in capsys.readouterr().err
    assert Path(target).read_bytes() == before


def test_predict_refuses_an_output_that_is_an_input_or_another_output(files, tiny_checkpoint, capsys):
    model = files / "m.safetensors"
    assert main([*_train_args(files, tiny_checkpoint, "--steps", "1", "--input-size", "64"), "--out", str(model)]) == 0
    image_bytes, model_bytes = (files / "img.tif").read_bytes(), model.read_bytes()
    base = ["predict", "--model", str(model), "--checkpoint", str(tiny_checkpoint), "--image", str(files / "img.tif"),
            "--device", "cpu"]
    for extra, message in ((["--out", str(files / "img.tif")], "--out .* is the same file as --image"),
                           (["--out", str(model)], "--out .* is the same file as --model"),
                           (["--out", str(files / "p.tif"), "--probabilities", str(files / "p.tif")],
                            "--out .* is the same file as --probabilities")):
        capsys.readouterr()
        assert main([*base, *extra]) == 2
        assert re.search(message, capsys.readouterr().err)
    assert (files / "img.tif").read_bytes() == image_bytes and model.read_bytes() == model_bytes
    assert not (files / "p.tif").exists()


def test_unwritable_outputs_are_found_before_training(files, tiny_checkpoint, capsys):
    args = _train_args(files, tiny_checkpoint, "--steps", "1", "--input-size", "64")
    assert main([*args, "--out", str(files)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main([*args, "--out", str(files / "img.tif" / "m.safetensors")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root may write anywhere
        locked = files / "locked"
        locked.mkdir(mode=0o500)
        assert main([*args, "--out", str(locked / "m.safetensors")]) == 2
        assert "no permission to write" in capsys.readouterr().err


def test_two_runs_cannot_write_the_same_output_and_a_dead_runs_lock_is_taken_over(files, tiny_checkpoint, capsys):
    """Two runs writing the same --out both exited 0 and one silently won."""
    from napari_convlora.io.safety import lock_path, run_lock

    out = files / "m.safetensors"
    args = [*_train_args(files, tiny_checkpoint, "--steps", "1", "--input-size", "64"), "--out", str(out)]
    with run_lock(out):  # another run of this machine, alive (this very process)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"is being written by another run (pid {os.getpid()}" in err and str(lock_path(out)) in err
    assert not out.exists() and not lock_path(out).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}))
    assert main(args) == 0
    assert f"took over {lock_path(out).name}: the run that held it (pid {dead.pid}" in capsys.readouterr().err
    assert out.exists() and not lock_path(out).exists()


@pytest.mark.parametrize("option, value, message", [
    ("--steps", "0", "steps must be >= 1"), ("--steps", "-5", "steps must be >= 1"),
    ("--batch-size", "0", "batch_size must be >= 1"), ("--grad-accum", "0", "grad_accum must be >= 1"),
    ("--input-size", "100", "multiple of 16"), ("--val-fraction", "1.5", "validation fraction"),
])
def test_settings_that_cannot_work_are_usage_errors(files, tiny_checkpoint, capsys, option, value, message):
    code = main([*_train_args(files, tiny_checkpoint), "--out", str(files / "m.safetensors"), option, value])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1  # one line, no traceback
    assert not (files / "m.safetensors").exists()


def test_operating_system_errors_are_one_line_with_the_file(files, tiny_checkpoint, capsys, monkeypatch):
    import napari_convlora.io.images as image_io

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(image_io, "read_image", unreadable)
    code = main([*_train_args(files, tiny_checkpoint), "--out", str(files / "m.safetensors")])
    err = capsys.readouterr().err
    assert code == 1 and err == f"napari-convlora train: error: {files / 'img.tif'}: Permission denied\n"


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_files(files, tiny_checkpoint, capsys,
                                                                              monkeypatch):
    """torch reports a full disk as "[enforce fail at inline_container.cc]", which ended in a traceback."""
    out = files / "m.safetensors"
    args = [*_train_args(files, tiny_checkpoint, "--steps", "2", "--val-every", "1", "--input-size", "64"),
            "--out", str(out)]
    assert main(args) == 0
    model, state = out.read_bytes(), (files / "m.training.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 320 vs 214")

    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"napari-convlora train: error: {files / 'm.training.pt'}: could not be written, the "
                              "previous file is kept (the disk is full or failed: [enforce fail") and sum("error" in line for line in err) == 1
    assert (files / "m.training.pt").read_bytes() == state and model != out.read_bytes()  # the model was newer
    assert not [p for p in files.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(torch, "save", real_save)
    assert main([*args[:-2], "--out", str(files / "r.safetensors"), "--resume", str(out)]) == 0  # from the state's
    assert "finished 2 steps" in capsys.readouterr().err  # own copy of its step's weights: whole, exact


def test_a_full_disk_at_the_first_adapter_save_is_one_line(files, tiny_checkpoint, capsys, monkeypatch):
    """safetensors reports a full disk as SafetensorError, which ended in a traceback (issue 21)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = files / "m.safetensors"
    assert main([*_train_args(files, tiny_checkpoint, "--steps", "2", "--input-size", "64"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert re.match(rf"napari-convlora train: error: {re.escape(str(files))}/m(\.best)?\.safetensors: could not be "
                    r"written, nothing was written \(the disk is full or failed: ", err[-1])
    assert sum("error" in line for line in err) == 1
    assert not [p for p in files.iterdir() if p.name.endswith((".tmp", ".safetensors"))]


def test_medical_formats_are_named_and_evaluate_json_names_the_classes(files, tiny_checkpoint, capsys):
    (files / "scan.nii.gz").write_bytes(b"\x1f\x8b not really")
    code = main(["train", "--checkpoint", str(tiny_checkpoint), "--image", str(files / "scan.nii.gz"), "--labels",
                 str(files / "lab.tif"), "--out", str(files / "m.safetensors"), "--device", "cpu"])
    assert code == 1 and "scan.nii.gz: could not read the NIfTI image (" in capsys.readouterr().err
    (files / "scan.mha").write_bytes(b"ObjectType = Image")
    code = main(["train", "--checkpoint", str(tiny_checkpoint), "--image", str(files / "scan.mha"), "--labels",
                 str(files / "lab.tif"), "--out", str(files / "m.safetensors"), "--device", "cpu"])
    assert code == 1 and "scan.mha: MetaImage images are not read yet; save the image as TIFF" in capsys.readouterr().err
    model = files / "m.safetensors"
    assert main([*_train_args(files, tiny_checkpoint, "--steps", "1", "--input-size", "64", "--class-names",
                              "bg,nucleus,rod"), "--out", str(model)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--checkpoint", str(tiny_checkpoint), "--image",
                 str(files / "img.tif"), "--labels", str(files / "lab.tif"), "--json", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["class_names"] == ["bg", "nucleus", "rod"] and record["class_values"] == [0, 1, 2]


def test_unexpected_errors_are_called_bugs_in_one_line():
    from napari_convlora.errors import describe_error

    assert describe_error(KeyError("config")) == "unexpected KeyError: 'config' (a bug: please report it with the log)"
    assert describe_error(IndexError()) == "unexpected IndexError: no message (a bug: please report it with the log)"
    assert describe_error(PermissionError(13, "Permission denied", "/x/y.tif")) == "/x/y.tif: Permission denied"
    assert describe_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")).startswith("out of memory")
    assert describe_error(ValueError("labels\n  are bad")) == "labels are bad"


def test_an_image_too_large_for_memory_is_refused_before_it_is_read(files, monkeypatch):
    """A compressed TIFF that expands to 50000 x 50000 ended in a MemoryError traceback."""
    import napari_convlora.io.images as image_io

    big = np.zeros((64, 64), np.uint16)
    tifffile.imwrite(files / "big.tif", big, compression="zlib")
    monkeypatch.setattr(image_io, "memory_bytes", lambda: 10_000)  # a machine with 10 kB of memory
    with pytest.raises(ValueError, match=r"big.tif: the image is 64 x 64 uint16, 0.0 GiB once read, more than half"):
        image_io.read_image(files / "big.tif")
    monkeypatch.setattr(image_io, "memory_bytes", lambda: 10**12)
    assert image_io.read_image(files / "big.tif").shape == (64, 64)


def test_a_finished_run_can_be_continued_for_more_steps(files, tiny_checkpoint, capsys):
    """`--resume` on a finished 3-step run with `--steps 5` printed "finished 3 steps" and trained nothing."""
    model, longer = files / "m.safetensors", files / "longer.safetensors"
    args = _train_args(files, tiny_checkpoint, "--input-size", "64", "--val-every", "1")
    assert main([*args, "--steps", "3", "--out", str(model)]) == 0
    capsys.readouterr()
    assert main([*args, "--steps", "5", "--lr", "0.5", "--out", str(longer), "--resume", str(model)]) == 0
    err = capsys.readouterr().err
    assert "for longer: 3 -> 5 steps" in err and "lr: 0.5 asked, 0.001 saved" in err and "finished 5 steps" in err
    assert torch.load(files / "longer.training.pt", map_location="cpu", weights_only=True)["step"] == 5
    assert main([*args, "--steps", "2", "--out", str(files / "x.safetensors"), "--resume", str(longer)]) == 1
    assert "has already made 5 steps" in capsys.readouterr().err


def test_train_again_from_a_trained_model_writes_a_new_file_and_a_metrics_table(files, tiny_checkpoint, capsys):
    """`--init-from`: a new run from the model's weights, with its settings (an option that would change them is
    reported and set aside); the source stays as it was. Every run writes its validations to <out>.metrics.csv."""
    import csv

    model, again = files / "m.safetensors", files / "again.safetensors"
    args = _train_args(files, tiny_checkpoint, "--steps", "2", "--val-every", "1")
    assert main([*args, "--input-size", "64", "--class-names", "bg,nucleus,rod", "--out", str(model)]) == 0
    before = model.read_bytes()
    with open(files / "m.metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "1", "2"] and "iou_nucleus" in rows[0] and "pixels_rod" in rows[0]
    assert "validation metrics in m.metrics.csv" in capsys.readouterr().err
    assert main([*args, "--input-size", "128", "--lr", "0.001", "--out", str(again), "--init-from", str(model)]) == 0
    err = capsys.readouterr().err
    assert f"starting from {model} with its own settings: input_size: 128 asked, 64 in the model" in err
    assert "finished 2 steps" in err and model.read_bytes() == before
    state = torch.load(files / "again.training.pt", map_location="cpu", weights_only=True)
    assert state["recipe"]["input_size"] == 64 and state["recipe"]["lr"] == 0.001
    assert state["started_from"]["file_name"] == "m.safetensors"
    with open(files / "again.metrics.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["0", "1", "2"]


def test_train_again_refuses_resume_with_it_and_its_own_source_as_out(files, tiny_checkpoint, capsys):
    model = files / "m.safetensors"
    args = _train_args(files, tiny_checkpoint, "--steps", "1", "--input-size", "64")
    assert main([*args, "--out", str(model)]) == 0
    before = model.read_bytes()
    capsys.readouterr()
    for extra, message in ((["--out", str(files / "n.safetensors"), "--resume", str(model), "--init-from", str(model)],
                            "continues a run, --init-from"),
                           (["--out", str(model), "--init-from", str(model)], "--out .* is the same file as --init-from")):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1
    assert model.read_bytes() == before and not (files / "n.safetensors").exists()


def test_a_diverging_run_saves_nothing_and_a_model_that_predicts_nan_is_refused(files, tiny_checkpoint, capsys):
    """Issue 21: ``train ... --steps 4 --grad-accum 1 --val-every 1 --lr 1e6`` stopped saying nothing non-finite was
    saved, but its files had finite weights and 100 % NaN outputs, and predict from them wrote an all-background
    label image with exit status 0."""
    from helpers import make_model

    from napari_convlora import save_adapter

    out = files / "m.safetensors"
    args = _train_args(files, tiny_checkpoint, "--input-size", "64", "--steps", "4", "--val-every", "1", "--lr", "1e6",
                       "--multiclass-head", "matched")  # the reported run's head (its NaN comes at step 1)
    assert main([*args, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("napari-convlora train: error: the model's outputs on the validation data became NaN "
                              "or infinite at step 1; training stopped and nothing non-finite was saved (nothing was "
                              "saved yet)")
    assert not out.exists() and not (files / "m.best.safetensors").exists()

    broken = make_model(tiny_checkpoint, num_classes=3, input_size=64).eval()
    with torch.no_grad():
        broken.head.mask_tokens.weight.mul_(1e36)  # finite weights, NaN outputs: what such a run saved
    model = save_adapter(broken, files / "diverged.safetensors")
    why = (f"{model}: the model predicts NaN or infinite probabilities on this image, so it cannot segment it (was "
           "it saved by a training run that diverged?): use an earlier file of that run, or train again with a lower "
           "learning rate")
    base = ["--model", str(model), "--checkpoint", str(tiny_checkpoint), "--image", str(files / "img.tif"),
            "--device", "cpu"]
    assert main(["predict", *base, "--out", str(files / "pred.tif"), "--probabilities", str(files / "p.tif")]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"napari-convlora predict: error: {why}\n" and captured.out == ""
    assert not (files / "pred.tif").exists() and not (files / "p.tif").exists()
    assert main(["evaluate", *base, "--labels", str(files / "lab.tif")]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"napari-convlora evaluate: error: {why}\n" and captured.out == ""
