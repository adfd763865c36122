"""Training steps with SAM's encoder attention through SDPA (``set_fast_attention``) against SAM's own, paired.

For each (input size, method, batch) one model (a random SAM, vit_b geometry by default, built once and copied;
``AdaptedSAM``; AdamW on its trainable parameters; steps as ``bench_train_step.py`` builds them) runs
``--warmup`` steps in each mode, then ``--steps`` pairs of steps, one with SDPA ("on") and one with SAM's forward
("off"), the order swapped every pair, in one process: background load hits both modes alike, and the median
of the per-pair time ratios on / off is what to read.

Memory: ``saved_mib``, what one forward saves for the backward pass (distinct storages seen by
``saved_tensors_hooks``, parameters left out: free of allocator caching); on CUDA ``max_memory_allocated``
during a step beyond the memory allocated before it (median over the pairs); on the CPU, where freed memory
stays with the process, the peak RSS of two steps beyond the RSS before them in a fresh process per mode (Linux
``VmHWM``, as ``bench_train_step.py``; ``--no-rss`` skips those processes).

``--forward-only``: forwards under ``no_grad`` (what prediction runs) instead of training steps.

``--flops``: one extra step per mode under ``FlopCounterMode``; the model FLOPs of a step are those of SAM's
attention ("off") for both modes (SDPA's FLOPs are counted differently), so MFU compares times only; against
the card's dense bf16 peak (``bench_train_step.PEAK_BF16_TFLOPS``; None on the CPU and in fp32).

Run (CPU, what the report of issue 14 quotes)::

    OMP_NUM_THREADS=1 python benchmarks/bench_fast_attention.py --model-type vit_b --sizes 256 512 \
        --methods lora conv_lora --steps 6 --warmup 1 --threads 1 --json fast_attention_cpu.json
    # prediction and decoder-only training, where no gradient flows through the attention:
    ... --sizes 256 512 1024 --methods lora --steps 4 --forward-only
    ... --sizes 256 512 --methods decoder --steps 5

The "on" rows force SDPA (``set_fast_attention("on")``); what ``"auto"`` picks is ``AUTO_FAST_ATTENTION``.

On CUDA (``gpu_suite.py`` part ``fast_attention_vit_b``): ``--device cuda --sizes 1024 --precision bf16
--batch 1 4 --flops``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train_step as bts  # noqa: E402

MODES = ("on", "off")


def saved_mib(model, images, device, dtype) -> float:
    """MiB of the tensors one forward saves for the backward pass (distinct storages, parameters left out): the
    activation memory of a step, free of any allocator's caching."""
    import torch

    from napari_convlora.devices import autocast_context

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_context(device, dtype):
        model(images)
    return sum(storages.values()) / 2**20


def child_peak_rss(spec: dict[str, Any]) -> float:
    """In this (fresh) process: peak RSS (MiB) of two steps in ``spec["mode"]`` (the first also allocates AdamW's
    state) beyond the RSS before them, as ``bench_train_step.py`` measures on the CPU."""
    from napari_convlora import random_base

    device, dtype = bts._setup({"threads": spec["threads"], "device": "cpu", "precision": "fp32"})
    model, optimizer = bts._build(spec["model_type"], spec["method"], spec["size"], device,
                                  base=random_base(spec["model_type"], seed=0))
    del optimizer
    model.set_fast_attention(spec["mode"])
    step, _ = _stepper(model, spec, device, dtype)
    before = bts._rss_mib()
    resettable = bts._reset_peak_rss()
    step(), step()
    return bts._peak_rss_mib(resettable) - before


def _make_forward(model, images, device, dtype):
    """A function running one forward under ``no_grad`` (as prediction does) and returning its wall time in s."""
    import torch

    from napari_convlora.devices import autocast_context

    def forward() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast_context(device, dtype):
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return forward


def _stepper(model, spec: dict[str, Any], device, dtype):
    """(step, images): a training step (AdamW) or, with ``spec["forward_only"]``, a forward under no_grad."""
    import torch

    images, targets = bts._batch(spec["size"], device, batch=spec["batch"])
    if spec.get("forward_only"):
        return _make_forward(model, images, device, dtype), images
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, eps=1e-6)
    return bts._make_step(model, optimizer, images, targets, device, dtype), images


def measure(model, spec: dict[str, Any], device, dtype) -> dict[str, Any]:
    """Paired on / off steps of one (size, method, batch) on ``model``: times, memory, ratios (and FLOPs)."""
    import torch

    step, images = _stepper(model, spec, device, dtype)
    times = {m: [] for m in MODES}
    memory = {m: [] for m in MODES}  # CUDA: max_memory_allocated during the step beyond its start
    for mode in MODES:
        model.set_fast_attention(mode)
        for _ in range(spec["warmup"]):
            step()
    for i in range(spec["steps"]):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            model.set_fast_attention(mode)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            times[mode].append(step())
            if device.type == "cuda":
                memory[mode].append((torch.cuda.max_memory_allocated(device) - before) / 2**20)
    ratios = [on / off for on, off in zip(times["on"], times["off"])]
    row = {"model_type": spec["model_type"], "method": spec["method"], "size": spec["size"], "batch": spec["batch"],
           "step": "forward (no_grad)" if spec.get("forward_only") else "training step",
           "device": str(device), "precision": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
           "pairs": len(ratios), "paired_ratio": statistics.median(ratios), "ratios": ratios,
           "mem_kind": "cuda max_memory_allocated delta" if device.type == "cuda" else "peak RSS delta (VmHWM), "
                       "a fresh process per mode"}
    for mode in MODES:
        model.set_fast_attention(mode)
        row[f"{mode}_median_s"] = statistics.median(times[mode])
        row[f"{mode}_times_s"] = times[mode]
        row[f"{mode}_saved_mib"] = None if spec.get("forward_only") else saved_mib(model, images, device, dtype)
        row[f"{mode}_peak_mib"] = (statistics.median(memory[mode]) if memory[mode] else
                                   None if spec.get("no_rss") else bts.run_child({**spec, "mode": mode}, __file__))
    if spec.get("flops") and not spec.get("forward_only"):
        for mode in MODES:
            model.set_fast_attention(mode)
            row[f"{mode}_flops_step"] = bts._count_flops(model, step, images, device, dtype)["flops_step"]
    model.set_fast_attention("auto")
    model.zero_grad(set_to_none=True)
    return row


def add_mfu(rows: list[dict[str, Any]], peak_tflops: float | None) -> None:
    """Achieved TFLOP/s and MFU per mode, from SAM's attention's FLOP count ("off") for both modes."""
    for r in rows:
        if "off_flops_step" not in r:
            continue
        mixed = r["precision"] in ("bfloat16", "float16")
        for mode in MODES:
            r[f"{mode}_tflops"] = r["off_flops_step"] / r[f"{mode}_median_s"] / 1e12
            r[f"{mode}_mfu"] = r[f"{mode}_tflops"] / peak_tflops if mixed and peak_tflops else None


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{rows[0]['step'] if rows else ''}:")
    print(f"{'size':>5} {'method':<10} {'batch':>5} {'prec':<9} {'off s':>8} {'on s':>8} {'on/off':>7} "
          f"{'off MiB':>8} {'on MiB':>8} {'off svd':>8} {'on svd':>8} {'off MFU':>8} {'on MFU':>8}")
    for r in rows:
        mfu = {m: f"{100 * r[f'{m}_mfu']:.1f}%" if r.get(f"{m}_mfu") is not None else "-" for m in MODES}
        print(f"{r['size']:>5} {r['method']:<10} {r['batch']:>5} {r['precision']:<9} {r['off_median_s']:>8.3f} "
              f"{r['on_median_s']:>8.3f} {r['paired_ratio']:>7.3f} {_mib(r['off_peak_mib']):>8} "
              f"{_mib(r['on_peak_mib']):>8} "
              f"{_mib(r['off_saved_mib']):>8} {_mib(r['on_saved_mib']):>8} {mfu['off']:>8} {mfu['on']:>8}")
    if rows:
        print(f"MiB: {rows[0]['mem_kind']}; svd: MiB saved for backward by one forward; on/off: median of the "
              "paired step-time ratios")


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=("vit_b", "vit_l", "vit_h", "small", "tiny"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--methods", nargs="+", default=["lora", "conv_lora"], choices=bts.METHODS)
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="images per step (one or more)")
    parser.add_argument("--steps", type=int, default=6, help="timed pairs (one step on, one off) per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16, fp16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--flops", action="store_true", help="count each mode's FLOPs and report MFU")
    parser.add_argument("--forward-only", action="store_true", help="time forwards under no_grad (prediction) "
                        "instead of training steps")
    parser.add_argument("--no-rss", action="store_true", help="CPU: skip the peak-RSS processes (two per row)")
    parser.add_argument("--json", help="also write the JSON record to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_peak_rss(json.loads(args.child))))
        return

    import torch

    from napari_convlora import random_base

    device, dtype = bts._setup({"threads": args.threads, "device": args.device, "precision": args.precision})
    base = random_base(args.model_type, seed=0)
    rows = []
    for size in args.sizes:
        for method in args.methods:
            model, optimizer = bts._build(args.model_type, method, size, device, base=base)
            del optimizer
            for batch in args.batch:
                torch.manual_seed(0)
                spec = {"model_type": args.model_type, "method": method, "size": size, "batch": batch,
                        "steps": args.steps, "warmup": args.warmup, "flops": args.flops, "threads": args.threads,
                        "no_rss": args.no_rss, "forward_only": args.forward_only}
                rows.append(measure(model, spec, device, dtype))
                print(f"  {size} {method} batch {batch}: on/off {rows[-1]['paired_ratio']:.3f}", file=sys.stderr,
                      flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    machine = bts._machine()
    peak = bts.peak_bf16_tflops(machine["gpu"]) if device.type == "cuda" else None
    add_mfu(rows, peak)
    record = {"benchmark": "fast_attention", "machine": machine, "model_type": args.model_type, "peak_tflops": peak,
              "command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    print_table(rows)
    print(json.dumps(record))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
