"""The GPU benchmark suite: everything to measure the first minutes a CUDA machine is at hand.

Runs, each part in its own subprocess with its own time limit, and writes one JSON file per part into
``--out`` (plus ``suite.log``), so that a part that fails or runs out of time loses only itself:

1. ``machine``: GPU name, memory, driver, torch and CUDA versions.
2. ``train_step_vit_b``: ``bench_train_step.py`` on vit_b at 256, 512 and 1024 px (decoder, LoRA,
   Conv-LoRA; bf16 autocast; peak ``max_memory_allocated``; paired Conv-LoRA / LoRA ratio).
3. ``train_step_vit_h``: the same at 1024 px on vit_h (the backbone of the Conv-LoRA paper's preset).
4. ``expert_variants``: ``bench_expert_variants.py``: each scale expert alone in bf16 and fp32, Conv-LoRA
   steps with the experts run different ways paired with LoRA (batch 1 and 4), GPU time per step.
5. ``hq_step_vit_l``: ``bench_hq_step.py`` on vit_l at 1024 px: Conv-LoRA with and without HQ-SAM's fusion, and
   HQ-SAM's own regime against decoder-only, in alternation (HQ-SAM's paper: about 4 % slower inference on ViT-L).
6. ``tiled_vit_b``: ``bench_tiled_predict.py``, 1024 px tiles over a 4096 x 4096 image.
7. ``e2e``: the real training loop on CUDA (``train``), stopped and resumed, against an uninterrupted
   run (how exact resume is on a GPU), and the CUDA prediction against the CPU prediction of the same model.
8. ``prompt_latency``: ``bench_prompt_latency.py``: one prompt on a cached window, vit_b and vit_h at 1024 px.

Run on a CUDA machine (about 7 minutes on one H100/H200)::

    python benchmarks/gpu_suite.py --out gpu_results

``--smoke`` runs every part on the CPU with the tiny SAM in about a minute (``tests/test_gpu_suite.py``, in CI): it
checks that the suite works, and measures nothing.

Random-weight SAMs only: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(name: str, cmd: list[str], out: Path, timeout: float, log) -> bool:
    start = time.perf_counter()
    log.write(f"\n=== {name}: {' '.join(cmd)}\n")
    log.flush()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        ok = proc.returncode == 0
        log.write(proc.stdout[-6000:] + "\n" + proc.stderr[-6000:] + "\n")
    except subprocess.TimeoutExpired as e:
        ok = False
        log.write(f"TIMEOUT after {timeout:.0f} s\n{(e.stdout or b'')[-3000:]!r}\n{(e.stderr or b'')[-3000:]!r}\n")
    log.write(f"=== {name}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s\n")
    log.flush()
    print(f"{name}: {'ok' if ok else 'FAILED'} ({time.perf_counter() - start:.0f} s)", flush=True)
    return ok


def smoke_parts(py: str, out: Path) -> list[tuple[str, list[str], float]]:
    """The suite's parts on the CPU with the tiny SAM at 64-128 px: the same scripts and code paths, in seconds."""
    cpu = ["--device", "cpu"]
    return [
        ("train_step_vit_b", [py, str(HERE / "bench_train_step.py"), "--model-type", "tiny", *cpu, "--sizes", "64",
                              "--steps", "1", "--warmup", "0", "--json", str(out / "train_step_vit_b.json")], 120),
        ("expert_variants", [py, str(HERE / "bench_expert_variants.py"), "--model-type", "tiny", *cpu, "--sizes", "64",
                             "--batch", "1", "--steps", "1", "--repeats", "1", "--profile-rows", "3",
                             "--json", str(out / "expert_variants.json")], 120),
        ("e2e", [py, str(HERE / "gpu_e2e.py"), "--model-type", "tiny", *cpu, "--steps", "4",
                 "--json", str(out / "e2e.json")], 120),
        ("hq_step_vit_l", [py, str(HERE / "bench_hq_step.py"), "--model-type", "tiny", *cpu, "--sizes", "64",
                           "--steps", "1", "--warmup", "0", "--json", str(out / "hq_step_vit_l.json")], 120),
        ("tiled_vit_b", [py, str(HERE / "bench_tiled_predict.py"), "--model-type", "tiny", *cpu, "--input-size", "64",
                         "--image-size", "128", "--repeats", "1", "--json", str(out / "tiled_vit_b.json")], 120),
        ("prompt_latency", [py, str(HERE / "bench_prompt_latency.py"), "--configs", "tiny:64", *cpu, "--prompts", "2",
                            "--image-size", "128", "--json", str(out / "prompt_latency.json")], 120),
    ]


def machine() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_results", help="folder for the JSON files and suite.log")
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip (train_step_vit_h, tiled_vit_b, ...)")
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU with the tiny SAM and the "
                        "smallest sizes, in about a minute: checks that the suite runs (what CI does), measures nothing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "machine.json").write_text(json.dumps(machine(), indent=2))
    print(json.dumps(machine()), flush=True)
    py = sys.executable
    parts = [
        ("train_step_vit_b", [py, str(HERE / "bench_train_step.py"), "--model-type", "vit_b", "--device", "cuda",
                              "--sizes", "256", "512", "1024", "--steps", "8", "--warmup", "2",
                              "--json", str(out / "train_step_vit_b.json")], 260),
        ("expert_variants", [py, str(HERE / "bench_expert_variants.py"), "--sizes", "512", "1024", "--batch", "1", "4",
                             "--json", str(out / "expert_variants.json")], 150),
        ("e2e", [py, str(HERE / "gpu_e2e.py"), "--json", str(out / "e2e.json")], 90),
        ("hq_step_vit_l", [py, str(HERE / "bench_hq_step.py"), "--model-type", "vit_l", "--device", "cuda",
                           "--sizes", "1024", "--steps", "6", "--warmup", "2", "--pairs", "conv_lora", "hq_vs_decoder",
                           "--json", str(out / "hq_step_vit_l.json")], 120),
        ("tiled_vit_b", [py, str(HERE / "bench_tiled_predict.py"), "--model-type", "vit_b", "--device", "cuda",
                         "--input-size", "1024", "--image-size", "4096", "--repeats", "2",
                         "--json", str(out / "tiled_vit_b.json")], 80),
        ("train_step_vit_h", [py, str(HERE / "bench_train_step.py"), "--model-type", "vit_h", "--device", "cuda",
                              "--sizes", "1024", "--steps", "5", "--warmup", "2",
                              "--json", str(out / "train_step_vit_h.json")], 150),
        ("prompt_latency", [py, str(HERE / "bench_prompt_latency.py"), "--device", "cuda", "--configs", "vit_b:1024",
                            "vit_h:1024", "--json", str(out / "prompt_latency.json")], 90),
    ]
    if args.smoke:
        parts = smoke_parts(py, out)
    results = {}
    with open(out / "suite.log", "w") as log:
        for name, cmd, timeout in parts:
            if name not in args.skip:
                results[name] = _run(name, cmd, out, timeout, log)
    print(json.dumps(results))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
