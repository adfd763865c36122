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


# ------------------------------------------------------------------------------------------------
# Issue 22: the generated families, multi-class scoring and the random-forest row


@pytest.fixture
def data(monkeypatch):
    """``adaptation_data`` (the families; numpy, scipy and scikit-image only)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("adaptation_data", "generated_families"):
        sys.modules.pop(name, None)
    import adaptation_data

    return adaptation_data


def _thick_share(labels: list[np.ndarray]) -> float:
    """The share of foreground pixels farther than 2 px from the background (a structure wider than ~4 px there)."""
    from scipy import ndimage

    thick = sum(int((ndimage.distance_transform_edt(lab > 0) > 2).sum()) for lab in labels)
    return thick / sum(int((lab > 0).sum()) for lab in labels)


@pytest.mark.parametrize("name", ["anatomy", "tiny_lesions", "thin_structures"])
def test_generated_family_is_deterministic_and_as_promised(data, name):
    family = data.family_loaders()[name]()
    spec, base = data.GENERATED[name], data.GENERATED_SEED + 1000 * list(data.GENERATED).index(name)
    assert (len(family.train), len(family.held_out)) == (spec.train, spec.held_out) and family.label_mode == "dense"
    again_train, again_held = spec.make(base, spec.size, 0), spec.make(base + 100, spec.size, 100)
    np.testing.assert_array_equal(family.train[0][0], again_train.image)
    np.testing.assert_array_equal(family.train[0][1], again_train.labels)
    np.testing.assert_array_equal(family.held_out[0].image, again_held.image)
    np.testing.assert_array_equal(family.held_out[0].labels, again_held.labels)
    assert not np.array_equal(family.held_out[0].image, family.held_out[1].image)
    labels = [t[1] for t in family.train] + [h.labels for h in family.held_out]
    for image, lab in zip([t[0] for t in family.train] + [h.image for h in family.held_out], labels):
        assert image.dtype == np.uint8 and lab.dtype == np.uint8 and image.shape == lab.shape == (spec.size,) * 2
    if name == "anatomy":
        assert family.num_classes == 6 and family.class_values() == tuple(range(6)) and 256 <= spec.size <= 384
        assert all(set(np.unique(lab).tolist()) == set(range(6)) for lab in labels)
        assert family.summary()["train_pixels"]["class 5"] > 0
    else:
        assert family.num_classes == 2 and all(set(np.unique(lab).tolist()) <= {0, 1} for lab in labels)
    if name == "tiny_lesions":
        assert spec.size == 512 and not family.train[0][1].any()  # a training image without lesions
        shares = [float((lab > 0).mean()) for lab in labels[1:]]
        assert all(0.001 <= share <= 0.005 for share in shares), shares
    if name == "thin_structures":
        assert all(0.005 < (lab > 0).mean() < 0.15 for lab in labels)
        assert _thick_share(labels) < 0.02  # 1-3 px wide but where curves cross


def test_multi_class_scores_pool_every_class(adaptation):
    """3 classes, 2 x 4 pixels, one unannotated: IoU 1/3, 2/3, 2/3; fg Dice: the mean of classes 1 and 2; no BF."""
    target = np.array([[0, 0, 1, 1], [2, 2, 2, adaptation.IGNORE_INDEX]])
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 0]])
    scorer = adaptation.Scorer(3)
    scorer.add(pred, target, target > 0)
    result = scorer.result()
    assert result["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert result["miou"] == pytest.approx(5 / 9)
    assert result["fg_dice"] == pytest.approx((4 / 5 + 4 / 5) / 2)
    assert math.isnan(result["boundary_f"]) and result["boundary_counts"] is None


def test_forest_features_and_subsample(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import random_forest

    grey = np.random.default_rng(0).integers(0, 255, (24, 32), dtype=np.uint8)
    assert random_forest.pixel_features(grey, False).shape == (24, 32, 42)
    assert random_forest.pixel_features(np.stack([grey] * 3, -1), True).shape == (24, 32, 126)
    classes = np.array([0] * 900 + [1] * 90 + [2] * 10)
    chosen = random_forest.stratified_subsample(classes, 100, np.random.default_rng(0))
    assert len(chosen) == 100 and (classes[chosen] == 2).sum() == 10  # the rare class whole (10 <= 100 / 6)
    assert len(np.unique(chosen)) == 100
    assert random_forest.stratified_subsample(classes, 5000, np.random.default_rng(0)).tolist() == list(range(1000))


@pytest.mark.parametrize("family", ["anatomy", "tiny_lesions"])
def test_forest_and_conv_lora_rows_on_generated_families(adaptation, family, tiny_checkpoint, tmp_path):
    """The random_forest row and conv_lora on a generated family at 128 px: the JSON has per-class IoU (and its
    summary over seeds for the 6 anatomy classes), the forest's record and finite scores."""
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "generated.json"
    try:
        assert adaptation.main(["--base", str(tiny_checkpoint), "--families", family, "--rows", "random_forest",
                                "conv_lora", "--seeds", "0", "1", "--steps", "2", "--threads", "1",
                                "--generated-size", "128", "--rf-trees", "4", "--rf-max-pixels", "5000",
                                "--json", str(out), "--markdown", str(tmp_path / "table.md")]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads(out.read_text())
    classes = 6 if family == "anatomy" else 2
    assert record["families"][family]["num_classes"] == classes and record["config"]["generated_size"] == 128
    runs = record["runs"]
    assert [(r["row"], r["seed"]) for r in runs] == [("random_forest", 0), ("random_forest", 1), ("conv_lora", 0),
                                                    ("conv_lora", 1)]
    for run in runs:
        assert len(run["per_class_iou"]) == classes and _finite(run["miou"]) and _finite(run["fg_dice"])
        assert _finite(run["train_s"]) and _finite(run["predict_s"])
        assert (run["boundary_f"] is None) == (classes > 2)
    forest = runs[0]["forest"]
    assert forest["trees"] == 4 and forest["features"] == 42 and sum(forest["training_pixels"].values()) <= 5000
    assert runs[0]["miou"] != runs[1]["miou"] or runs[0]["forest"]["tree_nodes"] != runs[1]["forest"]["tree_nodes"]
    table = (tmp_path / "table.md").read_text()
    assert "random forest, ilastik features" in table
    if classes > 2:
        per_class = record["per_class_iou_summary"][family]
        assert set(per_class) == {"random_forest", "conv_lora"} and len(per_class["conv_lora"]) == 6
        assert per_class["random_forest"][0]["n"] == 2
        assert "Per-class IoU, anatomy" in table and "| class 5 |" in table
    else:
        assert record["per_class_iou_summary"] == {}
