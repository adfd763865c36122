"""The README's instances figure: touching nuclei on the held-out half of the stardist image, as connected components
and as the instance head's objects.

One model, trained as ``napari-convlora train --label-mode instances --steps 300`` trains it from the built-in SAM
(the CLI's defaults, seed 0) on the top half of the stardist nuclei image; the bottom half is predicted twice from it,
``predict --instances`` with ``--instance-method components`` and with the instance head (the default). The crop
shown is chosen before looking at any prediction: the 160 x 160 window of the bottom half (stride 16) with the most
touching ground-truth nuclei (pixels of one nucleus next to another's), magnified twice. Panels: the crop with the
ground truth outlined; connected components; the instance head's objects; each object in its own colour. Prints the
F1 at IoU 0.5 of both on the whole bottom half. Run::

    python docs/make_instances_figure.py --threads 1     # writes docs/instances.png

Needs stardist's sample image (``pip install --no-deps stardist``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent
CROP, ZOOM, STRIDE = 160, 2, 16


def _touching(ids: np.ndarray) -> np.ndarray:
    """Pixels of an object with a 4-neighbour of another object (bool)."""
    touch = np.zeros(ids.shape, bool)
    for axis in (0, 1):
        a, b = np.swapaxes(ids, 0, axis)[:-1], np.swapaxes(ids, 0, axis)[1:]
        meet = (a > 0) & (b > 0) & (a != b)
        np.swapaxes(touch, 0, axis)[:-1] |= meet
        np.swapaxes(touch, 0, axis)[1:] |= meet
    return touch


def _window(ids: np.ndarray) -> tuple[slice, slice]:
    touch = _touching(ids)
    best, where = -1, (0, 0)
    for top in range(0, ids.shape[0] - CROP + 1, STRIDE):
        for left in range(0, ids.shape[1] - CROP + 1, STRIDE):
            count = int(touch[top : top + CROP, left : left + CROP].sum())
            if count > best:
                best, where = count, (top, left)
    return slice(where[0], where[0] + CROP), slice(where[1], where[1] + CROP)


def _colour(ids: np.ndarray, grey: np.ndarray) -> np.ndarray:
    """Each object in its own colour over the image (half and half), outlines in white."""
    from skimage.segmentation import find_boundaries

    palette = np.random.default_rng(1).integers(60, 256, (int(ids.max()) + 1, 3)).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, -1).astype(np.float32)
    inside = ids > 0
    rgb[inside] = 0.45 * rgb[inside] + 0.55 * palette[ids[inside]]
    rgb[find_boundaries(ids, mode="inner")] = 255
    return rgb.astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(DOCS / "instances.png"))
    args = parser.parse_args(argv)
    import tifffile
    from PIL import Image, ImageDraw

    from napari_convlora.cli import main as cli
    from napari_convlora.data.samples import stardist_nuclei
    from napari_convlora.instances.metrics import instance_scores

    data = stardist_nuclei()
    if data is None:
        print("stardist is not installed (pip install --no-deps stardist): no nuclei image", file=sys.stderr)
        return 1
    image, mask = data
    half = image.shape[0] // 2
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        tifffile.imwrite(work / "top.tif", image[:half])
        tifffile.imwrite(work / "top_ids.tif", mask[:half].astype(np.uint16))
        tifffile.imwrite(work / "bottom.tif", image[half:])
        model = work / "m.safetensors"
        common = ["--device", "cpu", "--threads", str(args.threads)]
        assert cli(["train", "--image", str(work / "top.tif"), "--labels", str(work / "top_ids.tif"), "--label-mode",
                    "instances", "--steps", "300", "--seed", "0", "--out", str(model), *common]) == 0
        found = {}
        for method in ("components", "head"):
            out = work / f"{method}.tif"
            assert cli(["predict", "--model", str(model), "--image", str(work / "bottom.tif"), "--out",
                        str(work / "labels.tif"), "--instances", str(out), "--instance-method", method, *common]) == 0
            found[method] = tifffile.imread(out)
    truth = mask[half:]
    for method, ids in found.items():
        print(f"{method}: F1@0.5 {instance_scores(ids, truth).f1_50:.3f}")
    rows, cols = _window(truth)
    crop = image[half:][rows, cols].astype(np.float64)
    grey = 255 * (crop - np.percentile(crop, 1)) / max(np.percentile(crop, 99.8) - np.percentile(crop, 1), 1e-9)
    grey = np.clip(grey, 0, 255)
    panels = [_colour(truth[rows, cols], grey), _colour(found["components"][rows, cols], grey),
              _colour(found["head"][rows, cols], grey)]
    titles = ["ground truth", "connected components", "instance head"]
    gap, label = 8, 18
    width = len(panels) * CROP * ZOOM + (len(panels) - 1) * gap
    canvas = Image.new("RGB", (width, CROP * ZOOM + label), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        x = i * (CROP * ZOOM + gap)
        canvas.paste(Image.fromarray(panel).resize((CROP * ZOOM, CROP * ZOOM), Image.NEAREST), (x, label))
        draw.text((x + 4, 3), title, fill=(0, 0, 0))
    canvas.save(args.out)
    print(f"figure -> {args.out} (crop rows {rows.start}-{rows.stop} of the bottom half, columns "
          f"{cols.start}-{cols.stop})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
