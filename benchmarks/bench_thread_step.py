"""Training driven from a plain Python thread vs the main thread: the dock's compute thread, without Qt.

The dock trains by driving ``napari_convlora.training.loop.train`` (a generator) on one long-lived compute thread
(``_qt/compute.py``: a single-thread ``QThreadPool``) while napari's event loop runs on the main thread.
``bench_worker.py`` measures the real dock, but it needs napari, Qt and a display (Xvfb), and the GPU machines
here have none of them. This script drives the same generator, with the same recipe, three ways in one process:

- ``main``: on the main thread (as the CLI does);
- ``thread``: in a ``threading.Thread`` while the main thread waits in ``join`` (the compute thread while
  napari's event loop sleeps);
- ``thread+ticks``: in a ``threading.Thread`` while the main thread wakes every 10 ms (as a 10 ms ``QTimer``
  in Qt's event loop would) and records the gaps between its wake-ups during the steps: the longest gap says
  how long the training thread kept the GIL from the GUI's thread.

A round runs every mode once (the order reversed every other round). Steps per second of a run come from the
times its step events reach the code that drives the generator, leaving out the first ``--skip`` steps (CUDA's
lazy initialisation, kernel selection); validation runs once, after the last step, and is not timed. Each mode
is reported as the median over rounds and the median of its per-round ratio to ``main``.

What it does not cover: Qt's queued signals (every event the generator yields becomes a signal handled on the
main thread, where the dock updates its progress bar, loss plot and log, and batches step events), napari's
drawing, ``QThread`` rather than ``threading.Thread`` (both are OS threads under the same GIL), and the
CPU-side matters of ``_napari/native_libs.py`` (one OpenMP pool per thread: on the CPU the thread modes here
start a second pool; ``bench_worker.py`` measures that case in separate processes).

Run (CUDA; ``--model-type tiny --device cpu --input-size 64`` for a dry run)::

    python benchmarks/bench_thread_step.py --model-type vit_b --device cuda --input-size 1024 --steps 20 \\
        --rounds 2 --json thread_step.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

MODES = ("main", "thread", "thread+ticks")
TICK_S = 0.010


def _data(input_size: int, steps: int):
    """Synthetic cells (384 px, tiled to cover 1.1 x the input size) prepared for a Conv-LoRA recipe of ``steps``
    steps at batch 1, validated once at the end."""
    import numpy as np

    from napari_convlora.config import AdapterConfig, TrainRecipe
    from napari_convlora.data import TrainingPair, prepare_training_data
    from napari_convlora.data.samples import synthetic_cells

    image, labels = synthetic_cells(384, seed=0)
    reps = max(1, math.ceil(1.1 * input_size / 384))
    image, labels = np.tile(image, (reps, reps)), np.tile(labels, (reps, reps))
    recipe = TrainRecipe(adapter=AdapterConfig(method="conv_lora"), input_size=input_size, label_mode="dense",
                         val_fraction=0.1, steps=steps, batch_size=1, grad_accum=1, lr=1e-4, val_every=steps, seed=0)
    return recipe, prepare_training_data([TrainingPair(image, labels)], recipe)


def drive(events: Iterator[Any]) -> dict[str, Any]:
    """Run a training generator to its end: when each step event arrived, and the loop's own last rate."""
    arrivals, last = [], None
    for event in events:
        if event.kind == "step":
            arrivals.append(time.perf_counter())
            last = event
    return {"arrivals": arrivals, "loop_images_per_s": last.images_per_s if last else None}


def run_mode(mode: str, make: Callable[[], Iterator[Any]]) -> dict[str, Any]:
    """One run of ``mode``: the generator ``make()`` driven on this thread or on a new one."""
    if mode == "main":
        return drive(make())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box.update(drive(make()))
        except BaseException as error:  # re-raised on the main thread
            box["error"] = error

    worker = threading.Thread(target=target, name="compute")
    ticks = []
    worker.start()
    if mode == "thread":
        worker.join()
    else:
        while worker.is_alive():
            time.sleep(TICK_S)
            ticks.append(time.perf_counter())
        worker.join()
    if "error" in box:
        raise box["error"]
    return {**box, "ticks": ticks} if mode == "thread+ticks" else box


def summarise(run: dict[str, Any], skip: int) -> dict[str, Any]:
    """Steps per second after ``skip`` steps and, with ticks, the main thread's gaps during those steps."""
    timed = run["arrivals"][skip:]
    out = {"steps_per_s": (len(timed) - 1) / (timed[-1] - timed[0]), "loop_images_per_s": run["loop_images_per_s"]}
    if "ticks" in run:
        ticks = [t for t in run["ticks"] if timed[0] <= t <= timed[-1]]
        gaps = sorted(b - a for a, b in zip(ticks, ticks[1:])) or [0.0]
        out.update(max_gap_ms=1000 * gaps[-1], p99_gap_ms=1000 * gaps[int(0.99 * (len(gaps) - 1))],
                   median_gap_ms=1000 * statistics.median(gaps), ticks=len(gaps))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", default="vit_b", help="random-weight SAM: vit_b, vit_l, vit_h or tiny")
    parser.add_argument("--device", default="cuda", help="cuda (default), cpu for a dry run")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA), fp32, bf16, fp16")
    parser.add_argument("--input-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="steps per run (at least --skip + 2)")
    parser.add_argument("--skip", type=int, default=3, help="first steps of each run left out of its rate")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the modes")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--json", help="also write the JSON record here")
    args = parser.parse_args(argv)
    if args.steps < args.skip + 2:
        parser.error("--steps must be at least --skip + 2")

    import torch

    from napari_convlora import random_sam, save_sam_checkpoint
    from napari_convlora.config import RunOptions
    from napari_convlora.training.loop import train

    run_options = RunOptions(device=args.device, precision=args.precision)
    recipe, data = _data(args.input_size, args.steps)
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        base = save_sam_checkpoint(random_sam(args.model_type, seed=0), Path(tmp) / "base.pth")
        for round_ in range(args.rounds):
            order = args.modes if round_ % 2 == 0 else args.modes[::-1]
            for mode in order:
                out = Path(tmp) / f"{mode.replace('+', '_')}_{round_}.safetensors"
                result = summarise(run_mode(mode, lambda: train(base, data, out, recipe, run_options)), args.skip)
                runs[mode].append({"round": round_, **result})
                print(f"round {round_} {mode}: {result['steps_per_s']:.2f} steps/s", file=sys.stderr, flush=True)
    results = {}
    for mode, mode_runs in runs.items():
        speeds = [r["steps_per_s"] for r in mode_runs]
        entry: dict[str, Any] = {"median_steps_per_s": statistics.median(speeds), "runs": mode_runs}
        if "main" in runs:
            entry["median_ratio_to_main"] = statistics.median(
                r["steps_per_s"] / m["steps_per_s"] for r, m in zip(mode_runs, runs["main"]))
        if "max_gap_ms" in mode_runs[0]:
            entry["worst_max_gap_ms"] = max(r["max_gap_ms"] for r in mode_runs)
        results[mode] = entry
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device.startswith("cuda") else None
    record = {"benchmark": "thread_step", "gpu": gpu, "device": args.device, "torch": torch.__version__,
              "model_type": args.model_type, "method": "conv_lora", "input_size": args.input_size, "batch_size": 1,
              "precision": args.precision, "steps": args.steps, "skip": args.skip, "rounds": args.rounds,
              "command": " ".join(sys.argv), "results": results}
    print(f"{'mode':<14} {'steps/s':>8} {'vs main':>8} {'max gap':>9}")
    for mode, r in results.items():
        ratio = f"{r['median_ratio_to_main']:.3f}" if "median_ratio_to_main" in r else "-"
        gap = f"{r['worst_max_gap_ms']:.0f} ms" if "worst_max_gap_ms" in r else "-"
        print(f"{mode:<14} {r['median_steps_per_s']:>8.2f} {ratio:>8} {gap:>9}")
    print(json.dumps(record))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
