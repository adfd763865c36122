"""The GPU benchmark suite runs end to end (its CPU smoke mode, with the tiny SAM): a GPU session can trust it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def test_every_part_of_the_gpu_suite_runs_in_smoke_mode(tmp_path):
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    log = (tmp_path / "suite.log").read_text() if (tmp_path / "suite.log").exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == {"train_step_vit_b", "expert_variants", "e2e", "hq_step_vit_l", "tiled_vit_b",
                            "prompt_latency"} and all(results.values())
    for name in results:
        assert json.loads((tmp_path / f"{name}.json").read_text())
