"""Peak memory (and time) of predicting one plane of a large stack, against predicting that plane alone.

``predict_image(model, stack, planes=[Z // 2], device="cpu")`` must prepare only the plane it predicts: the
image's intensity range is taken over the whole stack (a strided subsample), but no float copy of the
stack is made. Normalising the whole stack into float32 RGB planes first, as the code once did, costs
12 bytes per voxel: 1920 MiB for the default uint16 stack of 40 x 2048 x 2048 (320 MiB).

Two cases, each in a fresh subprocess (so that neither peak memory nor the allocator's free lists carry
over from one case to the other), on the same data:

- ``stack``: plane ``Z // 2`` of a uint16 ``Z x Y x X`` stack (``np.random.default_rng(0).integers``);
- ``plane``: the 2D plane ``stack[Z // 2]`` alone (a view of the same stack), predicted whole: the floor,
  what one plane's tiles, probabilities and labels take.

The model is ``AdaptedSAM`` on a tiny SAM with random weights (``random_base("tiny")``), Conv-LoRA, 3
classes, input 256 px, eval mode; prediction uses ``predict_image``'s defaults (tiles overlapping by 0.25,
batches of 4). Each child first predicts a small 256 x 256 image, untimed, so that torch's one-time
allocations (thread pools, kernels) do not count; then it measures the one call:

- memory: peak resident set size during the call minus the resident set right before it (Linux ``VmHWM``
  reset through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``, which cannot be reset, so it also counts
  building the model and the stack);
- time: wall time of the call.

Goal: the stack case takes at most half the stack's own size more than the 2D floor (``extra_mib``), so
that not even a copy of the stack in its own dtype fits, let alone a float one.

Run (CPU, about 15 seconds)::

    python benchmarks/bench_predict_memory.py --threads 1 --json predict_memory.json

``--image-sizes 1024 2048 4096 8192`` measures instead the peak memory of predicting 2D uint16 images of those
sides, next to the labels' own size (uint8: one byte per pixel): what prediction needs beyond its output.

It prints a table and a JSON record (``--json FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from napari_convlora import AdaptedSAM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import _machine, _peak_rss_mib, _reset_peak_rss, _rss_mib, run_child  # noqa: E402

CASES = ("stack", "plane")
NUM_CLASSES = 3
INPUT_SIZE = 256
#: float32 x RGB: what normalising an image into SAM's planes takes per voxel.
FLOAT_RGB_BYTES = 12


# --------------------------------------------------------------------------------------------------
# One case (runs in a child process)


def build_model() -> AdaptedSAM:
    """``AdaptedSAM`` on the tiny random SAM: Conv-LoRA, 3 classes, input 256 px, eval mode."""
    from napari_convlora import AdaptedSAM, random_base
    from napari_convlora.config import AdapterConfig, HeadConfig, ModelConfig

    base = random_base("tiny", seed=0)
    config = ModelConfig(base=base.architecture, adapter=AdapterConfig(method="conv_lora"),
                         head=HeadConfig(num_classes=NUM_CLASSES), input_size=INPUT_SIZE,
                         base_checkpoint=base.checkpoint)
    return AdaptedSAM(base.sam, config).eval()


def make_stack(z: int, size: int) -> np.ndarray:
    """A uint16 ``z x size x size`` stack of uniform random intensities (seed 0)."""
    return np.random.default_rng(0).integers(0, 2**16, size=(z, size, size), dtype=np.uint16)


def measure_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak-RSS delta and wall time of one ``predict_image`` call, in this (fresh) process."""
    import torch

    from napari_convlora.prediction.planes import predict_image

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = build_model()
    stack = make_stack(spec["z"], spec["size"])
    middle = spec["z"] // 2
    if spec["case"] == "stack":
        image, planes = stack, [middle]
    else:
        image, planes = stack[middle], None
    warm = np.random.default_rng(1).integers(0, 2**16, size=(INPUT_SIZE, INPUT_SIZE), dtype=np.uint16)
    predict_image(model, warm, device="cpu")  # warm-up: torch's one-time allocations
    gc.collect()

    rss_before = _rss_mib()
    resettable = _reset_peak_rss()
    start = time.perf_counter()
    prediction = predict_image(model, image, planes=planes, device="cpu")
    seconds = time.perf_counter() - start
    peak = _peak_rss_mib(resettable)

    predicted = prediction.labels[middle] if spec["case"] == "stack" else prediction.labels
    return {
        "case": spec["case"], "image_shape": list(image.shape), "image_dtype": str(image.dtype),
        "planes": planes, "image_mib": image.nbytes / 2**20,
        "float_rgb_mib": image.size * FLOAT_RGB_BYTES / 2**20,
        "rss_before_mib": rss_before, "peak_rss_mib": peak, "peak_delta_mib": peak - rss_before,
        "mem_kind": "peak RSS delta (VmHWM)" if resettable else "peak RSS delta (ru_maxrss)",
        "seconds": seconds, "threads": torch.get_num_threads(),
        "labels_shape": list(prediction.labels.shape),
        "classes_predicted": sorted(int(v) for v in np.unique(predicted)),
    }


# --------------------------------------------------------------------------------------------------
# Report


def print_table(record: dict[str, Any]) -> None:
    rows = {r["case"]: r for r in record["rows"]}
    print(f"tiny SAM, conv_lora, {NUM_CLASSES} classes, input {INPUT_SIZE} px; uint16 stack {record['z']} x "
          f"{record['size']} x {record['size']}; cpu, {record['threads']} threads")
    print(f"{'case':<22} {'image':>16} {'image MiB':>9} {'float RGB MiB':>13} {'peak MiB':>9} {'seconds':>8}")
    labels = {"stack": f"plane {record['z'] // 2} of the stack", "plane": "2D plane alone"}
    for case in CASES:
        r = rows[case]
        shape = " x ".join(str(n) for n in r["image_shape"])
        print(f"{labels[case]:<22} {shape:>16} {r['image_mib']:>9.1f} {r['float_rgb_mib']:>13.1f} "
              f"{r['peak_delta_mib']:>9.1f} {r['seconds']:>8.2f}")
    print(f"peak MiB: {rows['stack']['mem_kind']} of the predict_image call; float RGB MiB: a float32 RGB copy "
          f"of the whole image ({FLOAT_RGB_BYTES} bytes per voxel)")
    print(f"one plane of the stack - the 2D plane alone: {record['extra_mib']:+.1f} MiB (goal <= "
          f"{record['goal_mib']:.1f} MiB, half the stack: {'meets' if record['meets_goal'] else 'MISSES'})")


def by_image_size(sizes: list[int], threads: int) -> dict[str, Any]:
    """Peak memory of predicting 2D uint16 images of each size, beyond the labels' own bytes."""
    rows = []
    for size in sizes:
        row = run_child({"z": 1, "size": size, "threads": threads, "case": "plane"}, __file__)
        pixels = size * size
        row.update(size=size, bytes_per_pixel=row["peak_delta_mib"] * 2**20 / pixels,
                   labels_mib=pixels / 2**20, beyond_labels_mib=row["peak_delta_mib"] - pixels / 2**20)
        rows.append(row)
        print(f"  {size} x {size}: peak {row['peak_delta_mib']:.1f} MiB ({row['bytes_per_pixel']:.1f} bytes per "
              f"pixel), {row['seconds']:.1f} s", file=sys.stderr, flush=True)
    print(f"{'image':>13} {'labels MiB':>10} {'peak MiB':>9} {'beyond labels':>13} {'bytes/pixel':>11} {'seconds':>8}")
    for r in rows:
        print(f"{r['size']:>6} x {r['size']:<6} {r['labels_mib']:>10.1f} {r['peak_delta_mib']:>9.1f} "
              f"{r['beyond_labels_mib']:>13.1f} {r['bytes_per_pixel']:>11.2f} {r['seconds']:>8.1f}")
    return {"benchmark": "predict_memory_by_size", "machine": _machine(), "command": " ".join(sys.argv),
            "model_type": "tiny", "input_size": INPUT_SIZE, "num_classes": NUM_CLASSES, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 when the goal is missed: the benchmark asserts the memory bound."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--z", type=int, default=40, help="planes of the stack")
    parser.add_argument("--size", type=int, default=2048, help="Y = X of each plane")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=None,
                        help="instead: peak memory against the size of 2D images of these sides")
    parser.add_argument("--json", help="also write the JSON record to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(measure_case(json.loads(args.child))))
        return 0
    if args.image_sizes:
        record = by_image_size(args.image_sizes, args.threads)
        print(json.dumps(record))
        if args.json:
            Path(args.json).write_text(json.dumps(record, indent=2))
        return 0

    base = dict(z=args.z, size=args.size, threads=args.threads)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    for case in CASES:
        rows.append(run_child({**base, "case": case}, __file__))
        print(f"  {case}: peak {rows[-1]['peak_delta_mib']:.1f} MiB, {rows[-1]['seconds']:.2f} s",
              file=sys.stderr, flush=True)
    by_case = {r["case"]: r for r in rows}
    extra = by_case["stack"]["peak_delta_mib"] - by_case["plane"]["peak_delta_mib"]
    goal = by_case["stack"]["image_mib"] / 2
    record = {
        "benchmark": "predict_memory", "machine": _machine(), "command": " ".join(sys.argv),
        "load_average_start": load_start, "model_type": "tiny", "method": "conv_lora", "num_classes": NUM_CLASSES,
        "input_size": INPUT_SIZE, "z": args.z, "size": args.size, "device": "cpu",
        "threads": by_case["stack"]["threads"], "rows": rows,
        "extra_mib": extra, "goal_mib": goal, "meets_goal": extra <= goal,
    }
    print_table(record)
    print(json.dumps(record))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0 if record["meets_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
