"""How good a SAM the built-in model is, before any fine-tuning (issue 24): held-out box- and point-prompt mIoU on
generated scenes (the abstract ones the first model was scored on, and the mixed ones of ``pretraining.scene_mix``)
and zero-shot box IoU on the whole nuclei of the stardist image, measured with segment_anything's own
``SamPredictor`` in windows of the model's input size at the image's native resolution (a window centred on each
nucleus, clipped to the image; one tight box per nucleus; nuclei cut by the image border are skipped).

    OMP_NUM_THREADS=1 python benchmarks/builtin_zero_shot.py --threads 1 \\
        --models builtin /work/pretrain/small_sam_256_v2.pth.state.pt \\
        --json benchmarks/cpu_results/builtin_zero_shot.json

``--models`` takes ``builtin``, SAM checkpoints (.pth) and training states of ``scripts/pretrain_small_sam.py``
(``*.state.pt``: the weights of the step it was saved at). Goals (issue 24): nuclei box IoU >= 0.85, held-out box
mIoU >= 0.80.
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

from adaptation_data import FamilyUnavailable, nuclei_image  # noqa: E402


def load_sam(name: str):
    """(SAM module in eval mode, what it is) for ``builtin``, a .pth checkpoint or a pretraining state."""
    import torch

    from napari_convlora.checkpoints.builtin import builtin_checkpoint
    from napari_convlora.checkpoints.sam_files import load_base
    from napari_convlora.config import SMALL
    from napari_convlora.modeling.sam_build import build_sam

    if name.endswith(".state.pt"):
        state = torch.load(name, map_location="cpu", weights_only=True)
        sam = build_sam(SMALL)
        sam.load_state_dict(state["model"])
        return sam.eval(), f"{name} (step {state['step']})"
    path = builtin_checkpoint() if name == "builtin" else Path(name)
    return load_base(path).sam.eval(), str(path)


def nuclei_box_iou(sam, image: np.ndarray, instances: np.ndarray) -> dict[str, float]:
    """Mean IoU of SamPredictor's single mask for a tight box around each whole nucleus, in a window of the model's
    input size around it (native resolution)."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    side = sam.image_encoder.img_size
    low, high = np.percentile(image, (0.5, 99.8))  # a display range, as a user's contrast limits
    grey = np.clip((image.astype(np.float64) - low) / max(high - low, 1e-9) * 255, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    height, width = instances.shape
    ious = []
    for value in np.unique(instances[instances > 0]):
        ys, xs = np.nonzero(instances == value)
        if ys.min() == 0 or xs.min() == 0 or ys.max() == height - 1 or xs.max() == width - 1:
            continue
        top = int(np.clip((ys.min() + ys.max()) // 2 - side // 2, 0, max(height - side, 0)))
        left = int(np.clip((xs.min() + xs.max()) // 2 - side // 2, 0, max(width - side, 0)))
        window = (slice(top, top + side), slice(left, left + side))
        predictor.set_image(rgb[window])
        box = np.array([xs.min() - left, ys.min() - top, xs.max() - left, ys.max() - top], float)
        masks, _, _ = predictor.predict(box=box, multimask_output=False)
        truth = instances[window] == value
        ious.append(float((masks[0] & truth).sum() / max((masks[0] | truth).sum(), 1)))
    return {"box_iou": float(np.mean(ious)), "nuclei": len(ious)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["builtin"])
    parser.add_argument("--scenes", type=int, default=64, help="held-out generated scenes of each kind")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import torch

    from napari_convlora.pretraining.promptable import prompt_mious
    from napari_convlora.pretraining.scene_mix import mixed_scene
    from napari_convlora.pretraining.synthetic import random_scene

    torch.set_num_threads(args.threads)
    abstract = [random_scene(np.random.default_rng(10_000_000 + i)) for i in range(args.scenes)]
    mixed = [mixed_scene(np.random.default_rng(20_000_000 + i)) for i in range(args.scenes)]
    try:
        full_image, instances = nuclei_image()
    except FamilyUnavailable as error:
        print(f"builtin_zero_shot: {error}", file=sys.stderr)
        full_image = instances = None
    rows = []
    for name in args.models:
        sam, what = load_sam(name)
        started = time.perf_counter()
        with torch.no_grad():
            row = {"model": what, "abstract": prompt_mious(sam, abstract), "mixed": prompt_mious(sam, mixed)}
            if full_image is not None:
                row["nuclei"] = nuclei_box_iou(sam, full_image, instances)
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        nuclei = row.get("nuclei", {}).get("box_iou", float("nan"))
        print(f"{what}: held-out box mIoU {row['abstract']['box_miou']:.3f} (abstract) "
              f"{row['mixed']['box_miou']:.3f} (mixed); point {row['abstract']['point_miou']:.3f} / "
              f"{row['mixed']['point_miou']:.3f}; nuclei box IoU {nuclei:.3f}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(["benchmarks/builtin_zero_shot.py", *(
            argv if argv is not None else sys.argv[1:])]), "machine": platform.platform(), "threads": args.threads,
            "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
