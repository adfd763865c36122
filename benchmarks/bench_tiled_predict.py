"""Tiled prediction of a large image against the encoder time of its tiles alone.

``predict_tiled`` (with ``make_prob_fn(model, device)``, i.e. ``model.class_probabilities``) runs on a
random ``--image-size`` square RGB image (float32, 0..255), with overlap 0 and overlap 0.25. Its baseline
is ``model.encode`` on the very same tiles in the same batches (``--batch-size``), tiles cut beforehand
and not timed. ``ratio = tiled time / encoder time``: what decoding, probabilities, blending and
bookkeeping add to the encoder. Goal: at most 1.1 with overlap 0. With overlap 0.25 there are more
tiles (the table gives the counts), so the time against the non-overlapping encoder time
(``vs_overlap0_encoder``) shows what the overlap itself costs.

Two passes timed minutes apart differ by several percent on a busy machine, which is as much as the
overhead being measured. So the tiled pass also times, inside itself, the image encoder (forward
hooks on ``model.sam.image_encoder``) and each ``prob_fn`` call: ``ratio_in_pass = tiled time /
encoder time in that pass``, ``decode`` = (``prob_fn`` - encoder) / encoder (decoder, upsampling,
probabilities) and ``blend`` = (tiled - ``prob_fn``) / encoder (cutting tiles, blending windows,
accumulation, normalisation, the copy of finished bands to the host) are immune to load that changes between
passes. On CUDA or MPS the tiles are blended on the device (``prediction.tiling.BandSums``; ``blending`` in the record says
where): ``prob_fn`` returns its probabilities there and is timed up to a device sync, not a copy to the host.
Those syncs and the encoder hooks keep the host from cutting the next batch while the device computes, so each
repeat also times a plain pass (no hooks, no syncs but the one copy per finished band): ``plain_s`` and
``ratio_plain = plain_s / encoder_s``, the time a user waits.

Each repeat times, for each overlap, the encoder pass then the tiled pass; the table shows medians over
``--repeats`` and the median of the per-repeat ratios. The model is SAM with random weights
(``random_base``) adapted by ``AdaptedSAM``, in eval mode. Conv-LoRA's gate starts at zero, which in eval
mode sends every window to the first expert (scale 1, no resizing); ``--gate random`` (the default) draws
its weights from N(0, 1) so that windows spread over the experts as in a trained model (the expert counts
are reported).

Run (CPU, what ``BENCHMARKS.md`` reports)::

    python benchmarks/bench_tiled_predict.py --model-type vit_b --input-size 256 --image-size 2048 --threads 1 \\
        --json tiled_predict.json

It prints a table and a JSON record (``--json FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import _machine  # noqa: E402

from napari_convlora import AdaptedSAM, random_base  # noqa: E402
from napari_convlora.adapters.layers import ConvLoRALinear  # noqa: E402
from napari_convlora.config import AdapterConfig, HeadConfig, ModelConfig  # noqa: E402
from napari_convlora.devices import resolve_device  # noqa: E402
from napari_convlora.prediction.planes import make_prob_fn  # noqa: E402
from napari_convlora.prediction.tiling import HOST_BLENDED, predict_tiled, tile_starts  # noqa: E402

RATIO_GOAL = 1.1
OVERLAPS = (0.0, 0.25)


def build_model(model_type: str, method: str, size: int, device: torch.device, gate: str) -> AdaptedSAM:
    """SAM with random weights (``random_base``) adapted by ``method`` at input ``size``, binary head, eval mode;
    ``gate="random"`` draws Conv-LoRA's gate weights from N(0, 1)."""
    base = random_base(model_type, seed=0)
    model = AdaptedSAM(base.sam, ModelConfig(base=base.architecture, adapter=AdapterConfig(method=method),
                                             head=HeadConfig(num_classes=2), input_size=size,
                                             base_checkpoint=base.checkpoint))
    if gate == "random":
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, ConvLoRALinear):
                    m.gate.w_gate.copy_(torch.randn(m.gate.w_gate.shape, generator=g))
    return model.to(device).eval()


def count_experts(model: torch.nn.Module) -> Counter:
    """Hooks that count, per expert scale, how many rows (images or windows) each expert received."""
    counts: Counter = Counter()
    for m in model.modules():
        if isinstance(m, ConvLoRALinear):
            for expert in m.experts:
                expert.register_forward_hook(lambda mod, inp, out: counts.update({mod.scale: inp[0].shape[0]}))
    return counts


def tile_batches(image: np.ndarray, tile: int, overlap: float, batch_size: int) -> list[torch.Tensor]:
    """The tiles ``predict_tiled`` feeds its ``prob_fn``, in the same batches (B x 3 x tile x tile)."""
    ys, xs = tile_starts(image.shape[0], tile, overlap), tile_starts(image.shape[1], tile, overlap)
    tiles = [image[y : y + tile, x : x + tile] for y in ys for x in xs]
    return [
        torch.from_numpy(np.ascontiguousarray(np.stack(tiles[i : i + batch_size]).transpose(0, 3, 1, 2)))
        for i in range(0, len(tiles), batch_size)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_encoder(model, batches: list[torch.Tensor], device: torch.device) -> float:
    """Seconds of ``model.encode`` (the ``ImageFeatures`` it returns are dropped) over all batches, inputs moved
    to the device like ``prob_fn`` does."""
    total = 0.0
    with torch.inference_mode():
        for batch in batches:
            _sync(device)
            start = time.perf_counter()
            model.encode(batch.to(device, non_blocking=True))
            _sync(device)
            total += time.perf_counter() - start
    return total


def time_tiled(model, image: np.ndarray, tile: int, overlap: float, batch_size: int, device) -> dict[str, float]:
    """Seconds of the whole ``predict_tiled`` call, of its ``prob_fn`` calls and of the image encoder
    inside them (forward hooks on ``model.sam.image_encoder``); the tile count."""
    prob_fn = make_prob_fn(model, device)
    spent = {"prob_fn_s": 0.0, "encoder_in_pass_s": 0.0, "tiles": 0}
    encoder = model.sam.image_encoder

    def encoder_start(module, inputs) -> None:
        _sync(device)
        spent["_encoder_start"] = time.perf_counter()

    def encoder_end(module, inputs, output) -> None:
        _sync(device)
        spent["encoder_in_pass_s"] += time.perf_counter() - spent.pop("_encoder_start")

    def timed_prob_fn(batch: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = prob_fn(batch)  # left on the device, where predict_tiled blends it
        _sync(device)
        spent["prob_fn_s"] += time.perf_counter() - start
        return out

    def progress(done: int, total: int) -> None:
        spent["tiles"] = total

    hooks = [encoder.register_forward_pre_hook(encoder_start), encoder.register_forward_hook(encoder_end)]
    try:
        start = time.perf_counter()
        predict_tiled(timed_prob_fn, image, tile, model.num_classes, overlap=overlap, batch_size=batch_size,
                      progress=progress)
        spent["tiled_s"] = time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()
    return spent


def time_plain(model, image: np.ndarray, tile: int, overlap: float, batch_size: int, device) -> float:
    """Seconds of ``predict_tiled`` as the plugin runs it: no hooks, no sync but its copies to the host."""
    prob_fn = make_prob_fn(model, device)
    _sync(device)
    start = time.perf_counter()
    predict_tiled(prob_fn, image, tile, model.num_classes, overlap=overlap, batch_size=batch_size)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)  # the adapters' A matrices, hence the routing of windows to experts
    model = build_model(args.model_type, args.method, args.input_size, device, args.gate)
    counts = count_experts(model)
    rng = np.random.default_rng(0)
    image = (rng.random((args.image_size, args.image_size, 3), dtype=np.float32) * 255).astype(np.float32)
    batches = {ov: tile_batches(image, args.input_size, ov, args.batch_size) for ov in OVERLAPS}

    time_encoder(model, batches[0.0][:1], device)  # warm-up
    time_tiled(model, image[: args.input_size, : args.input_size], args.input_size, 0.0, 1, device)
    samples: dict[float, list[dict[str, float]]] = {ov: [] for ov in OVERLAPS}
    for repeat in range(args.repeats):
        for ov in OVERLAPS:
            encoder_s = time_encoder(model, batches[ov], device)
            counts.clear()
            sample = {"encoder_s": encoder_s, **time_tiled(model, image, args.input_size, ov, args.batch_size, device)}
            sample["expert_rows"] = {str(k): v for k, v in sorted(counts.items())}
            sample["plain_s"] = time_plain(model, image, args.input_size, ov, args.batch_size, device)
            samples[ov].append(sample)
            print(f"  repeat {repeat + 1} overlap {ov}: tiled {sample['tiled_s']:.1f} s, encoder "
                  f"{encoder_s:.1f} s ({sample['tiles']} tiles)", file=sys.stderr, flush=True)

    rows = []
    for ov in OVERLAPS:
        s = samples[ov]
        med = {k: statistics.median(x[k] for x in s)
               for k in ("tiled_s", "prob_fn_s", "encoder_in_pass_s", "encoder_s", "plain_s")}
        rows.append({
            "overlap": ov, "tiles": s[0]["tiles"], **med,
            "ratio": statistics.median(x["tiled_s"] / x["encoder_s"] for x in s),
            "ratio_plain": statistics.median(x["plain_s"] / x["encoder_s"] for x in s),
            "ratio_in_pass": statistics.median(x["tiled_s"] / x["encoder_in_pass_s"] for x in s),
            "decode_share": statistics.median((x["prob_fn_s"] - x["encoder_in_pass_s"]) / x["encoder_in_pass_s"] for x in s),
            "blend_share": statistics.median((x["tiled_s"] - x["prob_fn_s"]) / x["encoder_in_pass_s"] for x in s),
            "encoder_s_per_tile": med["encoder_s"] / s[0]["tiles"],
            "expert_rows": s[-1]["expert_rows"], "samples": s,
        })
    base = rows[0]["encoder_s"]
    for row in rows:
        row["vs_overlap0_encoder"] = row["tiled_s"] / base
    return {
        "benchmark": "tiled_predict", "machine": _machine(), "command": " ".join(sys.argv),
        "model_type": args.model_type, "method": args.method, "gate": args.gate, "input_size": args.input_size,
        "image_size": args.image_size, "batch_size": args.batch_size, "device": str(device),
        "blending": "host (numpy)" if device.type in HOST_BLENDED else f"{device} (torch)",
        "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows,
        "goal": RATIO_GOAL, "meets_goal": rows[0]["ratio"] <= RATIO_GOAL,
        "meets_goal_in_pass": rows[0]["ratio_in_pass"] <= RATIO_GOAL,
    }


def print_table(record: dict[str, Any]) -> None:
    print(f"{record['model_type']} {record['method']} tiles {record['input_size']} px, image "
          f"{record['image_size']}^2, batch {record['batch_size']}, {record['device']}, {record['threads']} threads, "
          f"blending on {record['blending']}")
    print(f"{'overlap':>7} {'tiles':>5} {'tiled s':>8} {'encoder s':>9} {'ratio':>6} {'enc in pass s':>13} "
          f"{'ratio in pass':>13} {'decode':>7} {'blend':>6} {'vs enc(ov0)':>11} {'plain s':>7} {'ratio plain':>11}")
    for r in record["rows"]:
        print(f"{r['overlap']:>7.2f} {r['tiles']:>5} {r['tiled_s']:>8.2f} {r['encoder_s']:>9.2f} {r['ratio']:>6.3f} "
              f"{r['encoder_in_pass_s']:>13.2f} {r['ratio_in_pass']:>13.3f} {r['decode_share']:>+7.1%} "
              f"{r['blend_share']:>+6.1%} {r['vs_overlap0_encoder']:>11.2f} {r['plain_s']:>7.2f} {r['ratio_plain']:>11.3f}")
    first = record["rows"][0]
    print(f"overlap 0: ratio {first['ratio']:.3f} against the separate encoder pass, {first['ratio_in_pass']:.3f} "
          f"against the encoder inside the same pass, {first['ratio_plain']:.3f} without hooks or syncs "
          f"(goal <= {record['goal']}: "
          f"{'meets' if record['meets_goal'] else 'MISSES'} / {'meets' if record['meets_goal_in_pass'] else 'MISSES'})")
    if record["method"] == "conv_lora":
        print(f"Conv-LoRA rows per expert scale (last repeat, overlap 0): {record['rows'][0]['expert_rows']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=("vit_b", "vit_l", "vit_h", "tiny"))
    parser.add_argument("--method", default="conv_lora", choices=("decoder", "lora", "conv_lora"))
    parser.add_argument("--input-size", type=int, default=256, help="model input size = tile size")
    parser.add_argument("--image-size", type=int, default=2048, help="side of the square image")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gate", default="random", choices=("random", "zero"), help="Conv-LoRA gate weights")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="also write the JSON record to this file")
    args = parser.parse_args(argv)
    record = run(args)
    print_table(record)
    print(json.dumps(record))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
