"""SAM-refined instances (issue 23, item 2): the instance head's objects become prompts for SAM's promptable decoder
(as loaded, not as the prompt-free head trained it: ``AdaptedSAM.promptable_decoder_as_loaded``) on the adapted
encoder, micro-sam's "automatic prompt generation" (numpy, scipy, torch through the prompting core).

Each object of the head gives one prompt: its bounding box and one positive point at its innermost pixel (the
farthest from its edge). The prompts of a plane are decoded window by window from cached embeddings
(``self_training.prompting.segment_weak_labels``): SAM's single-mask output, thresholded at logit 0, and where two
masks overlap the pixel goes to the mask with the higher logit, so a duplicate mask loses every pixel to its twin
(a non-maximum suppression on the masks); an object whose mask comes back empty is dropped.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from ..data import ImageLayout
from ..data.prompts import central_point
from ..modeling import AdaptedSAM
from ..self_training.prompting import EmbeddingCache, segment_weak_labels
from ..weak import WeakLabels, WeakObject
from .tiling import PredictionCancelled


def object_prompts(objects: np.ndarray, plane: tuple[int, ...] = ()) -> list[WeakObject]:
    """One box prompt with a positive point per object of ``objects`` (Y x X ids, 0 background), in id order:
    the box on pixel edges (``x0, y0, x1, y1``), the point at its centre (``data.prompts.central_point``)."""
    prompts = []
    for index, found in enumerate(ndimage.find_objects(objects), start=1):
        if found is None:
            continue
        rows, cols = found
        corner = np.array([cols.start, rows.start], np.float32)
        point = (central_point(objects[found] == index) + corner)[None]
        box = np.array([cols.start, rows.start, cols.stop, rows.stop], np.float32)
        prompts.append(WeakObject(plane, "box", box=box, positive=point, source=f"object {index}"))
    return prompts


def refine_with_sam(model: AdaptedSAM, image: np.ndarray, layout: ImageLayout | None,
                    objects: dict[int, np.ndarray], device: str | torch.device = "cpu",
                    should_stop: Callable[[], bool] | None = None) -> dict[int, np.ndarray]:
    """The head's objects of some planes (flat plane index -> Y x X ids) -> SAM's masks of them (same keys, Y x X
    uint32 ids 1..N in prompt order, 0 background; see the module), all planes in one pass over one embedding cache.
    ``image`` and ``layout`` as for ``predict_image``; a model that rescales images is refused (ValueError), as
    prompting is. ``should_stop`` is polled before each plane (``PredictionCancelled``)."""
    cache = EmbeddingCache(model, image, layout, device)
    leading = cache.planes.leading
    planes = {index: tuple(int(i) for i in np.unravel_index(index, leading)) if leading else ()
              for index in objects}
    prompts = {planes[index]: object_prompts(ids, planes[index]) for index, ids in objects.items() if ids.any()}
    shape = tuple(leading) + tuple(cache.plane_shape)
    def check(done: int, total: int) -> None:
        if should_stop is not None and should_stop():
            raise PredictionCancelled()

    with model.promptable_decoder_as_loaded():  # the decoder the prompt-free head trained answers no prompt well
        labels, _ = segment_weak_labels(cache, WeakLabels(shape, prompts), planes=list(prompts), on_plane=check)
    return {index: _consecutive(labels[plane] if plane else labels) for index, plane in planes.items()}


def _consecutive(labels: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..N in increasing order (uint32)."""
    values = np.unique(labels[labels > 0])
    lookup = np.zeros(int(labels.max()) + 1, np.uint32)
    lookup[values] = np.arange(1, len(values) + 1, dtype=np.uint32)
    return lookup[labels]
