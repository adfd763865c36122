"""Blockwise prediction of an image on disk (Zarr) on a local dask cluster, against the in-memory tiled
prediction of the same image: throughput (tiles/s) and peak memory per worker.

The image: a synthetic ``--size`` x ``--size`` uint16 image (bright discs on a noisy ramp) written to a Zarr
store in 1024 x 1024 chunks, chunk by chunk (never whole in memory). The model: an adapter file (Conv-LoRA,
2 classes, input 256 px, trainable tensors moved away from their initial values) on ``--model tiny`` (the tests'
tiny random SAM, about 5 ms a tile on one core) or ``--model small`` (the built-in small SAM, about 27 ms a tile).

Runs, each timed on its own:

- ``blockwise``: ``prediction.blockwise.run.predict_blockwise`` on a ``LocalCluster`` of ``--workers`` worker processes, one
  thread each, torch on one thread per worker, blocks of ``--block-size``, batches of 4. Timed from the call to
  its return: the intensity-range pass over the image, the workers loading the model, every block read,
  predicted and written, the rename; starting the cluster is timed apart. Peak memory per worker: the worker
  process's ``ru_maxrss`` (everything it ever held: torch, the model, a block's input, labels and band).
- ``blockwise-1``: the same with one worker (``--one-worker``): the same compute as the in-memory run.
- ``in-memory``: in a fresh child process with torch on one thread: the whole image read into memory, then
  ``prediction.planes.predict_image`` (the same tile grid, batches of 4) timed; its peak memory (``ru_maxrss``); its labels
  compared pixel by pixel with the blockwise labels.

Throughput is the tile grid's tiles (``unique_tiles``) over the time: blocks predict about one extra row and column
of tiles each (the tiles they share with their neighbours), which is counted as a cost, not as work done.
``per_core_ratio = in-memory tiles/s / (blockwise tiles/s / workers)``, end to end (the range pass, the workers'
start and model loading included): the goal is <= 1.2. ``steady_ratio``: the block tasks' worker-seconds (model
loading left out; reading, shared tiles, blending and writing in) per grid tile, over the in-memory seconds per
tile: what blockwise costs per tile once running, whatever else runs on the machine's other core.

Run (CPU, what BENCHMARKS.md reports; about 4 minutes)::

    python benchmarks/bench_blockwise.py --size 16384 --workers 2 --block-size 4096 --model tiny --one-worker \\
        --json blockwise.json

It prints a table and a JSON record (``--json FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import _machine  # noqa: E402

CHUNK = 1024
BATCH = 4


def write_image(path: Path, size: int, seed: int = 0) -> None:
    """A ``size`` x ``size`` uint16 Zarr array of bright discs (radius 6-20 px) on a noisy ramp, chunk by chunk."""
    import zarr

    rng = np.random.default_rng(seed)
    array = zarr.create_array(str(path), shape=(size, size), chunks=(CHUNK, CHUNK), dtype=np.uint16, zarr_format=2)
    yy, xx = np.mgrid[0:CHUNK, 0:CHUNK]
    for y0 in range(0, size, CHUNK):
        for x0 in range(0, size, CHUNK):
            h, w = min(CHUNK, size - y0), min(CHUNK, size - x0)
            tile = 800.0 + 400.0 * (x0 + xx[:h, :w]) / size + rng.normal(0, 60, (h, w))
            for _ in range(40):
                cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(6, 21)
                tile[(yy[:h, :w] - cy) ** 2 + (xx[:h, :w] - cx) ** 2 < r * r] += 1500.0
            array[y0 : y0 + h, x0 : x0 + w] = np.clip(tile, 0, 65535).astype(np.uint16)


def write_model(folder: Path, which: str) -> tuple[Path, Path]:
    """An adapter file on the chosen base, and the base checkpoint."""
    import torch

    from napari_convlora import AdaptedSAM, load_base, save_adapter, tiny_sam_checkpoint
    from napari_convlora.checkpoints.builtin import builtin_checkpoint
    from napari_convlora.config import AdapterConfig, HeadConfig, ModelConfig

    checkpoint = tiny_sam_checkpoint(folder / "tiny_sam.pth", image_size=256, seed=0) if which == "tiny" \
        else builtin_checkpoint()
    base = load_base(checkpoint)
    config = ModelConfig(base=base.architecture, adapter=AdapterConfig(method="conv_lora"),
                         head=HeadConfig(num_classes=2), input_size=256, base_checkpoint=base.checkpoint)
    model = AdaptedSAM.from_base(base, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    return save_adapter(model.eval(), folder / "model.safetensors"), checkpoint


def run_blockwise(image: Path, out: Path, model: Path, checkpoint: Path, workers: int, block: int) -> dict[str, Any]:
    from napari_convlora.prediction.blockwise.run import ModelSource, predict_blockwise
    from napari_convlora.prediction.blockwise.cluster import dask_client
    from napari_convlora.io.zarr_stores import open_lazy

    start = time.perf_counter()
    with dask_client(workers=workers, memory_limit="auto") as client:
        started = time.perf_counter() - start
        baseline = client.run(_rss_after_imports)  # worker address -> RSS with torch and the package imported
        outcomes = []
        result = predict_blockwise(ModelSource.of(model, checkpoint, threads=1), open_lazy(image), out,
                                   batch_size=BATCH, block_size=block, client=client,
                                   progress=lambda done, total, outcome: outcomes.append(outcome))
    load = sum(o.load_seconds for o in outcomes)
    compute = sum(o.seconds for o in outcomes) - load  # worker-seconds reading, predicting and writing blocks
    return {"run": "blockwise" if workers > 1 else "blockwise-1", "workers": workers, "block_size": block,
            "cluster_start_s": started, "seconds": result.seconds, "ranges_s": result.ranges_seconds,
            "blocks": result.blocks, "tiles_predicted": result.tiles, "unique_tiles": result.unique_tiles,
            "tiles_per_s": result.unique_tiles / result.seconds, "model_load_s": load, "block_worker_s": compute,
            "block_ms_per_unique_tile": 1000 * compute / result.unique_tiles,
            "peak_rss_mib": sorted(v / 2**20 for v in result.peak_rss.values()),
            "rss_after_imports_mib": sorted(v / 2**20 for v in baseline.values())}


def _rss_after_imports() -> int:
    """A worker's resident memory once torch and the package are imported, before any block (bytes)."""
    import napari_convlora.prediction.blockwise.run  # noqa: F401
    import napari_convlora.prediction.planes  # noqa: F401

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_in_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """The in-memory run (in a fresh process): read, predict with ``predict_image``, compare with ``spec['labels']``."""
    import torch
    import zarr

    from napari_convlora import load_model
    from napari_convlora.prediction.blockwise.tiles import TileGrid
    from napari_convlora.prediction.planes import predict_image

    torch.set_num_threads(1)
    model = load_model(spec["model"], spec["checkpoint"])
    image = zarr.open(spec["image"], mode="r")[...]
    start = time.perf_counter()
    labels = predict_image(model, image, device="cpu", batch_size=BATCH).labels
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tiles = TileGrid.of(*image.shape, tile=model.input_size, overlap=0.25).unique_tiles
    del image
    differ = None
    if spec.get("labels"):
        other = zarr.open(spec["labels"], mode="r")[...]
        differ = int((other != labels).sum())
    return {"run": "in-memory", "workers": 1, "seconds": seconds, "unique_tiles": tiles, "tiles_per_s": tiles / seconds,
            "block_ms_per_unique_tile": 1000 * seconds / tiles,
            "peak_rss_mib": [peak], "labels_differing_from_blockwise": differ}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'run':<12} {'workers':>7} {'seconds':>8} {'tiles':>7} {'predicted':>9} {'tiles/s':>8} "
          f"{'per core':>8} {'ratio':>6} {'ms/tile':>8} {'ratio':>6} {'peak RSS MiB (per process)':>28} "
          f"{'after imports':>14}")
    for r in rows:
        per_core = r["tiles_per_s"] / r["workers"]
        ratio = f"{r['per_core_ratio']:.2f}" if "per_core_ratio" in r else "-"
        steady = f"{r['steady_ratio']:.2f}" if "steady_ratio" in r else "-"
        print(f"{r['run']:<12} {r['workers']:>7} {r['seconds']:>8.1f} {r['unique_tiles']:>7} "
              f"{r.get('tiles_predicted', r['unique_tiles']):>9} {r['tiles_per_s']:>8.1f} {per_core:>8.1f} {ratio:>6} "
              f"{r['block_ms_per_unique_tile']:>8.2f} {steady:>6} "
              f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mib']):>28} "
              f"{', '.join(f'{m:.0f}' for m in r.get('rss_after_imports_mib', [])):>14}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--one-worker", action="store_true", help="also run blockwise with one worker")
    parser.add_argument("--dir", default=None, help="where to write the image and outputs (default: a temporary "
                                                    "folder, removed at the end)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_in_memory(json.loads(args.child))))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench_blockwise."))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        load_start = os.getloadavg()
        start = time.perf_counter()
        image = folder / "image.zarr"
        if not image.exists():
            write_image(image, args.size)
        write_s = time.perf_counter() - start
        model, checkpoint = write_model(folder, args.model)
        rows = []
        for workers in ([args.workers] + ([1] if args.one_worker and args.workers != 1 else [])):
            out = folder / f"labels_{workers}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            rows.append(run_blockwise(image, out, model, checkpoint, workers, args.block_size))
        rows.append(run_child({"model": str(model), "checkpoint": str(checkpoint), "image": str(image),
                               "labels": str(folder / f"labels_{args.workers}.zarr")}))
        memory = rows[-1]
        for r in rows[:-1]:
            r["per_core_ratio"] = memory["tiles_per_s"] / (r["tiles_per_s"] / r["workers"])
            r["steady_ratio"] = r["block_ms_per_unique_tile"] / memory["block_ms_per_unique_tile"]
        record = {"benchmark": "blockwise", "machine": _machine(), "load_average_start": load_start,
                  "command": " ".join(sys.argv), "size": args.size, "model": args.model, "image_write_s": write_s,
                  "image_mib": args.size * args.size * 2 / 2**20, "rows": rows}
        print_table(rows)
        print(json.dumps(record))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=2)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
