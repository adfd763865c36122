"""Training-step time and peak memory of the decoder-only, LoRA and Conv-LoRA methods.

One step is what ``train.train`` does per optimizer step at batch 1: forward, ``segmentation_loss``,
backward, AdamW step on the trainable parameters (``zero_grad(set_to_none=True)`` first). The model is
SAM with random weights (``random_base``, vit_b geometry by default) adapted by ``AdaptedSAM`` at each
input size, binary head; the optimizer takes ``model.trainable_parameters()``.

Each (input size, method) runs in a fresh subprocess, so that neither peak memory nor allocator caches
leak from one configuration into the next:

- time: median (and min / max) of ``--steps`` timed steps after ``--warmup`` untimed ones;
- memory on CPU: peak resident set size during warm-up and timed steps minus the resident set before the
  first step (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``, which
  cannot be reset, so it also counts model construction); the model itself is ``rss_model_mib``.
- memory on CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the first step;
  steps run under ``autocast_context`` with ``resolve_precision(--precision)`` (bf16 where supported).

Conv-LoRA's goal is a step time at most 1.25 x LoRA's. On a shared machine a ratio of two medians taken
minutes apart is at the mercy of other processes, so a third subprocess per size also trains the LoRA
and Conv-LoRA models in alternation (one step each, ``--steps`` pairs) and reports the median of the
per-pair ratios (``paired_ratio``), which background load cancels out of.

Conv-LoRA's gate starts at zero; in training its noisy gating then routes each image / window to a
random expert (scales 1..8), as at the start of fine-tuning.

Run (CPU, what ``BENCHMARKS.md`` reports; ``--threads 1`` because on a machine whose cores other
processes keep busy, a second OpenMP thread makes every step several times slower)::

    python benchmarks/bench_train_step.py --model-type vit_b --sizes 256 512 --steps 10 --threads 1 \
        --json train_step.json

On a CUDA machine the default sizes are 256, 512 and 1024. It prints a table and a JSON record
(``--json FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

METHODS = ("decoder", "lora", "conv_lora")
RATIO_GOAL = 1.25


# --------------------------------------------------------------------------------------------------
# Memory


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mib(resettable: bool) -> float:
    if resettable:
        return _status_kib("VmHWM") / 1024
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return maxrss / (2**20 if sys.platform == "darwin" else 1024)


# --------------------------------------------------------------------------------------------------
# One configuration (runs in a child process)


def _build(model_type: str, method: str, size: int, device, seed: int = 0, hq: str | None = None):
    """A binary model on a random SAM and its AdamW; ``hq``: HQ-SAM's mode (default off, "sam+hq" for method hq)."""
    import torch

    from napari_convlora import AdaptedSAM, random_base
    from napari_convlora.config import AdapterConfig, HeadConfig, ModelConfig

    base = random_base(model_type, seed=seed)
    hq = hq or ("sam+hq" if method == "hq" else "off")
    config = ModelConfig(base=base.architecture, adapter=AdapterConfig(method=method),
                         head=HeadConfig(num_classes=2, hq=hq), input_size=size, base_checkpoint=base.checkpoint)
    model = AdaptedSAM(base.sam, config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, eps=1e-6)
    return model, optimizer


def _batch(size: int, device, seed: int = 0):
    """One image (1 x 3 x S x S, 0..255) and binary targets (a disc, 1 x S x S int64)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.rand(1, 3, size, size, generator=g) * 255
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    targets = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2).long()[None]
    return images.to(device), targets.to(device)


def _make_step(model, optimizer, images, targets, device, dtype):
    """A function running one training step and returning its wall time in seconds."""
    import torch

    from napari_convlora.devices import autocast_context
    from napari_convlora.losses import segmentation_loss

    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> float:
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, dtype):
            loss = segmentation_loss(model(images), targets, model.num_classes)["total"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sync()
        return time.perf_counter() - start

    return step


def _setup(spec: dict[str, Any]):
    import torch

    from napari_convlora.devices import resolve_device, resolve_precision

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = resolve_device(spec["device"])
    return device, resolve_precision(spec["precision"], device)


def measure_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and peak memory of one (method, size) configuration, in this (fresh) process."""
    import torch

    device, dtype = _setup(spec)
    model, optimizer = _build(spec["model_type"], spec["method"], spec["size"], device)
    images, targets = _batch(spec["size"], device)
    step = _make_step(model, optimizer, images, targets, device, dtype)
    trainable = sum(p.numel() for p in model.trainable_parameters())

    rss_before = _rss_mib()
    resettable = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    for _ in range(spec["warmup"]):
        step()
    times = [step() for _ in range(spec["steps"])]

    result = {
        "method": spec["method"], "size": spec["size"], "device": str(device),
        "precision": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "trainable_params": trainable, "steps": len(times),
        "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times,
        "rss_model_mib": rss_before,
    }
    if device.type == "cuda":
        result["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) - allocated_before) / 2**20
        result["mem_kind"] = "cuda max_memory_allocated delta"
    else:
        result["peak_mem_mib"] = _peak_rss_mib(resettable) - rss_before
        result["mem_kind"] = "peak RSS delta (VmHWM)" if resettable else "peak RSS delta (ru_maxrss)"
    return result


def measure_pair(spec: dict[str, Any]) -> dict[str, Any]:
    """LoRA and Conv-LoRA steps in alternation in one process: median of the per-pair time ratios."""
    device, dtype = _setup(spec)
    images, targets = _batch(spec["size"], device)
    steps = {}
    for method in ("lora", "conv_lora"):
        model, optimizer = _build(spec["model_type"], method, spec["size"], device)
        steps[method] = _make_step(model, optimizer, images, targets, device, dtype)
    for _ in range(spec["warmup"]):
        steps["lora"](), steps["conv_lora"]()
    ratios, lora, conv = [], [], []
    for i in range(spec["steps"]):
        order = ("lora", "conv_lora") if i % 2 == 0 else ("conv_lora", "lora")
        t = {m: steps[m]() for m in order}
        lora.append(t["lora"])
        conv.append(t["conv_lora"])
        ratios.append(t["conv_lora"] / t["lora"])
    return {
        "size": spec["size"], "pairs": len(ratios), "paired_ratio": statistics.median(ratios),
        "ratios": ratios, "lora_median_s": statistics.median(lora), "conv_lora_median_s": statistics.median(conv),
    }


def run_child(spec: dict[str, Any], script: str = __file__) -> dict[str, Any]:
    """Run ``script --child SPEC`` in a fresh Python process and return its JSON result."""
    cmd = [sys.executable, os.path.abspath(script), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed for {spec}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Report


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "gpu": gpu,
            "python": platform.python_version(), "load_average": load}


def ratios_by_size(rows: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conv-LoRA / LoRA step-time ratio per size: of the two medians, and paired (when measured)."""
    out = []
    for size in sorted({r["size"] for r in rows}):
        by_method = {r["method"]: r for r in rows if r["size"] == size}
        if "lora" not in by_method or "conv_lora" not in by_method:
            continue
        entry = {"size": size, "median_ratio": by_method["conv_lora"]["median_s"] / by_method["lora"]["median_s"]}
        pair = next((p for p in pairs if p["size"] == size), None)
        if pair:
            entry["paired_ratio"] = pair["paired_ratio"]
        entry["goal"] = RATIO_GOAL
        entry["meets_goal"] = entry.get("paired_ratio", entry["median_ratio"]) <= RATIO_GOAL
        out.append(entry)
    return out


def print_table(rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> None:
    print(f"{'size':>5} {'method':<10} {'trainable':>10} {'median s':>9} {'min s':>7} {'max s':>7} "
          f"{'peak MiB':>9} {'model MiB':>9}")
    for r in rows:
        print(f"{r['size']:>5} {r['method']:<10} {r['trainable_params']:>10,} {r['median_s']:>9.3f} "
              f"{r['min_s']:>7.3f} {r['max_s']:>7.3f} {r['peak_mem_mib']:>9.0f} {r['rss_model_mib']:>9.0f}")
    print(f"peak MiB: {rows[0]['mem_kind'] if rows else ''}")
    for q in ratios:
        paired = f", paired {q['paired_ratio']:.2f}" if "paired_ratio" in q else ""
        verdict = "meets" if q["meets_goal"] else "MISSES"
        print(f"Conv-LoRA / LoRA at {q['size']}: medians {q['median_ratio']:.2f}{paired} "
              f"(goal <= {q['goal']}: {verdict})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=("vit_b", "vit_l", "vit_h", "tiny"))
    parser.add_argument("--sizes", type=int, nargs="+", help="input sizes (default 256 512, plus 1024 on CUDA)")
    parser.add_argument("--methods", nargs="+", default=["decoder", "lora", "conv_lora"], choices=METHODS,
                        help="default: decoder lora conv_lora (hq: HQ-SAM's regime, see bench_hq_step.py)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--precision", default="auto", help="auto (bf16/fp16 on CUDA, fp32 elsewhere), fp32, bf16, fp16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-paired", action="store_true", help="skip the alternating LoRA / Conv-LoRA run")
    parser.add_argument("--json", help="also write the JSON record to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        result = measure_pair(spec) if spec.get("pair") else measure_config(spec)
        print(json.dumps(result))
        return

    from napari_convlora.devices import resolve_device

    device = resolve_device(args.device)
    sizes = args.sizes or ([256, 512, 1024] if device.type == "cuda" else [256, 512])
    base = dict(model_type=args.model_type, device=str(device), precision=args.precision,
                steps=args.steps, warmup=args.warmup, threads=args.threads)
    rows, pairs = [], []
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    for size in sizes:
        for method in args.methods:
            rows.append(run_child({**base, "method": method, "size": size}))
            print(f"  {size} {method}: {rows[-1]['median_s']:.3f} s", file=sys.stderr, flush=True)
        if not args.no_paired and {"lora", "conv_lora"} <= set(args.methods):
            pairs.append(run_child({**base, "size": size, "pair": True}))
            print(f"  {size} paired ratio: {pairs[-1]['paired_ratio']:.2f}", file=sys.stderr, flush=True)
    ratios = ratios_by_size(rows, pairs)
    record = {"benchmark": "train_step", "machine": _machine(), "model_type": args.model_type,
              "batch_size": 1, "load_average_start": load_start, "command": " ".join(sys.argv), "rows": rows, "paired": pairs, "ratios": ratios}
    print_table(rows, ratios)
    print(json.dumps(record))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
