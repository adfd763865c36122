"""What the benchmarks over families and seeds share (``adaptation.py``, ``wesam_adaptation.py``): statistics over
seeds, the choice of families and rows from patterns, and JSON written atomically."""

from __future__ import annotations

import fnmatch
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def summarise(runs: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """family -> row -> metric -> {mean, median, std (sample, None for one run), min, max, n} over the seeds' runs
    (each run a dict with "family", "row" and the metrics; missing and non-finite values left out)."""
    summary: dict = {}
    for run in runs:
        summary.setdefault(run["family"], {}).setdefault(run["row"], []).append(run)
    for rows in summary.values():
        for row, group in rows.items():
            stats = {}
            for metric in metrics:
                values = np.array([r[metric] for r in group if r.get(metric) is not None], float)
                values = values[np.isfinite(values)]
                if values.size:
                    stats[metric] = {"mean": float(values.mean()), "median": float(np.median(values)),
                                     "min": float(values.min()),
                                     "max": float(values.max()), "n": int(values.size),
                                     "std": float(values.std(ddof=1)) if values.size > 1 else None}
            rows[row] = stats
    return summary


def choose(asked: list[str], known: list[str], what: str) -> list[str]:
    chosen = [name for pattern in asked for name in known if fnmatch.fnmatchcase(name, pattern)]
    unknown = [p for p in asked if not any(fnmatch.fnmatchcase(name, p) for name in known)]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {', '.join(known)} (shell patterns allowed)")
    return list(dict.fromkeys(chosen))


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(record), indent=1) + "\n")
    os.replace(tmp, path)
