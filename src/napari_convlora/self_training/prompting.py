"""Segmenting prompts with SAM's promptable decoder on the (adapted) encoder: every weak label's object becomes one
instance, and single prompts are answered from cached image embeddings (interactive prompting).

An image plane of any size is seen through ``S x S`` windows (S = the model's input size) on a grid of stride
S / 2: an object is decoded in the grid window that holds its centre farthest from the window's edges, so that
nearby prompts share a window and its embedding (:class:`EmbeddingCache`). Masks are SAM's single-mask output,
upsampled to the window and thresholded at logit 0; where objects overlap, a pixel goes to the object with the
higher logit. ``adapters=False`` segments with the SAM that was loaded (the adapters switched off), to compare.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import InputSpec
from ..data import ImageLayout
from ..data.images import SamPlanes
from ..devices import autocast_context
from ..modeling import AdaptedSAM, ImageFeatures
from ..weak import WeakLabels, WeakObject
from .crops import CropPrompt, crop_plane, object_centre, prompt_in_crop
from .decoding import decode_prompts

#: Seed of the points drawn in coarse masks when they are segmented (the same prompt every time).
PROMPT_SEED = 12345


def grid_window(centre: np.ndarray, plane_shape: tuple[int, int], size: int) -> tuple[int, int]:
    """(top, left) of the window of the stride-``size/2`` grid (clipped to the plane) that holds ``centre`` (x, y)
    farthest from its edges."""
    corner = []
    for value, length in ((float(centre[1]), plane_shape[0]), (float(centre[0]), plane_shape[1])):
        if length <= size:
            corner.append(0)
            continue
        starts = sorted({*range(0, length - size + 1, max(size // 2, 1)), length - size})
        margins = [min(value - s, s + size - value) for s in starts]
        corner.append(starts[int(np.argmax(margins))])
    return corner[0], corner[1]


class EmbeddingCache:
    """Image features of windows of one image's planes, computed once per (plane, window, adapters on/off).

    Args:
        model: the model (its encoder and prompt head are used; it is not changed).
        image, layout: the image as a napari layer holds it; planes are normalised with the model's input spec.
        device, dtype: where and in which precision to compute.
        max_items: features kept (least recently used dropped first).
    """

    def __init__(self, model: AdaptedSAM, image: np.ndarray, layout: ImageLayout | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None, max_items: int = 16) -> None:
        self.model, self.device, self.dtype, self.max_items = model, torch.device(device), dtype, max_items
        spec: InputSpec = model.config.input
        if spec.rescale != 1.0:
            raise ValueError("prompts are segmented at the image's own scale: this model rescales images "
                             f"({spec.rescale}); use a model trained without rescaling")
        self.planes = SamPlanes(image, layout or ImageLayout(), spec)
        self._items: OrderedDict[tuple[int, int, int, bool], tuple[ImageFeatures, np.ndarray]] = OrderedDict()

    @property
    def plane_shape(self) -> tuple[int, int]:
        return self.planes.shape

    def window(self, index: int, top: int, left: int, adapters: bool = True) -> tuple[ImageFeatures, np.ndarray]:
        """The features of the ``S x S`` window at (top, left) of plane ``index``, and its valid area (``S x S``)."""
        key = (index, top, left, adapters)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        size = self.model.config.input_size
        rows, cols = slice(top, top + size), slice(left, left + size)
        image, valid = crop_plane(self.planes.normalised(index, rows, cols), 0, 0, size)
        tensor = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].to(self.device)
        model = self.model
        with torch.no_grad(), autocast_context(self.device, self.dtype):
            model.set_adapters_enabled(adapters)
            try:
                features = model.encode(tensor)
            finally:
                model.set_adapters_enabled(True)
        self._items[key] = (features, valid)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return features, valid


@dataclass
class SegmentedObject:
    """One prompted object's mask: plane index, window (top, left), logits ``S x S`` (float32) inside the window."""

    index: int
    top: int
    left: int
    logits: np.ndarray


@torch.no_grad()
def segment_in_window(cache: EmbeddingCache, index: int, top: int, left: int, prompts: Sequence[CropPrompt],
                      adapters: bool = True) -> np.ndarray:
    """Logits ``N x S x S`` (float32, outside the plane -inf) of N prompts given in the window's coordinates."""
    if not prompts:
        size = cache.model.config.input_size
        return np.zeros((0, size, size), np.float32)
    features, valid = cache.window(index, top, left, adapters)
    model, size = cache.model, cache.model.config.input_size
    with autocast_context(cache.device, cache.dtype):
        low, _ = decode_prompts(model, features.embedding, features.early, prompts)
    logits = F.interpolate(low[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    logits = logits.cpu().numpy()
    logits[:, ~valid] = -np.inf
    return logits


def segment_prompt(cache: EmbeddingCache, index: int, prompt: CropPrompt, adapters: bool = True) -> np.ndarray:
    """One prompt (in the plane's coordinates) -> its mask on plane ``index`` (bool ``Y x X``): interactive
    prompting, from the cached embedding of its window."""
    size = cache.model.config.input_size
    centre = object_centre(WeakObject((), prompt.kind if prompt.kind != "coarse" else "box", box=prompt.box,
                                      positive=prompt.positive, negative=prompt.negative))
    top, left = grid_window(centre, cache.plane_shape, size)
    shift = np.array([left, top], np.float32)
    local = CropPrompt(prompt.kind, None if prompt.box is None else prompt.box - np.tile(shift, 2),
                       prompt.positive - shift, prompt.negative - shift)
    logits = segment_in_window(cache, index, top, left, [local], adapters)[0]
    mask = np.zeros(cache.plane_shape, bool)
    h, w = min(size, cache.plane_shape[0] - top), min(size, cache.plane_shape[1] - left)
    mask[top : top + h, left : left + w] = logits[:h, :w] > 0
    return mask


def segment_weak_labels(cache: EmbeddingCache, weak: WeakLabels, planes: Sequence[tuple[int, ...]] | None = None,
                        adapters: bool = True, positive: int = 5, negative: int = 5,
                        on_plane: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, list[WeakObject]]:
    """Every weak label's object of the chosen planes (default all) as one instance. ``on_plane(done, total)`` is
    called before each plane (progress; it may raise to stop).

    Returns:
        (instance labels of the image's spatial shape, int32, 0 background and object k + 1 for ``objects[k]``;
        the objects segmented, in that order). Objects whose prompt falls outside every window are left out.
    """
    shape = tuple(weak.image_shape)
    labels = np.zeros(shape, np.int32)
    objects: list[WeakObject] = []
    size = cache.model.config.input_size
    chosen = list(planes) if planes is not None else weak.planes()
    for done, plane in enumerate(chosen):
        if on_plane is not None:
            on_plane(done, len(chosen))
        plane = tuple(plane)
        index = weak.flat_plane_index(plane)
        best = np.full(cache.plane_shape, -np.inf, np.float32)
        out = labels[plane] if plane else labels
        windows: dict[tuple[int, int], list[tuple[CropPrompt, int]]] = {}
        for k, obj in enumerate(weak.on_plane(plane)):
            top, left = grid_window(object_centre(obj), cache.plane_shape, size)
            rng = np.random.default_rng(PROMPT_SEED + k)
            prompt = prompt_in_crop(obj, cache.plane_shape, top, left, size, rng, positive, negative)
            if prompt is not None:
                objects.append(obj)
                windows.setdefault((top, left), []).append((prompt, len(objects)))
        for (top, left), items in windows.items():
            logits = segment_in_window(cache, index, top, left, [p for p, _ in items], adapters)
            h, w = min(size, cache.plane_shape[0] - top), min(size, cache.plane_shape[1] - left)
            region, chosen = best[top : top + h, left : left + w], out[top : top + h, left : left + w]
            for (_, label), logit in zip(items, logits[:, :h, :w]):
                wins = (logit > 0) & (logit > region)
                chosen[wins] = label
                region[wins] = logit[wins]
    return labels, objects
