"""Training speed on CPUs that other processes keep busy: torch's default threads, one thread, and the automatic
choice (``devices.cpu_threads``), measured in the same run under the same artificial load.

``--load N`` busy processes (each a Python loop) run in the background for the whole benchmark. After
``--settle`` seconds (the automatic choice reads the 1-minute load average, which takes about a minute to rise),
each mode trains the tiny SAM (random weights, Conv-LoRA, 256 px, batch 1) for ``--steps`` optimizer steps in a
fresh process, through ``training.loop.train`` as the dock and the command line do; the modes alternate over ``--rounds``
rounds, in reversed order every other round. Reported: steps per second (the loop's own clock, after the first step), median over rounds, and the
threads each mode used.

Run (CPU; about 5 minutes on 2 cores)::

    python benchmarks/bench_busy_cpu.py --load 2 --steps 20 --rounds 2 --json busy_cpu.json

It prints a table and a JSON record (``--json FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = {"default": 0, "one": 1, "auto": None}  # num_threads: 0 = torch's default (forced), None = automatic


def run_mode(spec: dict[str, Any]) -> dict[str, Any]:
    """Train in this (fresh) process and report speed and threads."""
    import torch

    from napari_convlora import tiny_sam_checkpoint
    from napari_convlora.config import RunOptions, TrainRecipe
    from napari_convlora.data import TrainingPair, prepare_training_data
    from napari_convlora.data.samples import synthetic_cells
    from napari_convlora.training.loop import train

    work = Path(tempfile.mkdtemp())
    checkpoint = tiny_sam_checkpoint(work / "tiny.pth")
    image, labels = synthetic_cells(384, seed=0)
    recipe = TrainRecipe(input_size=256, steps=spec["steps"], batch_size=1, grad_accum=1, lr=1e-3,
                         val_every=spec["steps"], val_fraction=0.1)
    data = prepare_training_data([TrainingPair(image, labels)], recipe)
    threads = spec["threads"]
    run = RunOptions(device="cpu", num_threads=torch.get_num_threads() if threads == 0 else threads)
    times, note = [], ""
    last = None
    for event in train(checkpoint, data, work / "m.safetensors", recipe, run):
        if event.kind == "start":
            note = event.message
        if event.kind == "step":
            now = time.perf_counter()
            if last is not None:
                times.append(now - last)
            last = now
    return {"mode": spec["mode"], "threads_used": torch.get_num_threads(), "start_message": note,
            "steps_per_s": 1.0 / statistics.median(times), "step_s_median": statistics.median(times)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=int, default=2, help="busy background processes")
    parser.add_argument("--settle", type=float, default=75.0, help="seconds of load before the first measurement")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the JSON record to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(json.loads(args.child))))
        return

    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        time.sleep(args.settle)
        rows = []
        for round_index in range(args.rounds):
            order = list(MODES.items()) if round_index % 2 == 0 else list(MODES.items())[::-1]  # no mode always last
            for mode, threads in order:
                spec = {"mode": mode, "threads": threads, "steps": args.steps}
                before = os.getloadavg()[0]
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(out.stderr[-3000:])
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row.update(round=round_index, load_average=before)
                rows.append(row)
                print(f"  round {round_index} {mode}: {row['steps_per_s']:.2f} steps/s with {row['threads_used']} "
                      f"thread(s) (load {before:.1f})", file=sys.stderr, flush=True)
    finally:
        for process in load:
            process.kill()
    summary = {}
    for mode in MODES:
        speeds = [r["steps_per_s"] for r in rows if r["mode"] == mode]
        summary[mode] = {"median_steps_per_s": statistics.median(speeds), "speeds": speeds,
                         "threads": sorted({r["threads_used"] for r in rows if r["mode"] == mode})}
    record = {"benchmark": "busy_cpu", "cpus": os.cpu_count(), "background_processes": args.load,
              "steps": args.steps, "rounds": args.rounds, "command": " ".join(sys.argv), "rows": rows,
              "summary": summary}
    print(f"{'mode':<8} {'threads':>8} {'median steps/s':>15} {'vs one thread':>14}")
    one = summary["one"]["median_steps_per_s"]
    for mode, entry in summary.items():
        print(f"{mode:<8} {','.join(map(str, entry['threads'])):>8} {entry['median_steps_per_s']:>15.2f} "
              f"{entry['median_steps_per_s'] / one:>14.2f}")
    print(json.dumps(record))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
