"""A run that has not learned says so, with what to change (issue 22, item 2)."""

from __future__ import annotations

import tifffile

from napari_convlora.cli import main
from napari_convlora.data.samples import synthetic_cells
from napari_convlora.training.notes import stall_note


def _history(losses, scores):
    return {"loss": list(enumerate(losses, 1)),
            "validation": [(step, {"per_class_iou": [score, score], "per_class_pixels": [10, 10]})
                           for step, score in scores]}


def test_the_note_comes_once_when_loss_and_validation_stand_still():
    flat = _history([0.7] * 20, [(0, 0.2), (10, 0.2), (20, 0.21)])
    assert "loss has not moved (0.700 -> 0.700)" in stall_note(flat, 20, 100, 1e-4)
    assert "higher learning rate (now 0.0001" in stall_note(flat, 20, 100, 1e-4)
    assert stall_note(_history([0.7] * 10, [(0, 0.2), (10, 0.2)]), 10, 100, 1e-4) == ""  # too early
    assert stall_note(_history([0.7] * 30, [(0, 0.2), (10, 0.2), (20, 0.2), (30, 0.2)]), 30, 100, 1e-4) == ""  # once
    learning = _history([0.7] * 10 + [0.4] * 10, [(0, 0.2), (10, 0.3), (20, 0.4)])
    assert stall_note(learning, 20, 100, 1e-4) == ""
    rising = _history([0.7] * 20, [(0, 0.2), (10, 0.3), (20, 0.5)])  # a flat loss, but validation rose
    assert stall_note(rising, 20, 100, 1e-4) == ""


def test_a_run_at_a_rate_too_low_to_learn_says_so_on_the_command_line(tmp_path, tiny_checkpoint, capsys):
    image, labels = synthetic_cells(64, seed=0)  # one patch: the loss stands still when the weights do
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    assert main(["train", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "img.tif"), "--labels",
                 str(tmp_path / "lab.tif"), "--out", str(tmp_path / "m.safetensors"), "--input-size", "64",
                 "--steps", "20", "--val-every", "5", "--grad-accum", "1", "--lr", "1e-9", "--no-augment", "--device", "cpu",
                 "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("the loss has not moved") == 1 and "try a higher learning rate (now 1e-09" in err
