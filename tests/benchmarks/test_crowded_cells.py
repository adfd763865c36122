"""The crowded-cells family, the classical instance baselines and ``benchmarks/instances.py`` (issue 23), without
training or a model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
CROSS = ndimage.generate_binary_structure(2, 1)


@pytest.fixture
def bench(monkeypatch):
    """The benchmarks folder on the path; its modules imported afresh."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("generated_families", "classical_instances", "instances"):
        sys.modules.pop(name, None)


def touching_share(instances: np.ndarray) -> tuple[int, int]:
    """(cells whose 1 px dilation (4-neighbours) meets another id, cells)."""
    ids = np.unique(instances[instances > 0])
    touching = sum(bool((ndimage.binary_dilation(instances == i, CROSS) & (instances > 0) & (instances != i)).any())
                   for i in ids)
    return touching, len(ids)


def test_crowded_cells_are_deterministic_per_seed(bench):
    from generated_families import crowded_cells_image

    first, again, other = crowded_cells_image(7), crowded_cells_image(7), crowded_cells_image(8)
    for name in ("image", "labels", "instances"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.instances, other.instances)


def test_crowded_cells_sizes_and_touching_share(bench):
    """Six images: labels are the cells' union, one 4-connected piece per consecutive id, mean radii 6-12 px (cells
    cut by the border smaller), and about half the cells touch a neighbour."""
    from generated_families import crowded_cells_image

    touching, cells, radii = 0, 0, []
    for seed in range(6):
        generated = crowded_cells_image(seed)
        assert generated.image.shape == generated.labels.shape == generated.instances.shape == (256, 256)
        assert generated.image.dtype == generated.labels.dtype == np.uint8 and generated.instances.dtype == np.int32
        np.testing.assert_array_equal(generated.labels, (generated.instances > 0).astype(np.uint8))
        count = int(generated.instances.max())
        np.testing.assert_array_equal(np.unique(generated.instances), np.arange(count + 1))
        assert all(ndimage.label(generated.instances == i, CROSS)[1] == 1 for i in range(1, count + 1))
        areas = np.bincount(generated.instances.ravel())[1:]
        radii.extend(np.sqrt(areas / np.pi))
        assert areas.min() >= 20 and 60 <= count <= 130
        image_touching, image_cells = touching_share(generated.instances)
        assert 0.3 <= image_touching / image_cells <= 0.8, (seed, image_touching / image_cells)
        touching, cells = touching + image_touching, cells + image_cells
        inside = generated.image[generated.labels > 0].astype(float).mean()
        assert inside > generated.image[generated.labels == 0].astype(float).mean() + 60  # bright cells, dark field
    assert 0.4 <= touching / cells <= 0.7
    radii = np.array(radii)
    assert 6 <= np.median(radii) <= 12
    assert np.mean((radii >= 5) & (radii <= 12.5)) >= 0.9 and radii.max() <= 14


def two_touching_discs() -> tuple[np.ndarray, np.ndarray]:
    """A 96 x 96 uint8 image of two bright discs of radius 14 whose centres are 24 px apart (they merge along a
    4 px-deep overlap; no seam), blurred and noisy; and their instances (pixels of the overlap go to the nearer)."""
    yy, xx = np.mgrid[:96, :96]
    first, second = np.hypot(yy - 48, xx - 36), np.hypot(yy - 48, xx - 60)
    instances = np.where((first <= 14) | (second <= 14), np.where(first < second, 1, 2), 0)
    image = ndimage.gaussian_filter(np.where(instances > 0, 200.0, 20.0), 1.0)
    image += np.random.default_rng(0).normal(0, 5, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), instances.astype(np.int32)


def test_watershed_splits_touching_discs_that_components_merge(bench):
    from classical_instances import otsu_components, otsu_foreground, otsu_watershed
    from napari_convlora.instances.metrics import instance_scores

    image, truth = two_touching_discs()
    assert ndimage.label(truth > 0)[1] == 1  # the discs touch
    foreground = otsu_foreground(image, min_size=20)
    assert (foreground == (truth > 0)).mean() > 0.99
    merged = otsu_components(image, min_size=20)
    assert merged.dtype == np.int32 and merged.max() == 1
    split = otsu_watershed(image, min_size=20, min_distance=5)
    assert split.dtype == np.int32 and sorted(np.unique(split)) == [0, 1, 2]
    assert instance_scores(split, truth).f1(0.8) == 1.0
    assert instance_scores(merged, truth).recall(0.5) <= 0.5  # one object matches one disc at most


def test_classical_baselines_on_an_empty_image(bench):
    from classical_instances import otsu_components, otsu_watershed

    flat = np.full((32, 32), 7, np.uint8)
    assert otsu_components(flat, 20).max() == 0 and otsu_watershed(flat, 20, 4).max() == 0
    with pytest.raises(ValueError, match="grey"):
        otsu_components(np.zeros((8, 8, 3)), 20)


def test_instances_help_runs():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "instances.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--rows" in proc.stdout and "--seeds" in proc.stdout and "--json" in proc.stdout


def test_row_registry(bench):
    import instances

    assert set(instances.ROWS) >= {"otsu_components", "otsu_watershed", "conv_lora_components", "instance_head",
                                   "sam_refined", "segment_everything", "segment_everything_adapted"}
    assert instances.ROWS["instance_head"].run is not None and instances.ROWS["sam_refined"].run is not None
    assert not instances.ROWS["segment_everything"].seeded and instances.ROWS["segment_everything_adapted"].seeded
    assert not instances.ROWS["otsu_watershed"].seeded and instances.ROWS["conv_lora_components"].seeded
    assert set(instances.FAMILIES) == {"nuclei", "crowded_cells"}


def test_classical_rows_end_to_end(bench, tmp_path, capsys):
    """The classical rows on crowded_cells: one run each whatever the seeds, pooled scores."""
    import instances

    out = tmp_path / "instances.json"
    assert instances.main(["--families", "crowded_cells", "--rows", "otsu_*", "--seeds", "0", "1",
                           "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["pending"] == {}
    runs = {run["row"]: run for run in record["runs"]}
    assert set(runs) == {"otsu_components", "otsu_watershed"} and len(record["runs"]) == 2
    family = record["families"]["crowded_cells"]
    assert family["train_images"] == 4 and family["held_out_images"] == 8
    for run in runs.values():
        assert run["seed"] is None and run["num_true"] == family["held_out_objects"]
        for key in ("f1_50", "mean_f1", "precision_50", "recall_50", "mean_ap"):
            assert math.isfinite(run[key]) and 0 <= run[key] <= 1
        assert run["mean_f1"] <= run["f1_50"] and len(run["scores"]["f1"]) == 10
    assert runs["otsu_watershed"]["f1_50"] > runs["otsu_components"]["f1_50"]
    assert 0.4 <= family["held_out_touching_share"] <= 0.7


def test_touching_ids_agree_with_dilation(bench):
    import instances
    from generated_families import crowded_cells_image

    cells = crowded_cells_image(3).instances
    expected = [i for i in range(1, cells.max() + 1)
                if (ndimage.binary_dilation(cells == i, CROSS) & (cells > 0) & (cells != i)).any()]
    np.testing.assert_array_equal(instances.touching_ids(cells), expected)


def test_nuclei_split(bench):
    import instances

    try:
        family = instances.load_nuclei()
    except instances.FamilyUnavailable as e:
        pytest.skip(str(e))
    (train_image, train_mask), = family.train
    (held_image, held_mask), = family.held_out
    assert train_image.shape == held_image.shape == train_mask.shape == held_mask.shape == (256, 512)
    assert family.summary()["held_out_objects"] == len(np.unique(held_mask[held_mask > 0]))
