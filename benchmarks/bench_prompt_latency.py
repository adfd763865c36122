"""Interactive prompting: how long one prompt takes once its plane's embedding is cached, and the first one.

``self_training.prompting.segment_prompt`` on an ``--image-size`` square plane (uint16 noise with bright discs): the first prompt of a
window computes and caches its image embedding (cold); every further prompt in that window decodes only (warm).
Reported per configuration: the cold time, and the median, min and max of ``--prompts`` warm box prompts and of as
many warm single-point prompts, each including the upsampling to the window and the plane-sized mask.

Models: the built-in small SAM (256 px) and random-weight vit_b geometry (``--sizes``), LoRA q/v adapters (WeSAM's)
on; nothing is downloaded. Run (CPU, what BENCHMARKS.md reports)::

    python benchmarks/bench_prompt_latency.py --threads 1 --json prompt_latency.json

On a GPU: ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _plane(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(1000, 50, (size, size))
    yy, xx = np.mgrid[:size, :size]
    for _ in range(12):
        cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(10, 40)]
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 800
    return np.clip(image, 0, 65535).astype(np.uint16)


def _model(name: str, size: int):
    from napari_convlora import AdaptedSAM, load_base, random_base
    from napari_convlora.checkpoints.builtin import builtin_checkpoint
    from napari_convlora.config import HeadConfig, ModelConfig, wesam_adapter
    from napari_convlora.config.model import PromptableAdaptation

    base = load_base(builtin_checkpoint()) if name == "small" else random_base(name)
    config = ModelConfig(base=base.architecture, adapter=wesam_adapter(), head=HeadConfig(), input_size=size,
                         base_checkpoint=base.checkpoint, promptable=PromptableAdaptation())
    return AdaptedSAM.from_base(base, config).eval()


def measure(name: str, size: int, image_size: int, prompts: int, device: str) -> dict:
    import torch

    from napari_convlora.self_training.prompting import EmbeddingCache, segment_prompt
    from napari_convlora.self_training.crops import CropPrompt

    model = _model(name, size).to(device)
    cache = EmbeddingCache(model, _plane(image_size), device=device)
    rng = np.random.default_rng(1)
    centre = image_size / 2

    def box() -> CropPrompt:
        x0, y0 = rng.uniform(centre - size / 4, centre, 2)
        return CropPrompt("box", np.array([x0, y0, x0 + size / 8, y0 + size / 8], np.float32))

    def point() -> CropPrompt:
        return CropPrompt("points", None, rng.uniform(centre - size / 4, centre + size / 4, (1, 2)).astype(np.float32))

    def timed(prompt: CropPrompt) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        segment_prompt(cache, 0, prompt)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    cold = timed(box())
    warm_box = [timed(box()) for _ in range(prompts)]
    warm_point = [timed(point()) for _ in range(prompts)]

    def stats(values: list[float]) -> dict:
        return {"median_ms": 1e3 * statistics.median(values), "min_ms": 1e3 * min(values), "max_ms": 1e3 * max(values)}

    return {"model": name, "input_size": size, "image_size": image_size, "device": device, "cold_ms": 1e3 * cold,
            "box": stats(warm_box), "point": stats(warm_point), "prompts": prompts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["small:256", "vit_b:512", "vit_b:1024"],
                        help="model:input_size (model: small, the built-in SAM, or vit_b / vit_l / vit_h / tiny)")
    parser.add_argument("--image-size", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = []
    print(f"{'model':<6} {'S':>5} {'cold ms':>9} {'box ms (median [min, max])':>30} {'point ms':>28}")
    for config in args.configs:
        name, size = config.split(":")
        r = measure(name, int(size), args.image_size, args.prompts, args.device)
        results.append(r)
        b, p = r["box"], r["point"]
        print(f"{name:<6} {r['input_size']:>5} {r['cold_ms']:>9.0f} {b['median_ms']:>12.1f} [{b['min_ms']:.1f}, "
              f"{b['max_ms']:.1f}] {p['median_ms']:>12.1f} [{p['min_ms']:.1f}, {p['max_ms']:.1f}]", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "prompt_latency", "threads": args.threads,
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
