"""Smoke test of ``benchmarks/wesam_adaptation.py`` (issue 13) on the tiny SAM, and its weak labels."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def wesam_benchmark(monkeypatch):
    pytest.importorskip("napari_convlora.pretraining.synthetic", reason="the synthetic scenes' module is absent")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("wesam_adaptation", None)
    import wesam_adaptation

    return wesam_adaptation


def test_benchmark_runs_end_to_end(wesam_benchmark, tiny_checkpoint, tmp_path):
    """One family, every row, one seed, 2 steps: every row is scored with box and point prompts."""
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "wesam.json"
    try:
        assert wesam_benchmark.main(["--base", str(tiny_checkpoint), "--families", "shift_blur", "--seeds", "0",
                                     "--steps", "2", "--max-objects", "8", "--held-out", "2", "--threads", "1",
                                     "--json", str(out),
                                     "--markdown", str(tmp_path / "table.md")]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads(out.read_text())
    assert set(record) >= {"config", "families", "skipped", "runs", "summary", "gap_closed", "seconds"}
    assert record["config"]["steps"] == 2 and set(record["families"]) == {"shift_blur"}
    assert 0 < record["families"]["shift_blur"]["coarse_vs_true_miou"] < 1
    runs = {run["row"]: run for run in record["runs"]}
    assert set(runs) == set(wesam_benchmark.ROWS) and len(record["runs"]) == len(wesam_benchmark.ROWS)
    assert runs["zero_shot"]["seed"] is None and runs["zero_shot"]["step_s"] is None
    for row, run in runs.items():
        assert run["objects"] == 47 + 11  # every object of the first two held-out scenes is prompted
        for key in ("box_miou", "point_miou", "point_best3_miou"):
            assert 0 <= run[key] <= 1, (row, key)
        if row != "zero_shot":
            assert run["seed"] == 0 and math.isfinite(run["step_s"]) and math.isfinite(run["last_loss"]["loss"])
    table = (tmp_path / "table.md").read_text()
    assert "WeSAM, coarse masks" in table and "supervised, full masks (upper bound)" in table


def test_weak_labels_from_ground_truth(wesam_benchmark):
    """Boxes are tight, the point lies inside its object, and a coarse mask is a degraded copy of the mask."""
    yy, xx = np.mgrid[:64, :64]
    disk = (yy - 30) ** 2 + (xx - 34) ** 2 <= 15**2
    box = wesam_benchmark.weak_object(disk, "box", "disk")
    assert box.kind == "box" and box.box.tolist() == [19, 15, 50, 46]
    point = wesam_benchmark.weak_object(disk, "points", "disk")
    (x, y), = point.positive
    assert disk[int(y), int(x)] and len(point.negative) == 0
    coarse = wesam_benchmark.weak_object(disk, "coarse", "disk")
    full = coarse.full_mask(disk.shape)
    iou = (full & disk).sum() / (full | disk).sum()
    assert coarse.kind == "coarse" and 0.5 < iou < 0.95  # a polygon of a few vertices, not the disk itself
    assert (full & ~disk).sum() <= 0.05 * full.sum()  # its vertices lie on the outline: inscribed in a convex object
    tiny = np.zeros((16, 16), bool)
    tiny[5:7, 5:7] = True  # too small for a polygon: its filled box
    assert np.array_equal(wesam_benchmark.coarse_mask(tiny), tiny)
