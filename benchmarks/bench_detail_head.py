"""What the detail head costs (issue 22): training-step and prediction time of the built-in small SAM with and
without the full-resolution correction of its masks, measured in alternation so that the machine's load cancels
out of the ratio.

Two models on the built-in SAM (Conv-LoRA defaults, ``--classes`` classes: 2 is a binary head, 3 or more the per-class
head), the same but for ``HeadConfig.detail``. A training step is the loop's: forward, ``segmentation_loss``
against a random label map, backward, AdamW step. A prediction is ``class_probabilities`` of one patch without
gradients. Each of ``--steps`` rounds times one of each, in alternating order; the script prints the median times and
the median of the per-round ratios (with, without).

    OMP_NUM_THREADS=1 python benchmarks/bench_detail_head.py --threads 1 --steps 20 --classes 2 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from napari_convlora import AdaptedSAM, load_base
from napari_convlora.checkpoints.builtin import builtin_checkpoint
from napari_convlora.config import HeadConfig, ModelConfig
from napari_convlora.training.losses import segmentation_loss


def build(classes: int, detail: bool, size: int) -> AdaptedSAM:
    base = load_base(builtin_checkpoint())
    head = HeadConfig(num_classes=classes, multiclass="per_class", detail=detail)
    return AdaptedSAM.from_base(base, ModelConfig(base=base.architecture, head=head, input_size=size,
                                                  base_checkpoint=base.checkpoint))


def timed_step(model: AdaptedSAM, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               targets: torch.Tensor) -> float:
    started = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = segmentation_loss(model(images), targets, model.num_classes)["total"]
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


@torch.no_grad()
def timed_prediction(model: AdaptedSAM, images: torch.Tensor) -> float:
    started = time.perf_counter()
    model.eval()
    model.class_probabilities(images)
    return time.perf_counter() - started


def measure(classes: int, size: int, steps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, size, size, generator=g) * 255
    targets = torch.randint(0, classes, (1, size, size), generator=g)
    models = {on: build(classes, on, size) for on in (True, False)}
    optimizers = {on: torch.optim.AdamW(m.trainable_parameters(), lr=1e-3) for on, m in models.items()}
    times: dict[str, dict[bool, list[float]]] = {"step": {True: [], False: []}, "predict": {True: [], False: []}}
    for round_ in range(steps + 2):
        order = (True, False) if round_ % 2 == 0 else (False, True)
        for on in order:
            step = timed_step(models[on], optimizers[on], images, targets)
            predict = timed_prediction(models[on], images)
            if round_ >= 2:  # two warm-up rounds
                times["step"][on].append(step)
                times["predict"][on].append(predict)
    result = {"classes": classes, "input_size": size, "steps": steps,
              "detail_parameters": sum(p.numel() for p in models[True].detail_head.parameters())}
    for kind, pair in times.items():
        result[f"{kind}_with_s"] = statistics.median(pair[True])
        result[f"{kind}_without_s"] = statistics.median(pair[False])
        result[f"{kind}_ratio"] = statistics.median(a / b for a, b in zip(pair[True], pair[False]))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(k, args.size, args.steps) for k in args.classes]
    print("| classes | detail head parameters | step with / without (s) | step ratio | prediction with / without "
          "(s) | prediction ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['classes']} | {r['detail_parameters']:,} | {r['step_with_s']:.3f} / {r['step_without_s']:.3f} | "
              f"{r['step_ratio']:.2f} | {r['predict_with_s']:.4f} / {r['predict_without_s']:.4f} | "
              f"{r['predict_ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "threads": args.threads, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
