"""The training loop on a tiny SAM: it learns, it stops and resumes exactly, it keeps good files."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from napari_convlora import load_model
from napari_convlora.dataset import TrainingPair, prepare_training_data
from napari_convlora.sample_data import synthetic_cells
from napari_convlora.train import TrainConfig, TrainingError, train
from napari_convlora.training_state import best_path, state_path


def _run(gen, stop_at: int | None = None, stop: threading.Event | None = None):
    events = []
    try:
        while True:
            event = next(gen)
            events.append(event)
            if stop_at is not None and event.kind == "step" and event.step == stop_at:
                stop.set()
    except StopIteration as done:
        return events, done.value


@pytest.fixture(scope="module")
def cells():
    """Nuclei and rods as one foreground class (instances mode), 128 px patches."""
    image, labels = synthetic_cells(256, seed=0)
    return prepare_training_data([TrainingPair(image, labels)], "instances", patch_size=128, val_fraction=0.2, seed=0)


def _config(**kw):
    base = dict(method="conv_lora", input_size=128, steps=40, batch_size=4, grad_accum=1, lr=2e-3, val_every=20,
                device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_loss_and_improves_validation(tmp_path, tiny_checkpoint, cells):
    out = tmp_path / "model.safetensors"
    events, model = _run(train(tiny_checkpoint, cells, out, _config(steps=150, val_every=75)))
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finished"
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, 151))
    assert all(e.lr is not None and e.images_per_s > 0 and e.eta_s >= 0 for e in steps)
    first, last = np.mean([e.loss for e in steps[:10]]), np.mean([e.loss for e in steps[-10:]])
    assert last < 0.75 * first
    validations = [e for e in events if e.kind == "validation"]
    assert validations[0].step == 0 and validations[-1].step == 150
    before = validations[0].metrics["mean_iou_foreground"]
    after = validations[-1].metrics["mean_iou_foreground"]
    assert after > before + 0.25  # measured: 0.05 -> 0.55 (tiny random-encoder SAM)
    assert out.exists() and best_path(out).exists() and state_path(out).exists()
    reloaded = load_model(out, base=tiny_checkpoint)
    assert reloaded.config.head.class_values == (0, 1) and reloaded.config.head.label_mode == "instances"
    x = torch.rand(1, 3, 128, 128) * 255
    assert torch.equal(reloaded.class_probabilities(x), model.class_probabilities(x))


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_stop_and_resume_equal_uninterrupted(tmp_path, tiny_checkpoint, cells, grad_accum):
    config = _config(steps=12, val_every=5, grad_accum=grad_accum, batch_size=2)
    full = tmp_path / "full.safetensors"
    _run(train(tiny_checkpoint, cells, full, config))

    part = tmp_path / "part.safetensors"
    stop = threading.Event()
    events, _ = _run(train(tiny_checkpoint, cells, part, config, stop=stop), stop_at=7, stop=stop)
    assert events[-1].kind == "stopped" and events[-1].step == 7
    assert load_file(str(part)).keys() == load_file(str(full)).keys()
    resumed = tmp_path / "resumed.safetensors"
    events, _ = _run(train(tiny_checkpoint, cells, resumed, resume_from=part))
    assert [e.step for e in events if e.kind == "step"] == list(range(8, 13))
    a, b = load_file(str(full)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stop_mid_accumulation_discards_the_half_step(tmp_path, tiny_checkpoint, cells):
    config = _config(steps=6, grad_accum=4, batch_size=1, val_every=100)
    stop = threading.Event()
    gen = train(tiny_checkpoint, cells, tmp_path / "m.safetensors", config, stop=stop)
    calls = {"n": 0}
    original = cells.sampler.sample

    def counting(rng, batch):
        calls["n"] += 1
        if calls["n"] == 10:  # inside step 3 (micro-batches 9..12)
            stop.set()
        return original(rng, batch)

    cells.sampler.sample = counting
    try:
        events, _ = _run(gen)
    finally:
        del cells.sampler.sample
    assert events[-1].kind == "stopped" and events[-1].step == 2


def test_nan_loss_stops_and_keeps_last_good_file(tmp_path, tiny_checkpoint, cells, monkeypatch):
    out = tmp_path / "m.safetensors"
    _run(train(tiny_checkpoint, cells, out, _config(steps=4, val_every=2)))
    good = out.read_bytes()
    import napari_convlora.train as train_module

    real = train_module.segmentation_loss

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(train_module, "segmentation_loss", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at step 1"):
        _run(train(tiny_checkpoint, cells, out, _config(steps=4, val_every=2)))
    assert out.read_bytes() == good


def test_each_method_trains(tmp_path, tiny_checkpoint, cells):
    for method in ("lora", "decoder"):
        events, model = _run(train(tiny_checkpoint, cells, tmp_path / f"{method}.safetensors",
                                   _config(method=method, steps=3, val_every=3)))
        assert model.config.adapter.method == method and events[-1].kind == "finished"


def test_activation_checkpointing_gives_same_gradients(tiny_checkpoint):
    from napari_convlora import ConvLoRASAM, load_sam

    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = ConvLoRASAM(load_sam(tiny_checkpoint), num_classes=3, input_size=64).train()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05)
        model.set_activation_checkpointing(enabled)
        torch.manual_seed(1)
        out = model(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 255)
        (out.mask_logits.square().mean() + out.balance_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)
