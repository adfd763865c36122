"""What a user gets without touching a setting (issue 22): the default recipe of the built-in model, over seeds, on
the plugin's own sample and on the benchmark families; with ``--lr`` several rates, the sweep that chose the
small-base learning rate (``config.suggestions.SMALL_BASE_LR``).

Every run is what ``napari-convlora train --image I --labels L --steps N`` does: ``recipe_for("builtin", device,
steps=N, label_mode=..., seed=...)`` (the base's input size and learning rate, 1 x 4 patches per step, a 10 %
validation split, class-balanced patches, the best model kept), then the held-out part is predicted with the last
model and with the best one and scored with ``evaluate_image`` (pooled confusion matrix over the family's held-out
images): mIoU over all classes (background included) and the mean foreground Dice (Dice of the foreground for
binary families).

Families: ``sample`` (the plugin's sample, ``synthetic_cells(384)``: 3 classes, background / nucleus / rod; image seed
0 trains, seed 1 is scored, as the dock's sample and the demo), ``nuclei`` (stardist's image, left half trains,
right half scored; ``adaptation_data.load_nuclei``), and the generated families of ``adaptation_data`` when present
(``anatomy``, ``tiny_lesions``, ``thin_structures``: dense labels).

    OMP_NUM_THREADS=1 python benchmarks/default_recipe.py --threads 1 --steps 200 --seeds 0 1 \\
        --families sample nuclei --lr 3e-4 1e-3 3e-3 --json benchmarks/adaptation_results/lr_sweep.json

Without ``--lr`` the recipe's own rate is used (the defaults row). Prints a line per run and a markdown table
(mean ± std [min, max] over seeds); the JSON holds every run and is rewritten after each.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adaptation_data import Family, FamilyUnavailable, HeldOut, family_loaders  # noqa: E402

from napari_convlora.checkpoints.builtin import builtin_checkpoint  # noqa: E402
from napari_convlora.checkpoints.model_files import load_model  # noqa: E402
from napari_convlora.checkpoints.training_state import best_path  # noqa: E402
from napari_convlora.config import RunOptions  # noqa: E402
from napari_convlora.data import ImageLayout, TrainingPair, prepare_training_data  # noqa: E402
from napari_convlora.data.samples import synthetic_cells  # noqa: E402
from napari_convlora.metrics import ConfusionMatrix  # noqa: E402
from napari_convlora.prediction.planes import predict_image  # noqa: E402
from napari_convlora.training.loop import train  # noqa: E402
from napari_convlora.training.recipes import recipe_for  # noqa: E402


def load_sample() -> Family:
    """The plugin's own sample: train on ``synthetic_cells(384, seed=0)``, score ``seed=1``."""
    image, labels = synthetic_cells(384, seed=0)
    test_image, test_labels = synthetic_cells(384, seed=1)
    held = HeldOut(test_image, test_labels, test_labels > 0, test_labels)
    return Family("sample", "dense", [(image, labels, False)], [held],
                  "the plugin's sample (synthetic_cells 384 px): seed 0 trains, seed 1 scored; 3 classes")


def loaders() -> dict[str, Callable[[], Family]]:
    return {"sample": load_sample, **family_loaders()}


def score(model: Any, family: Family, device: str) -> dict[str, Any]:
    """Pooled scores of ``model`` on the family's held-out images (dense labels: value = class value)."""
    values = list(model.config.head.class_values)
    matrix = ConfusionMatrix(len(values))
    lookup = {v: i for i, v in enumerate(values)}
    for held in family.held_out:
        predicted = predict_image(model, held.image, ImageLayout(rgb=held.rgb), device=device).labels
        target = np.full(held.labels.shape, -100, dtype=np.int64)
        for value, index in lookup.items():
            target[held.labels == value] = index
        pred = np.zeros(predicted.shape, dtype=np.int64)
        for value, index in lookup.items():
            pred[predicted == value] = index
        if family.label_mode == "sparse":  # 0 is not annotated there
            target[held.labels == 0] = -100
        matrix.update(pred, target)
    metrics = matrix.compute()
    dice = [d for d in metrics.per_class_dice[1:] if d == d]
    return {"miou": metrics.mean_iou, "fg_dice": float(np.mean(dice)) if dice else float("nan"),
            "per_class_iou": metrics.per_class_iou}


def run_one(family: Family, seed: int, steps: int, lr: float | None, args: argparse.Namespace,
            work: Path, detail: str | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"steps": steps, "label_mode": family.label_mode, "seed": seed}
    if lr is not None:
        fields["lr"] = lr
    if detail is not None:
        fields["detail_head"] = detail
    recipe = recipe_for("builtin", args.device, **fields)
    pairs = [TrainingPair(image, labels, ImageLayout(rgb=rgb)) for image, labels, rgb in family.train]
    data = prepare_training_data(pairs, recipe)
    out = work / f"{family.name}-{seed}-{lr}-{detail}.safetensors"
    started = time.perf_counter()
    for _ in train(builtin_checkpoint(), data, out, recipe, RunOptions(device=args.device, num_threads=args.threads)):
        pass
    train_s = time.perf_counter() - started
    last = score(load_model(out), family, args.device)
    best_file = best_path(out)
    best = score(load_model(best_file), family, args.device) if best_file.exists() else last
    return {"family": family.name, "seed": seed, "lr": recipe.lr, "input_size": recipe.input_size, "steps": steps,
            "detail_head": recipe.trains_detail_head,
            "last": last, "best": best, "train_s": train_s, "warnings": list(getattr(data, "warnings", []))}


def spread(values: list[float]) -> str:
    """``mean ± std [min, max]`` over seeds (NaN-free values)."""
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def markdown(runs: list[dict[str, Any]]) -> str:
    lines = ["| family | lr | detail head | mIoU (last) | fg Dice (last) | mIoU (best) | fg Dice (best) | s/run |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    keys = sorted({(r["family"], r["lr"], r.get("detail_head", False)) for r in runs})
    for family, lr, detail in keys:
        group = [r for r in runs if (r["family"], r["lr"], r.get("detail_head", False)) == (family, lr, detail)]
        cells = [spread([r[which][metric] for r in group])
                 for which in ("last", "best") for metric in ("miou", "fg_dice")]
        lines.append(f"| {family} | {lr:g} | {'on' if detail else 'off'} | {' | '.join(cells)} | "
                     f"{np.mean([r['train_s'] for r in group]):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["sample", "nuclei"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", nargs="+", type=float, default=[None])
    parser.add_argument("--detail-head", nargs="+", default=[None], choices=["on", "off", "auto"],
                        help="detail head settings to compare (default: the recipe's own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    available = loaders()
    unknown = [f for f in args.families if f not in available]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {sorted(available)}")
    runs: list[dict[str, Any]] = []
    record = {"command": " ".join(sys.argv), "machine": platform.platform(), "threads": args.threads, "runs": runs}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.families:
            try:
                family = available[name]()
            except FamilyUnavailable as e:
                print(f"{name}: skipped ({e})", flush=True)
                continue
            for lr, detail, seed in ((lr, d, s) for lr in args.lr for d in args.detail_head for s in args.seeds):
                result = run_one(family, seed, args.steps, lr, args, Path(folder), detail)
                runs.append(result)
                print(f"{name} lr {result['lr']:g} detail {detail} seed {seed}: last mIoU "
                      f"{result['last']['miou']:.3f} Dice {result['last']['fg_dice']:.3f}; best mIoU "
                      f"{result['best']['miou']:.3f} ({result['train_s']:.0f} s)", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(record, indent=1))
    print(markdown(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
