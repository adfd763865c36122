"""The GPU benchmark suite: everything to measure the first minutes a CUDA machine is at hand.

Runs, each part in its own subprocess (and process group) with its own time limit, and writes one JSON file per
part into ``--out`` (plus ``suite.log``), so that a part that fails or runs out of time loses only itself; at the
end ``gpu_table.py`` writes ``suite.md`` there: the goals of issue 14 and every table, each row naming its card.

1. ``machine``: GPU name, memory, driver, torch and CUDA versions.
2. ``train_step_vit_b``: ``bench_train_step.py`` on vit_b at 256, 512 and 1024 px (decoder, LoRA,
   Conv-LoRA; bf16 autocast; peak ``max_memory_allocated``; paired Conv-LoRA / LoRA ratio).
3. ``e2e``: the real training loop on CUDA (``train``), stopped and resumed, against an uninterrupted
   run (how exact resume is on a GPU), and the CUDA prediction against the CPU prediction of the same model.
4. ``expert_variants``: ``bench_expert_variants.py``: each scale expert alone in bf16 and fp32, Conv-LoRA
   steps with the experts run different ways paired with LoRA (batch 1 and 4), GPU time per step.
5. ``train_step_vit_h``: as 2, at 1024 px on vit_h (the backbone of the Conv-LoRA paper's preset).
6. ``hq_step_vit_l``: ``bench_hq_step.py`` on vit_l at 1024 px: Conv-LoRA with and without HQ-SAM's fusion, and
   HQ-SAM's own regime against decoder-only, in alternation (HQ-SAM's paper: about 4 % slower inference on ViT-L).
7. ``prompt_latency``: ``bench_prompt_latency.py``: one prompt on a cached window, vit_b and vit_h at 1024 px.
8. ``tiled_vit_b``: ``bench_tiled_predict.py``, 1024 px tiles over a 4096 x 4096 image.
9. ``checkpointing_vit_h``: ``bench_train_step.py --one-process`` on vit_h at 1024 px, decoder / LoRA /
   Conv-LoRA in bf16 with activation checkpointing off and on: step time, peak memory beyond the model and
   absolute and, with checkpointing, whether two steps run with CUDA memory capped as on a 12 GB card (the goal:
   vit_h Conv-LoRA in bf16 with checkpointing fits 12 GB).
10. ``mfu_vit_b``: vit_b at 1024 px, bf16, batch 1 and 4: each step's FLOPs (``FlopCounterMode``) and the model
    FLOPs utilisation against the card's dense bf16 peak (goal: 40 %).
11. ``checkpointing_vit_b`` (fp32 and bf16), ``checkpointing_vit_l`` (bf16): as 9.
12. ``worker_thread``: ``bench_thread_step.py``: the training generator driven on the main thread against a
    plain ``threading.Thread`` (the dock's compute thread without Qt; napari and Qt are not on the GPU
    machines): steps per second, and the main thread's longest wait for the GIL.
13. ``fast_attention_vit_b``: ``bench_fast_attention.py`` on vit_b at 1024 px, bf16, batch 1 and 4, LoRA and
    Conv-LoRA: the encoder's attention through ``scaled_dot_product_attention`` (relative positions as a bias)
    against SAM's own, steps paired in alternation: time, peak memory, MFU (whether ``"auto"`` should use SDPA
    on CUDA: ``AUTO_FAST_ATTENTION`` in ``modeling/fast_attention.py``).

Run on a CUDA machine (about 10 minutes on one H100/H200, parts 9-12 about 3 of them)::

    python benchmarks/gpu_suite.py --out gpu_results
    python benchmarks/gpu_suite.py --out gpu_results_2 --budget 230 --parts checkpointing_vit_h mfu_vit_b \
        checkpointing_vit_b checkpointing_vit_l worker_thread
    python benchmarks/gpu_suite.py --out gpu_results_3 --parts fast_attention_vit_b mfu_vit_b  # about 2 minutes

``--parts`` runs only the parts named (in the order above), ``--skip`` leaves the parts named out, ``--budget``
cuts every part's limit to the seconds left. ``--smoke`` runs every part on the CPU with the tiny SAM in about a
minute (``tests/test_gpu_suite.py``, in CI): it checks that the suite and ``suite.md`` work, and measures nothing.
``python benchmarks/gpu_table.py FOLDER [FOLDER ...]`` writes ``suite.md`` again, from several sessions' results.

Random-weight SAMs only: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu_table import write_table  # noqa: E402


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _run(name: str, cmd: list[str], out: Path, timeout: float, log) -> bool:
    """Run one part in its own process group; on timeout the whole group is killed (a benchmark's child
    processes too, which would otherwise keep the GPU busy during the next part)."""
    start = time.perf_counter()
    log.write(f"\n=== {name}: {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        ok = proc.returncode == 0
        log.write(stdout[-6000:] + "\n" + stderr[-6000:] + "\n")
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        ok = False
        log.write(f"TIMEOUT after {timeout:.0f} s\n{stdout[-3000:]}\n{stderr[-3000:]}\n")
    except BaseException:  # interrupted or terminated: take the part's processes along
        _kill_group(proc)
        raise
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
        *[(name, [py, str(HERE / "bench_train_step.py"), "--model-type", "tiny", *cpu, "--sizes", "64", "--precision",
                  "fp32", *extra, "--one-process", "--steps", "1", "--warmup", "0", "--json", str(out / f"{name}.json")],
           120) for name, extra in (
            ("checkpointing_vit_h", ["--checkpointing", "on", "--methods", "conv_lora", "--fit-gib", "12"]),
            ("mfu_vit_b", ["--methods", "conv_lora", "--batch", "2", "--flops"]),
            ("checkpointing_vit_b", ["--checkpointing", "off", "on", "--methods", "decoder", "conv_lora", "--fit-gib", "12"]),
            ("checkpointing_vit_l", ["--checkpointing", "on", "--methods", "conv_lora", "--fit-gib", "12"]))],
        ("worker_thread", [py, str(HERE / "bench_thread_step.py"), "--model-type", "tiny", *cpu, "--input-size", "64",
                           "--steps", "4", "--skip", "1", "--rounds", "1", "--json", str(out / "worker_thread.json")], 120),
        ("fast_attention_vit_b", [py, str(HERE / "bench_fast_attention.py"), "--model-type", "tiny", *cpu, "--sizes",
                                  "64", "--steps", "1", "--warmup", "0", "--flops", "--no-rss",
                                  "--json", str(out / "fast_attention_vit_b.json")], 120),
    ]


def gpu_parts(py: str, out: Path) -> list[tuple[str, list[str], float]]:
    """The suite's parts on CUDA: (name, command, time limit in seconds)."""
    def train_step(name: str, model: str, *args: str) -> list[str]:
        return [py, str(HERE / "bench_train_step.py"), "--model-type", model, "--device", "cuda", *args,
                "--json", str(out / f"{name}.json")]

    ckpt = ["--sizes", "1024", "--checkpointing", "off", "on", "--one-process", "--fit-gib", "12", "--warmup", "1"]
    return [
        ("train_step_vit_b", train_step("train_step_vit_b", "vit_b", "--sizes", "256", "512", "1024", "--steps", "8",
                                        "--warmup", "2"), 260),
        ("e2e", [py, str(HERE / "gpu_e2e.py"), "--json", str(out / "e2e.json")], 90),
        ("expert_variants", [py, str(HERE / "bench_expert_variants.py"), "--sizes", "512", "1024", "--batch", "1", "4",
                             "--json", str(out / "expert_variants.json")], 150),
        ("train_step_vit_h", train_step("train_step_vit_h", "vit_h", "--sizes", "1024", "--steps", "5", "--warmup", "2"),
         150),
        ("hq_step_vit_l", [py, str(HERE / "bench_hq_step.py"), "--model-type", "vit_l", "--device", "cuda",
                           "--sizes", "1024", "--steps", "6", "--warmup", "2", "--pairs", "conv_lora", "hq_vs_decoder",
                           "--json", str(out / "hq_step_vit_l.json")], 120),
        ("prompt_latency", [py, str(HERE / "bench_prompt_latency.py"), "--device", "cuda", "--configs", "vit_b:1024",
                            "vit_h:1024", "--json", str(out / "prompt_latency.json")], 90),
        ("tiled_vit_b", [py, str(HERE / "bench_tiled_predict.py"), "--model-type", "vit_b", "--device", "cuda",
                         "--input-size", "1024", "--image-size", "4096", "--repeats", "2",
                         "--json", str(out / "tiled_vit_b.json")], 80),
        ("checkpointing_vit_h", train_step("checkpointing_vit_h", "vit_h", *ckpt, "--precision", "bf16",
                                           "--steps", "3"), 120),
        ("mfu_vit_b", train_step("mfu_vit_b", "vit_b", "--sizes", "1024", "--precision", "bf16", "--batch", "1", "4",
                                 "--one-process", "--flops", "--steps", "6", "--warmup", "2"), 90),
        ("checkpointing_vit_b", train_step("checkpointing_vit_b", "vit_b", *ckpt, "--precision", "fp32", "bf16",
                                           "--steps", "4"), 90),
        ("checkpointing_vit_l", train_step("checkpointing_vit_l", "vit_l", *ckpt, "--precision", "bf16",
                                           "--steps", "3"), 90),
        ("worker_thread", [py, str(HERE / "bench_thread_step.py"), "--model-type", "vit_b", "--device", "cuda",
                           "--input-size", "1024", "--steps", "12", "--skip", "2", "--rounds", "2",
                           "--json", str(out / "worker_thread.json")], 100),
        ("fast_attention_vit_b", [py, str(HERE / "bench_fast_attention.py"), "--model-type", "vit_b", "--device", "cuda",
                                  "--sizes", "1024", "--precision", "bf16", "--batch", "1", "4", "--methods", "lora",
                                  "conv_lora", "--steps", "5", "--warmup", "2", "--flops",
                                  "--json", str(out / "fast_attention_vit_b.json")], 90),
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
    parser.add_argument("--out", default="gpu_results", help="folder for the JSON files, suite.log and suite.md")
    parser.add_argument("--parts", nargs="+", help="run only these parts (default: all)")
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip (train_step_vit_h, tiled_vit_b, ...)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole suite: each part's limit "
                        "is cut to what is left, and a part with under 20 s left is skipped (recorded as such)")
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU with the tiny SAM and the "
                        "smallest sizes, in about a minute: checks that the suite runs (what CI does), measures nothing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    py = sys.executable
    parts = smoke_parts(py, out) if args.smoke else gpu_parts(py, out)
    unknown = set(args.parts or []) - {name for name, _, _ in parts}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; the parts: {', '.join(name for name, _, _ in parts)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that a running part's group is killed too
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    (out / "machine.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info), flush=True)
    results: dict[str, bool] = {}
    deadline = None if args.budget is None else time.perf_counter() + args.budget
    with open(out / "suite.log", "a") as log:
        log.write(f"\n##### {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n")
        for name, cmd, timeout in parts:
            if name in args.skip or (args.parts and name not in args.parts):
                continue
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left < 20:
                log.write(f"\n=== {name}: skipped, {max(left, 0):.0f} s of the --budget left\n")
                print(f"{name}: skipped (budget)", flush=True)
                results[name] = False
                continue
            results[name] = _run(name, cmd, out, timeout if left is None else min(timeout, left), log)
        try:
            print(f"tables: {write_table([out])}", flush=True)
        except Exception as error:  # the JSON files are what counts; say why the summary is missing
            log.write(f"\n=== suite.md: FAILED: {error!r}\n")
            print(f"suite.md: FAILED ({error!r})", flush=True)
            results["suite.md"] = False
    print(json.dumps(results))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
