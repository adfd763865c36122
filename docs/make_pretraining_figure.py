"""The pretraining scenes figure of BENCHMARKS.md (issue 24): two scenes of each kind the built-in SAM is pretrained
on (``pretraining.scene_mix.SCENE_KINDS``), each beside itself with its objects outlined by class (yellow round,
cyan elongated, magenta other). The scenes are the first two of each kind's generator seeded 0 and 1, chosen before
looking at them. Run::

    python docs/make_pretraining_figure.py     # writes docs/pretraining_scenes.jpg
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent


def main() -> None:
    import imageio.v3 as iio

    from napari_convlora.pretraining import contact_sheet
    from napari_convlora.pretraining.scene_mix import SCENE_KINDS

    scenes = [make(np.random.default_rng(seed), 256) for make, _ in SCENE_KINDS.values() for seed in (0, 1)]
    iio.imwrite(DOCS / "pretraining_scenes.jpg", contact_sheet(scenes, columns=4), quality=85)
    print(f"wrote {DOCS / 'pretraining_scenes.jpg'}: rows of two kinds each, in the order {', '.join(SCENE_KINDS)}")


if __name__ == "__main__":
    main()
