"""Multi-class heads: Conv-LoRA's matched head against SAMed's one token per class (issue 22, item 4).

Heads (``TrainRecipe.multiclass_head``):
- ``matched``: Conv-LoRA's mask classification: 2K mask tokens, a ``Linear(D, K+1)`` class head, Hungarian matching in
  the loss (class CE + point-sampled BCE + dice, 1:1:1); probabilities sum_q softmax(class_q) * sigmoid(mask_q);
- ``per_class``: SAMed's: K mask tokens, token k always class k; probabilities softmax over the K mask logits; loss
  cross-entropy + soft Dice at full input resolution, weighted 1 : 1 (``training/per_class_loss.py``);
- ``per_class_samed`` (``--variants``, not a recipe setting): the per-class head with SAMed's own weights, 0.2 CE +
  0.8 Dice, by patching ``segmentation_loss``'s per-class loss in the worker process (a fresh process per run).

Data: ``cells``: the plugin's sample, trained on ``synthetic_cells(384, seed=0)`` and scored on
``synthetic_cells(384, seed=1)`` (3 classes: background, nucleus, rod); ``anatomy``: ``adaptation_data.py``'s generated
family (320 px, 6 classes of alike textures, 3 training images, 6 held out).

Every run: the built-in small SAM (``builtin_checkpoint()``), Conv-LoRA's defaults, ``TrainRecipe(input_size=256,
lr=1e-3, steps=300, batch_size=1, grad_accum=4, seed=s)`` and the recipe's other defaults (validation on 10 % of the
labelled area about 10 times, flips, rotations, intensity jitter); the model after the last step is scored with
``prediction.planes.predict_image`` and ``metrics.evaluate_arrays`` over the held-out images stacked (pooled mIoU over
all K classes, background included, and per-class IoU). Validation stability: the std of the validation mIoU over the
last half of a run's validation checks.

Command (CPU, one torch thread per process, 2 processes; about an hour on 2 cores)::

    OMP_NUM_THREADS=1 python benchmarks/multiclass_heads.py --jobs 2

Writes ``benchmarks/adaptation_results/multiclass_heads.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "adaptation_results" / "multiclass_heads.json"
HEADS = ("matched", "per_class")
DATASETS = ("cells", "anatomy")


def _dataset(name: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]], int]:
    """(training pairs, held-out pairs, K) as images and dense labels 0..K-1."""
    if name == "cells":
        from napari_convlora.data.samples import synthetic_cells

        return [synthetic_cells(384, seed=0)], [synthetic_cells(384, seed=1)], 3
    sys.path.insert(0, str(HERE))
    from adaptation_data import family_loaders

    family = family_loaders()[name]()
    assert family.label_mode == "dense" and family.class_values() == tuple(range(family.num_classes))
    return ([(im, lab) for im, lab, _ in family.train], [(h.image, h.labels) for h in family.held_out],
            family.num_classes)


def run_one(job: tuple[str, str, int, int, str]) -> dict[str, Any]:
    """Train one (dataset, head, seed) and score it; runs in its own process with one torch thread."""
    dataset, variant, seed, steps, work = job
    import torch

    torch.set_num_threads(1)
    from napari_convlora.checkpoints.builtin import builtin_checkpoint
    from napari_convlora.config import RunOptions, TrainRecipe
    from napari_convlora.data import ImageLayout, TrainingPair, prepare_training_data
    from napari_convlora.metrics import evaluate_arrays
    from napari_convlora.prediction.planes import predict_image
    from napari_convlora.training import losses, per_class_loss
    from napari_convlora.training.loop import train

    losses.per_class_loss = per_class_loss.per_class_loss  # set every time: never a previous job's patch
    if variant == "per_class_samed":
        losses.per_class_loss = lambda logits, targets: per_class_loss.per_class_loss(
            logits, targets, *per_class_loss.SAMED_WEIGHTS)
    head = "matched" if variant == "matched" else "per_class"
    train_pairs, held_out, num_classes = _dataset(dataset)
    recipe = TrainRecipe(input_size=256, lr=1e-3, steps=steps, batch_size=1, grad_accum=4, seed=seed,
                         multiclass_head=head)
    data = prepare_training_data([TrainingPair(im, lab, ImageLayout()) for im, lab in train_pairs], recipe)
    started, tick, intervals, validations, last_parts = time.perf_counter(), None, [], [], {}
    gen = train(builtin_checkpoint(), data, Path(work) / f"{dataset}-{variant}-{seed}.safetensors", recipe,
                RunOptions(device="cpu", num_threads=1))
    try:
        while True:
            event = next(gen)
            now = time.perf_counter()
            if event.kind == "step":
                if tick is not None:
                    intervals.append(now - tick)
                last_parts = event.parts
            if event.kind in ("start", "step"):
                tick = now
            if event.kind == "validation" and event.metrics:
                validations.append((event.step, event.metrics["mean_iou"]))
    except StopIteration as done:
        model = done.value
    train_s = time.perf_counter() - started
    assert model.config.head.multiclass == head and model.num_classes == num_classes
    preds = np.stack([predict_image(model, im, ImageLayout(), device="cpu").labels for im, _ in held_out])
    truth = np.stack([lab for _, lab in held_out]).astype(np.int64)
    metrics = evaluate_arrays(preds.astype(np.int64), truth, num_classes)
    tail = [m for _, m in validations[len(validations) // 2:]]
    return {"dataset": dataset, "head": variant, "seed": seed, "miou": metrics.mean_iou,
            "per_class_iou": metrics.per_class_iou, "validation": validations,
            "validation_std_last_half": float(np.std(tail)) if len(tail) > 1 else math.nan,
            "validation_checks": len(validations), "last_loss_parts": last_parts, "train_s": train_s,
            "step_s": float(np.median(intervals)) if intervals else math.nan,
            "trainable_params": int(sum(p.numel() for p in model.trainable_parameters()))}


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """(dataset/head) -> mIoU stats over seeds, per-class IoU means and stds, validation stability."""
    out = {}
    for key in sorted({(r["dataset"], r["head"]) for r in runs}):
        group = [r for r in runs if (r["dataset"], r["head"]) == key]
        per_class = np.array([r["per_class_iou"] for r in group], dtype=np.float64)
        out["/".join(key)] = {
            "miou": _stats([r["miou"] for r in group]),
            "per_class_iou_mean": np.nanmean(per_class, axis=0).tolist(),
            "per_class_iou_std": np.nanstd(per_class, axis=0).tolist(),
            "validation_std_last_half": _stats([r["validation_std_last_half"] for r in group]),
            "step_s": float(np.median([r["step_s"] for r in group])), "seeds": [r["seed"] for r in group]}
    return out


def markdown(summary: dict[str, dict[str, Any]]) -> str:
    lines = ["| data | head | mIoU mean ± std [min, max] | per-class IoU (mean over seeds) | val. mIoU std, last half "
             "(mean [max]) | s/step |", "|---|---|---|---|---|---|"]
    for key, s in summary.items():
        data, head = key.split("/")
        m, v = s["miou"], s["validation_std_last_half"]
        classes = " / ".join(f"{x:.2f}" for x in s["per_class_iou_mean"])
        lines.append(f"| {data} | {head} | {m['mean']:.3f} ± {m['std']:.3f} [{m['min']:.3f}, {m['max']:.3f}] | "
                     f"{classes} | {v['mean']:.3f} [{v['max']:.3f}] | {s['step_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--variants", nargs="+", default=list(HEADS), choices=HEADS + ("per_class_samed",))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--jobs", type=int, default=1, help="processes (one torch thread each)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--merge", action="store_true",
                   help="keep the runs already in --out that this call does not redo (the commands are listed)")
    p.add_argument("--work", type=Path, default=Path("/tmp/multiclass_heads"))
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [(d, v, s, args.steps, str(args.work)) for d in args.datasets for v in args.variants for s in args.seeds]
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:  # a fresh process a run
        runs = []
        for run in pool.imap_unordered(run_one, jobs):
            runs.append(run)
            print(f"{run['dataset']} {run['head']} seed {run['seed']}: mIoU {run['miou']:.3f}, val std "
                  f"{run['validation_std_last_half']:.3f}, {run['train_s']:.0f} s", flush=True)
    command = " ".join(["python", "benchmarks/multiclass_heads.py", *(argv if argv is not None else sys.argv[1:])])
    commands, notes = [command], []
    if args.merge and args.out.exists():
        done = {(r["dataset"], r["head"], r["seed"]) for r in runs}
        previous = json.loads(args.out.read_text())
        runs += [r for r in previous["runs"] if (r["dataset"], r["head"], r["seed"]) not in done]
        commands = previous.get("commands", [previous.get("command")]) + commands
        notes = previous.get("notes", [])
    runs.sort(key=lambda r: (r["dataset"], r["head"], r["seed"]))
    summary = summarise(runs)
    import torch

    record = {"benchmark": "multiclass_heads", "commands": commands,
              "config": {"base": "builtin (small_sam_256.pth)", "input_size": 256, "lr": 1e-3, "steps": args.steps,
                         "batch_size": 1, "grad_accum": 4, "threads_per_process": 1, "processes": args.jobs,
                         "device": "cpu", "torch": torch.__version__, "python": platform.python_version(),
                         "machine": platform.machine(), "cpu_count": multiprocessing.cpu_count()},
              "runs": runs, "summary": summary, "seconds_last_command": time.perf_counter() - started, "notes": notes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, allow_nan=True))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
