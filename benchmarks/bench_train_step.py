"""Training-step time and peak memory of the decoder-only, LoRA and Conv-LoRA methods.

One step is what ``training.loop.train`` does per optimizer step at batch 1 (``--batch``), through the same
``training.step.TrainingStep``: forward, ``segmentation_loss``, backward through the fp16 scaler, clipping at the
recipe's default norm, AdamW step on the trainable parameters, finite check of the weights
(``zero_grad(set_to_none=True)`` first; until 2026-12 the benchmark's own copy had no clipping and no finite check). The model is
SAM with random weights (``random_base``, vit_b geometry by default) adapted by ``AdaptedSAM`` at each
input size, binary head; the optimizer takes ``model.trainable_parameters()``.

Each configuration (input size, method; and precision, checkpointing, batch where several are asked for) runs
in a fresh subprocess unless ``--one-process`` (below), so that neither peak memory nor allocator caches leak
from one configuration into the next:

- time: median (and min / max) of ``--steps`` timed steps after ``--warmup`` untimed ones;
- memory on CPU: peak resident set size during warm-up and timed steps minus the resident set before the
  first step (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``, which
  cannot be reset, so it also counts model construction); the model itself is ``rss_model_mib``.
- memory on CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the first step;
  steps run under ``autocast_context`` with ``resolve_precision(--precision)`` (bf16 where supported).

Conv-LoRA's goal is a step time at most 1.25 x LoRA's. On a shared machine a ratio of two medians taken
minutes apart is at the mercy of other processes, so a third subprocess per size also trains the LoRA
and Conv-LoRA models in alternation (one step each, ``--steps`` pairs) and reports the median of the
per-pair ratios (``paired_ratio``), which background load cancels out of; ratios are given per size (and
precision, checkpointing, batch).

Conv-LoRA's gate starts at zero; in training its noisy gating then routes each image / window to a
random expert (scales 1..8), as at the start of fine-tuning.

Run (CPU, what ``BENCHMARKS.md`` reports; ``--threads 1`` because on a machine whose cores other
processes keep busy, a second OpenMP thread makes every step several times slower)::

    python benchmarks/bench_train_step.py --model-type vit_b --sizes 256 512 --steps 10 --threads 1 \
        --json train_step.json

On a CUDA machine the default sizes are 256, 512 and 1024. It prints a table and a JSON record
(``--json FILE`` also writes it).

Options for issue 14's GPU questions (each row of the record says which it ran with):

- ``--precision fp32 bf16`` and ``--checkpointing off on`` measure every combination; checkpointing is
  ``AdaptedSAM.set_activation_checkpointing(True)`` (what ``RunOptions.activation_checkpointing`` switches on in
  ``train``: every encoder block recomputed in the backward pass). ``--batch 1 4``: images per step.
- On CUDA every row also has the *absolute* peak, ``peak_alloc_gib`` (``max_memory_allocated`` after
  ``reset_peak_memory_stats`` with the model on the device: what a card must hold), ``peak_reserved_gib`` (what
  the caching allocator took from the driver) and ``outside_allocator_gib`` (CUDA context and library
  workspaces, from ``mem_get_info``). ``--fit-gib 12``: each row with checkpointing on then runs two more
  steps with the allocator capped at 12 GiB less that outside part (``set_per_process_memory_fraction``), as
  on a 12 GB card; ``fits`` says whether they ran without running out of memory.
- ``--flops``: one extra step of each configuration without checkpointing under
  ``torch.utils.flop_counter.FlopCounterMode`` (and one forward under ``no_grad``): the FLOPs the step really
  executes (``flops_step``; matrix products, convolutions and attention; the backward through the frozen
  encoder computes input gradients only, so about 2 x the forward with adapters in the encoder and about 1 x
  for decoder-only, where nothing flows back into the encoder). Model FLOPs utilisation is
  ``flops_step / median_s / peak``, with the step's FLOPs *without* recomputation also for checkpointed rows
  (the usual MFU convention; recomputation is extra work, not model work), against the GPU's dense bf16 peak
  (``PEAK_BF16_TFLOPS``, ``--peak-tflops`` to override; None on the CPU and for fp32 rows).
- ``--one-process``: all configurations of the run in this process, the random SAM built once on the CPU and
  copied for each (size, method), a fresh AdamW per configuration, the allocator's cache emptied before each
  peak is taken (for GPU sessions with little time: a vit_h SAM takes 10-20 s to build, a process 5-10 s to
  start). Without it every configuration has its own process, as above. No paired run in this mode.
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


def _build(model_type: str, method: str, size: int, device, seed: int = 0, hq: str | None = None, base=None):
    """A binary model on a random SAM and its AdamW; ``hq``: HQ-SAM's mode (default off, "sam+hq" for method hq).
    ``base``: a ``BaseSam`` already built, whose SAM is copied (instead of building a new random one)."""
    import copy

    import torch

    from napari_convlora import AdaptedSAM, random_base
    from napari_convlora.config import AdapterConfig, HeadConfig, ModelConfig

    sam = copy.deepcopy(base.sam) if base is not None else None
    base = random_base(model_type, seed=seed) if base is None else base
    hq = hq or ("sam+hq" if method == "hq" else "off")
    config = ModelConfig(base=base.architecture, adapter=AdapterConfig(method=method),
                         head=HeadConfig(num_classes=2, hq=hq), input_size=size, base_checkpoint=base.checkpoint)
    model = AdaptedSAM(sam if sam is not None else base.sam, config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, eps=1e-6)
    return model, optimizer


def _batch(size: int, device, seed: int = 0, batch: int = 1):
    """``batch`` copies of one image (B x 3 x S x S, 0..255) and its binary targets (a disc, B x S x S int64)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.rand(1, 3, size, size, generator=g) * 255
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    targets = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2).long()[None]
    return images.repeat(batch, 1, 1, 1).to(device), targets.repeat(batch, 1, 1).to(device)


def _make_step(model, optimizer, images, targets, device, dtype):
    """A function running one training step, the one the training loop takes (``training.step.TrainingStep``: fp16
    scaler, clipping at the recipe's default norm, finite checks), and returning its wall time in seconds."""
    from pathlib import Path

    import torch

    from napari_convlora.config import TrainRecipe
    from napari_convlora.training.losses import segmentation_loss
    from napari_convlora.training.step import TrainingStep

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    stepper = TrainingStep(model, optimizer, scheduler, device=device, dtype=dtype,
                           grad_clip=TrainRecipe().grad_clip, out_path=Path("benchmark"))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> float:
        sync()
        start = time.perf_counter()
        stepper.start()
        stepper.micro_batch(lambda: segmentation_loss(model(images), targets, model.num_classes), 1)
        stepper.finish(1)
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


def _count_flops(model, step, images, device, dtype) -> dict[str, int]:
    """FLOPs of one training step and of one forward, as executed (``FlopCounterMode``)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from napari_convlora.devices import autocast_context

    with FlopCounterMode(display=False) as counter:
        step()
    flops_step = counter.get_total_flops()
    with torch.no_grad(), autocast_context(device, dtype), FlopCounterMode(display=False) as counter:
        model(images)
    return {"flops_step": flops_step, "flops_forward": counter.get_total_flops()}


def _fits(step, gib: float, device) -> dict[str, Any]:
    """Two steps with the caching allocator capped at ``gib`` GiB less what lies outside it (CUDA context,
    library workspaces): whether the step fits a card of that size. The model stays on the device."""
    import torch

    torch.cuda.empty_cache()
    device = torch.cuda.current_device() if torch.device(device).index is None else torch.device(device).index
    free, total = torch.cuda.mem_get_info(device)
    outside = total - free - torch.cuda.memory_reserved(device)
    limit = gib * 2**30 - outside
    torch.cuda.set_per_process_memory_fraction(min(max(limit, 0) / total, 1.0), device)
    try:
        step(), step()
        fits = True
    except torch.cuda.OutOfMemoryError:
        fits = False
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    torch.cuda.empty_cache()
    return {"fit_gib": gib, "fits": fits, "fit_limit_gib": limit / 2**30}


def _measure(model, spec: dict[str, Any], device, dtype) -> dict[str, Any]:
    """Time and peak memory of ``spec``'s steps on ``model`` (checkpointing and batch as ``spec`` says), with a
    fresh AdamW; ``spec["flops"]`` and ``spec["fit_gib"]`` add FLOPs and the capped-memory check."""
    import torch

    ckpt, batch = bool(spec.get("checkpointing")), spec.get("batch", 1)
    model.set_activation_checkpointing(ckpt)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, eps=1e-6)
    images, targets = _batch(spec["size"], device, batch=batch)
    step = _make_step(model, optimizer, images, targets, device, dtype)

    rss_before = _rss_mib()
    resettable = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    for _ in range(spec["warmup"]):
        step()
    times = [step() for _ in range(spec["steps"])]

    result = {
        "model_type": spec["model_type"], "method": spec["method"], "size": spec["size"], "batch": batch,
        "checkpointing": ckpt, "device": str(device), "precision": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()), "steps": len(times),
        "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times,
        "rss_model_mib": rss_before,
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        free, total = torch.cuda.mem_get_info(device)
        result.update(peak_mem_mib=(peak - allocated_before) / 2**20, mem_kind="cuda max_memory_allocated delta",
                      peak_alloc_gib=peak / 2**30, peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30,
                      outside_allocator_gib=(total - free - torch.cuda.memory_reserved(device)) / 2**30)
    else:
        result["peak_mem_mib"] = _peak_rss_mib(resettable) - rss_before
        result["mem_kind"] = "peak RSS delta (VmHWM)" if resettable else "peak RSS delta (ru_maxrss)"
    if spec.get("flops") and not ckpt:
        result.update(_count_flops(model, step, images, device, dtype))
    if spec.get("fit_gib") and ckpt and device.type == "cuda":
        result.update(_fits(step, spec["fit_gib"], device))
    optimizer.zero_grad(set_to_none=True)
    model.set_activation_checkpointing(False)
    return result


def measure_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and peak memory of one (method, size, precision, checkpointing, batch) configuration, in this
    (fresh) process."""
    device, dtype = _setup(spec)
    model, optimizer = _build(spec["model_type"], spec["method"], spec["size"], device)
    del optimizer  # _measure makes its own
    return _measure(model, spec, device, dtype)


def measure_all(spec: dict[str, Any]) -> dict[str, Any]:
    """Every configuration of ``spec`` in this process: the random SAM built once on the CPU, copied for each
    (size, method); the rows in the order sizes, methods, batches, precisions, checkpointing."""
    import gc

    import torch

    from napari_convlora import random_base
    from napari_convlora.devices import resolve_precision

    device, _ = _setup({**spec, "precision": "auto"})
    base = random_base(spec["model_type"], seed=0)
    rows = []
    for size in spec["sizes"]:
        for method in spec["methods"]:
            model, optimizer = _build(spec["model_type"], method, size, device, base=base)
            del optimizer  # each configuration gets its own; this one would keep the model alive past its turn
            for batch in spec["batches"]:
                for precision in spec["precisions"]:
                    for ckpt in spec["checkpointing"]:
                        one = {**spec, "size": size, "method": method, "batch": batch, "checkpointing": ckpt}
                        torch.manual_seed(0)
                        rows.append(_measure(model, one, device, resolve_precision(precision, device)))
                        print(f"  {_label(rows[-1])}: {rows[-1]['median_s']:.3f} s", file=sys.stderr, flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows}


def measure_pair(spec: dict[str, Any]) -> dict[str, Any]:
    """LoRA and Conv-LoRA steps in alternation in one process: median of the per-pair time ratios."""
    device, dtype = _setup(spec)
    images, targets = _batch(spec["size"], device, batch=spec.get("batch", 1))
    steps = {}
    for method in ("lora", "conv_lora"):
        model, optimizer = _build(spec["model_type"], method, spec["size"], device)
        model.set_activation_checkpointing(bool(spec.get("checkpointing")))
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
        "size": spec["size"], "batch": spec.get("batch", 1), "checkpointing": bool(spec.get("checkpointing")),
        "precision": str(dtype).removeprefix("torch."), "pairs": len(ratios),
        "paired_ratio": statistics.median(ratios), "ratios": ratios,
        "lora_median_s": statistics.median(lora), "conv_lora_median_s": statistics.median(conv),
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


#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, by a part of the GPU's
#: name; the first part found in the name wins (so "H100 PCIe" before "H100", "L40S" before "L4").
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.2))


def peak_bf16_tflops(gpu: str | None) -> float | None:
    """The dense bf16 peak of the GPU named ``gpu`` (``torch.cuda.get_device_name``); None if unknown or no GPU."""
    return next((peak for part, peak in PEAK_BF16_TFLOPS if gpu and part in gpu), None)


def _label(row: dict[str, Any]) -> str:
    ckpt = " ckpt" if row.get("checkpointing") else ""
    return f"{row['size']} {row['method']} {row.get('precision', '')}{ckpt} batch {row.get('batch', 1)}"


def add_mfu(rows: list[dict[str, Any]], peak_tflops: float | None) -> None:
    """Give rows the step's model FLOPs (counted without checkpointing: a checkpointed row takes its twin's),
    the TFLOP/s they ran at and, in mixed precision with a known peak, the model FLOPs utilisation."""
    counted = {(r["size"], r["method"], r.get("batch", 1), r["precision"]): r["flops_step"]
               for r in rows if "flops_step" in r}
    for r in rows:
        flops = counted.get((r["size"], r["method"], r.get("batch", 1), r["precision"]))
        if flops is None:
            continue
        r["model_flops_step"] = flops
        r["achieved_tflops"] = flops / r["median_s"] / 1e12
        mixed = r["precision"] in ("bfloat16", "float16")
        r["peak_tflops"] = peak_tflops if mixed else None
        r["mfu"] = r["achieved_tflops"] / peak_tflops if mixed and peak_tflops else None


def ratios_by_size(rows: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conv-LoRA / LoRA step-time ratio per size (and precision, checkpointing, batch where they vary): of the
    two medians, and paired (when measured)."""
    def key(r):
        return r["size"], r.get("precision"), bool(r.get("checkpointing")), r.get("batch", 1)

    out = []
    for k in sorted({key(r) for r in rows}, key=str):
        by_method = {r["method"]: r for r in rows if key(r) == k}
        if "lora" not in by_method or "conv_lora" not in by_method:
            continue
        entry = {"size": k[0], "precision": k[1], "checkpointing": k[2], "batch": k[3],
                 "median_ratio": by_method["conv_lora"]["median_s"] / by_method["lora"]["median_s"]}
        pair = next((p for p in pairs if (p["size"], p.get("precision"), bool(p.get("checkpointing")),
                                          p.get("batch", 1)) == k), None)
        if pair:
            entry["paired_ratio"] = pair["paired_ratio"]
        entry["goal"] = RATIO_GOAL
        entry["meets_goal"] = entry.get("paired_ratio", entry["median_ratio"]) <= RATIO_GOAL
        out.append(entry)
    return out


def print_table(rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> None:
    print(f"{'size':>5} {'method':<10} {'prec':<9} {'ckpt':<4} {'batch':>5} {'median s':>9} {'min s':>7} "
          f"{'max s':>7} {'peak MiB':>9} {'abs GiB':>8} {'TFLOP/s':>8} {'MFU':>6} {'fits':>5}")
    for r in rows:
        absolute = f"{r['peak_alloc_gib']:.2f}" if "peak_alloc_gib" in r else "-"
        tflops = f"{r['achieved_tflops']:.1f}" if "achieved_tflops" in r else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        fits = {True: "yes", False: "NO"}.get(r.get("fits"), "-")
        print(f"{r['size']:>5} {r['method']:<10} {r['precision']:<9} {'on' if r.get('checkpointing') else 'off':<4} "
              f"{r.get('batch', 1):>5} {r['median_s']:>9.3f} {r['min_s']:>7.3f} {r['max_s']:>7.3f} "
              f"{r['peak_mem_mib']:>9.0f} {absolute:>8} {tflops:>8} {mfu:>6} {fits:>5}")
    print(f"peak MiB: {rows[0]['mem_kind'] if rows else ''}; abs GiB: max_memory_allocated with the model")
    for q in ratios:
        paired = f", paired {q['paired_ratio']:.2f}" if "paired_ratio" in q else ""
        verdict = "meets" if q["meets_goal"] else "MISSES"
        print(f"Conv-LoRA / LoRA at {q['size']} ({q['precision']}, checkpointing {q['checkpointing']}, batch "
              f"{q['batch']}): medians {q['median_ratio']:.2f}{paired} (goal <= {q['goal']}: {verdict})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=("vit_b", "vit_l", "vit_h", "tiny"))
    parser.add_argument("--sizes", type=int, nargs="+", help="input sizes (default 256 512, plus 1024 on CUDA)")
    parser.add_argument("--methods", nargs="+", default=["decoder", "lora", "conv_lora"], choices=METHODS,
                        help="default: decoder lora conv_lora (hq: HQ-SAM's regime, see bench_hq_step.py)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--precision", nargs="+", default=["auto"],
                        help="one or more of: auto (bf16/fp16 on CUDA, fp32 elsewhere), fp32, bf16, fp16")
    parser.add_argument("--checkpointing", nargs="+", default=["off"], choices=("off", "on"),
                        help="activation checkpointing of the encoder blocks: off, on, or both (off on)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="images per step (one or more)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-paired", action="store_true", help="skip the alternating LoRA / Conv-LoRA run")
    parser.add_argument("--one-process", action="store_true", help="all configurations in this process, the SAM "
                        "built once (see the module's docstring); no paired run")
    parser.add_argument("--flops", action="store_true", help="count each step's FLOPs (one extra step per "
                        "configuration without checkpointing) and report TFLOP/s and MFU")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU (default: by name)")
    parser.add_argument("--fit-gib", type=float, help="with checkpointing on: also run two steps with CUDA "
                        "memory capped as on a card of this many GiB")
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
    ckpts = [c == "on" for c in args.checkpointing]
    base = dict(model_type=args.model_type, device=str(device), steps=args.steps, warmup=args.warmup,
                threads=args.threads, flops=args.flops, fit_gib=args.fit_gib)
    rows, pairs = [], []
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.one_process:  # in this process: it has not touched the device yet
        rows = measure_all({**base, "sizes": sizes, "methods": args.methods, "batches": args.batch,
                            "precisions": args.precision, "checkpointing": ckpts})["rows"]
    for size in sizes if not args.one_process else []:
        for batch in args.batch:
            for precision in args.precision:
                for ckpt in ckpts:
                    one = {**base, "size": size, "batch": batch, "precision": precision, "checkpointing": ckpt}
                    for method in args.methods:
                        rows.append(run_child({**one, "method": method}))
                        print(f"  {_label(rows[-1])}: {rows[-1]['median_s']:.3f} s", file=sys.stderr, flush=True)
                    if not args.no_paired and {"lora", "conv_lora"} <= set(args.methods):
                        pairs.append(run_child({**one, "pair": True}))
                        print(f"  {size} paired ratio: {pairs[-1]['paired_ratio']:.2f}", file=sys.stderr, flush=True)
    machine = _machine()
    peak = args.peak_tflops or (peak_bf16_tflops(machine["gpu"]) if device.type == "cuda" else None)
    add_mfu(rows, peak)
    ratios = ratios_by_size(rows, pairs)
    record = {"benchmark": "train_step", "machine": machine, "model_type": args.model_type,
              "batch_size": args.batch[0] if len(args.batch) == 1 else args.batch, "peak_tflops": peak,
              "load_average_start": load_start, "command": " ".join(sys.argv), "rows": rows, "paired": pairs,
              "ratios": ratios}
    print_table(rows, ratios)
    print(json.dumps(record))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
