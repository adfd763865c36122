"""Smoke test of ``benchmarks/adaptation.py`` (issue 11) on its smallest setting, and its boundary F-score."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def adaptation(monkeypatch):
    """The benchmark module (it needs the synthetic scenes' package: the zero-shot row uses its prompting code)."""
    pytest.importorskip("napari_convlora.pretraining.synthetic", reason="the synthetic scenes' module is absent")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("adaptation", None)
    import adaptation

    return adaptation


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.parametrize("family", ["shift_blur", "nuclei"])
def test_benchmark_runs_on_its_smallest_setting(adaptation, family, tiny_checkpoint, tmp_path):
    """One family, two rows, one seed, 2 steps on the tiny SAM: the JSON record has every key, finite numbers."""
    try:
        adaptation.family_loaders()[family]()
    except adaptation.FamilyUnavailable as e:  # nuclei: stardist is not installed
        pytest.skip(str(e))
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "adaptation.json"
    try:
        assert adaptation.main(["--base", str(tiny_checkpoint), "--families", family, "--rows", "zero_shot",
                                "conv_lora", "--seeds", "0", "--steps", "2", "--threads", "1",
                                "--json", str(out), "--markdown", str(tmp_path / "table.md")]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads(out.read_text())
    assert set(record) >= {"config", "families", "skipped", "runs", "summary", "seconds"}
    assert record["skipped"] == {}
    assert record["config"]["steps"] == 2 and record["config"]["boundary_tolerance_px"] == 2.0
    assert set(record["families"]) == {family}
    runs = {run["row"]: run for run in record["runs"]}
    assert set(runs) == {"zero_shot", "conv_lora"} and len(record["runs"]) == 2
    assert runs["conv_lora"]["seed"] == 0 and runs["zero_shot"]["seed"] is None
    for row, run in runs.items():
        keys = ["miou", "fg_dice", "boundary_f", "boundary_iou", "boundary_precision", "boundary_recall",
                "trainable_params"]
        keys += ["box_iou"] if row == "zero_shot" else ["step_s", "train_s", "predict_s"]
        for key in keys:
            assert _finite(run[key]), (row, key, run[key])
        assert 0 <= run["miou"] <= 1 and 0 <= run["boundary_f"] <= 1 and 0 <= run["boundary_iou"] <= 1
    assert runs["conv_lora"]["trainable_params"] > 0 and runs["conv_lora"]["step_s"] > 0
    summary = record["summary"][family]["conv_lora"]
    assert summary["miou"]["n"] == 1 and summary["miou"]["std"] is None
    assert summary["miou"]["mean"] == pytest.approx(runs["conv_lora"]["miou"])
    table = (tmp_path / "table.md").read_text()
    assert "zero-shot SAM + GT boxes (different task)" in table and "Conv-LoRA (defaults, top-1)" in table
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert header[4:6] == ["BF (2 px)", "bIoU"] and summary["boundary_iou"]["n"] == 1
    conv_lora_line = next(line for line in table.splitlines() if "Conv-LoRA (defaults, top-1)" in line)
    assert conv_lora_line.split("|")[6].strip() == f"{runs['conv_lora']['boundary_iou']:.3f}"


def test_boundary_f_score(adaptation):
    """A 20 x 20 square against itself, shifted by 2 px (within the tolerance) and by 4 px (beyond it)."""
    truth = np.zeros((64, 64), bool)
    truth[20:40, 20:40] = True
    everywhere = np.ones_like(truth)

    def score(pred: np.ndarray) -> float:
        return adaptation.boundary_f(adaptation.boundary_counts(pred, truth, everywhere))["boundary_f"]

    assert score(truth) == 1.0
    assert score(np.roll(truth, 2, axis=1)) == 1.0
    # Shifted right by 4 px: each boundary has 76 pixels. Of the shifted one, 18 on the top edge lie within 2 px of
    # the other square's top edge (columns 24-41), 18 on the bottom edge, and 2 + 2 of its left side (rows 21, 22,
    # 37, 38, within 2 px of the other's top and bottom edges); its right side is 4 px from anything. By symmetry the
    # same 40 of 76 for recall.
    shifted = np.roll(truth, 4, axis=1)
    assert adaptation.boundary_counts(shifted, truth, everywhere).tolist() == [40, 76, 40, 76]
    assert score(shifted) == pytest.approx(40 / 76)
    assert score(np.zeros_like(truth)) == 0.0
    assert math.isnan(adaptation.boundary_f(np.zeros(4, np.int64))["boundary_f"])
    # Only scored pixels count: nothing predicted or true there leaves the score undefined.
    assert math.isnan(adaptation.boundary_f(adaptation.boundary_counts(truth, truth, ~everywhere))["boundary_f"])


def test_boundary_iou_is_hq_sams_pooled_over_the_held_out_images(adaptation):
    """The shifted 10 x 10 square of test_boundary.py (1/3 on a 20 x 20 image, band 1 px) and the square against
    itself, pooled: (18 + 36) / (54 + 36); unannotated pixels are not scored."""
    truth = np.zeros((20, 20), bool)
    truth[5:15, 5:15] = True
    target = truth.astype(np.int64)
    scorer = adaptation.Scorer()
    scorer.add(np.roll(truth, 1, axis=1), target, truth)
    assert scorer.result()["boundary_iou"] == pytest.approx(1 / 3)
    scorer.add(truth, target, truth)
    assert scorer.result()["boundary_iou"] == pytest.approx((18 + 36) / (54 + 36))
    sparse = adaptation.Scorer()
    unannotated = np.where(np.arange(20)[None, :] < 10, target, adaptation.IGNORE_INDEX)  # left half annotated
    sparse.add(truth, unannotated, truth)  # the cut through the square is no boundary
    assert sparse.result()["boundary_iou"] == 1.0
