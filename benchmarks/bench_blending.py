"""What blending costs ``predict_tiled`` beyond the model: numpy on the host against torch on a device.

``prob_fn`` hands back the same precomputed ``B x K x tile x tile`` probabilities for every batch (already on
the device, so no model time), and ``predict_tiled`` blends them over an ``--image-size`` square image. What is
timed is therefore cutting the tiles, the weighted sums and the copies of finished bands to the host. Each
repeat times every path once, in turn (the order alternates), in one process; the table gives medians:

- ``host``: the numpy sums on the host (``prediction.tiling.HOST_BLENDED``, the CPU's path);
- ``torch cpu``: the torch sums forced on the CPU (``HOST_BLENDED`` emptied): why the CPU keeps numpy;
- ``torch cuda``: probabilities left on CUDA and summed there (when CUDA is available), against ``host cuda``:
  the same probabilities copied to the host batch by batch and summed by numpy, as before issue 14's fix.

Run (CPU, one thread)::

    python benchmarks/bench_blending.py --threads 1 --tile 1024 --image-size 4096 --json blending.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from napari_convlora.prediction import tiling


def time_path(path: str, image: np.ndarray, tile: int, probs: torch.Tensor, overlap: float, batch: int) -> float:
    """Seconds of one ``predict_tiled`` call whose ``prob_fn`` returns (a slice of) ``probs``."""
    device = probs.device
    host_blended = tiling.HOST_BLENDED
    if path.startswith("torch"):
        tiling.HOST_BLENDED = frozenset()
    elif device.type != "cpu":
        tiling.HOST_BLENDED = frozenset({"cpu", device.type})
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        tiling.predict_tiled(lambda b: probs[: b.shape[0]], image, tile, probs.shape[1], overlap=overlap,
                             batch_size=batch)
        return time.perf_counter() - start  # the result is on the host: the device is done
    finally:
        tiling.HOST_BLENDED = host_blended


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--overlap", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="also write the JSON record to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    image = (rng.random((args.image_size, args.image_size, 3), dtype=np.float32) * 255).astype(np.float32)
    probs = torch.softmax(torch.randn(args.batch_size, args.classes, args.tile, args.tile,
                                      generator=torch.Generator().manual_seed(0)), dim=1)
    paths = {"host": probs, "torch cpu": probs}
    if torch.cuda.is_available():
        paths |= {"host cuda": probs.cuda(), "torch cuda": probs.cuda()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for repeat in range(args.repeats + 1):  # the first round warms up
        order = list(paths) if repeat % 2 == 0 else list(paths)[::-1]
        for name in order:
            seconds = time_path(name, image, args.tile, paths[name], args.overlap, args.batch_size)
            if repeat:
                times[name].append(seconds)
    rows = [{"path": name, "median_s": statistics.median(t), "min_s": min(t), "samples": t}
            for name, t in times.items()]
    record = {"benchmark": "blending", "command": " ".join(sys.argv), "tile": args.tile,
              "image_size": args.image_size, "classes": args.classes, "overlap": args.overlap,
              "batch_size": args.batch_size, "threads": torch.get_num_threads(), "rows": rows,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    print(f"blending {args.image_size}^2 in {args.tile} px tiles, K={args.classes}, overlap {args.overlap}, "
          f"batch {args.batch_size}, {record['threads']} threads, {args.repeats} repeats")
    for row in rows:
        print(f"{row['path']:>11}: median {row['median_s']:.3f} s, min {row['min_s']:.3f} s")
    print(json.dumps(record))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
