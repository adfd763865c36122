"""A reference for what a generated family asks of a model (issue 22): a small U-Net (three levels, 16-32-64
channels, batch norm; about 0.1 M parameters) trained from scratch on the family's training images, with
BCE + Dice over the batch, patches of 128 px (half centred near foreground), flips and rotations, AdamW at 1e-3,
batches of 8. Not a product row: it says whether a family's goal is reachable by a plain convolutional network at
all, and at what cost, before the plugin's heads are blamed or tuned.

    OMP_NUM_THREADS=1 python benchmarks/unet_reference.py --family tiny_lesions --steps 1000 --threads 1 \\
        --json benchmarks/adaptation_results/unet_reference_tiny_lesions.json

Prints the held-out foreground Dice (pooled over the held-out images, threshold 0.5) every ``--every`` steps.
Binary families only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adaptation_data import family_loaders  # noqa: E402

PATCH = 128
BATCH = 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="tiny_lesions")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    family = family_loaders()[args.family]()
    if family.num_classes != 2 or family.label_mode != "dense":
        print(f"unet_reference: {args.family} is not a dense binary family", file=sys.stderr)
        return 1
    grey = [(im.astype(np.float32) / 255 if im.ndim == 2 else im.mean(-1).astype(np.float32) / 255,
             (lab > 0).astype(np.float32)) for im, lab, _ in family.train]

    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

    class UNet(nn.Module):
        def __init__(self, c: int = 16) -> None:
            super().__init__()
            self.e1, self.e2, self.e3 = block(1, c), block(c, 2 * c), block(2 * c, 4 * c)
            self.d2, self.d1, self.out = block(6 * c, 2 * c), block(3 * c, c), nn.Conv2d(c, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # B x 1 x H x W (H, W divisible by 4) -> logits
            a = self.e1(x)
            b = self.e2(F.max_pool2d(a, 2))
            c = self.e3(F.max_pool2d(b, 2))
            b = self.d2(torch.cat([F.interpolate(c, scale_factor=2), b], 1))
            return self.out(self.d1(torch.cat([F.interpolate(b, scale_factor=2), a], 1)))

    net = UNet()
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3)

    def patch() -> tuple[np.ndarray, np.ndarray]:
        image, target = grey[int(rng.integers(len(grey)))]
        if rng.random() < 0.5 and target.any():
            ys, xs = np.nonzero(target)
            k = int(rng.integers(len(ys)))
            y, x = ys[k] - PATCH // 2 + int(rng.integers(-40, 40)), xs[k] - PATCH // 2 + int(rng.integers(-40, 40))
        else:
            y, x = (int(v) for v in rng.integers(0, np.array(image.shape) - PATCH + 1))
        y, x = int(np.clip(y, 0, image.shape[0] - PATCH)), int(np.clip(x, 0, image.shape[1] - PATCH))
        a, b = image[y:y + PATCH, x:x + PATCH], target[y:y + PATCH, x:x + PATCH]
        turns = int(rng.integers(4))
        a, b = np.rot90(a, turns), np.rot90(b, turns)
        if rng.random() < 0.5:
            a, b = a[:, ::-1], b[:, ::-1]
        return np.ascontiguousarray(a), np.ascontiguousarray(b)

    def held_out_dice() -> float:
        net.eval()
        inter = predicted = truth = 0
        with torch.no_grad():
            for held in family.held_out:
                image = held.image if held.image.ndim == 2 else held.image.mean(-1)
                h, w = image.shape
                padded = np.pad(image.astype(np.float32) / 255, ((0, -h % 4), (0, -w % 4)), mode="reflect")
                found = net(torch.from_numpy(padded)[None, None]).sigmoid()[0, 0, :h, :w].numpy() > 0.5
                scored = held.labels > 0
                inter += int((found & scored).sum())
                predicted += int(found.sum())
                truth += int(scored.sum())
        net.train()
        return 2 * inter / max(predicted + truth, 1)

    history, started = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        pairs = [patch() for _ in range(BATCH)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
        y = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
        logits = net(x)
        prob = logits.sigmoid()
        dice = (2 * (prob * y).sum() + 1) / (prob.sum() + y.sum() + 1)
        loss = F.binary_cross_entropy_with_logits(logits, y) + 1 - dice
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            dice = held_out_dice()
            history.append({"step": step, "dice": dice, "seconds": round(time.perf_counter() - started, 1)})
            print(f"step {step}: loss {float(loss.detach()):.3f} held-out Dice {dice:.3f} "
                  f"({history[-1]['seconds']} s)", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "command": " ".join(["benchmarks/unet_reference.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": platform.platform(), "threads": args.threads, "family": args.family, "seed": args.seed,
            "patch": PATCH, "batch": BATCH, "history": history}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
