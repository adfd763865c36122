"""WeSAM on the domain-shift benchmark: prompt mIoU before and after self-training from weak labels (issue 13).

From a base SAM (default: the built-in small SAM, 256 px), for each family of ``adaptation_data.py`` that has
ground-truth instances on every object (``nuclei`` and the five ``shift_*`` families; the sparse families annotate
only some objects and are skipped), the rows are:

- ``zero_shot``: the base SAM before adaptation (one deterministic run);
- ``wesam_box`` / ``wesam_points`` / ``wesam_coarse``: ``self_training.self_train`` (WeSAM: LoRA rank 4 on q and v,
  decoder frozen, anchor + teacher + student) on the TRAIN images' weak labels, made from their ground truth:
  box: the tight box of every object (``data.prompts.mask_box``);
  points: one positive point per object at its interior-most pixel (``data.prompts.central_point``), no
  negative point (a user's click; WeSAM's 5 + 5 random points per step come with the coarse kind below);
  coarse: every object's mask degraded as WeSAM's "poly" labels are (``coarse_mask``): the longest outline of the
  mask simplified by Douglas-Peucker with a tolerance of 5 % of its length (at least 3 px) and filled; tiny
  objects whose polygon is empty get their filled box. The plugin prompts a coarse object with the box of the
  coarse mask plus 5 positive and 5 negative points drawn afresh in and outside it at every step (the released
  WeSAM code uses only the polygon's box);
- ``supervised``: the upper bound, supervised fine-tuning of the same model (same LoRA, decoder frozen, same
  optimizer, schedule, steps and crop sampling) on the full ground-truth masks: every object of the crop is
  prompted with its exact box and, separately, with one positive point drawn uniformly in its mask; SAM's
  single-mask output (``self_training.loop.decode_prompts``, as WeSAM decodes) against the mask with SAM's mask
  loss (``pretraining.promptable``: 20 x focal + dice, plus the IoU head's MSE; the IoU head is frozen, so that
  term reaches only the adapters).

Every model is scored on the HELD-OUT images with prompts from their ground truth: a tight box per object
(box mIoU), one positive point at its interior-most pixel with SAM's single-mask output (point mIoU, what the
plugin's prompting returns) and with SAM's three masks, the one with the highest predicted IoU (best-of-3, as the
built-in model's own record scores it). Each object is prompted in the window of ``self_training.prompting.grid_window`` (the
256-px scenes are one window); the upsampled logits are thresholded at 0 and compared with the object's mask
inside the window; mIoU = mean over objects. s/step: median optimizer-step time (after the first two steps).

Optimisation (the defaults, chosen by a pilot, BENCHMARKS.md): 100 steps of Adam, lr 1e-3 after a 20-step linear
warm-up (WeSAM's own 1e-4 with its 250-step warm-up moves nothing in a run this short), weight decay 1e-4, clipping
at 1.0, at most 16 prompted objects per 256 px crop (WeSAM: 40), seeds 0, 1, 2.

Full run (CPU, one thread, about 40 minutes)::

    python benchmarks/wesam_adaptation.py --threads 1 --json benchmarks/wesam_results/wesam.json
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from skimage.draw import polygon2mask
from skimage.measure import approximate_polygon, find_contours

from napari_convlora.config import RunOptions
from napari_convlora.config.self_training import SelfTrainingRecipe
from napari_convlora.data import ImageLayout
from napari_convlora.data.images import SamPlanes
from napari_convlora.modeling import AdaptedSAM, Prompts
from napari_convlora.pretraining import promptable
from napari_convlora.data.prompts import central_point, mask_box, random_points
from napari_convlora.self_training.prompting import grid_window
from napari_convlora.checkpoints.sam_files import checkpoint_identity, load_base
from napari_convlora.self_training import WeakPair, prepare_weak_data, self_train
from napari_convlora.self_training.crops import CropPrompt, CropSampler, crop_plane
from napari_convlora.self_training.decoding import decode_prompts
from napari_convlora.self_training.loop import model_config_for
from napari_convlora.training.mask_terms import mask_iou, sigmoid_focal_loss, soft_dice_loss
from napari_convlora.training.step import TrainingStep
from napari_convlora.self_training.views import random_flips
from napari_convlora.weak import WeakLabels, WeakObject

from bench_report import choose, summarise, write_json
from adaptation_data import SHIFT_SEED, SHIFT_TRAIN_SCENES, Family, FamilyUnavailable, family_loaders

DEFAULT_BASE = Path(__file__).resolve().parents[1] / "src" / "napari_convlora" / "models" / "small_sam_256.pth"
FAMILIES = ("nuclei", "shift_*")  # every object annotated; the sparse families are not
ROWS = {"zero_shot": "zero-shot (before)", "wesam_box": "WeSAM, boxes", "wesam_points": "WeSAM, points",
        "wesam_coarse": "WeSAM, coarse masks", "supervised": "supervised, full masks (upper bound)"}
WEAK_KIND = {"wesam_box": "box", "wesam_points": "points", "wesam_coarse": "coarse"}
METRICS = ("box_miou", "point_miou", "point_best3_miou", "step_s")
POLY_FRACTION, POLY_MIN_PX = 0.05, 3.0  # WeSAM's approxPolyDP tolerance: 5 % of the outline's length, >= 3 px


# ------------------------------------------------------------------------------------------------
# Data: the families' images with instance ground truth on the training side too


@dataclass
class Scored:
    """One image with its instances (Y x X int, 0 background): image as napari holds it, ``rgb`` as its layout."""

    image: np.ndarray
    instances: np.ndarray
    rgb: bool


def instance_family(family: Family) -> tuple[list[Scored], list[Scored]]:
    """(train, held-out) images of ``family`` with their instances. ``adaptation_data`` keeps only the training
    side's foreground, so its instances are rebuilt from the same source (and checked against it)."""
    if family.name == "nuclei":
        import importlib.util

        import tifffile

        folder = Path(importlib.util.find_spec("stardist").origin).parent
        mask = tifffile.imread(folder / "data" / "images" / "mask2d.tif").astype(np.int32)
        train_instances = [mask[:, : mask.shape[1] // 2]]
    elif family.name.startswith("shift_"):
        from napari_convlora.pretraining.synthetic import SHIFTS, shifted_scene

        shift = family.name.removeprefix("shift_")
        k = SHIFTS.index(shift)
        size = family.train[0][0].shape[0]
        scenes = [shifted_scene(np.random.default_rng(SHIFT_SEED + 1000 * k + i), shift, size=size)
                  for i in range(SHIFT_TRAIN_SCENES)]
        for scene, (image, _, _) in zip(scenes, family.train):
            if not np.array_equal(scene.image, image):
                raise RuntimeError(f"{family.name}: the regenerated training scene differs from adaptation_data's")
        train_instances = [s.instances for s in scenes]
    else:
        raise FamilyUnavailable(f"{family.name}: sparse labels (only some objects annotated); not used for WeSAM")
    for instances, (_, labels, _) in zip(train_instances, family.train):
        if not np.array_equal(instances > 0, labels > 0):
            raise RuntimeError(f"{family.name}: the training instances do not match the family's foreground")
    train = [Scored(image, inst, rgb) for (image, _, rgb), inst in zip(family.train, train_instances)]
    return train, [Scored(h.image, h.instances, h.rgb) for h in family.held_out]


def object_masks(instances: np.ndarray) -> list[np.ndarray]:
    """The Y x X bool mask of every object (ids in increasing order)."""
    return [instances == i for i in np.unique(instances) if i > 0]


def _polygon_mask(mask: np.ndarray) -> np.ndarray | None:
    """The filled simplified polygon of the mask's longest outline, or None when it encloses no pixel."""
    padded = np.pad(mask, 1)
    contour = max(find_contours(padded.astype(np.float32), 0.5), key=len)
    length = float(np.linalg.norm(np.diff(contour, axis=0), axis=1).sum())
    polygon = approximate_polygon(contour, tolerance=max(POLY_FRACTION * length, POLY_MIN_PX))
    if len(polygon) < 4:  # closed: first vertex repeated; fewer than 3 distinct vertices enclose nothing
        return None
    filled = polygon2mask(padded.shape, polygon)[1:-1, 1:-1]
    return filled if filled.any() else None


def coarse_mask(mask: np.ndarray) -> np.ndarray:
    """WeSAM's "poly" degradation of a Y x X bool mask: its longest outline simplified (Douglas-Peucker, tolerance
    5 % of the outline's length, at least 3 px) and filled; the filled box when that encloses no pixel."""
    coarse = _polygon_mask(mask)
    if coarse is None:
        x0, y0, x1, y1 = mask_box(mask).astype(int)
        coarse = np.zeros_like(mask)
        coarse[y0:y1, x0:x1] = True
    return coarse


def weak_object(mask: np.ndarray, kind: str, source: str) -> WeakObject:
    """One object's weak label of ``kind`` made from its ground-truth mask (see the module docstring)."""
    if kind == "box":
        return WeakObject((), "box", box=mask_box(mask), layer="ground truth", source=source)
    if kind == "points":
        return WeakObject((), "points", positive=interior_point(mask)[None], layer="ground truth", source=source)
    coarse = coarse_mask(mask)
    x0, y0, x1, y1 = mask_box(coarse).astype(int)
    return WeakObject((), "coarse", box=mask_box(coarse), mask=coarse[y0:y1, x0:x1], mask_origin=(y0, x0),
                      layer="ground truth", source=source)


def weak_pairs(images: list[Scored], kind: str) -> list[WeakPair]:
    """Weak labels of ``kind`` for every object of every image (no evaluation labels: no validation in training)."""
    pairs = []
    for n, item in enumerate(images):
        objects = [weak_object(m, kind, f"object {k}") for k, m in enumerate(object_masks(item.instances))]
        pairs.append(WeakPair(item.image, WeakLabels(item.instances.shape, {(): objects}), ImageLayout(rgb=item.rgb),
                              name=f"train {n}"))
    return pairs


def coarse_quality(images: list[Scored]) -> dict[str, float]:
    """How coarse the coarse labels are: mean IoU of coarse and true masks, and how many fell back to boxes."""
    ious, boxes = [], 0
    for item in images:
        for mask in object_masks(item.instances):
            coarse = coarse_mask(mask)
            ious.append((coarse & mask).sum() / (coarse | mask).sum())
            boxes += _polygon_mask(mask) is None
    return {"coarse_vs_true_miou": float(np.mean(ious)), "objects": len(ious), "filled_boxes": boxes}


# ------------------------------------------------------------------------------------------------
# Scoring with prompts from the held-out ground truth


def interior_point(mask: np.ndarray) -> np.ndarray:
    """``central_point`` of a non-empty Y x X bool mask (x, y), computed inside its box (the same point, faster)."""
    x0, y0, x1, y1 = mask_box(mask).astype(int)
    return central_point(mask[y0:y1, x0:x1]) + np.array([x0, y0], np.float32)


@dataclass
class Window:
    """An S x S window of a held-out plane (float32 S x S x 3 in 0..255, valid S x S) and the objects prompted in it:
    their masks in the window (N x S x S bool), exact boxes (N x 4) and interior-most points (N x 2)."""

    image: np.ndarray
    valid: np.ndarray
    targets: np.ndarray
    boxes: np.ndarray
    points: np.ndarray


def held_out_windows(images: list[Scored], recipe: SelfTrainingRecipe) -> list[Window]:
    """Every object of ``images`` in its ``self_training.prompting.grid_window``, with its prompts (the same for every row)."""
    size, out = recipe.input_size, []
    for item in images:
        plane = SamPlanes(item.image, ImageLayout(rgb=item.rgb), recipe.input).normalised(0)
        windows: dict[tuple[int, int], list[np.ndarray]] = {}
        for mask in object_masks(item.instances):
            box = mask_box(mask)
            windows.setdefault(grid_window((box[:2] + box[2:]) / 2, mask.shape, size), []).append(mask)
        for (top, left), masks in windows.items():
            image, valid = crop_plane(plane, top, left, size)
            offset = np.array([left, top], np.float32)
            targets = [crop_plane(m[..., None].astype(np.float32), top, left, size)[0][..., 0] > 0 for m in masks]
            boxes = [np.clip(mask_box(m) - np.tile(offset, 2), 0, size) for m in masks]
            points = [interior_point(m) - offset for m in masks]
            out.append(Window(image, valid, np.stack(targets), np.stack(boxes), np.stack(points)))
    return out


@torch.no_grad()
def score_prompts(model: AdaptedSAM, windows: list[Window], device: torch.device) -> dict[str, Any]:
    """Box, one-point (single mask) and one-point best-of-3 mIoU over the objects of ``windows``."""
    model.eval()
    size = model.config.input_size
    ious: dict[str, list[float]] = {"box": [], "point": [], "point_best3": []}
    for window in windows:
        n = len(window.targets)
        embedding = model.encode(torch.from_numpy(window.image.transpose(2, 0, 1).copy())[None].to(device)).embedding
        box_low, _ = decode_prompts(model, embedding, None, [CropPrompt("box", b) for b in window.boxes])
        point_low, _ = decode_prompts(model, embedding, None, [CropPrompt("points", None, p[None])
                                                               for p in window.points])
        coords = torch.from_numpy(window.points[:, None].copy()).to(device)
        many, predicted = model.prompt_head(embedding, Prompts(points=coords, point_labels=torch.ones(
            n, 1, dtype=torch.int64, device=device)), multimask_output=True)
        best = many[torch.arange(n), predicted.argmax(dim=1)]
        for name, low in (("box", box_low), ("point", point_low), ("point_best3", best)):
            pred = (F.interpolate(low[:, None].float(), size=(size, size), mode="bilinear",
                                  align_corners=False)[:, 0] > 0).cpu().numpy() & window.valid
            inter, union = (pred & window.targets).sum((1, 2)), (pred | window.targets).sum((1, 2))
            ious[name] += (inter / np.maximum(union, 1)).tolist()
    return {f"{name}_miou": float(np.mean(v)) for name, v in ious.items()} | {"objects": len(ious["box"])}


# ------------------------------------------------------------------------------------------------
# Rows


def recipe_for(args: argparse.Namespace, seed: int) -> SelfTrainingRecipe:
    return SelfTrainingRecipe(input_size=args.input_size, steps=args.steps, lr=args.lr, warmup_steps=args.warmup,
                              max_objects=args.max_objects, seed=seed, val_every=args.steps, grad_clip=args.grad_clip)


def wesam_model(base: Path, train: list[Scored], recipe: SelfTrainingRecipe) -> AdaptedSAM:
    """A new model as ``self_train`` builds it (``model_config_for``): WeSAM's LoRA on ``base``, only it trains."""
    loaded = load_base(base)
    data = prepare_weak_data(weak_pairs(train, "box"), recipe)
    return AdaptedSAM.from_base(loaded, model_config_for(loaded, recipe, data))


def run_wesam(base: Path, train: list[Scored], kind: str, seed: int, args: argparse.Namespace, work: Path
              ) -> tuple[AdaptedSAM, list[float], dict[str, float]]:
    """``self_train`` on the weak labels of ``kind``; returns the model, step times and the last step's loss terms."""
    recipe = recipe_for(args, seed)
    data = prepare_weak_data(weak_pairs(train, kind), recipe)
    gen = self_train(base, data, work / f"wesam-{kind}-{seed}.safetensors", recipe,
                     RunOptions(device=args.device, precision="fp32", num_threads=args.threads))
    intervals, parts, tick = [], {}, time.perf_counter()
    try:
        while True:
            event = next(gen)
            now = time.perf_counter()
            if event.kind == "step":
                intervals.append(now - tick)
                parts = {"loss": event.loss, **event.parts}
            if event.kind in ("start", "step"):
                tick = now
    except StopIteration as done:
        return done.value, intervals, parts


def supervised_loss(model: AdaptedSAM, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
                    device: torch.device) -> torch.Tensor:
    """SAM's mask loss of one crop (S x S x 3) whose objects are ``masks`` (N x S x S bool): each object prompted by
    its exact box and by one random point in it, single-mask output."""
    size = image.shape[0]
    prompts = [CropPrompt("box", mask_box(m)) for m in masks]
    prompts += [CropPrompt("points", None, random_points(m, 1, rng)) for m in masks]
    embedding = model.encode(torch.from_numpy(image.transpose(2, 0, 1).copy())[None].to(device)).embedding
    low, iou_pred = decode_prompts(model, embedding, None, prompts)
    logits = F.interpolate(low[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    truth = torch.from_numpy(np.concatenate([masks, masks])[:, None].astype(np.float32)).to(device)
    mask_loss = (promptable.FOCAL_WEIGHT * sigmoid_focal_loss(logits, truth)
                 + promptable.DICE_WEIGHT * soft_dice_loss(logits, truth, trailing=2))[:, 0]
    iou_loss = F.mse_loss(iou_pred.float(), mask_iou(logits, truth)[:, 0])
    return mask_loss.mean() + promptable.IOU_WEIGHT * iou_loss


def run_supervised(base: Path, train: list[Scored], seed: int, args: argparse.Namespace
                   ) -> tuple[AdaptedSAM, list[float], dict[str, float]]:
    """The upper bound: the WeSAM model and optimisation, trained on the full masks (see the module docstring)."""
    device = torch.device(args.device)
    recipe = recipe_for(args, seed)
    data = prepare_weak_data(weak_pairs(train, "box"), recipe)  # the planes, normalised as WeSAM's
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = wesam_model(base, train, recipe).to(device)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_factor)
    stepper = TrainingStep(model, optimizer, scheduler, device=device, dtype=None, grad_clip=recipe.grad_clip,
                           out_path=Path("supervised upper bound"))  # the step self_train takes
    sampler = CropSampler(data.planes, data.objects, recipe.input_size, recipe.max_objects)
    boxes = [{i: mask_box(item.instances == i) for i in np.unique(item.instances) if i > 0} for item in train]
    size, intervals, parts = recipe.input_size, [], {"total": 0.0}
    for step in range(1, recipe.steps + 1):
        tick = time.perf_counter()
        crop = sampler.sample(rng)  # a window around a random object, as WeSAM's crops
        instances = crop_plane(train[crop.plane_index].instances[..., None].astype(np.float32), crop.top, crop.left,
                               size)[0][..., 0].astype(np.int64)
        ids = [i for i, b in boxes[crop.plane_index].items()  # as WeSAM's crops: the objects centred in the window
               if crop.left <= (b[0] + b[2]) / 2 < crop.left + size and crop.top <= (b[1] + b[3]) / 2 < crop.top + size
               and (instances == i).any()]
        if len(ids) > recipe.max_objects:
            ids = [ids[i] for i in sorted(rng.choice(len(ids), recipe.max_objects, replace=False))]
        flips = random_flips(rng)
        masks = np.stack([flips.image(instances == i) for i in ids])
        stepper.start()
        stepper.micro_batch(lambda: {"total": supervised_loss(model, flips.image(crop.image), masks, rng, device)}, step)
        parts = stepper.finish(step)
        intervals.append(time.perf_counter() - tick)
    return model.eval(), intervals, {"loss": parts["total"]}


# ------------------------------------------------------------------------------------------------
# Reporting


def gap_closed(summary: dict, family: str, row: str, metric: str) -> float | None:
    """(row - zero-shot) / (supervised - zero-shot) of the means; None without a gap of at least 0.01."""
    rows = summary.get(family, {})
    try:
        zero, sup, mine = (rows[r][metric]["mean"] for r in ("zero_shot", "supervised", row))
    except KeyError:
        return None
    return (mine - zero) / (sup - zero) if sup - zero >= 0.01 else None


def markdown(summary: dict, threads: int, seeds: int) -> str:
    def cell(stats: dict | None, digits: int = 3) -> str:
        if not stats:
            return "n/a"
        return f"{stats['mean']:.{digits}f}" + (f" ± {stats['std']:.{digits}f}" if stats["std"] is not None else "")

    lines = [f"| family | row | box mIoU | point mIoU (1 point) | point mIoU (best of 3) | s/step ({threads} thr) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for family, rows in summary.items():
        for row in (r for r in ROWS if r in rows):
            stats = rows[row]
            cells = [cell(stats.get(m)) for m in ("box_miou", "point_miou", "point_best3_miou")]
            cells.append(cell(stats.get("step_s"), 2) if row != "zero_shot" else "-")
            lines.append(f"| {family} | {ROWS[row]} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± sample std over {seeds} seed(s) (zero-shot: one deterministic run).", "",
              "The gap (supervised - zero-shot, means) and the share of it that each WeSAM row closes, box / point "
              "prompts ((row - zero-shot) / gap; n/a where the gap is under 0.01):", "",
              "| family | gap (box / point) | WeSAM, boxes | WeSAM, points | WeSAM, coarse |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for family, rows in summary.items():
        gaps = [rows["supervised"][m]["mean"] - rows["zero_shot"][m]["mean"]
                if {"supervised", "zero_shot"} <= set(rows) else math.nan for m in ("box_miou", "point_miou")]
        cells = [" / ".join(f"{g:+.3f}" for g in gaps)]
        for row in ("wesam_box", "wesam_points", "wesam_coarse"):
            shares = [gap_closed(summary, family, row, m) for m in ("box_miou", "point_miou")]
            cells.append(" / ".join("n/a" if s is None else f"{100 * s:.0f} %" for s in shares))
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Command line


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=str(DEFAULT_BASE), help="base SAM checkpoint (default: the built-in SAM)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), help="names or patterns (default: every "
                        "family with instances on every object)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help=f"rows (default: all): {', '.join(ROWS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every trained row")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20, help="linear warm-up steps (WeSAM: 250 at lr 1e-4)")
    parser.add_argument("--max-objects", type=int, default=16, help="prompted objects per crop (WeSAM: 40; 16 "
                        "here to fit the CPU budget)")
    parser.add_argument("--held-out", type=int, default=None, help="score only the first N held-out images "
                        "(default: all; for quick checks)")
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--grad-clip", type=float, default=None, help="clip gradient norms (default: none, as WeSAM; "
                        "the stored results of 2026-11 were measured with 1.0, which reproduces them)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write every per-seed number and the summary here")
    parser.add_argument("--markdown", help="write the tables here too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base = Path(args.base)
    if not base.is_file():
        raise SystemExit(f"no base checkpoint at {base}: give --base")
    loaders = {k: v for k, v in family_loaders().items() if not k.startswith("sparse_")}
    families = choose(args.families, list(loaders), "families")
    rows = choose(args.rows, list(ROWS), "rows")
    record: dict[str, Any] = {
        "benchmark": "WeSAM adaptation (benchmarks/wesam_adaptation.py)",
        "config": {"base": str(base), "base_sha256": checkpoint_identity(base).sha256, "steps": args.steps,
                   "lr": args.lr, "warmup": args.warmup, "held_out": args.held_out, "max_objects": args.max_objects,
                   "input_size": args.input_size,
                   "threads": args.threads, "device": args.device, "seeds": args.seeds, "rows": rows,
                   "recipe": {k: v for k, v in vars(recipe_for(args, 0)).items() if k not in ("adapter", "input")},
                   "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                   "machine": platform.machine(), "cpu": _cpu_name()},
        "families": {}, "skipped": {}, "runs": [],
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wesam-") as tmp:
        for name in families:
            try:
                family = loaders[name]()
                train, held = instance_family(family)
            except FamilyUnavailable as e:
                print(f"skipping {name}: {e}", file=sys.stderr, flush=True)
                record["skipped"][name] = str(e)
                continue
            record["families"][name] = {"description": family.description, "train_images": len(train),
                                        "train_objects": sum(len(object_masks(t.instances)) for t in train),
                                        "held_out_images": len(held), **coarse_quality(train)}
            windows = held_out_windows(held[: args.held_out], recipe_for(args, 0))
            for row in rows:
                for seed in [None] if row == "zero_shot" else args.seeds:
                    tick = time.perf_counter()
                    if row == "zero_shot":  # the model WeSAM starts from: LoRA's B is zero, so the base SAM
                        model, steps, parts = wesam_model(base, train, recipe_for(args, 0)), [], {}
                    elif row == "supervised":
                        model, steps, parts = run_supervised(base, train, seed, args)
                    else:
                        model, steps, parts = run_wesam(base, train, WEAK_KIND[row], seed, args, Path(tmp))
                    train_s = time.perf_counter() - tick
                    scores = score_prompts(model, windows, torch.device(args.device))
                    timed = steps[2:] or steps
                    result = {"family": name, "row": row, "seed": seed, **scores, "last_loss": parts,
                              "step_s": float(np.median(timed)) if timed else None, "train_s": train_s,
                              "score_s": time.perf_counter() - tick - train_s}
                    record["runs"].append(result)
                    print(f"{name} {row} seed {seed}: box {scores['box_miou']:.3f} point {scores['point_miou']:.3f} "
                          f"best3 {scores['point_best3_miou']:.3f}"
                          + (f", {result['step_s']:.3f} s/step" if timed else "")
                          + f"; {time.perf_counter() - started:.0f} s", flush=True)
                    if args.json:
                        write_json(Path(args.json), record)
    record["summary"] = summarise(record["runs"], METRICS)
    record["gap_closed"] = {f: {r: {m: gap_closed(record["summary"], f, r, m) for m in ("box_miou", "point_miou")}
                                for r in WEAK_KIND} for f in record["summary"]}
    record["seconds"] = time.perf_counter() - started
    table = markdown(record["summary"], args.threads, len(args.seeds))
    print(table)
    if args.json:
        write_json(Path(args.json), record)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
