"""What the built-in SAM is pretrained on (issue 24): the abstract scenes of ``synthetic.random_scene`` mixed with
scenes like what users image (``imaging_cells``, ``imaging_tissue``), and a stream of them that any position of
which can be drawn again on its own (what makes resuming a pretraining run exact).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .imaging_cells import cell_sheet, filaments, fluorescent_nuclei
from .imaging_tissue import anatomy_like, em_like, histology_like
from .synthetic import Scene, random_scene

#: Scene kinds and their share of the mix. The abstract scenes keep the largest share: they hold the shape and
#: texture variety every kind of image needs, and the benchmark's shifted families are measured against them.
SCENE_KINDS: dict[str, tuple[Callable[[np.random.Generator, int], Scene], float]] = {
    "abstract": (lambda rng, size: random_scene(rng, size), 0.40),
    "nuclei": (fluorescent_nuclei, 0.14),
    "cell_sheet": (cell_sheet, 0.10),
    "filaments": (filaments, 0.08),
    "em_like": (em_like, 0.10),
    "histology_like": (histology_like, 0.08),
    "anatomy_like": (anatomy_like, 0.10),
}
#: What ``--scenes`` chooses between in ``scripts/pretrain_small_sam.py``.
MIXES = {"mixed": tuple(SCENE_KINDS), "abstract": ("abstract",)}


def mixed_scene(rng: np.random.Generator, size: int = 256, kinds: tuple[str, ...] = tuple(SCENE_KINDS)) -> Scene:
    """One scene of a kind drawn by its share among ``kinds`` (names of ``SCENE_KINDS``)."""
    unknown = [k for k in kinds if k not in SCENE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown or no scene kinds {unknown}; choose from {', '.join(SCENE_KINDS)}")
    shares = np.array([SCENE_KINDS[k][1] for k in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=shares / shares.sum()))]
    return SCENE_KINDS[kind][0](rng, size)


def stream_scene(seed: int, index: int, size: int = 256, kinds: tuple[str, ...] = tuple(SCENE_KINDS)) -> Scene:
    """Scene ``index`` of the stream of run ``seed``: the same scene whenever it is drawn (its own generator)."""
    return mixed_scene(np.random.default_rng([seed, index]), size, kinds)


class ScenePool:
    """The scenes a pretraining run draws its batches from: ``pool`` scenes of the stream of run ``seed``; step
    ``s`` replaces the scene in slot :meth:`slot_at` (s) by stream scene ``pool + s``. Rebuilt at any step from the
    seed alone, so a resumed run sees exactly the scenes an uninterrupted one would.
    """

    def __init__(self, seed: int, pool: int, size: int = 256, kinds: tuple[str, ...] = tuple(SCENE_KINDS),
                 step: int = 0) -> None:
        self.seed, self.pool, self.size, self.kinds = seed, pool, size, kinds
        contents = list(range(pool))
        for past in range(step):
            contents[self.slot_at(past)] = pool + past
        self.scenes = [stream_scene(seed, index, size, kinds) for index in contents]

    def slot_at(self, step: int) -> int:
        """The slot step ``step`` refreshes."""
        return int(np.random.default_rng([self.seed, 2, step]).integers(0, self.pool))

    def advance(self, step: int) -> None:
        """Refresh the slot of step ``step`` with its new scene (after the step drew its batch)."""
        self.scenes[self.slot_at(step)] = stream_scene(self.seed, self.pool + step, self.size, self.kinds)
