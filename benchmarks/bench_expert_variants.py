"""Where a Conv-LoRA training step spends its time on a GPU, and which way of running the experts is fastest.

Three parts, all on random-weight SAMs (nothing is downloaded), each printed and written to ``--json``:

1. ``experts``: one scale expert alone (bicubic up, 3x3 conv, GELU, bicubic down; forward and backward) on
   the bottleneck maps of vit_b's windowed blocks (windows of 14 x 14) and global blocks (the whole token
   grid), for every scale, in bf16 and in fp32, channels-first and channels-last (CUDA events, median).
2. ``steps``: whole training steps (``bench_train_step``'s step: forward, loss, backward, AdamW) of LoRA and
   of Conv-LoRA with the experts run each way (monkeypatched ``ConvLoRALinear.bottleneck``, or for
   ``masked`` the layers' own masked dispatch, ``adapters/dispatch.py``: every expert on every row, no host
   copy per layer, plus the one host copy per step of ``drop_unrouted_expert_grads``), paired in
   alternation so that the ratio to LoRA is measured on the same warm GPU; at the last size also with a
   batch of several images (where the GPU, not the host launching kernels, sets the pace).
3. ``profile``: ``torch.profiler`` over three steps of each method: GPU time per step (what the step would
   take if the host launched kernels infinitely fast), operators launched per step, and Conv-LoRA's most
   expensive operators; ``conv_lora_masked``: Conv-LoRA with the masked dispatch.

Run on a CUDA machine (about 2 minutes on one H200)::

    python benchmarks/bench_expert_variants.py --sizes 512 1024 --batch 1 4 --json expert_variants.json

On the CPU (``--device cpu --sizes 128 --threads 1``) it only checks that the script runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: current: indexed dispatch, experts in fp32 (since 2026-11-26); masked: every expert on every row (issue 14)
VARIANTS = ("current", "autocast_experts", "channels_last", "masked")


def _bottleneck_variant(variant: str):
    """A ``ConvLoRALinear.bottleneck`` that runs its experts as ``variant`` says (same routing, same math)."""
    import torch

    from napari_convlora.adapters.layers import ConvLoRALinear

    original = ConvLoRALinear.bottleneck
    if variant in ("current", "masked"):  # the layer's own bottleneck; the dispatch is set by _use_variant
        return original
    fp32 = variant != "autocast_experts"  # the experts as they ran before: in autocast's dtype
    channels_last = variant == "channels_last"

    def bottleneck(self, z):
        if z.dim() == 3:
            side = int(z.shape[1] ** 0.5)
            return bottleneck(self, z.reshape(z.shape[0], side, side, -1)).reshape(z.shape)
        zc = z.permute(0, 3, 1, 2)
        gates, self.balance_loss = self.gate(zc)
        pairs = gates.t().nonzero()
        rows = pairs[:, 1]
        counts = torch.bincount(pairs[:, 0], minlength=len(self.experts)).tolist()
        x_all = zc.index_select(0, rows)
        if fp32:
            x_all = x_all.float()
        if channels_last:
            x_all = x_all.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(z.device.type, enabled=False) if fp32 else contextlib.nullcontext()
        with ctx:
            outs = [expert(x) for expert, x, n in zip(self.experts, x_all.split(counts), counts) if n]
        out = torch.cat(outs)
        mixed = torch.zeros_like(zc).index_add(0, rows, out.to(zc.dtype))
        return (zc + mixed).permute(0, 2, 3, 1)

    return bottleneck


@contextlib.contextmanager
def _use_variant(variant: str, model, optimizer):
    """Run ``model``'s Conv-LoRA layers as ``variant`` says; masked also drops unrouted experts' gradients
    before each AdamW step (one host copy per step), so that it trains as the indexed dispatch does."""
    from napari_convlora.adapters.routing import drop_unrouted_expert_grads, set_expert_dispatch
    from napari_convlora.adapters.layers import ConvLoRALinear

    original = ConvLoRALinear.bottleneck
    ConvLoRALinear.bottleneck = _bottleneck_variant(variant)
    set_expert_dispatch(model, "masked" if variant == "masked" else "indexed")

    def drop(*_) -> None:
        drop_unrouted_expert_grads(model)

    hook = optimizer.register_step_pre_hook(drop) if variant == "masked" else None
    try:
        yield
    finally:
        ConvLoRALinear.bottleneck = original
        set_expert_dispatch(model, "auto")
        if hook is not None:
            hook.remove()


def _time_cuda(fn, repeats: int, device) -> float:
    import torch

    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1000
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


#: The SAM geometry of the whole-step parts (``--model-type``; tiny for the suite's CPU smoke run).
MODEL_TYPE = "vit_b"


def experts_part(size: int, device, repeats: int) -> list[dict]:
    """Forward + backward of one expert per scale on vit_b's bottleneck maps at ``size`` px."""
    import torch

    from napari_convlora.adapters.layers import ScaleExpert

    grid = size // 16
    windows = (-(-grid // 14)) ** 2  # windows of a padded grid, batch 1
    shapes = {"windowed": (windows, 3, 14, 14), "global": (1, 3, grid, grid)}
    rows = []
    for block, shape in shapes.items():
        for scale in range(1, 9):
            expert = ScaleExpert(3, scale).to(device)
            for dtype in (torch.bfloat16, torch.float32):
                for cl in (False, True):
                    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
                    e = expert.to(dtype)
                    if cl:
                        e = e.to(memory_format=torch.channels_last)

                    def fn(x=x, e=e, cl=cl):
                        xi = x.contiguous(memory_format=torch.channels_last) if cl else x
                        e(xi).float().square().mean().backward()

                    ms = _time_cuda(fn, repeats, device)
                    rows.append(dict(size=size, block=block, scale=scale, dtype=str(dtype).split(".")[-1],
                                     channels_last=cl, ms=round(ms, 3)))
    return rows


def steps_part(size: int, device, steps: int, batch: int = 1) -> dict:
    """Paired step times: LoRA, then Conv-LoRA with each variant of running the experts (``batch`` images)."""
    from bench_train_step import _batch, _build, _make_step

    from napari_convlora.devices import resolve_precision

    dtype = resolve_precision("auto", device)
    images, targets = _batch(size, device)
    images, targets = images.repeat(batch, 1, 1, 1), targets.repeat(batch, 1, 1)
    lora, lora_opt = _build(MODEL_TYPE, "lora", size, device)
    conv, conv_opt = _build(MODEL_TYPE, "conv_lora", size, device)
    lora_step = _make_step(lora, lora_opt, images, targets, device, dtype)
    conv_step = _make_step(conv, conv_opt, images, targets, device, dtype)
    result = {"size": size, "batch": batch, "precision": str(dtype).split(".")[-1]}
    for variant in VARIANTS:
        with _use_variant(variant, conv, conv_opt):
            for _ in range(2):
                lora_step(), conv_step()
            ratios, conv_times = [], []
            for _ in range(steps):
                a, b = lora_step(), conv_step()
                ratios.append(b / a)
                conv_times.append(b)
        result[variant] = dict(conv_lora_ms=round(statistics.median(conv_times) * 1000, 1),
                               paired_ratio=round(statistics.median(ratios), 2))
        print(size, batch, variant, result[variant], flush=True)
    result["lora_ms"] = round(statistics.median([lora_step() for _ in range(steps)]) * 1000, 1)
    return result


def profile_part(size: int, device, rows: int) -> dict:
    """GPU (or CPU) time per step of LoRA, Conv-LoRA and Conv-LoRA with masked dispatch; Conv-LoRA's top operators."""
    import torch
    from bench_train_step import _batch, _build, _make_step

    from napari_convlora.devices import resolve_precision

    dtype = resolve_precision("auto", device)
    images, targets = _batch(size, device)
    result: dict = {}
    for method in ("lora", "conv_lora", "conv_lora_masked"):
        model, opt = _build(MODEL_TYPE, method.removesuffix("_masked"), size, device)
        variant = "masked" if method.endswith("_masked") else "current"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with _use_variant(variant, model, opt):
            step = _make_step(model, opt, images, targets, device, dtype)
            step(), step()
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(3):
                    step()
        averages = prof.key_averages()
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        if device.type == "cuda":  # kernels only: an operator's row repeats the time of the kernels it launched
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            total_us = sum(e.self_device_time_total for e in kernels)
        else:
            total_us = sum(e.self_cpu_time_total for e in averages)
        result[method] = dict(time_per_step_ms=round(total_us / 3 / 1000, 1), kind=key,
                              host_ops_per_step=round(sum(e.count for e in averages) / 3))
        if method == "conv_lora":
            result["table"] = averages.table(sort_by=key, row_limit=rows)
        del model, opt
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes of the paired steps at the last size")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile-rows", type=int, default=30)
    parser.add_argument("--model-type", default="vit_b", help="geometry of the whole steps (tiny: a smoke run)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    global MODEL_TYPE
    MODEL_TYPE = args.model_type

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    record: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "experts": [], "steps": [], "profile": {}}
    for size in args.sizes:
        record["experts"] += experts_part(size, device, args.repeats)
    for row in record["experts"]:
        print(json.dumps(row))
    for size in args.sizes:
        for batch in args.batch if size == args.sizes[-1] else [1]:
            record["steps"].append(steps_part(size, device, args.steps, batch))
    for size in args.sizes[-1:]:
        profile = profile_part(size, device, args.profile_rows)
        record["profile"][str(size)] = profile
        print(profile.pop("table"), flush=True)
        print(json.dumps(profile), flush=True)
    print(json.dumps(record["steps"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
