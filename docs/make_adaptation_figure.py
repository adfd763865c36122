"""The README's adaptation figure: the unseen right half of the stardist nuclei image, four ways.

Panels, left to right (ground-truth outlines in green, predicted foreground in magenta):
1. the image;
2. the built-in small SAM zero-shot, prompted with a tight box around every ground-truth nucleus (SAM's own
   promptable decoder; a different, easier task than the prompt-free head's);
3. Conv-LoRA fine-tuned on the left half from a random-weight SAM of the same shape;
4. Conv-LoRA fine-tuned on the left half from the built-in small SAM.

Both fine-tunings use the recipe of ``tests/test_learning_real_data.py`` (256 px, 150 steps, seed 0). Run::

    python docs/make_adaptation_figure.py          # writes docs/adaptation_nuclei.png, prints the Dice of each panel

Needs stardist's image (``pip install --no-deps stardist``); nothing is downloaded.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def _zero_shot(sam, image: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """The union of box-prompted masks, one 256 px tile at a time (each object in the tile holding its centre)."""
    import torch
    import torch.nn.functional as F

    from napari_convlora.config import InputSpec
    from napari_convlora.data import ImageLayout, to_sam_planes
    from napari_convlora.pretraining.promptable import Prompted, decode, preprocess
    from napari_convlora.data.prompts import mask_box

    size = sam.image_encoder.img_size
    planes = to_sam_planes(image, ImageLayout(), InputSpec())[0]
    foreground = np.zeros(instances.shape, bool)
    for y0 in range(0, instances.shape[0], size):
        for x0 in range(0, instances.shape[1], size):
            tile = (slice(y0, y0 + size), slice(x0, x0 + size))
            objects = instances[tile]
            ids = [i for i in np.unique(objects) if i > 0]
            if not ids:
                continue
            masks = np.stack([objects == i for i in ids])
            boxes = torch.from_numpy(np.stack([mask_box(m) for m in masks]))
            with torch.no_grad():
                embedding = sam.image_encoder(preprocess(sam, planes[tile][None]))
                low_res, _ = decode(sam, embedding, Prompted(None, None, boxes, None, multimask=False))
                masks = F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)[:, 0] > 0
            foreground[tile] |= masks.numpy().any(0)[: objects.shape[0], : objects.shape[1]]
    return foreground


def _fine_tuned(base: Path, train_image: np.ndarray, train_mask: np.ndarray, test_image: np.ndarray,
                work: Path) -> np.ndarray:
    from napari_convlora.config import RunOptions, TrainRecipe
    from napari_convlora.data import TrainingPair, prepare_training_data
    from napari_convlora.prediction.planes import predict_image
    from napari_convlora.training.loop import train

    recipe = TrainRecipe(input_size=256, label_mode="instances", val_fraction=0.15, seed=0, steps=150, batch_size=2,
                         grad_accum=1, lr=1e-3, val_every=75)
    data = prepare_training_data([TrainingPair(train_image, train_mask)], recipe)
    gen = train(base, data, work / f"{base.stem}.safetensors", recipe, RunOptions(device="cpu"))
    try:
        while True:
            next(gen)
    except StopIteration as done:
        model = done.value
    return predict_image(model, test_image, device="cpu").labels > 0


def _panel(gray: np.ndarray, truth: np.ndarray, predicted: np.ndarray | None) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    rgb = np.repeat(gray[..., None], 3, axis=-1)
    if predicted is not None:
        rgb[predicted] = 0.55 * rgb[predicted] + 0.45 * np.array([1.0, 0.2, 0.9])
    rgb[find_boundaries(truth, mode="inner")] = [0.2, 1.0, 0.3]
    return rgb


def main() -> int:
    from imageio.v3 import imwrite

    from napari_convlora.checkpoints.builtin import builtin_checkpoint
    from napari_convlora.config import SMALL
    from napari_convlora.checkpoints.sam_files import load_sam, random_sam, save_sam_checkpoint
    from napari_convlora.data.samples import stardist_nuclei

    found = stardist_nuclei()
    if found is None:
        sys.exit("needs stardist's nuclei image: pip install --no-deps stardist")
    image, mask = found
    train_image, train_mask, test_image, test_mask = image[:, :256], mask[:, :256], image[:, 256:], mask[:, 256:]
    truth = test_mask > 0
    work = Path(tempfile.mkdtemp(prefix="convlora-figure-"))
    random_base = save_sam_checkpoint(random_sam(SMALL, seed=1000), work / "random_small_sam.pth")
    predictions = {
        "zero-shot, box prompts": _zero_shot(load_sam(builtin_checkpoint()), test_image, test_mask),
        "Conv-LoRA from a random SAM": _fine_tuned(random_base, train_image, train_mask, test_image, work),
        "Conv-LoRA from the built-in SAM": _fine_tuned(builtin_checkpoint(), train_image, train_mask, test_image, work),
    }
    lo, hi = np.percentile(test_image, (1, 99.8))
    gray = np.clip((test_image.astype(np.float32) - lo) / (hi - lo), 0, 1)
    panels = [_panel(gray, test_mask, None)] + [_panel(gray, test_mask, p) for p in predictions.values()]
    gap = np.ones((gray.shape[0], 6, 3))
    figure = np.concatenate([x for panel in panels for x in (panel, gap)][:-1], axis=1)
    imwrite(DOCS / "adaptation_nuclei.png", (figure * 255).round().astype(np.uint8))
    for name, predicted in predictions.items():
        print(f"{name}: foreground Dice {_dice(predicted, truth):.3f}")
    print(f"wrote {DOCS / 'adaptation_nuclei.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
