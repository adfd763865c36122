"""The README's HQ-SAM figure: boundaries on the unseen half of the stardist nuclei image, with and without HQ.

Two models fine-tuned on the left half from the built-in small SAM with the recipe of ``make_adaptation_figure.py``
(256 px, 150 steps, batch 2, seed 0): Conv-LoRA, and Conv-LoRA with HQ-SAM's token and fusion on the head
(``hq="sam+hq"``; the built-in SAM is a plain SAM, so the HQ parts start new and train with the run). Both predict
the right half. The crop shown is chosen before looking at any prediction: the 64 x 64 window of the right half
with the most ground-truth boundary pixels, magnified 4 times. Panels: the crop with its ground-truth outlines
(green); each model's predicted outlines (magenta) over the same crop.

Prints each model's foreground Dice and boundary IoU (HQ-SAM's, dilation 0.02 of the diagonal) on the whole
right half. Run::

    python docs/make_hq_figure.py --threads 1        # writes docs/hq_boundaries.png

Needs stardist's image (``pip install --no-deps stardist``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent
CROP, ZOOM = 64, 4


def _fine_tuned(hq: str, train_image, train_mask, test_image, work: Path, threads: int) -> np.ndarray:
    from napari_convlora.builtin_model import builtin_checkpoint
    from napari_convlora.config import RunOptions, TrainRecipe
    from napari_convlora.data import TrainingPair, prepare_training_data
    from napari_convlora.predict import predict_image
    from napari_convlora.train import train

    recipe = TrainRecipe(input_size=256, label_mode="instances", val_fraction=0.15, seed=0, steps=150, batch_size=2,
                         grad_accum=1, lr=1e-3, val_every=75, hq=hq)
    data = prepare_training_data([TrainingPair(train_image, train_mask)], recipe)
    gen = train(builtin_checkpoint(), data, work / f"{hq}.safetensors", recipe,
                RunOptions(device="cpu", num_threads=threads))
    try:
        while True:
            next(gen)
    except StopIteration as done:
        model = done.value
    return predict_image(model, test_image, device="cpu").labels > 0


def _crop_window(truth: np.ndarray) -> tuple[slice, slice]:
    """The CROP x CROP window (stride 8) with the most ground-truth boundary pixels."""
    from skimage.segmentation import find_boundaries

    edges = find_boundaries(truth, mode="inner").astype(np.int64)
    best, where = -1, (0, 0)
    for y in range(0, truth.shape[0] - CROP + 1, 8):
        for x in range(0, truth.shape[1] - CROP + 1, 8):
            count = int(edges[y : y + CROP, x : x + CROP].sum())
            if count > best:
                best, where = count, (y, x)
    return slice(where[0], where[0] + CROP), slice(where[1], where[1] + CROP)


def _panel(gray: np.ndarray, outline: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    big = np.kron(gray, np.ones((ZOOM, ZOOM)))
    rgb = np.repeat(big[..., None], 3, axis=-1)
    mask = np.kron(outline.astype(np.uint8), np.ones((ZOOM, ZOOM), np.uint8)).astype(bool)
    rgb[find_boundaries(mask, mode="inner")] = colour
    return rgb


def main(argv: list[str] | None = None) -> int:
    from imageio.v3 import imwrite

    from napari_convlora.boundary import boundary_iou
    from napari_convlora.sample_data import stardist_nuclei

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    found = stardist_nuclei()
    if found is None:
        sys.exit("needs stardist's nuclei image: pip install --no-deps stardist")
    image, mask = found
    train_image, train_mask, test_image, test_mask = image[:, :256], mask[:, :256], image[:, 256:], mask[:, 256:]
    truth = test_mask > 0
    work = Path(tempfile.mkdtemp(prefix="convlora-hq-figure-"))
    predictions = {name: _fine_tuned(hq, train_image, train_mask, test_image, work, args.threads)
                   for name, hq in (("Conv-LoRA", "off"), ("Conv-LoRA + HQ", "sam+hq"))}
    window = _crop_window(test_mask)
    lo, hi = np.percentile(test_image, (1, 99.8))
    gray = np.clip((test_image[window].astype(np.float32) - lo) / (hi - lo), 0, 1)
    green, magenta = (0.2, 1.0, 0.3), (1.0, 0.2, 0.9)
    panels = [_panel(gray, truth[window], green)] + [_panel(gray, p[window], magenta) for p in predictions.values()]
    gap = np.ones((panels[0].shape[0], 6, 3))
    figure = np.concatenate([x for panel in panels for x in (panel, gap)][:-1], axis=1)
    imwrite(DOCS / "hq_boundaries.png", (figure * 255).round().astype(np.uint8))
    print(f"crop: rows {window[0].start}-{window[0].stop}, columns {window[1].start + 256}-{window[1].stop + 256}")
    for name, predicted in predictions.items():
        dice = 2 * float((predicted & truth).sum()) / max(float(predicted.sum() + truth.sum()), 1.0)
        print(f"{name}: foreground Dice {dice:.3f}, boundary IoU {boundary_iou(predicted, truth):.3f}")
    print(f"wrote {DOCS / 'hq_boundaries.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
