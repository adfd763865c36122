"""The weak-label jobs the dock runs on its compute thread: adapt SAM from weak labels (WeSAM self-training),
segment every prompt as an instance, and answer one interactive prompt from cached image embeddings.

Plain generators over the Qt-free core, as in ``jobs.py``: copies in, Messages and training events out, results
returned for the main thread to write. torch is imported inside the jobs only.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Sequence

import numpy as np

from ..config import RunOptions
from ..config.self_training import SelfTrainingRecipe
from ..weak import WeakLabels
from .jobs import Message, batch_steps
from .layers import LayerCopy
from .native_libs import isolate_triton


@dataclass
class AdaptResult:
    """The adapted (promptable) model, its file, and whether Stop ended the run."""

    model: Any
    path: str
    stopped: bool


@dataclass
class SegmentResult:
    """Instances of every prompt on ``planes`` (flat indices; None: all), from the adapted model and, to compare,
    the unadapted one; ``objects[k]`` is instance ``k + 1``; ``cache``: ``(key, EmbeddingCache)`` for the next
    prompts; ``features``: the weak layers' features (for the objects' classes); ``added``: other planes the
    objects reached through the stack, where they fill the pixels no object holds yet."""

    image_name: str
    labels: np.ndarray
    objects: list[Any]
    planes: list[int] | None
    cache: Any
    unadapted: np.ndarray | None = None
    features: dict[str, Any] = field(default_factory=dict)
    added: list[int] | None = None


@dataclass
class PromptedObject:
    """An object made by interactive prompting: its plane (flat index), box or points (``(x, y)``, pixel edges)
    and, once written, its id in ``"<image> instances"`` (a negative point given later refines it)."""

    image_name: str
    plane: int
    box: np.ndarray | None = None
    positive: list[np.ndarray] = field(default_factory=list)
    negative: list[np.ndarray] = field(default_factory=list)
    object_id: int | None = None


@dataclass
class PromptResult:
    target: PromptedObject
    mask: np.ndarray
    cache: Any


def adapt_job(
    base: str,
    image: LayerCopy,
    weak: WeakLabels,
    recipe: SelfTrainingRecipe,
    run: RunOptions,
    out_path: str,
    stop: threading.Event | None = None,
    resume_from: str | None = None,
) -> Generator[Any, None, AdaptResult | None]:
    """Prepare the image's planes that hold weak labels and drive ``self_training.self_train``; yields training
    events (steps in batches), returns the adapted model (None when stopped before it began). ``resume_from``: the
    run continues exactly with its saved recipe (for longer when ``recipe.steps`` is larger)."""
    isolate_triton()  # before torch: see native_libs
    from ..data import ImageLayout
    from ..self_training import WeakPair, prepare_weak_data, self_train
    from ..self_training.loop import resume_self_training_recipe

    if resume_from is not None:
        saved = resume_self_training_recipe(resume_from)
        recipe = dataclasses.replace(saved, steps=max(saved.steps, recipe.steps))
        yield Message(f"resuming {Path(resume_from).name} with its saved recipe ({recipe.steps} steps)")
    stop = stop or threading.Event()
    data = prepare_weak_data([WeakPair(image.image, weak, ImageLayout(rgb=image.rgb), image.name)], recipe)
    if stop.is_set():  # the start event says what the run reads
        return None
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    kinds: set[str] = set()
    model = yield from batch_steps(self_train(base, data, out_path, recipe, run, stop=stop, resume_from=resume_from),
                                   seen=kinds)
    return AdaptResult(model, out_path, "stopped" in kinds)


def embedding_cache(model: Any, cached: tuple[Any, Any] | None, key: Any, image: LayerCopy | None,
                    device: str) -> tuple[Any, Any]:
    """``(key, cache)``: ``cached`` when it was made for ``key`` (image, model, device), else a new
    ``self_training.prompting.EmbeddingCache`` of ``image`` for ``model`` on ``device``."""
    if cached is not None and cached[0] == key:
        return cached
    if image is None:
        raise ValueError("the image was not copied for a new embedding cache")
    from ..data import ImageLayout
    from ..devices import resolve_device
    from ..self_training.prompting import EmbeddingCache

    where = resolve_device(device)
    return key, EmbeddingCache(model.to(where), image.image, ImageLayout(rgb=image.rgb), device=where)


def segment_job(
    model: Any,
    cached: tuple[Any, Any] | None,
    key: Any,
    image: LayerCopy | None,
    image_name: str,
    weak: WeakLabels,
    planes: Sequence[tuple[int, ...]] | None,
    device: str,
    compare: bool = False,
    features: dict[str, Any] | None = None,
    through_stack: bool = False,
) -> Generator[Message, None, SegmentResult]:
    """Every box, point group and coarse object of ``planes`` (default all) as one instance, with the adapted
    model and (``compare``) with the SAM that was loaded (its adapters off); ``through_stack`` carries each object
    through the stack (``self_training.through_stack``): the planes asked for are replaced, the other planes the
    objects reach (``SegmentResult.added``) keep their objects and the new ones fill their free pixels."""
    isolate_triton()  # before torch: see native_libs
    from ..self_training.prompting import segment_weak_labels
    from ..self_training.through_stack import segment_through_stack

    count = sum(len(weak.on_plane(p)) for p in (planes if planes is not None else weak.planes()))
    also = " (and with the unadapted SAM)" if compare else ""
    yield Message(f"segmenting {count} prompt(s) of '{image_name}'{' through the stack' if through_stack else ''}"
                  f"{also}")
    keyed = embedding_cache(model, cached, key, image, device)
    flat = None if planes is None else [weak.flat_plane_index(p) for p in planes]
    if through_stack:
        labels, objects, spans = segment_through_stack(keyed[1], weak, planes=planes)
        unadapted = segment_through_stack(keyed[1], weak, planes=planes, adapters=False)[0] if compare else None
        added = None
        if flat is not None:  # the planes reached beyond the one shown keep what they hold; new objects fill them
            reached = labels.reshape(-1, *labels.shape[-2:]).any(axis=(1, 2))
            if unadapted is not None:
                reached |= unadapted.reshape(-1, *labels.shape[-2:]).any(axis=(1, 2))
            added = sorted(set(np.flatnonzero(reached).tolist()) - set(flat))
        for span in spans:
            yield Message(f"object {span.label}: planes {span.first}-{span.last} (prompted on "
                          f"{','.join(map(str, span.prompted))})")
        return SegmentResult(image_name, labels, objects, flat, keyed, unadapted, dict(features or {}), added)
    labels, objects = segment_weak_labels(keyed[1], weak, planes=planes)
    unadapted = segment_weak_labels(keyed[1], weak, planes=planes, adapters=False)[0] if compare else None
    return SegmentResult(image_name, labels, objects, flat, keyed, unadapted, dict(features or {}))


def prompt_job(
    model: Any,
    cached: tuple[Any, Any] | None,
    key: Any,
    image: LayerCopy | None,
    target: PromptedObject,
    box: np.ndarray | None,
    positive: np.ndarray,
    negative: np.ndarray,
    device: str,
) -> Generator[Message, None, PromptResult]:
    """One interactive prompt (a box, or points) on ``target``'s plane -> its mask, from the cached embedding."""
    isolate_triton()  # before torch: see native_libs
    from ..self_training.prompting import segment_prompt
    from ..self_training.crops import CropPrompt

    keyed = embedding_cache(model, cached, key, image, device)
    prompt = CropPrompt("box" if box is not None else "points", box, positive.reshape(-1, 2), negative.reshape(-1, 2))
    yield Message(f"segmenting the {prompt.kind} prompt on plane {target.plane} of '{target.image_name}'")
    return PromptResult(target, segment_prompt(keyed[1], target.plane, prompt), keyed)
