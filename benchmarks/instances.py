"""Instance segmentation of touching objects (issue 23, item 7): how many held-out objects each method finds, over
seeds.

Families (training images with their instance masks, held-out images scored against theirs):

- ``nuclei``: stardist's 512 x 512 fluorescence image of nuclei (DSB 2018, CC0; ``data/images/img2d.tif`` and its
  expert mask ``mask2d.tif`` in the installed stardist package). Rows 0-255 train, rows 256-511 are held out (split at
  ``image.shape[0] // 2``); a nucleus cut by the split counts on each side with its part there. 64 training and
  67 held-out nuclei.
- ``crowded_cells``: ``generated_families.crowded_cells_image`` at 256 px (bright cells of radius 6-12 px, about
  half of them touching another, with a slight dimmer seam or none): seeds ``CROWDED_SEED + i``, i = 0..3 train,
  100..107 held out (``CROWDED_SEED`` = ``adaptation_data.GENERATED_SEED`` + 3000, after the three generated
  families of ``adaptation_data``).

Rows (``ROWS``: a name -> :class:`Row`; a new row is one function returning the held-out instance images):

- ``otsu_components``: Otsu's threshold, holes filled, small pieces removed, 8-connected components
  (``classical_instances.py``); no training, one run (seed-independent, spread 0).
- ``otsu_watershed``: the same foreground split by a watershed of its distance transform from its peaks (the
  classical baseline); one run.
- ``conv_lora_components``: the built-in small SAM fine-tuned exactly as ``napari-convlora train --label-mode
  instances --instance-head off --steps N --seed S`` does (``recipe_for("builtin", device, steps=N,
  label_mode="instances", seed=S, instance_head="off")``: its input size and learning rate, its validation split,
  Conv-LoRA), the model after the last step predicting the held-out images with ``predict_image(...,
  instances=True, instance_method="components")``: the connected components of the predicted foreground.
- ``instance_head``: the same fine-tuning with the CLI's default for instance labels (``instance_head="on"``, what
  ``auto`` gives): the instance head trains with the adapters, and its maps are split by the seeded watershed with
  the setting chosen on the run's validation split (``predict_image(..., instance_method="head")``).
- ``sam_refined``: the instance head's model (trained once when both rows run), its objects given to SAM's
  promptable decoder as box + point prompts (``predict_image(..., instance_method="sam_refined")``).
- ``segment_everything``: no labels at all: the built-in SAM as shipped, SAM's automatic mask generator
  (``predict_image(..., instance_method="everything")``, the small base's thresholds); one run.
- ``segment_everything_adapted``: the instance head's model (trained once for the head's rows), segment everything
  on its adapted encoder.

The classical rows' parameters are fixed per family, chosen once from the family's typical object (median
equivalent radius r and area A of its training objects): ``min_size`` about A / 10 and ``min_distance`` r / 2
(:data:`CLASSICAL`); never tuned on the held-out images.

Scores (``napari_convlora.instances.metrics``; one ``InstanceScoreAccumulator`` pooled over the family's held-out
images): F1 at IoU 0.5, mean F1 over IoU 0.5, 0.55, ..., 0.95, precision and recall at 0.5, the mean average
precision (TP / (TP + FP + FN) averaged over the thresholds), the objects predicted and true; train s and predict s
are wall times (the classical rows: no training; predict s is their segmentation of the held-out images).

    OMP_NUM_THREADS=1 python benchmarks/instances.py --threads 1 --rows otsu_components otsu_watershed \\
        --json benchmarks/adaptation_results/instances_classical.json
    OMP_NUM_THREADS=1 python benchmarks/instances.py --threads 1 --rows conv_lora_components --steps 200 --seeds 0 1 2

Prints a line per run and a markdown table (mean ± std [min, max] over seeds); the JSON (``--json``) holds every
run's scores (per threshold too) and is rewritten after each run.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adaptation_data import GENERATED_SEED, FamilyUnavailable  # noqa: E402
from bench_report import choose, summarise, write_json  # noqa: E402
from classical_instances import otsu_components, otsu_watershed  # noqa: E402
from generated_families import CROWDED_SIZE, crowded_cells_image  # noqa: E402

from napari_convlora.checkpoints.builtin import builtin_checkpoint  # noqa: E402
from napari_convlora.checkpoints.model_files import load_model  # noqa: E402
from napari_convlora.config import RunOptions  # noqa: E402
from napari_convlora.data import ImageLayout, TrainingPair, prepare_training_data  # noqa: E402
from napari_convlora.data.samples import stardist_nuclei  # noqa: E402
from napari_convlora.instances.metrics import InstanceScoreAccumulator, InstanceScores  # noqa: E402
from napari_convlora.prediction.planes import predict_image  # noqa: E402
from napari_convlora.training.loop import train  # noqa: E402
from napari_convlora.training.recipes import recipe_for  # noqa: E402

CROWDED_SEED = GENERATED_SEED + 3000
CROWDED_TRAIN = 4
CROWDED_HELD_OUT = 8
METRICS = ("f1_50", "mean_f1", "precision_50", "recall_50", "mean_ap", "num_predicted", "num_true", "train_s",
           "predict_s")


@dataclass(frozen=True)
class ClassicalParams:
    """The classical rows' fixed parameters for a family: pieces under ``min_size`` px dropped; watershed peaks at
    least ``min_distance`` px apart."""

    min_size: int
    min_distance: int


#: The training objects' median area and equivalent radius: nuclei 429 px and 11.7 px, crowded_cells 201 px and 8.0 px
#: (its generator also drops pieces under 20 px).
CLASSICAL = {"nuclei": ClassicalParams(min_size=40, min_distance=6),
             "crowded_cells": ClassicalParams(min_size=20, min_distance=4)}


@dataclass
class InstanceFamily:
    """Training and held-out images with their instance masks: (image, instances) pairs, image Y x X (any real
    dtype, grey), instances Y x X int32 (0 background, one id per object)."""

    name: str
    train: list[tuple[np.ndarray, np.ndarray]]
    held_out: list[tuple[np.ndarray, np.ndarray]]
    description: str
    classical: ClassicalParams

    def summary(self) -> dict[str, Any]:
        def objects(pairs: list[tuple[np.ndarray, np.ndarray]]) -> int:
            return sum(len(np.unique(instances[instances > 0])) for _, instances in pairs)

        touching = sum(len(touching_ids(instances)) for _, instances in self.held_out)
        return {"description": self.description, "train_images": len(self.train),
                "held_out_images": len(self.held_out), "train_objects": objects(self.train),
                "held_out_objects": objects(self.held_out),
                "held_out_touching_share": touching / max(objects(self.held_out), 1),
                "min_size": self.classical.min_size, "min_distance": self.classical.min_distance}


def touching_ids(instances: np.ndarray) -> np.ndarray:
    """The ids of the objects of a Y x X instance image that have a pixel 4-adjacent to another object's."""
    cross = ndimage.generate_binary_structure(2, 1)
    highest = ndimage.grey_dilation(instances, footprint=cross)
    lowest = ndimage.grey_erosion(np.where(instances > 0, instances, np.iinfo(instances.dtype).max), footprint=cross)
    return np.unique(instances[(instances > 0) & ((highest != instances) | (lowest != instances))])


def load_nuclei() -> InstanceFamily:
    """stardist's nuclei image and mask: the top half trains, the bottom half is held out."""
    data = stardist_nuclei()
    if data is None:
        raise FamilyUnavailable("stardist is not installed (pip install --no-deps stardist): no nuclei image")
    image, mask = data[0], data[1].astype(np.int32)
    half = image.shape[0] // 2
    return InstanceFamily("nuclei", [(image[:half], mask[:half])], [(image[half:], mask[half:])],
                          f"stardist nuclei (DSB 2018): rows 0-{half - 1} train, {half}-{image.shape[0] - 1} held out",
                          CLASSICAL["nuclei"])


def load_crowded_cells() -> InstanceFamily:
    """Generated crowded, touching cells at 256 px: 4 training and 8 held-out images."""
    def pairs(indices: range) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(g.image, g.instances) for g in (crowded_cells_image(CROWDED_SEED + i) for i in indices)]

    return InstanceFamily("crowded_cells", pairs(range(CROWDED_TRAIN)), pairs(range(100, 100 + CROWDED_HELD_OUT)),
                          f"generated_families.crowded_cells_image at {CROWDED_SIZE} px, seeds {CROWDED_SEED} + i: "
                          f"i = 0..{CROWDED_TRAIN - 1} train, 100..{99 + CROWDED_HELD_OUT} held out",
                          CLASSICAL["crowded_cells"])


FAMILIES: dict[str, Callable[[], InstanceFamily]] = {"nuclei": load_nuclei, "crowded_cells": load_crowded_cells}


# ------------------------------------------------------------------------------------------------
# Rows: (family, seed, args, work folder) -> (held-out instance images, in order; extra fields of the run)

RowResult = tuple[list[np.ndarray], dict[str, Any]]


def _timed(segment: Callable[[np.ndarray], np.ndarray], family: InstanceFamily) -> RowResult:
    started = time.perf_counter()
    predictions = [segment(image) for image, _ in family.held_out]
    return predictions, {"train_s": 0.0, "predict_s": time.perf_counter() - started}


def otsu_components_row(family: InstanceFamily, seed: int | None, args: argparse.Namespace, work: Path) -> RowResult:
    return _timed(lambda image: otsu_components(image, family.classical.min_size), family)


def otsu_watershed_row(family: InstanceFamily, seed: int | None, args: argparse.Namespace, work: Path) -> RowResult:
    params = family.classical
    return _timed(lambda image: otsu_watershed(image, params.min_size, params.min_distance), family)


def fine_tuned(family: InstanceFamily, seed: int | None, args: argparse.Namespace, work: Path, instance_head: str,
               instance_method: str) -> RowResult:
    """What the CLI does with instance labels (see the module docstring): the built-in SAM fine-tuned with the
    recipe's ``instance_head`` (``"off"``, ``"on"``), the model after the last step predicting the held-out images'
    objects by ``instance_method`` (``"components"``, ``"head"``)."""
    recipe = recipe_for("builtin", args.device, steps=args.steps, label_mode="instances", seed=seed,
                        instance_head=instance_head)
    data = prepare_training_data([TrainingPair(image, instances, ImageLayout()) for image, instances in family.train],
                                 recipe)
    out = work / f"{family.name}-{seed}-{instance_head}.safetensors"
    if out not in TRAINED:  # rows of one model (the head, SAM-refined) share its training
        started = time.perf_counter()
        for _ in train(builtin_checkpoint(), data, out, recipe,
                       RunOptions(device=args.device, num_threads=args.threads)):
            pass
        TRAINED[out] = time.perf_counter() - started
    train_s = TRAINED[out]
    model = load_model(out)
    started = time.perf_counter()
    predictions = [predict_image(model, image, ImageLayout(), device=args.device, instances=True,
                                 instance_method=instance_method).instances for image, _ in family.held_out]
    return predictions, {"train_s": train_s, "predict_s": time.perf_counter() - started, "lr": recipe.lr,
                         "input_size": recipe.input_size, "steps": args.steps}


#: Model file -> its training time: the rows that predict with one trained model share it.
TRAINED: dict[Path, float] = {}


def conv_lora_components_row(family: InstanceFamily, seed: int | None, args: argparse.Namespace,
                             work: Path) -> RowResult:
    """No instance head: the predicted foreground's connected components."""
    return fine_tuned(family, seed, args, work, instance_head="off", instance_method="components")


def instance_head_row(family: InstanceFamily, seed: int | None, args: argparse.Namespace, work: Path) -> RowResult:
    """The CLI's default with instance labels: an instance head trained with the adapters, its maps split by the
    seeded watershed with the setting chosen on the run's validation split."""
    return fine_tuned(family, seed, args, work, instance_head="on", instance_method="head")


def sam_refined_row(family: InstanceFamily, seed: int | None, args: argparse.Namespace, work: Path) -> RowResult:
    """The instance head's model (trained once for both rows), its objects refined by SAM's promptable decoder."""
    return fine_tuned(family, seed, args, work, instance_head="on", instance_method="sam_refined")


def segment_everything_row(family: InstanceFamily, seed: int | None, args: argparse.Namespace,
                           work: Path) -> RowResult:
    """No labels at all: the built-in SAM as shipped (adapters new, so unchanged), SAM's automatic mask generator
    with the small base's thresholds (``prediction/everything.py``)."""
    from napari_convlora import AdaptedSAM, load_base
    from napari_convlora.config import ModelConfig

    base = load_base(builtin_checkpoint())
    model = AdaptedSAM.from_base(base, ModelConfig(base=base.architecture, input_size=256,
                                                   base_checkpoint=base.checkpoint)).eval()
    return _timed(lambda image: predict_image(model, image, ImageLayout(), device=args.device, instances=True,
                                              instance_method="everything").instances, family)


def segment_everything_adapted_row(family: InstanceFamily, seed: int | None, args: argparse.Namespace,
                                   work: Path) -> RowResult:
    """The instance head's model (trained once for the head's rows): segment everything on its adapted encoder."""
    return fine_tuned(family, seed, args, work, instance_head="on", instance_method="everything")


@dataclass(frozen=True)
class Row:
    """A method. run: None while it is not built (the row is skipped); seeded: False for a deterministic method
    that runs once whatever the seeds."""

    label: str
    run: Callable[[InstanceFamily, int | None, argparse.Namespace, Path], RowResult] | None
    seeded: bool = True


ROWS: dict[str, Row] = {
    "otsu_components": Row("Otsu + connected components", otsu_components_row, seeded=False),
    "otsu_watershed": Row("Otsu + watershed on the distance transform", otsu_watershed_row, seeded=False),
    "conv_lora_components": Row("Conv-LoRA (defaults) + connected components", conv_lora_components_row),
    "instance_head": Row("Conv-LoRA (defaults) + instance head", instance_head_row),
    "sam_refined": Row("Conv-LoRA (defaults) + instance head, SAM-refined", sam_refined_row),
    "segment_everything": Row("segment everything, built-in SAM as shipped (no labels)", segment_everything_row,
                              seeded=False),
    "segment_everything_adapted": Row("Conv-LoRA (defaults, instance labels) + segment everything",
                                      segment_everything_adapted_row),
}


# ------------------------------------------------------------------------------------------------
# Scoring and the table


def score(predictions: list[np.ndarray], family: InstanceFamily) -> InstanceScores:
    """Pooled instance scores of the predictions (one Y x X int array per held-out image, in order)."""
    accumulator = InstanceScoreAccumulator()
    for predicted, (_, truth) in zip(predictions, family.held_out, strict=True):
        accumulator.update(predicted, truth)
    return accumulator.compute()


def _cell(stats: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean ± std [min, max]`` (std 0 for one run)."""
    if not stats:
        return "n/a"
    std = stats["std"] or 0.0
    return f"{stats['mean']:.{digits}f} ± {std:.{digits}f} [{stats['min']:.{digits}f}, {stats['max']:.{digits}f}]"


def markdown(summary: dict[str, dict[str, dict[str, Any]]], seeds: int) -> str:
    lines = ["| family | method | F1@0.5 | mean F1 0.5:0.95 | precision@0.5 | recall@0.5 | objects pred / true | "
             "train s | predict s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for family, rows in summary.items():
        for row in (r for r in ROWS if r in rows):
            stats = rows[row]
            objects = f"{stats['num_predicted']['mean']:.0f} / {stats['num_true']['mean']:.0f}"
            times = [f"{stats[key]['median']:.2f}" if key in stats else "n/a" for key in ("train_s", "predict_s")]
            scores = [_cell(stats.get(key)) for key in ("f1_50", "mean_f1", "precision_50", "recall_50")]
            lines.append(f"| {family} | {ROWS[row].label} | {' | '.join(scores)} | {objects} | {' | '.join(times)} |")
    legend = (f"\nmean ± std [min, max] over {seeds} seed(s); rows without training run once (std 0). Objects: the "
              "mean over seeds of the predicted and the true held-out objects; times: medians over seeds.\n")
    return "\n".join(lines) + "\n" + legend


# ------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), help=f"default: {' '.join(FAMILIES)}")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help=f"rows (default: all): {', '.join(ROWS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of the trained rows")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write every run and the summary here (rewritten after each run)")
    parser.add_argument("--markdown", help="write the table here too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    families = choose(args.families, list(FAMILIES), "families")
    rows = choose(args.rows, list(ROWS), "rows")
    record: dict[str, Any] = {
        "benchmark": "instances (benchmarks/instances.py)",
        "config": {"steps": args.steps, "seeds": args.seeds, "rows": rows, "threads": args.threads,
                   "device": args.device, "torch": torch.__version__, "python": platform.python_version(),
                   "machine": platform.machine(), "command": " ".join(sys.argv)},
        "families": {}, "skipped": {}, "pending": {}, "runs": [],
    }
    for name in rows:
        if ROWS[name].run is None:
            print(f"{name}: not built yet (skipped)", file=sys.stderr, flush=True)
            record["pending"][name] = "not built yet"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="instances-") as folder:
        for name in families:
            try:
                family = FAMILIES[name]()
            except FamilyUnavailable as e:
                print(f"skipping {name}: {e}", file=sys.stderr, flush=True)
                record["skipped"][name] = str(e)
                continue
            record["families"][name] = family.summary()
            for row_name in (r for r in rows if ROWS[r].run is not None):
                row = ROWS[row_name]
                for seed in args.seeds if row.seeded else [None]:
                    predictions, extra = row.run(family, seed, args, Path(folder))
                    scores = score(predictions, family)
                    run = {"family": name, "row": row_name, "seed": seed, "f1_50": scores.f1_50,
                           "mean_f1": scores.mean_f1, "precision_50": scores.precision(0.5),
                           "recall_50": scores.recall(0.5), "mean_ap": scores.mean_average_precision,
                           "num_predicted": scores.num_predicted, "num_true": scores.num_true, **extra,
                           "scores": scores.as_dict()}
                    record["runs"].append(run)
                    print(f"{name} {row_name} seed {seed}: F1@0.5 {run['f1_50']:.3f}, mean F1 {run['mean_f1']:.3f} "
                          f"(P {run['precision_50']:.3f}, R {run['recall_50']:.3f}; {run['num_predicted']} predicted / "
                          f"{run['num_true']} true); train {run['train_s']:.1f} s, predict {run['predict_s']:.1f} s",
                          flush=True)
                    if args.json:
                        write_json(Path(args.json), record)
    record["summary"] = summarise(record["runs"], METRICS)
    record["seconds"] = time.perf_counter() - started
    table = markdown(record["summary"], len(args.seeds))
    print(table)
    if args.json:
        write_json(Path(args.json), record)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
