"""Pretrain the built-in small SAM on generated scenes with SAM's promptable objective (deterministic).

The model is ``config.SMALL`` (segment_anything's own classes, about 3.8 M parameters, 256 px input), trained
from random weights (or ``--init``) on generated scenes (``--scenes``, below) with the objective of
``pretraining.promptable`` (box and point prompts, best-of-three masks for one point, a second round with the
previous mask and a correction point, focal + dice 20 : 1, IoU head). Nothing is downloaded.

Scenes come from a pool that is refreshed as training goes (one new scene per step), each drawn flipped or
rotated at random, because generating a scene costs a tenth of a step on two cores. ``--scenes mixed`` (the
default since issue 24) draws them from ``pretraining.scene_mix``: the abstract scenes mixed with scenes like what
users image (fluorescent nuclei, cell sheets, filaments, EM, histology, CT / MR); ``--scenes abstract`` draws only
``synthetic.random_scene``, the kind of scenes the first shipped model saw. ``--init`` starts from a SAM checkpoint (the
shipped model, say) instead of random weights.

Long runs: the training state (weights, optimizer, history) is written to ``--state`` (default
``<out>.state.pt``) every ``--save-every`` steps, atomically, and ``--resume`` continues from it exactly: every
scene, batch and prompt of step ``s`` comes from generators seeded by (seed, s), so a run stopped and resumed
trains the same weights as one that never stopped (tested). A resumed run must be given the same settings.

The shipped model was made with (2 CPU cores, about 30 minutes)::

    python scripts/pretrain_small_sam.py --steps 3600 --seed 0 --threads 2 \
        --out src/napari_convlora/models/small_sam_256.pth

by this script at the commit its record names (``source_commit`` in ``small_sam_256.json``), before the mixed
scenes and the seeding by step existed: to make it again, check that commit out. Today the same command trains on
the mixed scenes, and even ``--scenes abstract`` draws the abstract scenes in another order.

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

STATE_FORMAT = "napari-convlora pretraining state 1"


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
    parser.add_argument("--scenes", choices=("mixed", "abstract"), default="mixed",
                        help="mixed (default): abstract scenes and scenes like microscopy, histology and CT; "
                             "abstract: synthetic.random_scene only (the first shipped model)")
    parser.add_argument("--init", help="start from this SAM checkpoint of the small architecture (default: random)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the shipped model: cpu)")
    parser.add_argument("--eval-scenes", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--save-every", type=int, default=100, help="steps between saves of the training state")
    parser.add_argument("--state", help="training state file (default: <out>.state.pt)")
    parser.add_argument("--resume", action="store_true", help="continue from --state (the same settings)")
    parser.add_argument("--stop-at", type=int, help="save the state after this step and stop (resume later)")
    parser.add_argument("--stop-after-minutes", type=float,
                        help="save the state and stop once this invocation has run this long (resume later)")
    parser.add_argument("--out", required=True, help="checkpoint to write (.pth); provenance goes to <out>.json")
    args = parser.parse_args(argv)
    try:
        return _run(args, argv)
    except (OSError, ValueError) as error:
        print(f"pretrain_small_sam: {error}", file=sys.stderr)
        return 1


def _settings(args: argparse.Namespace, init_sha: str | None) -> dict:
    """What a resumed run must share with the run it continues."""
    return {"seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
            "focal_ramp": args.focal_ramp, "pool": args.pool, "scenes": args.scenes, "init_sha256": init_sha}


def _save_state(path: Path, sam, optimizer, step: int, settings: dict, history: list, seconds: float) -> None:
    import torch

    from napari_convlora.io.atomic import atomic_path

    state = {"format": STATE_FORMAT, "step": step, "model": sam.state_dict(), "optimizer": optimizer.state_dict(),
             "settings": json.dumps(settings), "history": json.dumps(history), "seconds": seconds}
    with atomic_path(path) as partial:
        torch.save(state, partial)


def _load_state(path: Path, settings: dict) -> dict:
    import torch

    if not path.is_file():
        raise ValueError(f"--resume: no training state at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a training state of this script")
    saved = json.loads(state["settings"])
    changed = [f"{k} {saved.get(k)} -> {v}" for k, v in settings.items() if saved.get(k) != v]
    if changed:
        raise ValueError(f"{path}: a resumed run needs the settings it started with ({'; '.join(changed)})")
    return state


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    import torch

    from napari_convlora.io.atomic import atomic_path, sha256_file
    from napari_convlora.config import SMALL
    from napari_convlora.pretraining.promptable import focal_weight_at, image_loss, preprocess, prompt_mious
    from napari_convlora.pretraining.scene_mix import MIXES, ScenePool, mixed_scene
    from napari_convlora.pretraining.synthetic import random_scene
    from napari_convlora.modeling.sam_build import build_sam
    from napari_convlora.checkpoints.sam_files import load_base, save_sam_checkpoint

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    state_path = Path(args.state) if args.state else out.with_name(out.name + ".state.pt")
    init_sha = sha256_file(args.init) if args.init else None
    settings = _settings(args, init_sha)
    held_out = [random_scene(np.random.default_rng(10_000_000 + i)) for i in range(args.eval_scenes)]
    held_out_mixed = [mixed_scene(np.random.default_rng(20_000_000 + i)) for i in range(args.eval_scenes)]

    sam = build_sam(SMALL)
    if args.init:
        base = load_base(args.init)
        if base.architecture != SMALL:
            raise ValueError(f"--init {args.init}: not the small architecture this script trains")
        sam.load_state_dict(base.sam.state_dict())
    sam = sam.to(args.device)
    sam.train()
    params = [p for p in sam.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.999))
    first, history, spent = 0, [], 0.0
    if args.resume:
        state = _load_state(state_path, settings)
        sam.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first, history, spent = int(state["step"]), json.loads(state["history"]), float(state["seconds"])
        if args.stop_at is not None and args.stop_at <= first:
            raise ValueError(f"--stop-at {args.stop_at}: the state in {state_path} is already at step {first}")
        print(f"resuming at step {first} from {state_path}", flush=True)
    started = time.perf_counter()
    pool = ScenePool(args.seed, args.pool, kinds=MIXES[args.scenes], step=first)
    print(f"pool of {args.pool} scenes in {time.perf_counter() - started:.0f} s", flush=True)

    def elapsed() -> float:
        return spent + time.perf_counter() - started

    for step in range(first, args.steps):
        rng = np.random.default_rng([args.seed, 1, step])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        picks = rng.integers(0, args.pool, args.batch)
        drawn = [_dihedral(pool.scenes[i], rng) for i in picks]
        pool.advance(step)
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
        if (step + 1) % 50 == 0 or step == first:
            ious = [s["iou_round1"] for s in stats if s]
            print(f"step {step + 1}/{args.steps} loss {float(loss.detach()):.4f} train IoU {np.mean(ious):.3f} "
                  f"lr {optimizer.param_groups[0]['lr']:.2e} {elapsed():.0f} s", flush=True)
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            scores = prompt_mious(sam, held_out[:16])
            mixed = prompt_mious(sam, held_out_mixed[:16])
            history.append({"step": step + 1, **scores, "mixed": mixed})
            print(f"step {step + 1}: held-out {scores}; mixed {mixed}", flush=True)
            sam.train()
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            _save_state(state_path, sam, optimizer, step + 1, settings, history, elapsed())
        out_of_time = args.stop_after_minutes is not None and \
            time.perf_counter() - started > 60 * args.stop_after_minutes
        if step + 1 < args.steps and (step + 1 == args.stop_at or out_of_time):
            _save_state(state_path, sam, optimizer, step + 1, settings, history, elapsed())
            print(f"stopped after step {step + 1}; the state is in {state_path} (continue with --resume)", flush=True)
            return 0
    seconds = elapsed()
    sam.eval()
    scores = prompt_mious(sam, held_out)
    mixed = prompt_mious(sam, held_out_mixed)
    history.append({"step": args.steps, **scores, "mixed": mixed})
    print(f"held-out ({args.eval_scenes} scenes): {scores}; mixed: {mixed}", flush=True)
    save_sam_checkpoint(sam.cpu(), out)
    record = {
        "model": "napari-convlora built-in small SAM (segment_anything classes, config.SMALL)",
        "parameters": sum(p.numel() for p in sam.parameters()),
        "script": "scripts/pretrain_small_sam.py",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
        "focal_ramp": args.focal_ramp, "scenes": args.scenes, "init": args.init, "init_sha256": init_sha,
        "pool": args.pool, "threads": args.threads, "device": args.device, "seconds": round(seconds),
        "source_commit": _commit(), "torch": torch.__version__, "sha256": sha256_file(out),
        "held_out": {"scenes": args.eval_scenes, "seed": "10000000 + i", **scores},
        "held_out_mixed": {"scenes": args.eval_scenes, "seed": "20000000 + i (scene_mix.mixed_scene)", **mixed},
        "history": history,
    }
    with atomic_path(out.with_suffix(".json")) as partial:
        partial.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {out.with_suffix('.json').name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
