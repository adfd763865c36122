"""Small builders shared by the tests (imported as ``from helpers import ...``; pytest puts tests/ on the path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from napari_convlora import AdaptedSAM, load_base
from napari_convlora.config import AdapterConfig, HeadConfig, InputSpec, ModelConfig
from napari_convlora.checkpoints.sam_files import BaseSam

HEAD_FIELDS = {"num_mask_tokens", "class_names", "class_values", "label_mode", "background_value", "hq", "multiclass",
               "detail", "detail_context"}


def make_model(
    base: str | Path | BaseSam,
    num_classes: int = 2,
    method: str = "conv_lora",
    input_size: int = 256,
    input: InputSpec | None = None,
    **options: Any,
) -> AdaptedSAM:
    """An :class:`AdaptedSAM` on ``base`` (a checkpoint path or a ``BaseSam``); ``options`` go to the head
    (tokens, class names and values, label mode) or the adapter (rank, experts, targets, ...)."""
    base = base if isinstance(base, BaseSam) else load_base(base)
    head = HeadConfig(num_classes=num_classes, **{k: v for k, v in options.items() if k in HEAD_FIELDS})
    adapter = AdapterConfig(method=method, **{k: v for k, v in options.items() if k not in HEAD_FIELDS})
    config = ModelConfig(base=base.architecture, adapter=adapter, head=head, input_size=input_size,
                         input=input or InputSpec(), base_checkpoint=base.checkpoint)
    return AdaptedSAM.from_base(base, config)


def perturb_trainable(model: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Move every trainable tensor away from its initial value (B != 0, so A gets gradient too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n x 3 x size x size random RGB in 0..255."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255


def drain(gen, stop_at: int | None = None, stop: Any = None) -> tuple[list, Any]:
    """Run a training generator to its end: (its events, its return value). With ``stop_at``, set the ``stop``
    event when the step event of that step arrives."""
    events = []
    try:
        while True:
            event = next(gen)
            events.append(event)
            if stop_at is not None and event.kind == "step" and event.step == stop_at:
                stop.set()
    except StopIteration as done:
        return events, done.value



def ball_stack(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 15 x 160 x 200 stack (float32) of two bright ellipsoids on a dark noisy background, 4 px per plane in z:
    (image, ids uint8: 1 the ball around plane 7, radius 30 px; 2 the one around plane 4, radius 25 px, fainter)."""
    zz, yy, xx = np.mgrid[:15, :160, :200]
    first = (zz - 7) ** 2 * 16 + (yy - 80) ** 2 + (xx - 70) ** 2 < 30 ** 2
    second = (zz - 4) ** 2 * 16 + (yy - 70) ** 2 + (xx - 150) ** 2 < 25 ** 2
    rng = np.random.default_rng(seed)
    image = (20 + 150 * first + 120 * second + rng.normal(0, 8, first.shape)).astype(np.float32)
    return image, (first * 1 + second * 2).astype(np.uint8)


def local_contrast(scene) -> float:
    """Median over objects of (mean inside - mean of the background 2-6 px around it), in the channel where the
    step is largest, as a fraction of 255 (signed: positive when objects are brighter)."""
    inst = scene.instances
    dist, (iy, ix) = ndimage.distance_transform_edt(inst == 0, return_indices=True)
    nearest = inst[iy, ix]
    ring = (inst == 0) & (dist > 2) & (dist <= 6)
    n = len(scene.classes) + 1
    inside_count = np.maximum(np.bincount(inst.ravel(), minlength=n), 1)
    ring_count = np.bincount(nearest[ring], minlength=n)
    steps = []
    for channel in np.moveaxis(scene.image.astype(np.float64) / 255, -1, 0):
        inside = np.bincount(inst.ravel(), channel.ravel(), n) / inside_count
        around = np.bincount(nearest[ring], channel[ring], n) / np.maximum(ring_count, 1)
        steps.append((inside - around)[1:])
    steps = np.array(steps)
    per_object = steps[np.abs(steps).argmax(0), np.arange(steps.shape[1])][ring_count[1:] > 20]
    return float(np.median(per_object))
