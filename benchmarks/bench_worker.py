"""Training speed in the napari dock's worker thread vs the same steps run directly, and GUI responsiveness.

Each mode runs in a fresh process (OpenMP thread pools are per process and per thread):

- ``direct``: ``training.loop.train`` on the main thread of a process without Qt (like the CLI).
- ``dock``: the real dock widget in a shown napari viewer presses Train; torch runs on the compute thread.
- ``dock-after-main-torch``: as ``dock``, but the main thread trained a few steps first (so it owns an
  OpenMP pool, as after using torch in napari's console); the dock releases that pool before starting.
- ``naive-worker``: napari's plain ``thread_worker`` on Qt's global pool, after main-thread torch, without
  the fixes of ``_napari/native_libs.py``: the slowdown those fixes remove.

The modes run in rounds (all modes, then all again); before each run the script waits until the CPUs are
idle (``--min-idle``). The same configuration moves by about +-6 % from process to process on a shared
2-CPU machine, so the comparison is the median over rounds of each run's speed divided by the ``direct``
run of the same round; medians, best runs and every run are in the JSON. Steps per second
come from the loop's own clock (the last step event's ``images_per_s``, measured in the
training thread). The GUI modes also run a 10 ms ``QTimer`` on the main thread and report the longest gap
between its ticks while training (the Qt event loop must never be blocked for more than 100 ms).

Run (Qt's xcb platform under Xvfb, the way the GUI tests run)::

    xvfb-run -a python benchmarks/bench_worker.py --steps 300 --input-size 256

It prints a table and a JSON record (``--json FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from napari_convlora.config import RunOptions, TrainRecipe

MODES = ("direct", "dock", "dock-after-main-torch", "naive-worker")


def _recipe(args) -> TrainRecipe:
    """The training recipe of every mode (the dock is set to the same values)."""
    from napari_convlora.config import AdapterConfig, TrainRecipe
    from napari_convlora.data.samples import CLASS_NAMES

    return TrainRecipe(adapter=AdapterConfig(method="conv_lora"), input_size=args.input_size, label_mode="dense",
                       val_fraction=0.1, steps=args.steps, batch_size=1, grad_accum=1, lr=1e-3,
                       class_names=CLASS_NAMES, seed=0)


def _run_options(args) -> RunOptions:
    """CPU and ``--threads`` (the dock's own RunOptions come from its form, set to the same)."""
    from napari_convlora.config import RunOptions

    return RunOptions(device="cpu", num_threads=args.threads or None)


def _data(args):
    from napari_convlora.data import TrainingPair, prepare_training_data
    from napari_convlora.data.samples import synthetic_cells

    image, labels = synthetic_cells(384, seed=0)
    return image, labels, prepare_training_data([TrainingPair(image, labels)], _recipe(args))


def _steps_per_s(event, recipe: TrainRecipe) -> float:
    return event.images_per_s / recipe.patches_per_step


def run_direct(args, checkpoint: Path, out: Path) -> dict:
    from napari_convlora.training.loop import train

    recipe = _recipe(args)
    _, _, data = _data(args)
    last = None
    for event in train(checkpoint, data, out / "direct.safetensors", recipe, _run_options(args)):
        last = event if event.kind == "step" else last
    return {"steps_per_s": _steps_per_s(last, recipe)}


class GapMeter:
    """Longest interval between ticks of a 10 ms QTimer on the main thread, while ``active``."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.active, self.gaps, self.last = False, [], None
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self.tick)
        self.timer.start()

    def tick(self):
        now = time.perf_counter()
        if self.active and self.last is not None:
            self.gaps.append(now - self.last)
        self.last = now

    def summary(self) -> dict:
        gaps = sorted(self.gaps) or [0.0]
        return {"max_gap_ms": 1000 * gaps[-1], "p99_gap_ms": 1000 * gaps[int(0.99 * (len(gaps) - 1))],
                "median_gap_ms": 1000 * statistics.median(gaps), "ticks": len(self.gaps)}


def _wait(app, condition, timeout=600.0):
    """Run Qt's event loop (as napari does) until ``condition()`` holds."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop, end = QEventLoop(), time.time() + timeout
    check = QTimer()
    check.setInterval(50)
    check.timeout.connect(lambda: (condition() or time.time() > end) and loop.quit())
    check.start()
    if not condition():
        loop.exec()
    check.stop()
    if not condition():
        raise TimeoutError("benchmark timed out")


def run_gui(args, mode: str, checkpoint: Path, out: Path) -> dict:
    import napari
    from qtpy.QtCore import QCoreApplication, QSettings

    from napari_convlora._napari.native_libs import isolate_triton

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(out / "settings"))
    if mode == "naive-worker":  # no triton fix there: load torch's libraries before napari's OpenGL context
        import segment_anything  # noqa: F401
    viewer = napari.Viewer(show=True)
    app = QCoreApplication.instance()
    image, labels, data = _data(args)
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="cells labels")
    recipe, run = _recipe(args), _run_options(args)
    if mode != "dock":  # the main thread uses torch first: it now owns an OpenMP pool
        isolate_triton()  # napari's OpenGL context is up: see native_libs
        from napari_convlora.training.loop import train

        for _ in train(checkpoint, data, out / "main.safetensors", dataclasses.replace(recipe, steps=5), run):
            pass
    meter = GapMeter()
    events = []

    def on_event(event):
        if getattr(event, "kind", None) == "start":
            meter.active = True
        if getattr(event, "kind", None) == "step":
            events.append(event)
        if getattr(event, "kind", None) == "steps":  # the dock's batches of step events
            events.extend(event.events)
        if getattr(event, "kind", None) in ("finished", "stopped"):
            meter.active = False

    if mode == "naive-worker":
        from napari.qt.threading import thread_worker
        from napari_convlora.training.loop import train

        worker = thread_worker(train, start_thread=False)(checkpoint, data, out / "naive.safetensors", recipe, run)
        done = []
        worker.yielded.connect(on_event)
        worker.finished.connect(lambda: done.append(1))
        worker.start()
        _wait(app, lambda: done)
    else:
        _, widget = viewer.window.add_plugin_dock_widget("napari-convlora", "Conv-LoRA fine-tuning")
        _wait(app, lambda: not widget.workers)  # device probe
        widget.model_form.sam.set_path(str(checkpoint))
        _wait(app, lambda: not widget.workers)
        widget.model_form.input_size.setValue(args.input_size)
        widget.data_form.length.setValue(args.steps)
        options = widget.data_form.options  # the Advanced form (magicgui)
        options.batch_size.value = recipe.batch_size
        options.grad_accum.value = recipe.grad_accum
        options.lr.value = recipe.lr
        options.threads.value = args.threads
        options.run_folder.value = out / "runs"
        widget.model_form.device.setCurrentIndex(widget.model_form.device.findData("cpu"))
        shown = widget._on_event  # the dock's own handler (progress bar, plot, log) still runs
        widget._on_event = lambda event: (on_event(event), shown(event))
        widget.train()
        _wait(app, lambda: not widget.workers)
    _wait(app, lambda: len(events) >= args.steps, 10)  # yielded signals are queued
    result = {"steps_per_s": _steps_per_s(events[-1], recipe), **meter.summary()}
    viewer.close()
    return result


def wait_for_idle_cpus(min_idle: float, timeout_s: float = 900.0) -> float:
    """On a shared machine, wait until the CPUs are at least ``min_idle`` idle over one second (Linux;
    returns at once elsewhere). Returns the idle fraction seen."""
    def snapshot():
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return values[3] + values[4], sum(values)

    if min_idle <= 0 or not Path("/proc/stat").exists():
        return float("nan")
    end, idle = time.time() + timeout_s, 0.0
    while time.time() < end:
        (idle0, total0), _ = snapshot(), time.sleep(1.0)
        idle1, total1 = snapshot()
        idle = (idle1 - idle0) / max(1, total1 - total0)
        if idle >= min_idle:
            break
    return idle


def child(args) -> None:
    out = Path(args.out)
    checkpoint = out / "tiny_sam.pth"
    result = run_direct(args, checkpoint, out) if args.mode == "direct" else run_gui(args, args.mode, checkpoint, out)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds over the modes")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--min-idle", type=float, default=0.9,
                        help="before each run, wait until the CPUs are this idle (0: do not wait)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        return child(args)

    from napari_convlora import tiny_sam_checkpoint

    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        tiny_sam_checkpoint(Path(tmp) / "tiny_sam.pth", image_size=256)
        for _ in range(args.repeats):  # rounds over all modes, so that load from other processes hits all alike
            for mode in modes:
                command = [sys.executable, __file__, "--mode", mode, "--out", tmp, "--steps", str(args.steps),
                           "--input-size", str(args.input_size), "--threads", str(args.threads)]
                idle = wait_for_idle_cpus(args.min_idle)
                done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
                line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
                if not line:
                    sys.exit(f"{mode} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
                runs[mode].append({**json.loads(line[-1][7:]), "idle_before": round(idle, 2)})
    results: dict[str, dict] = {}
    for mode, mode_runs in runs.items():
        speeds = [r["steps_per_s"] for r in mode_runs]
        results[mode] = {"best_steps_per_s": max(speeds), "median_steps_per_s": statistics.median(speeds),
                         "all_steps_per_s": [round(s, 2) for s in speeds], "runs": mode_runs}
        if "max_gap_ms" in mode_runs[0]:
            results[mode]["worst_max_gap_ms"] = max(r["max_gap_ms"] for r in mode_runs)
            results[mode]["worst_p99_gap_ms"] = max(r["p99_gap_ms"] for r in mode_runs)
        if "direct" in runs:  # each round's run against the direct run of the same round
            pairs = [r["steps_per_s"] / d["steps_per_s"] for r, d in zip(mode_runs, runs["direct"])]
            results[mode]["paired_ratios"] = [round(x, 3) for x in pairs]
            results[mode]["median_paired_ratio"] = statistics.median(pairs)
            results[mode]["ratio_of_medians"] = statistics.median(speeds) / statistics.median(
                [d["steps_per_s"] for d in runs["direct"]])
    print(f"\ntiny SAM, {args.input_size} px, {args.steps} steps, {os.cpu_count()} CPUs, "
          f"torch threads {args.threads or 'default'}, {args.repeats} rounds")
    print("vs direct: median over rounds of (run / direct run of the same round); gaps: worst over all rounds")
    print(f"{'mode':24s} {'median/s':>9s} {'best/s':>8s} {'vs direct':>10s} {'max gap':>9s} {'p99 gap':>9s}")
    for mode, r in results.items():
        ratio = f"{r['median_paired_ratio']:.3f}" if "median_paired_ratio" in r else "-"
        gap = f"{r['worst_max_gap_ms']:.0f} ms" if "worst_max_gap_ms" in r else "-"
        p99 = f"{r['worst_p99_gap_ms']:.0f} ms" if "worst_p99_gap_ms" in r else "-"
        print(f"{mode:24s} {r['median_steps_per_s']:9.2f} {r['best_steps_per_s']:8.2f} {ratio:>10s} {gap:>9s} {p99:>9s}")
    record = {"steps": args.steps, "input_size": args.input_size, "cpus": os.cpu_count(),
              "threads": args.threads or None, "results": results}
    print(json.dumps(record, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
