"""The GPU benchmark suite runs end to end (its CPU smoke mode, with the tiny SAM): a GPU session can trust it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SUITE = BENCHMARKS / "gpu_suite.py"
PARTS = {"train_step_vit_b", "expert_variants", "e2e", "hq_step_vit_l", "tiled_vit_b", "prompt_latency",
         "checkpointing_vit_h", "mfu_vit_b", "checkpointing_vit_b", "checkpointing_vit_l", "worker_thread",
         "fast_attention_vit_b"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(out)], capture_output=True,
                          text=True, timeout=900)
    return proc, out


def test_every_part_of_the_gpu_suite_runs_in_smoke_mode(smoke):
    proc, out = smoke
    log = (out / "suite.log").read_text() if (out / "suite.log").exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == PARTS and all(results.values())
    for name in results:
        assert json.loads((out / f"{name}.json").read_text())
    rows = json.loads((out / "checkpointing_vit_b.json").read_text())["rows"]
    assert {r["checkpointing"] for r in rows} == {False, True}
    assert all(r["flops_step"] > r["flops_forward"] > 0 for r in json.loads((out / "mfu_vit_b.json").read_text())["rows"])
    fast = json.loads((out / "fast_attention_vit_b.json").read_text())["rows"]
    assert fast and all(r["on_median_s"] > 0 and r["off_flops_step"] > 0 for r in fast)
    modes = json.loads((out / "worker_thread.json").read_text())["results"]
    assert set(modes) == {"main", "thread", "thread+ticks"} and all(m["median_steps_per_s"] > 0 for m in modes.values())


def test_the_suite_writes_suite_md_with_the_goals_and_the_new_tables(smoke):
    _, out = smoke
    text = (out / "suite.md").read_text()
    for goal in ("Conv-LoRA step <= 1.25 x LoRA's", "fits 12 GB", "MFU >= 40%"):
        assert goal in text
    assert "| CPU | tiny | 64 | 1 | decoder | float32 | on |" in text  # a checkpointed row, naming its card
    assert "| CPU | tiny conv_lora | 64 | thread+ticks |" in text
    fast_table = text.split("## Encoder attention through SDPA")[1].split("\n## ")[0]
    assert "| CPU | tiny | 64 | 1 | conv_lora | float32 |" in fast_table


def test_a_spent_budget_skips_the_remaining_parts_and_says_so(tmp_path):
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--budget", "0", "--out", str(tmp_path),
                           "--parts", "mfu_vit_b", "worker_thread"], capture_output=True, text=True, timeout=120)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and results == {"mfu_vit_b": False, "worker_thread": False}
    assert "skipped, 0 s of the --budget left" in (tmp_path / "suite.log").read_text()
    assert "not measured" in (tmp_path / "suite.md").read_text()


def test_an_unknown_part_is_refused_with_the_list_of_parts(tmp_path):
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path), "--parts", "mfu"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown parts ['mfu']" in proc.stderr and "worker_thread" in proc.stderr


def test_the_smoke_mode_has_every_gpu_part():
    sys.path.insert(0, str(BENCHMARKS))
    import gpu_suite

    gpu = {name for name, _, _ in gpu_suite.gpu_parts("python", Path("out"))}
    smoke = {name for name, _, _ in gpu_suite.smoke_parts("python", Path("out"))}
    assert smoke == PARTS and gpu - smoke == {"train_step_vit_h"}  # the script of train_step_vit_b on vit_h


def test_the_goals_are_judged_from_gpu_rows(tmp_path):
    """GPU rows (as bench_train_step writes them on CUDA) give the 12 GB and MFU verdicts, naming the card."""
    sys.path.insert(0, str(BENCHMARKS))
    from gpu_table import write_table

    def row(model, method, ckpt, **extra):
        return {"model_type": model, "method": method, "size": 1024, "batch": 1, "checkpointing": ckpt,
                "device": "cuda", "precision": "bfloat16", "median_s": 0.1, "min_s": 0.1, "max_s": 0.1,
                "peak_mem_mib": 100.0, **extra}

    machine = {"gpu": "NVIDIA H100 80GB HBM3"}
    (tmp_path / "machine.json").write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11"}))
    for name, model, rows in (
        ("checkpointing_vit_h", "vit_h", [row("vit_h", "conv_lora", True, peak_alloc_gib=5.1,
                                              outside_allocator_gib=0.5, fits=True, fit_gib=12)]),
        ("mfu_vit_b", "vit_b", [row("vit_b", "conv_lora", False, mfu=0.12, achieved_tflops=118.7, peak_tflops=989.4),
                                row("vit_b", "lora", False, mfu=0.45, achieved_tflops=445.2, peak_tflops=989.4)]),
    ):
        (tmp_path / f"{name}.json").write_text(json.dumps({"benchmark": "train_step", "machine": machine,
                                                           "model_type": model, "rows": rows, "ratios": []}))
    text = write_table([tmp_path]).read_text()
    assert "| vit_h Conv-LoRA, 1024 px, bf16 + checkpointing, fits 12 GB | H100 80GB HBM3 | peak 5.10 GiB" in text
    assert "capped at 12 GiB | **met** |" in text
    assert "| MFU >= 40% (vit_b, 1024 px, conv_lora, batch 1, bfloat16) | H100 80GB HBM3 | 12.0%" in text
    assert "(vit_b, 1024 px, lora, batch 1, bfloat16) | H100 80GB HBM3 | 45.0% (445 of 989.4 TFLOP/s) | **met** |" in text
