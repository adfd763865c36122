"""Pretrain the built-in small SAM on generated scenes with SAM's promptable objective (deterministic).

The model is ``config.SMALL`` (segment_anything's own classes, about 3.8 M parameters, 256 px input), trained
from random weights on scenes drawn by ``pretraining.synthetic.random_scene`` with the objective of
``pretraining.promptable`` (box and point prompts, best-of-three masks for one point, a second round with the
previous mask and a correction point, focal + dice 20 : 1, IoU head). Nothing is downloaded.

Scenes come from a pool that is refreshed as training goes (one new scene per step), each drawn flipped or
rotated at random, because generating a scene costs a tenth of a step on two cores.

The shipped model was made with (2 CPU cores, about 30 minutes)::

    python scripts/pretrain_small_sam.py --steps 3600 --seed 0 --threads 2 \
        --out src/napari_convlora/models/small_sam_256.pth

``--device cuda`` runs it on a GPU (more steps in the same time; the shipped model was made on the CPU).
It writes the checkpoint in the official format (a state dict ``torch.load``-able with ``weights_only=True``)
and ``<out>.json`` beside it: the provenance (script, seed, steps, source commit, sha256, time, torch version,
threads) and the held-out box- and point-prompt mIoU. CI runs a smoke run (``--steps 2 --pool 4``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _dihedral(scene, rng: np.random.Generator):
    """The scene flipped and rotated (image and instances alike)."""
    turns, flip = int(rng.integers(0, 4)), bool(rng.integers(0, 2))
    image, instances = np.rot90(scene.image, turns), np.rot90(scene.instances, turns)
    if flip:
        image, instances = image[:, ::-1], instances[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(instances)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--focal-ramp", type=int, default=1200, help="steps over which the focal weight rises to 20")
    parser.add_argument("--pool", type=int, default=768, help="scenes held at once (one is replaced per step)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the shipped model: cpu)")
    parser.add_argument("--eval-scenes", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--out", required=True, help="checkpoint to write (.pth); provenance goes to <out>.json")
    args = parser.parse_args(argv)

    import torch

    from napari_convlora.io.atomic import sha256_file
    from napari_convlora.config import SMALL
    from napari_convlora.pretraining.promptable import focal_weight_at, image_loss, preprocess, prompt_mious
    from napari_convlora.pretraining.synthetic import random_scene
    from napari_convlora.modeling.sam_build import build_sam
    from napari_convlora.checkpoints.sam_files import save_sam_checkpoint

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    held_out = [random_scene(np.random.default_rng(10_000_000 + i)) for i in range(args.eval_scenes)]
    started = time.perf_counter()
    pool = [random_scene(rng) for _ in range(args.pool)]
    print(f"pool of {len(pool)} scenes in {time.perf_counter() - started:.0f} s", flush=True)

    sam = build_sam(SMALL).to(args.device)
    sam.train()
    params = [p for p in sam.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.999))
    history = []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        picks = rng.integers(0, len(pool), args.batch)
        drawn = [_dihedral(pool[i], rng) for i in picks]
        pool[int(rng.integers(0, len(pool)))] = random_scene(rng)
        images = np.stack([d[0] for d in drawn])
        embeddings = sam.image_encoder(preprocess(sam, images))
        losses, stats = [], []
        for b, (_, instances) in enumerate(drawn):
            loss, stat = image_loss(sam, embeddings[b : b + 1], instances, rng, focal_weight_at(step, args.focal_ramp))
            losses.append(loss)
            stats.append(stat)
        loss = torch.stack(losses).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if not torch.isfinite(loss):
            print(f"step {step + 1}: the loss became {float(loss)}; stopping", file=sys.stderr)
            return 1
        if (step + 1) % 50 == 0 or step == 0:
            ious = [s["iou_round1"] for s in stats if s]
            print(f"step {step + 1}/{args.steps} loss {float(loss.detach()):.4f} train IoU {np.mean(ious):.3f} "
                  f"lr {optimizer.param_groups[0]['lr']:.2e} {time.perf_counter() - started:.0f} s", flush=True)
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            scores = prompt_mious(sam, held_out[:16])
            history.append({"step": step + 1, **scores})
            print(f"step {step + 1}: held-out {scores}", flush=True)
            sam.train()
    seconds = time.perf_counter() - started
    sam.eval()
    scores = prompt_mious(sam, held_out)
    history.append({"step": args.steps, **scores})
    print(f"held-out ({args.eval_scenes} scenes): {scores}", flush=True)
    out = Path(args.out)
    save_sam_checkpoint(sam.cpu(), out)
    record = {
        "model": "napari-convlora built-in small SAM (segment_anything classes, config.SMALL)",
        "parameters": sum(p.numel() for p in sam.parameters()),
        "script": "scripts/pretrain_small_sam.py",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
        "focal_ramp": args.focal_ramp,
        "pool": args.pool, "threads": args.threads, "device": args.device, "seconds": round(seconds),
        "source_commit": _commit(), "torch": torch.__version__, "sha256": sha256_file(out),
        "held_out": {"scenes": args.eval_scenes, "seed": "10000000 + i", **scores}, "history": history,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {out.with_suffix('.json').name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
