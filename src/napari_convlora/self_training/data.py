"""Images and their weak labels prepared for self-training: the planes SAM sees and each plane's weak objects.

numpy only. Planes are float32 ``Y x X x 3`` in 0..255 (``data.SamPlanes``, normalised over the whole image as for
supervised training); only the planes holding weak labels are kept. Evaluation labels (a dense instance Labels
array, optional) come along per plane for :func:`.evaluation.evaluate_prompts` and are never read by the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..config.choices import WEAK_LABEL_KINDS
from ..config.self_training import SelfTrainingRecipe
from ..data import ImageLayout
from ..data.images import SamPlanes
from ..errors import ConfigError
from ..weak import WeakLabels, WeakObject


@dataclass
class WeakPair:
    """One image (as a napari Image layer holds it), its weak labels, how to read its axes, and a name for messages."""

    image: np.ndarray
    weak: WeakLabels
    layout: ImageLayout = field(default_factory=ImageLayout)
    name: str = "image"


@dataclass
class WeakData:
    """What a self-training run reads: per kept plane, the plane, its weak objects, its evaluation labels (or None)
    and a name ("cells, plane 3")."""

    recipe: SelfTrainingRecipe
    planes: list[np.ndarray]
    objects: list[list[WeakObject]]
    truth: list[np.ndarray | None]
    names: list[str]
    skipped: list[str] = field(default_factory=list)

    @property
    def has_evaluation(self) -> bool:
        return any(t is not None for t in self.truth)

    def kinds(self) -> tuple[str, ...]:
        """The weak label kinds present, in ``WEAK_LABEL_KINDS`` order."""
        present = {o.kind for objs in self.objects for o in objs}
        return tuple(k for k in WEAK_LABEL_KINDS if k in present)

    def describe(self) -> str:
        counts = {k: sum(o.kind == k for objs in self.objects for o in objs) for k in self.kinds()}
        what = ", ".join(f"{n} {k}" for k, n in counts.items())
        return (f"{len(self.planes)} plane(s) with {what} weak label(s)"
                + ("; evaluation labels present" if self.has_evaluation else ""))


def prepare_weak_data(pairs: Sequence[WeakPair], recipe: SelfTrainingRecipe) -> WeakData:
    """The planes holding weak labels of every image, normalised as ``recipe.input`` says.

    Raises:
        ConfigError: no weak label at all, an image whose shape differs from its weak labels', or rescaling
            (``recipe.input.rescale`` must be 1 for now: the weak labels are in the image's pixels).
    """
    if recipe.input.rescale != 1.0:
        raise ConfigError(f"self-training takes images at their own scale for now (rescale {recipe.input.rescale} "
                          "asked): rescale the image and its prompts before, or leave rescale at 1")
    data = WeakData(recipe, [], [], [], [])
    for pair in pairs:
        planes = SamPlanes(pair.image, pair.layout, recipe.input)
        shape = planes.leading + planes.shape
        if tuple(shape) != tuple(pair.weak.image_shape):
            raise ConfigError(f"'{pair.name}': the image's shape {tuple(shape)} (channels aside) differs from its "
                              f"weak labels' {tuple(pair.weak.image_shape)}")
        data.skipped += [f"'{pair.name}': {line}" for line in pair.weak.skipped]
        dense = pair.weak.dense_labels
        for plane in pair.weak.planes():
            index = pair.weak.flat_plane_index(plane)
            data.planes.append(planes.normalised(index))
            data.objects.append(pair.weak.on_plane(plane))
            data.truth.append(None if dense is None else np.asarray(dense[tuple(plane)]))
            data.names.append(pair.name + (f", plane {tuple(plane) if len(plane) > 1 else plane[0]}" if plane else ""))
    if not data.planes:
        raise ConfigError("no weak label on any image: draw boxes or points, or paint coarse labels, first")
    return data
