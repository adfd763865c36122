"""Adaptation to unseen target domains: held-out quality after the same number of steps, over seeds (issue 11).

From a base SAM (default: the built-in small SAM, ``src/napari_convlora/models/small_sam_256.pth``, 256 px), each
row adapts to each target family (``adaptation_data.py``: real nuclei, sparse cells, sparse EM membranes,
synthetic scenes under five shifts that pretraining never showed, and, by name or ``--families '*'``, three generated
families where a pixel classifier and the plugin should differ: ``anatomy`` (6 classes of alike textures),
``tiny_lesions`` (lesions of 0.15-0.4 % of the pixels) and ``thin_structures`` (curves 1-3 px wide); see
``generated_families.py``) with the project's own API
(``prepare_training_data``, ``training.loop.train``, ``predict_image``, ``metrics.ConfusionMatrix``), then the held-out part
is predicted and scored. Every (family, row, seed) is an independent run, deterministic given its seed: the seed is
the recipe's (adapter initialisation, patch sampling, augmentation, Conv-LoRA's gate noise), and for the
``random_*`` rows also the random base's weights (``random_sam(<the base's geometry>, RANDOM_BASE_SEED + seed)``).

Rows: ``zero_shot`` (the base SAM's own promptable decoder with a tight box around every ground-truth object of the
held-out part; a DIFFERENT task, since the prompt-free head cannot be zero-shot: the union of the box-prompted masks
is scored as the foreground, and ``box IoU`` is the mean IoU of the objects' masks; deterministic, one run),
``decoder`` (decoder-only), ``lora``, ``conv_lora`` (its defaults: rank 3, 8 experts, top-1), ``conv_lora_top2``
(top-2 routing, experts weighted by the gate), ``hq`` (HQ-SAM's regime: SAM frozen, HQ-SAM's token, MLP and fusion
plus the head's tokens train; "SAM + HQ" output), ``conv_lora_hq`` / ``conv_lora_hq_only`` (Conv-LoRA with HQ-SAM's
fusion on the head, SAM + HQ or HQ only; the built-in SAM is a plain SAM, so the HQ parts start new as in HQ-SAM's
training), and ``random_decoder`` / ``random_lora`` / ``random_conv_lora`` (the same from a random-weight SAM of the
base's geometry: does pretraining matter?), and ``random_forest``: no SAM at all, ilastik's pixel classification
(``random_forest.py``: ilastik's default filter features at sigmas 0.7-10 of the same normalised image, a
scikit-learn forest of ``--rf-trees`` trees fitted on at most ``--rf-max-pixels`` training pixels, stratified; its
seed draws the subsample and the forest), trained on the same training annotations. Every row trains a K-class model
where a family has K > 2 classes (``anatomy``: ``prepare_training_data`` gives it a K-class head, the recipe's
``multiclass_head`` from ``--multiclass-head``: ``matched``, the default, Conv-LoRA's mask classification with
Hungarian matching, or ``per_class``, SAMed's K tokens with cross-entropy + Dice; its own loss whatever
``--mask-loss`` says).

Training, the same for every row: ``TrainRecipe(input_size=256, steps, batch_size, grad_accum=1, lr, seed,
val_fraction=0)`` and the recipe's other defaults (AdamW, weight decay 1e-4, linear decay, clipping at 1.0, flips,
90-degree rotations and an intensity jitter); no validation: the model after the last step is scored. Every image
goes through the same ``InputSpec()`` normalisation (percentiles 1 and 99.8), for the zero-shot row too.

Scores (pooled over the family's held-out images, only on held-out annotated pixels; one function, ``score``, for
every trained row and the forest; ``per_class_iou`` / ``per_class_dice`` of every run in the JSON):
- mIoU: mean over all K classes (background included) of IoU from the pooled confusion matrix;
- fg Dice: Dice of the foreground class (``tiny_lesions``: the lesion Dice); for K > 2, the mean Dice of the
  non-background classes;
- BF (binary families only; "n/a" for K > 2): boundary F-score with a 2 px tolerance. Boundary pixels of a mask:
  its pixels with a 4-neighbour outside it
  (``skimage.segmentation.find_boundaries(mode="inner")``). Ground-truth boundaries come from the complete
  annotation's foreground (training and held-out parts; unannotated pixels count as outside), predicted ones from
  the whole predicted foreground. Precision: the predicted boundary pixels on scored pixels that lie within 2 px
  (Euclidean) of a ground-truth boundary pixel; recall: the ground-truth boundary pixels on scored pixels within
  2 px of a predicted one; both pooled over images; F = 2PR / (P + R) (0 when nothing matches);
- bIoU: HQ-SAM's boundary IoU of the foreground (``napari_convlora.boundary``): the band of a mask is its pixels
  within d = max(1, round(0.02 x image diagonal)) px of a pixel outside it or of the image border; bIoU = |Gb & Pb|
  / |Gb | Pb|, intersections and unions pooled over images (``metrics.ConfusionMatrix``), on held-out annotated
  pixels only (an unannotated pixel is in neither band and does not create one); for K > 2, the mean over the
  non-background classes of each class's boundary IoU (``metrics.ConfusionMatrix``: a class's band against the rest);
- per-class IoU: for K > 2, one more table under the main one (mean ± std over seeds);
- s/step: median wall time of an optimizer step (steps after the first two), with the thread count;
- params: trainable parameters (adapters and head); train s / predict s: wall time of training (the forest: its
  features, subsample and fit) and of predicting the held-out part.

``--mask-loss hq_points`` trains every row with HQ-SAM's point-sampled BCE + dice instead of the structure loss
(``TrainRecipe.mask_loss``); each run records the loss terms the loop reported, and a run whose loop did not use the
asked loss stops the benchmark.

Default families: the original eight (nuclei, sparse_*, shift_*); default rows: all, the forest included.
Full run (CPU, 2 cores, one thread per process)::

    OMP_NUM_THREADS=1 python benchmarks/adaptation.py --threads 1 --steps 150 --json adaptation.json \
        --markdown adaptation.md
    OMP_NUM_THREADS=1 python benchmarks/adaptation.py --threads 1 --rows random_forest --families '*' \
        --json benchmarks/adaptation_results/random_forest.json
    OMP_NUM_THREADS=1 python benchmarks/adaptation.py --threads 1 --steps 150 --rows conv_lora \
        --families anatomy tiny_lesions thin_structures --json benchmarks/adaptation_results/new_families_conv_lora.json

Prints one line per run, then a markdown table (mean ± std [min, max] over seeds) and writes the JSON record
with every per-seed number (rewritten after every run, so an interrupted run keeps what it finished).
"""

from __future__ import annotations

import argparse
import math
import os
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
import torch.nn.functional as F
from scipy import ndimage
from skimage.segmentation import find_boundaries

from napari_convlora.boundary import DILATION_RATIO
from napari_convlora.config import AdapterConfig, InputSpec, RunOptions, TrainRecipe
from napari_convlora.config.choices import MASK_LOSSES, MULTICLASS_HEADS
from napari_convlora.constants import IGNORE_INDEX
from napari_convlora.data import ImageLayout, LabelEncoding, TrainingPair, prepare_training_data, to_sam_planes
from napari_convlora.metrics import ConfusionMatrix
from napari_convlora.prediction.planes import predict_image
from napari_convlora.pretraining.promptable import Prompted, decode, preprocess
from napari_convlora.data.prompts import mask_box
from napari_convlora.checkpoints.sam_files import checkpoint_identity, load_base, random_sam, save_sam_checkpoint
from napari_convlora.training.loop import train

from bench_report import choose, summarise, write_json
from adaptation_data import Family, FamilyUnavailable, HeldOut, family_loaders
from random_forest import MAX_PIXELS, TREES, fit_forest

BOUNDARY_TOLERANCE = 2.0
RANDOM_BASE_SEED = 1000  # random bases use 1000 + seed, so that none equals a random_sam(..., seed) test base
DEFAULT_BASE = Path(__file__).resolve().parents[1] / "src" / "napari_convlora" / "models" / "small_sam_256.pth"
#: The families run when --families is not given: all but the generated ones (add them by name or with '*').
DEFAULT_FAMILIES = ("nuclei", "sparse_*", "shift_*")
METRICS = ("miou", "fg_dice", "boundary_f", "boundary_iou", "box_iou", "step_s", "train_s", "predict_s",
           "trainable_params")


@dataclass(frozen=True)
class Row:
    """A method. kind: ``"train"`` (adapts the base SAM; ``adapter`` is an AdapterConfig's keyword arguments),
    ``"zero_shot"`` or ``"random_forest"`` (``adapter`` None)."""

    label: str
    adapter: dict | None
    random_base: bool = False
    hq: str = "off"
    kind: str = "train"


ROWS: dict[str, Row] = {
    "zero_shot": Row("zero-shot SAM + GT boxes (different task)", None, kind="zero_shot"),
    "random_forest": Row("random forest, ilastik features", None, kind="random_forest"),
    "decoder": Row("decoder-only", {"method": "decoder"}),
    "lora": Row("LoRA", {"method": "lora"}),
    "conv_lora": Row("Conv-LoRA (defaults, top-1)", {"method": "conv_lora"}),
    "conv_lora_top2": Row("Conv-LoRA top-2, gate-weighted", {"method": "conv_lora", "top_k": 2, "weight_by_gate": True}),
    "hq": Row("HQ-SAM (SAM frozen; HQ parts + head)", {"method": "hq"}, hq="sam+hq"),
    "conv_lora_hq": Row("Conv-LoRA + HQ (SAM + HQ)", {"method": "conv_lora"}, hq="sam+hq"),
    "conv_lora_hq_only": Row("Conv-LoRA + HQ (HQ only)", {"method": "conv_lora"}, hq="hq"),
    "random_decoder": Row("decoder-only, random SAM", {"method": "decoder"}, True),
    "random_lora": Row("LoRA, random SAM", {"method": "lora"}, True),
    "random_conv_lora": Row("Conv-LoRA, random SAM", {"method": "conv_lora"}, True),
}


# ------------------------------------------------------------------------------------------------
# Scoring


def boundary_counts(pred_fg: np.ndarray, truth_fg: np.ndarray, scored: np.ndarray,
                    tolerance: float = BOUNDARY_TOLERANCE) -> np.ndarray:
    """[matched predicted, predicted, matched truth, truth] boundary pixels on ``scored`` pixels (int64, 4).

    All Y x X bool. Boundaries: mask pixels with a 4-neighbour outside the mask; matched: within ``tolerance`` px
    (Euclidean) of a boundary pixel of the other mask, anywhere in the image."""
    pred_b = find_boundaries(pred_fg, mode="inner", connectivity=1) & pred_fg
    truth_b = find_boundaries(truth_fg, mode="inner", connectivity=1) & truth_fg
    near_truth = ndimage.distance_transform_edt(~truth_b) <= tolerance if truth_b.any() else np.zeros_like(truth_b)
    near_pred = ndimage.distance_transform_edt(~pred_b) <= tolerance if pred_b.any() else np.zeros_like(pred_b)
    p, t = pred_b & scored, truth_b & scored
    return np.array([(p & near_truth).sum(), p.sum(), (t & near_pred).sum(), t.sum()], dtype=np.int64)


def boundary_f(counts: np.ndarray) -> dict[str, float]:
    """Precision, recall and F from pooled :func:`boundary_counts` (NaN when neither mask has a boundary)."""
    matched_pred, pred, matched_truth, truth = (int(c) for c in counts)
    if pred == 0 and truth == 0:
        return {"boundary_precision": math.nan, "boundary_recall": math.nan, "boundary_f": math.nan}
    precision = matched_pred / pred if pred else 0.0
    recall = matched_truth / truth if truth else 0.0
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"boundary_precision": precision, "boundary_recall": recall, "boundary_f": f}


class Scorer:
    """Pools the confusion matrix of a family's held-out images (K classes), and for binary tasks the boundary
    counts of the foreground."""

    def __init__(self, num_classes: int = 2) -> None:
        self.matrix = ConfusionMatrix(num_classes)
        self.counts = np.zeros(4, dtype=np.int64)

    def add(self, pred: np.ndarray, target: np.ndarray, truth_fg: np.ndarray) -> None:
        """pred: Y x X class indices 0..K-1 (bool for binary); target: class indices or IGNORE_INDEX (not scored);
        truth_fg: Y x X bool, the complete annotation's foreground (binary boundary F-score only)."""
        self.matrix.update(pred.astype(np.int64), target)
        if self.matrix.num_classes == 2:
            self.counts += boundary_counts(pred.astype(bool), truth_fg, target != IGNORE_INDEX)

    def result(self) -> dict[str, Any]:
        m = self.matrix.compute()
        binary = self.matrix.num_classes == 2
        boundary = boundary_f(self.counts) if binary else \
            {"boundary_precision": math.nan, "boundary_recall": math.nan, "boundary_f": math.nan}
        fg_dice = m.per_class_dice[1] if binary else float(np.nanmean(np.array(m.per_class_dice[1:], float)))
        return {"miou": m.mean_iou, "fg_dice": fg_dice, "per_class_iou": m.per_class_iou,
                "per_class_dice": m.per_class_dice, "per_class_boundary_iou": m.per_class_boundary_iou,
                "pixels": m.num_pixels, **boundary, "boundary_counts": self.counts.tolist() if binary else None,
                "boundary_iou": m.boundary_iou}


def _encoding(family: Family) -> LabelEncoding:
    values = family.class_values()
    return LabelEncoding(family.label_mode, values, values[0])


def score(family: Family, predict: Callable[[HeldOut], np.ndarray]) -> dict[str, Any]:
    """Every row's scores: ``predict(held)`` gives the Y x X label values (the family's, see
    ``Family.class_values``) of each held-out image; scored on its annotated pixels and pooled (:class:`Scorer`)."""
    encoding, scorer = _encoding(family), Scorer(family.num_classes)
    for held in family.held_out:
        labels = predict(held)
        unknown = set(np.unique(labels).tolist()) - set(family.class_values())
        if unknown:
            raise ValueError(f"{family.name}: predicted label values {sorted(unknown)} are not classes")
        scorer.add(encoding.encode(labels), encoding.encode(held.labels), held.truth_foreground)
    return scorer.result()


# ------------------------------------------------------------------------------------------------
# Rows


def _tile_starts(length: int, size: int) -> list[int]:
    return sorted({*range(0, max(length - size, 0) + 1, size), max(length - size, 0)})


def zero_shot(family: Family, sam, max_boxes: int = 32) -> dict[str, Any]:
    """The base SAM's promptable decoder with a tight box around every held-out ground-truth object, on 256 px
    tiles (SAM's input size) of the normalised image; each object is prompted in the tile holding most of its
    pixels, clipped to it. Returns the mean box IoU over objects and, where the union of the masks is the task's
    foreground, the pixel scores of that union."""
    size = sam.image_encoder.img_size
    scorer, ious, started = Scorer(), [], time.perf_counter()
    sam.eval()
    for held in family.held_out:
        planes = to_sam_planes(held.image, ImageLayout(rgb=held.rgb), InputSpec())[0]
        ny, nx = planes.shape[:2]
        pad = ((0, max(size - ny, 0)), (0, max(size - nx, 0)))
        planes, instances = np.pad(planes, pad + ((0, 0),)), np.pad(held.instances, pad)
        foreground = np.zeros(instances.shape, bool)
        ids = np.unique(instances)
        ids = ids[ids > 0]
        tiles = [(slice(y0, y0 + size), slice(x0, x0 + size)) for y0 in _tile_starts(instances.shape[0], size)
                 for x0 in _tile_starts(instances.shape[1], size)]
        pixels = np.stack([np.bincount(instances[tile].ravel(), minlength=ids.max(initial=0) + 1) for tile in tiles])
        owner = pixels[:, ids].argmax(axis=0)  # each object goes to the tile holding most of it (the first on ties)
        for t, tile in enumerate(tiles):
            masks = [instances[tile] == i for i, o in zip(ids, owner) if o == t]
            if not masks:
                continue
            with torch.no_grad():
                embedding = sam.image_encoder(preprocess(sam, planes[tile][None]))
                for k in range(0, len(masks), max_boxes):
                    chunk = np.stack(masks[k : k + max_boxes])
                    boxes = torch.from_numpy(np.stack([mask_box(m) for m in chunk]))
                    low_res, _ = decode(sam, embedding, Prompted(None, None, boxes, None, multimask=False))
                    pred = (F.interpolate(low_res, size=(size, size), mode="bilinear",
                                          align_corners=False)[:, 0] > 0).numpy()
                    inter, union = (pred & chunk).sum((1, 2)), (pred | chunk).sum((1, 2))
                    ious += (inter / np.maximum(union, 1)).tolist()
                    foreground[tile] |= pred.any(0)
        if family.zero_shot_pixels:  # a binary task whose foreground is the union of the objects
            scorer.add(foreground[:ny, :nx], _encoding(family).encode(held.labels), held.truth_foreground)
    out: dict[str, Any] = {"box_iou": float(np.mean(ious)) if ious else math.nan, "objects": len(ious),
                           "predict_s": time.perf_counter() - started, "trainable_params": 0}
    if family.zero_shot_pixels:
        out.update(scorer.result())
    return out


def adapt(family: Family, row: Row, seed: int, base: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train ``row`` on ``family`` from ``base`` with ``seed``, predict and score the held-out part."""
    multi = family.num_classes > 2  # mask classification: the binary mask losses do not apply
    mask_loss = "structure" if multi else args.mask_loss
    recipe = TrainRecipe(adapter=AdapterConfig(**row.adapter), input_size=args.input_size, label_mode=family.label_mode,
                         val_fraction=0.0, steps=args.steps, batch_size=args.batch, grad_accum=1, lr=args.lr,
                         val_every=args.steps, seed=seed, hq=row.hq, mask_loss=mask_loss,
                         multiclass_head=args.multiclass_head)
    data = prepare_training_data([TrainingPair(im, lab, ImageLayout(rgb=rgb)) for im, lab, rgb in family.train], recipe)
    run = RunOptions(device=args.device, num_threads=args.threads)
    out_path = work / f"{family.name}-{seed}.safetensors"
    intervals, terms, started = [], set(), time.perf_counter()
    gen = train(base, data, out_path, recipe, run)
    try:
        tick = time.perf_counter()
        while True:
            event = next(gen)
            now = time.perf_counter()
            if event.kind == "step":
                intervals.append(now - tick)
                terms |= set(event.parts)
            if event.kind in ("start", "step"):
                tick = now
    except StopIteration as done:
        model = done.value
    train_s = time.perf_counter() - started
    expected = {"matched": "class", "per_class": "ce"}[args.multiclass_head] if multi else \
        {"hq_points": "dice", "structure": "structure"}[args.mask_loss]
    if expected not in terms:
        raise SystemExit(f"mask loss {args.mask_loss} asked but the loop reported the terms {sorted(terms)}")
    if tuple(model.config.head.class_values) != family.class_values():
        raise SystemExit(f"{family.name}: the model's classes {model.config.head.class_values} are not the family's")
    started = time.perf_counter()
    scores = score(family, lambda held: predict_image(model, held.image, ImageLayout(rgb=held.rgb),
                                                      device=args.device).labels)
    timed = intervals[2:] or intervals
    return {**scores, "step_s": float(np.median(timed)), "train_s": train_s,
            "predict_s": time.perf_counter() - started,
            "mask_loss": f"multiclass_head {args.multiclass_head}" if multi else mask_loss,
            "loss_terms": sorted(terms),
            "trainable_params": int(sum(p.numel() for p in model.trainable_parameters()))}


def forest(family: Family, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The random-forest row (``random_forest.py``): fit on the training annotations, predict and score the held-out
    part like every row. train_s: features of the training images, subsample and fit; predict_s: features and
    prediction of the held-out images."""
    started = time.perf_counter()
    fitted = fit_forest(family.train, family.label_mode, seed, trees=args.rf_trees, max_pixels=args.rf_max_pixels)
    train_s, started = time.perf_counter() - started, time.perf_counter()
    scores = score(family, lambda held: fitted.predict(held.image, held.rgb))
    return {**scores, "train_s": train_s, "predict_s": time.perf_counter() - started, "trainable_params": 0,
            "forest": fitted.info()}


# ------------------------------------------------------------------------------------------------
# Reporting


def _cell(stats: dict[str, Any] | None, digits: int = 3, spread: bool = True, key: str = "mean") -> str:
    if not stats:
        return "n/a"
    text = f"{stats[key]:.{digits}f}"
    if spread and stats["std"] is not None:
        text += f" ± {stats['std']:.{digits}f} [{stats['min']:.{digits}f}, {stats['max']:.{digits}f}]"
    return text


def per_class_summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """family -> row -> one {mean, median, std, min, max, n} per class of the per-class IoU over seeds, for the
    families of more than two classes."""
    flat = [{"family": r["family"], "row": r["row"], **{f"iou_{i}": v for i, v in enumerate(r["per_class_iou"])}}
            for r in runs if len(r.get("per_class_iou") or []) > 2]
    out: dict = {}
    for family, rows in summarise(flat, [f"iou_{i}" for i in range(256)]).items():
        out[family] = {row: [stats[f"iou_{i}"] for i in range(len(stats))] for row, stats in rows.items()}
    return out


def markdown(summary: dict, threads: int, seeds: int, per_class: dict | None = None) -> str:
    """The table: one line per family and row, mean ± std [min, max] over seeds; then the per-class IoU of the
    multi-class families (``per_class``, from :func:`per_class_summary`); then what the columns are."""
    lines = [f"| family | row | mIoU | fg Dice | BF (2 px) | bIoU | box IoU | s/step ({threads} thr) "
             "| trainable params | train s | predict s |", "| --- | --- |" + " ---: |" * 9]
    for family, rows in summary.items():
        for row, stats in rows.items():
            trains = ROWS[row].kind == "train"
            params = f"{int(stats['trainable_params']['mean']):,}" if "trainable_params" in stats and \
                ROWS[row].kind != "random_forest" else "-"
            step = _cell(stats.get("step_s"), spread=False, key="median") if trains else "-"
            cells = [_cell(stats.get(m)) for m in ("miou", "fg_dice", "boundary_f", "boundary_iou", "box_iou")]
            times = [_cell(stats.get(m), 1, spread=False, key="median") for m in ("train_s", "predict_s")]
            lines.append(f"| {family} | {ROWS[row].label} | {' | '.join(cells)} | {step} | {params} | "
                         f"{' | '.join(times)} |")
    for family, rows in (per_class or {}).items():
        classes = max(len(v) for v in rows.values())
        lines += ["", f"Per-class IoU, {family} (class 0 = background):", "",
                  "| row | " + " | ".join(f"class {i}" for i in range(classes)) + " |",
                  "| --- |" + " ---: |" * classes]
        for row, stats in rows.items():
            lines.append(f"| {ROWS[row].label} | " + " | ".join(_cell(c, spread=False) + (
                f" ± {c['std']:.3f}" if c and c["std"] is not None else "") for c in stats) + " |")
    legend = (f"\nHeld-out scores: mean ± sample std [min, max] over {seeds} seed(s). mIoU: mean IoU over all "
              "classes, background included; fg Dice: Dice of the foreground (tiny_lesions: the lesion Dice), the "
              "mean Dice of the non-background classes for multi-class families. BF: boundary F-score, "
              f"{BOUNDARY_TOLERANCE:g} px tolerance, binary families only (n/a for multi-class). bIoU: HQ-SAM's "
              f"boundary IoU of the foreground (band width {DILATION_RATIO:g} of the image diagonal), for multi-class "
              "families the mean over the non-background classes of each class's. box IoU and the zero-shot row: the "
              "base SAM's promptable decoder with a box around each ground-truth object, a different task from the "
              "prompt-free rows (its pixel scores are those of the union of the box-prompted masks), one deterministic "
              f"run. s/step: median over seeds of each run's median optimizer-step time, {threads} thread(s). "
              "train s / predict s: median over seeds of the training (random forest: features, subsample and fit) and the "
              "held-out prediction wall times (the forest runs on one core).\n")
    return "\n".join(lines) + "\n" + legend


# ------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=str(DEFAULT_BASE), help="the base SAM checkpoint (default: the built-in "
                        "small SAM)")
    parser.add_argument("--families", nargs="+", default=list(DEFAULT_FAMILIES), help="family names or patterns "
                        f"(default: {' '.join(DEFAULT_FAMILIES)}; '*' adds the generated ones)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help=f"rows (default: all): {', '.join(ROWS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps, the same for every row")
    parser.add_argument("--batch", type=int, default=1, help="patches per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mask-loss", default="structure", choices=MASK_LOSSES, help="the binary loss of every row")
    parser.add_argument("--multiclass-head", default="matched", choices=MULTICLASS_HEADS, help="the head of every "
                        "row on families of more than two classes (TrainRecipe.multiclass_head; default: the recipe's)")
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--generated-size", type=int, help="make the generated families at this size in px "
                        "(default: their own, 320 / 512 / 256)")
    parser.add_argument("--rf-trees", type=int, default=TREES, help="trees of the random_forest row")
    parser.add_argument("--rf-max-pixels", type=int, default=MAX_PIXELS, help="the random_forest row's training "
                        "pixels at most (a stratified subsample above it)")
    parser.add_argument("--json", help="write every per-seed number and the summary here")
    parser.add_argument("--markdown", help="write the table here too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base_path = Path(args.base)
    if not base_path.is_file():
        raise SystemExit(f"no base checkpoint at {base_path}: pretrain it (scripts/pretrain_small_sam.py) or give --base")
    base = load_base(base_path)
    loaders = family_loaders(args.generated_size)
    families = choose(args.families, list(loaders), "families")
    rows = choose(args.rows, list(ROWS), "rows")
    record: dict[str, Any] = {
        "benchmark": "adaptation (benchmarks/adaptation.py)",
        "config": {"base": str(base_path), "base_sha256": checkpoint_identity(base_path).sha256,
                   "steps": args.steps, "batch": args.batch, "lr": args.lr, "input_size": args.input_size,
                   "mask_loss": args.mask_loss, "generated_size": args.generated_size, "rf_trees": args.rf_trees,
                   "multiclass_head": args.multiclass_head,
                   "rf_max_pixels": args.rf_max_pixels,
                   "threads": args.threads, "device": args.device, "seeds": args.seeds, "rows": rows,
                   "boundary_tolerance_px": BOUNDARY_TOLERANCE, "boundary_dilation_ratio": DILATION_RATIO,
                   "torch": torch.__version__,
                   "python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "families": {}, "skipped": {}, "runs": [],
    }
    total = len(families) * sum(1 if r == "zero_shot" else len(args.seeds) for r in rows)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adaptation-") as tmp:
        work = Path(tmp)
        for name in families:
            try:
                family = loaders[name]()
            except FamilyUnavailable as e:
                print(f"skipping {name}: {e}", file=sys.stderr, flush=True)
                record["skipped"][name] = str(e)
                total -= sum(1 if r == "zero_shot" else len(args.seeds) for r in rows)
                continue
            record["families"][name] = family.summary()
            for row_name in rows:
                row = ROWS[row_name]
                for seed in [None] if row.kind == "zero_shot" else args.seeds:
                    if row.kind == "zero_shot":
                        result = zero_shot(family, base.sam)
                    elif row.kind == "random_forest":
                        result = forest(family, seed, args)
                    else:
                        checkpoint = base_path
                        if row.random_base:
                            checkpoint = work / f"random-{seed}.pth"
                            if not checkpoint.is_file():
                                save_sam_checkpoint(random_sam(base.architecture, RANDOM_BASE_SEED + seed), checkpoint)
                        result = adapt(family, row, seed, checkpoint, args, work)
                    record["runs"].append({"family": name, "row": row_name, "seed": seed, **result})
                    done = len(record["runs"])
                    elapsed = time.perf_counter() - started
                    print(f"[{done}/{total}] {name} {row_name} seed {seed}: mIoU {result.get('miou', math.nan):.3f} "
                          f"Dice {result.get('fg_dice', math.nan):.3f} BF {result.get('boundary_f', math.nan):.3f} "
                          f"bIoU {result.get('boundary_iou', math.nan):.3f}"
                          + (f" box IoU {result['box_iou']:.3f}" if "box_iou" in result else
                             f" {result['step_s']:.3f} s/step" if "step_s" in result else
                             f" fit {result['train_s']:.1f} s") + f"; {elapsed:.0f} s, about "
                          f"{elapsed / done * (total - done):.0f} s left", flush=True)
                    if args.json:
                        write_json(Path(args.json), record)
    record["summary"] = summarise(record["runs"], METRICS)
    record["per_class_iou_summary"] = per_class_summary(record["runs"])
    record["seconds"] = time.perf_counter() - started
    table = markdown(record["summary"], args.threads, len(args.seeds), record["per_class_iou_summary"])
    print(table)
    if args.json:
        write_json(Path(args.json), record)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
