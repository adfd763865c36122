"""The training loop and prediction on CUDA, end to end (part of ``gpu_suite.py``).

On a random-weight SAM in the vit_b geometry at 256 px, three-class synthetic cells:

- an uninterrupted run of ``--steps`` steps, and the same run stopped half-way and resumed: the largest
  difference between their final trained tensors says how exact resume is on this GPU (CUDA kernels such
  as ``index_add`` and the backward of ``interpolate`` use atomics and need not be bit-reproducible);
- both in bf16 autocast and in fp32;
- the trained model predicts a held-out image on CUDA and on the CPU: pixel agreement of the labels and
  the largest probability difference.

Run: ``python benchmarks/gpu_e2e.py --json e2e.json`` (needs CUDA).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from napari_convlora import load_model, random_sam, save_sam_checkpoint
from napari_convlora.config import AdapterConfig, RunOptions, TrainRecipe
from napari_convlora.data import TrainingPair, prepare_training_data
from napari_convlora.prediction.planes import predict_image
from napari_convlora.data.samples import synthetic_cells
from napari_convlora.training.loop import train


def _drive(gen, stop: threading.Event | None = None, stop_at: int | None = None):
    events = []
    try:
        while True:
            event = next(gen)
            events.append(event)
            if stop_at is not None and event.kind == "step" and event.step == stop_at:
                stop.set()
    except StopIteration as done:
        return events, done.value


def _max_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model-type", default="vit_b", help="vit_b (default) or tiny for a dry run")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only for a dry run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_e2e.py needs CUDA")
    work = Path(tempfile.mkdtemp())
    base = save_sam_checkpoint(random_sam(args.model_type, seed=0), work / "base_random.pth")
    image, labels = synthetic_cells(384, seed=0)
    test_image, _ = synthetic_cells(384, seed=1)
    recipe = TrainRecipe(adapter=AdapterConfig(method="conv_lora"), input_size=256, label_mode="dense",
                         val_fraction=0.15, steps=args.steps, batch_size=2, grad_accum=2, lr=1e-3,
                         val_every=args.steps // 2 or None, seed=0)
    data = prepare_training_data([TrainingPair(image, labels)], recipe)
    record: dict = {"model": f"{args.model_type} random weights, 256 px, conv_lora, 3 classes", "steps": args.steps}
    for precision in ("bf16", "fp32") if args.device == "cuda" else ("fp32",):
        run = RunOptions(device=args.device, precision=precision)
        full = work / f"full_{precision}.safetensors"
        start = time.perf_counter()
        events, model = _drive(train(base, data, full, recipe, run))
        seconds = time.perf_counter() - start
        steps = [e for e in events if e.kind == "step"]
        stop = threading.Event()
        part = work / f"part_{precision}.safetensors"
        _drive(train(base, data, part, recipe, run, stop=stop), stop, stop_at=args.steps // 2 + 1)
        resumed = work / f"resumed_{precision}.safetensors"  # the saved recipe, the same run options
        _drive(train(base, data, resumed, recipe, run, resume_from=part))
        record[precision] = {
            "run_s": seconds, "images_per_s_last": steps[-1].images_per_s,
            "loss_first": steps[0].loss, "loss_last": steps[-1].loss,
            "val_miou": [e.metrics["mean_iou"] for e in events if e.kind == "validation"],
            "resume_max_abs_diff": _max_diff(full, resumed),
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
        }
        if precision == "fp32":
            gpu = predict_image(load_model(full, base=base), test_image, device=args.device, return_probabilities=True)
            cpu = predict_image(load_model(full, base=base), test_image, device="cpu", return_probabilities=True)
            record["predict_cuda_vs_cpu"] = {
                "label_agreement": float((gpu.labels == cpu.labels).mean()),
                "max_prob_diff": float(np.abs(gpu.probabilities - cpu.probabilities).max()),
            }
        print(precision, json.dumps(record[precision]), flush=True)
    print(json.dumps(record))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
