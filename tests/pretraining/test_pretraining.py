"""Pretraining the built-in small SAM: prompts, SAM's promptable loss, a smoke run of the script, and the shipped
model (it loads like any checkpoint, its record matches the file, and it still reaches what the record says)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_convlora.data.prompts import central_point, correction_point, mask_box, noisy_box, random_points

ROOT = Path(__file__).resolve().parents[2]


def _disc(size: int = 64, centre=(30, 20), radius: int = 9) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_prompts_fall_where_sam_draws_them():
    mask = _disc()
    rng = np.random.default_rng(0)
    assert mask_box(mask).tolist() == [11, 21, 30, 40]  # x0, y0, x1, y1: pixel edges
    boxes = np.stack([noisy_box(mask, rng) for _ in range(200)])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all() and np.abs(boxes - mask_box(mask)).max() <= 20
    assert 0.5 < np.abs(boxes - mask_box(mask)).mean() < 4  # jitter of about 10 % of the 19 px side
    points = random_points(mask, 50, rng)
    assert mask[points[:, 1].astype(int), points[:, 0].astype(int)].all()  # (x, y) inside the object
    assert central_point(mask).tolist() == [20.5, 30.5]
    missed = mask.copy()
    missed[:, :20] = False  # the left part of the object was missed: the correction is a positive point there
    (x, y), label = correction_point(missed, mask, rng)
    assert label == 1 and mask[int(y), int(x)] and not missed[int(y), int(x)]
    extra = mask | _disc(centre=(50, 50), radius=6)  # a false detection larger than any miss: a negative point
    (x, y), label = correction_point(extra, mask, rng)
    assert label == 0 and not mask[int(y), int(x)]


def test_the_loss_trains_the_best_of_three_masks_only():
    from napari_convlora.pretraining.promptable import _mask_losses, focal_weight_at

    targets = torch.zeros(2, 32, 32)
    targets[:, 8:24, 8:24] = 1
    low_res = torch.full((2, 3, 8, 8), -5.0, requires_grad=True)
    with torch.no_grad():
        low_res[:, 1, 2:6, 2:6] = 5.0  # mask 1 is right, masks 0 and 2 empty
    loss, chosen, ious = _mask_losses(low_res, torch.zeros(2, 3), targets, 32)
    loss.backward()
    assert torch.equal(chosen, low_res.detach()[:, 1:2]) and (ious > 0.9).all()
    grad = low_res.grad.abs().sum(dim=(2, 3))
    assert (grad[:, 1] > 0).all() and torch.allclose(grad[:, [0, 2]], torch.zeros(2, 2), atol=1e-3)
    assert [focal_weight_at(s, 100) for s in (0, 50, 100, 500)] == [0.0, 10.0, 20.0, 20.0]


def test_a_smoke_run_of_the_pretraining_script_writes_a_loadable_checkpoint_and_its_record(tmp_path):
    out = tmp_path / "small.pth"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_small_sam.py"), "--steps", "2", "--pool",
                           "4", "--eval-scenes", "2", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from napari_convlora.io.atomic import sha256_file
    from napari_convlora.config import SMALL
    from napari_convlora.checkpoints.sam_files import load_base

    record = json.loads(out.with_suffix(".json").read_text())
    assert record["sha256"] == sha256_file(out) and record["steps"] == 2 and record["seed"] == 0
    assert set(record["held_out"]) >= {"box_miou", "point_miou", "objects"}
    assert load_base(out).architecture == SMALL


def test_the_shipped_model_is_the_one_its_record_describes():
    from napari_convlora.io.atomic import sha256_file
    from napari_convlora.checkpoints.builtin import builtin_checkpoint, builtin_provenance, describe_builtin
    from napari_convlora.config import SMALL
    from napari_convlora.pretraining.promptable import prompt_mious
    from napari_convlora.pretraining.synthetic import random_scene
    from napari_convlora.checkpoints.sam_files import load_base

    path = builtin_checkpoint()
    record = builtin_provenance()
    assert record["sha256"] == sha256_file(path) and path.stat().st_size < 20 * 2**20
    base = load_base(path)
    assert base.architecture == SMALL and base.architecture.model_type == "small"
    held_out = [random_scene(np.random.default_rng(10_000_000 + i)) for i in range(8)]
    scores = prompt_mious(base.sam, held_out)
    first = [h for h in record["history"] if h["step"] == record["steps"]][-1]
    assert scores["box_miou"] == pytest.approx(first["box_miou"], abs=0.1)  # 8 of the 64 scenes it was scored on
    assert scores["box_miou"] > 0.3, "the shipped model no longer segments boxed objects"
    assert "built-in small SAM" in describe_builtin() and "segment-anything" in describe_builtin()


def test_the_demo_starts_from_the_built_in_model_and_says_so(tmp_path, capsys):
    from napari_convlora.cli import main

    assert main(["demo", "--out-dir", str(tmp_path), "--steps", "2", "--device", "cpu", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "Base model: the built-in small SAM (3.8 M parameters, 256 px), pretrained in this repository" in out
    assert "official" in out and (tmp_path / "test_overlay.png").is_file()


def test_a_pretraining_run_stopped_and_resumed_trains_the_same_weights_as_one_that_never_stopped(tmp_path):
    import torch

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_small_sam.py"), "--steps", "3",
                               "--pool", "4", "--eval-scenes", "1", "--threads", "1", "--warmup", "1", *extra],
                              capture_output=True, text=True, timeout=300)

    straight = run("--out", str(tmp_path / "straight.pth"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    stopped = run("--out", str(tmp_path / "resumed.pth"), "--stop-at", "2")
    assert stopped.returncode == 0 and "continue with --resume" in stopped.stdout
    assert not (tmp_path / "resumed.pth").exists() and (tmp_path / "resumed.pth.state.pt").exists()
    other = run("--out", str(tmp_path / "resumed.pth"), "--resume", "--lr", "1e-3")
    assert other.returncode == 1 and "needs the settings it started with (lr 0.0008 -> 0.001)" in other.stderr
    assert "Traceback" not in other.stderr
    resumed = run("--out", str(tmp_path / "resumed.pth"), "--resume")
    assert resumed.returncode == 0 and "resuming at step 2" in resumed.stdout, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "straight.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "resumed.json").read_text())["scenes"] == "mixed"
