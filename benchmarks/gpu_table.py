"""The GPU suite's results as Markdown: ``suite.md``, with the goals of issue 14 and every table, each row naming
its card.

Reads the JSON files that ``gpu_suite.py`` writes (one per part, plus ``machine.json``) from one or more folders
(say, two GPU sessions' results) and writes one Markdown file. Nothing is measured here; what a part did not
write shows as "not measured". The goals:

- a Conv-LoRA training step takes at most 1.25 x LoRA's (paired ratio where measured, else ratio of medians);
- vit_h Conv-LoRA at 1024 px fits a 12 GB card with bf16 autocast and activation checkpointing (``fits``: two
  steps ran with the allocator capped at 12 GiB less the CUDA context; without that check, the absolute peak
  plus the memory outside the allocator must stay under 12 GiB);
- the training step of vit_b at 1024 px uses at least 40 % of the GPU's dense bf16 peak (model FLOPs
  utilisation: the FLOPs one step executes without recomputation, counted by ``FlopCounterMode``, per second).

Run: ``python benchmarks/gpu_table.py gpu_results [more_results ...] [--out suite.md]`` (default: ``suite.md`` in
the first folder). ``gpu_suite.py`` runs it at its end.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

RATIO_GOAL = 1.25
MEMORY_GOAL_GIB = 12.0
MFU_GOAL = 0.40


def _card(name: str | None) -> str:
    return name.removeprefix("NVIDIA ") if name else "CPU"


def _fmt(value: Any, spec: str = ".3f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["(not measured)", ""]
    right = ["---:" if h.endswith(("s", "MiB", "GiB", "TFLOP/s", "MFU", "ratio", "ms", "px", "batch")) else "---"
             for h in header]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(right) + " |",
            *["| " + " | ".join(r) + " |" for r in rows], ""]


def load(folders: list[Path]) -> list[dict[str, Any]]:
    """Every part's record in ``folders``, each with ``_part`` (the file's stem), ``_folder`` and ``_card`` (the
    folder's GPU from ``machine.json``, which parts that do not name their card inherit)."""
    records = []
    for folder in folders:
        machine_file = folder / "machine.json"
        machine = json.loads(machine_file.read_text()) if machine_file.is_file() else {}
        for path in sorted(folder.glob("*.json")):
            if path.name == "machine.json":
                continue
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict):
                records.append({**record, "_part": path.stem, "_folder": str(folder), "_card": _card(machine.get("gpu")),
                                "_machine": machine})
    return records


MODELS = ("tiny", "vit_b", "vit_l", "vit_h")
METHODS = ("decoder", "lora", "conv_lora")


def _order(r: dict[str, Any]) -> tuple:
    """Rows by card, model, size, batch, method, precision, checkpointing."""
    return (r["_card"], MODELS.index(r["model_type"]) if r.get("model_type") in MODELS else len(MODELS),
            r.get("size", 0), r.get("batch", 1), METHODS.index(r["method"]) if r.get("method") in METHODS else 9,
            str(r.get("precision")), bool(r.get("checkpointing")), r["_part"])


def _train_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of every ``bench_train_step`` record, each with its card, model and part, in :func:`_order`."""
    out = []
    for rec in records:
        if rec.get("benchmark") != "train_step":
            continue
        for row in rec.get("rows", []):
            cuda = str(row.get("device", "")).startswith("cuda")
            out.append({**row, "model_type": row.get("model_type", rec.get("model_type")), "_part": rec["_part"],
                        "_card": _card(rec.get("machine", {}).get("gpu")) if cuda else "CPU"})
    return sorted(out, key=_order)


def _ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for rec in records:
        if rec.get("benchmark") != "train_step":
            continue
        rows = rec.get("rows", [])
        cuda = any(str(r.get("device", "")).startswith("cuda") for r in rows)
        for q in rec.get("ratios", []):
            precision = q.get("precision") or (rows[0].get("precision") if rows else None)
            out.append({**q, "precision": precision, "model_type": rec.get("model_type"), "_part": rec["_part"],
                        "_card": _card(rec.get("machine", {}).get("gpu")) if cuda else "CPU"})
    return out


def _ratio(q: dict[str, Any]) -> float:
    return q.get("paired_ratio", q["median_ratio"])


def _memory_verdict(r: dict[str, Any]) -> tuple[str, str]:
    """(what was measured, verdict) of one row for the 12 GB goal."""
    outside = r.get("outside_allocator_gib")
    measured = f"peak {_fmt(r.get('peak_alloc_gib'), '.2f')} GiB allocated, {_fmt(outside, '.2f')} GiB outside"
    if r.get("fits") is not None:
        return measured + f"; 2 steps capped at {r.get('fit_gib', MEMORY_GOAL_GIB):g} GiB", \
            "**met**" if r["fits"] else "**missed** (out of memory)"
    if r.get("peak_alloc_gib") is None:
        return "no CUDA memory figures", "not measured"
    total = r["peak_alloc_gib"] + (outside or 0.0)
    return measured + " (not run capped)", "**met**" if total <= MEMORY_GOAL_GIB else "**missed**"


def goals(records: list[dict[str, Any]]) -> list[str]:
    rows, ratios = _train_rows(records), _ratios(records)
    table = []
    headline = [q for q in ratios if q["model_type"] == "vit_b" and q["size"] == 1024 and q.get("batch", 1) == 1
                and not q.get("checkpointing") and q.get("precision") == "bfloat16"]
    for q in headline:
        kind = "paired" if "paired_ratio" in q else "medians"
        table.append([f"Conv-LoRA step <= {RATIO_GOAL} x LoRA's (vit_b, 1024 px, bf16, batch 1)", q["_card"],
                      f"{_ratio(q):.2f} ({kind})", "**met**" if _ratio(q) <= RATIO_GOAL else "**missed**"])
    if ratios:
        met = [q for q in ratios if _ratio(q) <= RATIO_GOAL]
        low, high = f"{min(map(_ratio, ratios)):.2f}", f"{max(map(_ratio, ratios)):.2f}"
        table.append([f"Conv-LoRA step <= {RATIO_GOAL} x LoRA's, every configuration measured",
                      ", ".join(sorted({q["_card"] for q in ratios})), low if low == high else f"{low}-{high}",
                      f"met in {len(met)} of {len(ratios)}"])
    fit = [r for r in rows if r.get("model_type") == "vit_h" and r["size"] == 1024 and r["method"] == "conv_lora"
           and r.get("checkpointing") and r.get("precision") == "bfloat16"]
    for r in fit:
        table.append([f"vit_h Conv-LoRA, 1024 px, bf16 + checkpointing, fits {MEMORY_GOAL_GIB:g} GB", r["_card"],
                      *_memory_verdict(r)])
    if not fit:
        table.append([f"vit_h Conv-LoRA, 1024 px, bf16 + checkpointing, fits {MEMORY_GOAL_GIB:g} GB", "–", "–",
                      "not measured"])
    mfu = [r for r in rows if r.get("model_type") == "vit_b" and r["size"] == 1024 and r.get("mfu") is not None
           and not r.get("checkpointing")]
    shown = [r for r in mfu if r["method"] == "conv_lora" and r.get("batch", 1) == 1]
    best = max(mfu, key=lambda r: r["mfu"]) if mfu else None
    for r in shown + ([best] if best is not None and not any(b is best for b in shown) else []):
        table.append([f"MFU >= {MFU_GOAL:.0%} (vit_b, 1024 px, {r['method']}, batch {r.get('batch', 1)}, "
                      f"{r['precision']})", r["_card"],
                      f"{r['mfu']:.1%} ({r['achieved_tflops']:.0f} of {r['peak_tflops']:g} TFLOP/s)",
                      "**met**" if r["mfu"] >= MFU_GOAL else "**missed**"])
    if not mfu:
        table.append([f"MFU >= {MFU_GOAL:.0%} (vit_b, 1024 px, bf16)", "–", "–", "not measured"])
    return ["## Goals", "", *_table(["goal", "card", "measured", "verdict"], table)]


def train_tables(records: list[dict[str, Any]]) -> list[str]:
    rows = _train_rows(records)
    body = []
    for r in rows:
        fits = {True: "yes", False: "no"}.get(r.get("fits"), "–")
        body.append([r["_card"], str(r.get("model_type")), str(r["size"]), str(r.get("batch", 1)), r["method"],
                     r.get("precision", "–"), "on" if r.get("checkpointing") else "off", _fmt(r["median_s"]),
                     _fmt(r.get("peak_mem_mib"), ".0f"), _fmt(r.get("peak_alloc_gib"), ".2f"),
                     _fmt(r.get("achieved_tflops"), ".1f"), _fmt(r.get("mfu"), ".1%"), fits, r["_part"]])
    out = ["## Training steps", "",
           "Median step time; peak MiB: `max_memory_allocated` beyond the model (CPU: peak RSS beyond it); abs. GiB: "
           "the absolute peak with the model on the device; TFLOP/s and MFU from the step's FLOPs counted without "
           "recomputation; fits: two steps ran with CUDA memory capped at 12 GiB less the CUDA context.", "",
           *_table(["card", "model", "px", "batch", "method", "precision", "ckpt", "median s", "peak MiB",
                    "abs. GiB", "TFLOP/s", "MFU", "fits 12 GiB", "part"], body)]
    ratios = [[q["_card"], str(q["model_type"]), str(q["size"]), str(q.get("batch", 1)), str(q.get("precision")),
               "on" if q.get("checkpointing") else "off", f"{q['median_ratio']:.2f}", _fmt(q.get("paired_ratio"), ".2f"),
               "met" if _ratio(q) <= RATIO_GOAL else "missed", q["_part"]] for q in _ratios(records)]
    out += [f"## Conv-LoRA / LoRA step time (goal <= {RATIO_GOAL})", "",
            *_table(["card", "model", "px", "batch", "precision", "ckpt", "medians ratio", "paired ratio", "goal",
                     "part"], ratios)]
    return out


def thread_table(records: list[dict[str, Any]]) -> list[str]:
    body = []
    for rec in records:
        if rec.get("benchmark") != "thread_step":
            continue
        for mode, r in rec.get("results", {}).items():
            body.append([_card(rec.get("gpu")), f"{rec.get('model_type')} {rec.get('method')}",
                         str(rec.get("input_size")), mode, _fmt(r.get("median_steps_per_s"), ".2f"),
                         _fmt(r.get("median_ratio_to_main"), ".3f"), _fmt(r.get("worst_max_gap_ms"), ".0f")])
    return ["## Training on a thread (the dock's compute thread, without Qt)", "",
            "`training.loop.train` driven on the main thread, on a `threading.Thread`, and on one while the main thread "
            "ticks every 10 ms (max gap: the longest the main thread waited for the GIL during the steps).", "",
            *_table(["card", "model", "px", "mode", "steps/s", "vs main ratio", "max gap ms"], body)]


def fast_attention_table(records: list[dict[str, Any]]) -> list[str]:
    """``bench_fast_attention.py``: steps with the encoder's attention through SDPA against SAM's own, paired."""
    body = [[rec["_card"] if r.get("device") != "cpu" else "CPU", str(r.get("model_type")), str(r.get("size")),
             str(r.get("batch")), r.get("method", "–"), str(r.get("precision")), _fmt(r.get("off_median_s")),
             _fmt(r.get("on_median_s")), _fmt(r.get("paired_ratio"), ".3f"), _fmt(r.get("off_peak_mib"), ".0f"),
             _fmt(r.get("on_peak_mib"), ".0f"), _fmt(r.get("off_mfu"), ".1%"), _fmt(r.get("on_mfu"), ".1%")]
            for rec in sorted(records, key=lambda rec: rec["_card"]) if rec.get("benchmark") == "fast_attention"
            for r in rec.get("rows", [])]
    return ["## Encoder attention through SDPA (`fast_attention`)", "",
            "SAM's attention (off) and `scaled_dot_product_attention` with the relative positions as a bias (on), "
            "steps paired in alternation; on/off: median of the paired ratios; MiB: peak beyond the step's start; "
            "MFU from SAM's attention's FLOP count for both.", "",
            *_table(["card", "model", "px", "batch", "method", "precision", "off s", "on s", "on/off ratio",
                     "off MiB", "on MiB", "off MFU", "on MFU"], body)]


def other_tables(records: list[dict[str, Any]]) -> list[str]:
    out = []
    by_part = {}
    for rec in records:
        by_part.setdefault(rec["_part"], []).append(rec)
    body = [[rec["_card"] if rec.get("device") != "cpu" else "CPU", str(s.get("size")), str(s.get("batch")),
             variant, _fmt(v.get("conv_lora_ms"), ".1f"), _fmt(s.get("lora_ms"), ".1f"), _fmt(v.get("paired_ratio"), ".2f")]
            for rec in by_part.get("expert_variants", []) for s in rec.get("steps", [])
            for variant, v in s.items() if isinstance(v, dict)]
    out += ["## Conv-LoRA's experts run different ways (`expert_variants`)", "",
            *_table(["card", "px", "batch", "variant", "Conv-LoRA ms", "LoRA ms", "paired ratio"], body)]
    body = [[_card(rec.get("machine", {}).get("gpu")) if r.get("device") != "cpu" else "CPU",
             str(rec.get("model_type")), str(r.get("size")), str(r.get("pair")), _fmt(r.get("without_median_s")),
             _fmt(r.get("with_hq_median_s")), _fmt(r.get("paired_ratio"), ".2f")]
            for rec in records if rec.get("benchmark") == "hq_step" for r in rec.get("results", [])]
    out += ["## HQ-SAM's fusion (`hq_step`)", "",
            *_table(["card", "model", "px", "pair", "without s", "with HQ s", "paired ratio"], body)]
    body = [[_card(rec.get("machine", {}).get("gpu")) if rec.get("device") != "cpu" else "CPU",
             str(rec.get("model_type")), str(rec.get("input_size")), str(rec.get("image_size")), str(r.get("overlap")),
             str(r.get("tiles")), _fmt(r.get("tiled_s")), _fmt(r.get("ratio"), ".2f"), f"<= {rec.get('goal')}"]
            for rec in records if rec.get("benchmark") == "tiled_predict" for r in rec.get("rows", [])]
    out += ["## Tiled prediction (`tiled_predict`)", "",
            *_table(["card", "model", "tile px", "image px", "overlap", "tiles", "tiled s", "vs encoder ratio", "goal"],
                    body)]
    body = [[rec["_card"] if r.get("device") != "cpu" else "CPU", str(r.get("model")), str(r.get("input_size")),
             _fmt(r.get("cold_ms"), ".1f"), _fmt(r.get("box", {}).get("median_ms"), ".1f"),
             _fmt(r.get("point", {}).get("median_ms"), ".1f")]
            for rec in records if rec.get("benchmark") == "prompt_latency" for r in rec.get("results", [])]
    out += ["## One prompt on a cached plane (`prompt_latency`)", "",
            *_table(["card", "model", "px", "first ms", "box ms", "point ms"], body)]
    body = [[rec["_card"], precision, _fmt(rec[precision].get("run_s"), ".1f"),
             _fmt(rec[precision].get("resume_max_abs_diff"), ".1e"), _fmt(rec[precision].get("peak_cuda_mib"), ".0f")]
            for rec in by_part.get("e2e", []) for precision in ("bf16", "fp32") if isinstance(rec.get(precision), dict)]
    agree = [f"{rec['_card']}: CUDA and CPU labels agree at {rec['predict_cuda_vs_cpu']['label_agreement']:.4%} of "
             f"pixels" for rec in by_part.get("e2e", []) if "predict_cuda_vs_cpu" in rec]
    out += ["## The training loop end to end (`e2e`)", "",
            *_table(["card", "precision", "run s", "resume max diff", "peak MiB"], body), *agree, ""]
    return out


def write_table(folders: list[Path], out: Path | None = None) -> Path:
    """Write ``suite.md`` (or ``out``) from the results in ``folders``; returns its path."""
    folders = [Path(f) for f in folders]
    records = load(folders)
    machines = {}
    for rec in records:
        m = rec["_machine"]
        machines[rec["_card"]] = (f"{rec['_card']}: torch {m.get('torch')} (built for CUDA {m.get('cuda')})"
                                  + (f", {m['nvidia_smi']}" if m.get("nvidia_smi") else ""))
    lines = ["# GPU benchmark suite", "",
             f"Written by `benchmarks/gpu_table.py` on {datetime.date.today()} from "
             + ", ".join(f"`{f}`" for f in folders) + ". Random-weight SAMs; each row names its card.", "",
             *[f"- {m}" for m in machines.values()], "",
             *goals(records), *train_tables(records), *fast_attention_table(records), *thread_table(records),
             *other_tables(records)]
    out = out or folders[0] / "suite.md"
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders of the suite's JSON files")
    parser.add_argument("--out", type=Path, help="the Markdown file (default: suite.md in the first folder)")
    args = parser.parse_args(argv)
    print(write_table(args.folders, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
