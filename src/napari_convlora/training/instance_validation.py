"""Validation of an instance head: objects on the validation patches, scored as the cell-segmentation literature
scores them (``instances.metrics``), and the foreground threshold chosen there (numpy; no torch).

The seeds' least distance comes from the training objects, before training: half their median equivalent radius
(:func:`instance_config_for`; the classical distance-transform watershed's rule). Chosen on validation it was noise:
the validation patches cut objects at their block borders, and on the nuclei image F1@0.5 moved by +-0.03 from one
distance to the next around the best (BENCHMARKS.md, issue 23), while half the median radius scored within 0.01 of
the best. At each validation the head's maps of every validation patch are split into objects at each foreground
threshold of ``FOREGROUND_GRID``, and the threshold with the best F1 at IoU 0.5 (then the best mean F1 over IoU
0.5-0.95) is kept in the model's ``InstanceConfig`` (``chosen_on="validation"``), so that the model file saved after
it predicts with the threshold that scored best with its own weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..config.instances import InstanceConfig
from ..constants import IGNORE_INDEX
from ..instances.metrics import InstanceScoreAccumulator, InstanceScores
from ..instances import instances_from_maps, separate_objects

FOREGROUND_GRID = (0.4, 0.5, 0.6)


def instance_config_for(object_radius: float | None) -> InstanceConfig:
    """A new instance head's post-processing: seeds ``max(1, round(object_radius / 2))`` px apart (the default
    without objects), the default foreground threshold until validation chooses one."""
    if object_radius is None:
        return InstanceConfig()
    return InstanceConfig(min_distance=max(1, round(object_radius / 2)))


class ValidationObjects:
    """Collects the instance head's maps and the instance ids of the validation patches, then scores them."""

    def __init__(self) -> None:
        self.maps: list[np.ndarray] = []
        self.ids: list[np.ndarray] = []

    def add(self, maps: np.ndarray, ids: np.ndarray) -> None:
        """maps: B x 3 x S x S floats in 0..1 (sigmoid of the head's logits); ids: B x S x S int64 instance ids
        (IGNORE_INDEX not annotated, 0 background)."""
        self.maps.extend(np.asarray(maps, dtype=np.float32))
        self.ids.extend(np.asarray(ids))

    def score(self, config: InstanceConfig) -> InstanceScores:
        """The objects of every patch under ``config``, pooled over the patches."""
        pooled = InstanceScoreAccumulator()
        for maps, ids in zip(self.maps, self.ids):
            pooled.update(instances_from_maps(maps, config), separate_objects(ids), ignore=ids == IGNORE_INDEX)
        return pooled.compute()

    def choose(self, current: InstanceConfig | None) -> tuple[InstanceConfig, dict[str, Any]]:
        """The foreground threshold that scores best (see the module) and its scores (``as_dict()`` plus the
        setting, and ``"chosen"``: whether validation moved it); ``current``'s seed distance and minimum size are
        kept. The current threshold stays unless another of the grid scores strictly better (a validation without
        objects, or a head that finds none yet, keeps it)."""
        current = current or InstanceConfig()
        scores = self.score(current)
        best = ((_number(scores.f1_50), _number(scores.mean_f1)), current, scores)
        for foreground in FOREGROUND_GRID:
            if foreground == current.foreground:
                continue
            config = dataclasses.replace(current, foreground=foreground, chosen_on="validation")
            scores = self.score(config)
            key = (_number(scores.f1_50), _number(scores.mean_f1))
            if key > best[0]:
                best = (key, config, scores)
        _, config, scores = best
        return config, {**scores.as_dict(), "foreground": config.foreground, "min_distance": config.min_distance,
                        "chosen": config is not current}


def setting_after(current: InstanceConfig | None, metrics: dict[str, Any] | None) -> InstanceConfig | None:
    """The instance head's setting after a validation (``metrics`` as ``training.loop.validate`` returns them):
    the foreground threshold validation chose, when it chose one; else ``current``."""
    objects = (metrics or {}).get("instances")
    if current is None or not objects or not objects.get("chosen"):
        return current
    return dataclasses.replace(current, foreground=objects["foreground"], chosen_on="validation")


def _number(value: float) -> float:
    """NaN (no objects on either side) sorts below every score."""
    return -1.0 if value != value else value
