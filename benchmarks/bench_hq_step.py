"""What HQ-SAM's fusion costs per training step: each method with and without HQ, in alternation.

For each method (default: Conv-LoRA and decoder-only) and input size, two binary models on the same random SAM
geometry (``random_base``, seed 0) train in one process, one step each in turn, ``--steps`` pairs after
``--warmup``: the method as it is, and the method with HQ-SAM's token and fusion on the head (``hq="sam+hq"``: new HQ
parts, as HQ-SAM's training starts). A step is ``bench_train_step``'s (forward, ``segmentation_loss``, backward,
AdamW). Reported: the median of the per-pair time ratios (HQ / without; background load cancels out of it), both
medians, and the trainable parameters. ``hq`` (HQ-SAM's own regime: SAM frozen, only the HQ parts and the head's
tokens train) is timed in the same alternation against decoder-only.

HQ-SAM's paper reports about 4 % fewer frames per second for ViT-L at inference (5.0 -> 4.8 FPS); this measures
training steps, which also pay for the fusion's backward.

Run (CPU, what BENCHMARKS.md reports)::

    python benchmarks/bench_hq_step.py --model-type vit_b --sizes 256 512 --steps 10 --threads 1 --json hq_step.json

On a GPU: ``--device cuda --sizes 1024 --model-type vit_l`` (bf16 autocast by default there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_step import _batch, _build, _machine, _make_step, _setup  # noqa: E402

#: (name, (method, hq) without, (method, hq) with): each pair alternates in one process.
PAIRS = {
    "conv_lora": (("conv_lora", "off"), ("conv_lora", "sam+hq")),
    "lora": (("lora", "off"), ("lora", "sam+hq")),
    "decoder": (("decoder", "off"), ("decoder", "sam+hq")),
    "hq_vs_decoder": (("decoder", "off"), ("hq", "sam+hq")),
}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    device, dtype = _setup(spec)
    images, targets = _batch(spec["size"], device)
    steps, params = [], []
    for method, hq in PAIRS[spec["pair"]]:
        model, optimizer = _build(spec["model_type"], method, spec["size"], device, hq=hq)
        steps.append(_make_step(model, optimizer, images, targets, device, dtype))
        params.append(sum(p.numel() for p in model.trainable_parameters()))
    for _ in range(spec["warmup"]):
        steps[0](), steps[1]()
    without, with_hq = [], []
    for i in range(spec["steps"]):
        if i % 2 == 0:
            without.append(steps[0]())
            with_hq.append(steps[1]())
        else:
            with_hq.append(steps[1]())
            without.append(steps[0]())
    ratios = [b / a for a, b in zip(without, with_hq)]
    return {"pair": spec["pair"], "size": spec["size"], "device": str(device), "precision": str(dtype).removeprefix("torch."),
            "paired_ratio": statistics.median(ratios), "ratios": ratios, "without_median_s": statistics.median(without),
            "with_hq_median_s": statistics.median(with_hq), "trainable_without": params[0], "trainable_with": params[1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", default="vit_b", choices=("vit_b", "vit_l", "vit_h", "tiny"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--pairs", nargs="+", default=["conv_lora", "hq_vs_decoder"], choices=list(PAIRS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the JSON record here")
    args = parser.parse_args(argv)
    results = []
    print(f"{'pair':<15} {'size':>5} {'without s':>10} {'with HQ s':>10} {'ratio':>6} {'params':>21}")
    for pair in args.pairs:
        for size in args.sizes:
            r = measure({"pair": pair, "size": size, "model_type": args.model_type, "device": args.device,
                         "precision": args.precision, "threads": args.threads, "steps": args.steps,
                         "warmup": args.warmup})
            results.append(r)
            print(f"{pair:<15} {size:>5} {r['without_median_s']:>10.3f} {r['with_hq_median_s']:>10.3f} "
                  f"{r['paired_ratio']:>6.2f} {r['trainable_without']:>10,} {r['trainable_with']:>10,}", flush=True)
    record = {"benchmark": "hq_step", "machine": _machine(), "model_type": args.model_type, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
