"""Segmenting prompts: weak labels become instances, single prompts come from cached embeddings, and the
unadapted comparison is SAM as loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_model, perturb_trainable

from napari_convlora.data.prompts import mask_box
from napari_convlora.self_training.prompting import EmbeddingCache, grid_window, segment_prompt, segment_weak_labels
from napari_convlora.data.samples import synthetic_cells
from napari_convlora.self_training.crops import CropPrompt
from napari_convlora.weak import WeakLabels, WeakObject


def _instances(size=200, seed=0):
    from skimage.measure import label

    image, labels = synthetic_cells(size, seed=seed)
    return image, label(labels > 0)


def _weak(instances, planes=None):
    objects = {}
    stack = instances if instances.ndim == 3 else instances[None]
    for z, plane in enumerate(stack):
        key = (z,) if instances.ndim == 3 else ()
        objects[key] = [WeakObject(key, "box", box=mask_box(plane == i), source=f"label {i}")
                        for i in np.unique(plane) if i > 0]
    return WeakLabels(instances.shape, objects)


@pytest.mark.parametrize("centre, expected", [((10, 10), (0, 0)), ((100, 100), (64, 64)), ((190, 190), (72, 72))])
def test_grid_windows_hold_the_centre_far_from_their_edges(centre, expected):
    top, left = grid_window(np.array(centre, np.float32), (200, 200), 128)
    assert (top, left) == expected
    assert top <= centre[1] < top + 128 and left <= centre[0] < left + 128


def test_every_weak_label_becomes_one_instance_on_its_plane(tiny_checkpoint):
    model = perturb_trainable(make_model(tiny_checkpoint, method="lora", input_size=128), 0.3).eval()
    image, instances = _instances()
    stack_image, stack_instances = np.stack([image, image[::-1]]), np.stack([instances, instances[::-1]])
    weak = _weak(stack_instances)
    cache = EmbeddingCache(model, stack_image)
    labels, objects = segment_weak_labels(cache, weak, planes=[(1,)])
    assert labels.shape == stack_instances.shape and labels.dtype == np.int32
    assert (labels[0] == 0).all()  # only the chosen plane
    assert len(objects) == len(weak.on_plane((1,))) and all(o.plane == (1,) for o in objects)
    assert set(np.unique(labels[1])) <= set(range(len(objects) + 1))


def test_a_single_prompt_reuses_the_cached_window_and_matches_the_batch(tiny_checkpoint, monkeypatch):
    model = perturb_trainable(make_model(tiny_checkpoint, method="lora", input_size=128), 0.3).eval()
    image, instances = _instances()
    weak = _weak(instances)
    cache = EmbeddingCache(model, image)
    calls = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda x: calls.append(1) or encode(x))
    labels, objects = segment_weak_labels(cache, _weak(instances))
    before = len(calls)
    obj = objects[0]
    mask = segment_prompt(cache, 0, CropPrompt("box", obj.box))
    assert len(calls) == before  # the window's embedding was cached
    alone = segment_weak_labels(EmbeddingCache(model, image), WeakLabels(instances.shape, {(): [obj]}))[0] == 1
    assert np.array_equal(mask, alone)
    assert weak is not None


def test_unadapted_prompts_are_sam_as_loaded(tiny_checkpoint):
    """adapters=False segments with the loaded SAM: the same as a model whose adapters never trained."""
    trained = make_model(tiny_checkpoint, method="lora", input_size=128).eval()
    with torch.no_grad():  # only the adapters change, as self-training changes them
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    fresh = make_model(tiny_checkpoint, method="lora", input_size=128).eval()  # LoRA B = 0: SAM exactly
    image, instances = _instances()
    weak = _weak(instances)
    with torch.no_grad():
        unadapted = segment_weak_labels(EmbeddingCache(trained, image), weak, adapters=False)[0]
        plain = segment_weak_labels(EmbeddingCache(fresh, image), weak)[0]
        adapted = segment_weak_labels(EmbeddingCache(trained, image), weak)[0]
    assert np.array_equal(unadapted, plain)
    assert not np.array_equal(adapted, plain)


def test_the_prompt_latency_benchmark_runs(tmp_path):
    """benchmarks/bench_prompt_latency.py end to end on the tiny geometry."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_prompt_latency

    assert bench_prompt_latency.main(["--configs", "tiny:64", "--prompts", "2", "--image-size", "128",
                                      "--json", str(tmp_path / "p.json")]) == 0
    (result,) = json.loads((tmp_path / "p.json").read_text())["results"]
    assert result["cold_ms"] > 0 and result["box"]["median_ms"] > 0 and result["point"]["median_ms"] > 0
