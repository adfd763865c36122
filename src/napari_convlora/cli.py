"""``napari-convlora``: train, predict, evaluate, info and demo from a terminal (no Qt, no napari)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Sequence

from .sam_architecture import CheckpointError


def _layout(args: argparse.Namespace):
    from .data import ImageLayout

    channels = tuple(int(c) for c in args.channels.split(",")) if args.channels else None
    return ImageLayout(rgb=args.rgb, channel_axis=args.channel_axis, channels=channels,
                       percentiles=(args.low_percentile, args.high_percentile))


def _add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rgb", action="store_true", help="the last axis holds RGB(A) colours")
    p.add_argument("--channel-axis", type=int, default=None, help="axis of a multichannel image")
    p.add_argument("--channels", default=None, help="channels to use, e.g. 0,2 (for more than 3 channels)")
    p.add_argument("--low-percentile", type=float, default=1.0)
    p.add_argument("--high-percentile", type=float, default=99.8)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])


def _load(args: argparse.Namespace):
    from .files import load_model

    return load_model(args.model, base=args.checkpoint, check_base_hash=not args.ignore_base_hash)


def cmd_train(args: argparse.Namespace) -> int:
    from .dataset import TrainingPair, prepare_training_data
    from .image_io import read_image
    from .progress import TerminalProgress
    from .train import TrainConfig, train

    if len(args.image) != len(args.labels):
        raise ValueError(f"{len(args.image)} --image but {len(args.labels)} --labels: give them in pairs")
    layout = _layout(args)
    pairs = [TrainingPair(read_image(i), read_image(l), layout) for i, l in zip(args.image, args.labels)]
    val = [TrainingPair(read_image(i), read_image(l), layout) for i, l in zip(args.val_image, args.val_labels)]
    adapter_options = {k: v for k, v in {"rank": args.rank, "alpha": args.alpha, "num_experts": args.experts,
                                         "top_k": args.top_k}.items() if v is not None}
    if args.weight_by_gate:
        adapter_options["weight_by_gate"] = True
    config = TrainConfig(
        method=args.method, input_size=args.input_size, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, device=args.device,
        precision=args.precision, activation_checkpointing=args.activation_checkpointing, seed=args.seed,
        num_mask_tokens=args.mask_tokens, adapter_options=adapter_options, val_every=args.val_every,
    )
    data = prepare_training_data(
        pairs, args.label_mode, args.background_value, args.input_size, args.val_fraction, val,
        args.rescale, augment=not args.no_augment, seed=args.seed,
        class_names=args.class_names.split(",") if args.class_names else None,
    )
    stop = threading.Event()
    progress = TerminalProgress()
    try:
        for event in train(args.checkpoint, data, args.out, config, resume_from=args.resume, stop=stop):
            progress.show(event)
    except KeyboardInterrupt:
        progress.close()
        print("interrupted: run again with --resume to continue from the last save", file=sys.stderr)
        return 130
    progress.close()
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .image_io import read_image, write_image
    from .predict import predict_image

    model = _load(args)
    result = predict_image(model, read_image(args.image), _layout(args), device=args.device, overlap=args.overlap,
                           batch_size=args.batch_size, return_probabilities=args.probabilities is not None,
                           instances=args.instances is not None)
    write_image(args.out, result.labels)
    print(f"labels {result.labels.shape} {result.labels.dtype} -> {args.out}")
    if args.probabilities:
        write_image(args.probabilities, result.probabilities)
        print(f"probabilities -> {args.probabilities}")
    if args.instances:
        write_image(args.instances, result.instances)
        print(f"instances -> {args.instances}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .image_io import read_image
    from .predict import evaluate_image

    model = _load(args)
    metrics = evaluate_image(model, read_image(args.image), read_image(args.labels), _layout(args), device=args.device)
    if args.json:
        print(json.dumps(metrics.to_dict(), indent=2))
    else:
        print(metrics.format(model.config.head.class_names))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .files import describe

    print(json.dumps(describe(args.path), indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out_dir), checkpoint=args.checkpoint, steps=args.steps, device=args.device,
             input_size=args.input_size)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-convlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune SAM on images and their labels")
    p.add_argument("--checkpoint", required=True, help="base SAM checkpoint (.pth), e.g. sam_vit_b_01ec64.pth")
    p.add_argument("--image", action="append", required=True, help="an image file (repeat for several)")
    p.add_argument("--labels", action="append", required=True, help="its label image (same order as --image)")
    p.add_argument("--val-image", action="append", default=[], help="explicit validation image (repeatable)")
    p.add_argument("--val-labels", action="append", default=[], help="its labels")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--method", default="conv_lora", choices=["conv_lora", "lora", "decoder"])
    p.add_argument("--label-mode", default="dense", choices=["dense", "sparse", "instances"])
    p.add_argument("--background-value", type=int, default=None, help="sparse mode: label value of background")
    p.add_argument("--class-names", default=None, help="comma-separated, background first")
    p.add_argument("--input-size", type=int, default=1024, help="SAM input side (1024 native; 512/256 faster)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=None, help="passes over the labelled planes (default 10)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--rescale", type=float, default=1.0, help="resize factor for objects too large/small for SAM")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--weight-by-gate", action="store_true")
    p.add_argument("--mask-tokens", type=int, default=None, help="multi-class: number of mask tokens")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--activation-checkpointing", action="store_true", help="less GPU memory, ~30%% slower")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default=None, help="continue from this adapter file and its .training.pt")
    _add_image_options(p)
    p.set_defaults(func=cmd_train)

    for name, helptext in (("predict", "segment an image"), ("evaluate", "compare a prediction with labels")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="adapter or merged model file (.safetensors)")
        p.add_argument("--checkpoint", default=None, help="base SAM checkpoint (for adapter files)")
        p.add_argument("--ignore-base-hash", action="store_true", help="accept a base with another sha256")
        p.add_argument("--image", required=True)
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--overlap", type=float, default=0.25)
        _add_image_options(p)
        if name == "predict":
            p.add_argument("--out", required=True, help="label image to write (.tif)")
            p.add_argument("--probabilities", default=None, help="also write class probabilities (.tif)")
            p.add_argument("--instances", default=None, help="also write connected components (.tif)")
            p.set_defaults(func=cmd_predict)
        else:
            p.add_argument("--labels", required=True)
            p.add_argument("--json", action="store_true", help="print machine-readable metrics")
            p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="describe a SAM checkpoint, adapter or merged model file")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="fine-tune, predict and evaluate on built-in sample data")
    p.add_argument("--out-dir", default="napari-convlora-demo")
    p.add_argument("--checkpoint", default=None, help="a real SAM checkpoint instead of the tiny random one")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, CheckpointError, FileNotFoundError, RuntimeError) as e:
        print(f"napari-convlora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
